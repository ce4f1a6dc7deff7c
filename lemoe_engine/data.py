"""Edit records: the loader for ZsRE / EasyEdit files and the bundled edit set.

Two record forms are accepted, in a JSON list or in JSONL (one object per line):

* ZsRE (MEND / EasyEdit ``zsre_mend_eval.json``): ``src``, ``alt``, ``rephrase``, ``loc``,
  ``loc_ans``, optional ``subject``; other keys (``answers``, ``pred``, ``cond``, ...) are
  ignored.
* Flattened EasyEdit / KnowEdit: ``prompt``, ``target_new``, ``rephrase_prompt``,
  ``locality_prompt``, ``locality_ground_truth``, optional ``subject``; ``target_new`` and
  ``locality_ground_truth`` may be a list, whose first element is taken.

Optional in either form: ``relation`` and same-subject *specificity* prompts (other relations of
the same subject, scored against the unedited model like locality, never trained on): ZsRE form
``specificity`` / ``specificity_ans`` (+ ``specificity_relation``), each a string or a list;
EasyEdit form ``relation_specificity_prompt`` / ``relation_specificity_ground_truth``, or
KnowEdit's nested ``locality: {"Relation_Specificity": [{"prompt", "ground_truth"}]}``.

Every problem raises :class:`~lemoe_engine.errors.EditDataError` naming the file, the
record (and line, for JSONL) and the field. No record is ever dropped silently. Text
fields are stripped of surrounding whitespace.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from .errors import ConfigError, EditDataError

DATA_DIR = Path(__file__).resolve().parent / "data"
BUNDLED_EDITS = DATA_DIR / "country_edits.jsonl"
BUNDLED_UNRELATED = DATA_DIR / "unrelated_prompts.txt"
BUNDLED_UNRELATED_POOL = DATA_DIR / "unrelated_pool.txt"
"""3,135 real-looking questions and sentences the bundled model wrote (``scripts/build_unrelated_pool.py``),
disjoint from every scored prompt of the bundled set and of the shared ZsRE file."""

# record field -> (ZsRE key, EasyEdit key)
_FIELDS = {
    "prompt": ("src", "prompt"),
    "target": ("alt", "target_new"),
    "rephrase": ("rephrase", "rephrase_prompt"),
    "loc_prompt": ("loc", "locality_prompt"),
    "loc_answer": ("loc_ans", "locality_ground_truth"),
}
_ZSRE_KEYS = tuple(z for z, _ in _FIELDS.values())
_EASY_KEYS = tuple(e for _, e in _FIELDS.values())
_LIST_OK = {"target_new", "locality_ground_truth"}


@dataclass(frozen=True)
class EditRecord:
    """One counterfactual edit plus the unrelated question scored for locality."""

    prompt: str  # edit prompt ("src")
    target: str  # new answer ("alt"), non-empty
    rephrase: str  # paraphrase prompt
    loc_prompt: str  # unrelated prompt (scored for locality only; never trained on)
    loc_answer: str  # its answer
    subject: str | None = None
    relation: str | None = None  # optional relation name ("relation" key), e.g. "capital"
    # Same-subject prompts about OTHER relations, scored like locality (the unedited model's answer
    # must stay): ZsRE form ``specificity`` / ``specificity_ans`` (string or list, same length),
    # optional ``specificity_relation``; EasyEdit form ``relation_specificity_prompt`` /
    # ``relation_specificity_ground_truth`` or KnowEdit's ``locality: {"Relation_Specificity":
    # [{"prompt", "ground_truth"}, ...]}``. Never trained on.
    specificity: tuple[str, ...] = ()
    specificity_ans: tuple[str, ...] = ()
    specificity_relation: tuple[str | None, ...] = ()


def _text(value: Any, key: str, where: str) -> str:
    if key in _LIST_OK and isinstance(value, list):
        if not value:
            raise EditDataError(f"{where}: field '{key}' is an empty list")
        value = value[0]
    if not isinstance(value, str):
        kind = "a string or a list of strings" if key in _LIST_OK else "a string"
        raise EditDataError(
            f"{where}: field '{key}' must be {kind}, got {type(value).__name__}"
        )
    if not value.strip():
        raise EditDataError(f"{where}: field '{key}' must be a non-empty string")
    return value.strip()


def _record(obj: Any, where: str) -> EditRecord:
    if not isinstance(obj, dict):
        raise EditDataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    zsre = [k for k in _ZSRE_KEYS if k in obj]
    easy = [k for k in _EASY_KEYS if k in obj]
    if zsre and easy:
        raise EditDataError(
            f"{where}: mixes ZsRE fields ({', '.join(zsre)}) with EasyEdit fields "
            f"({', '.join(easy)}); use one form per record"
        )
    if not zsre and not easy:
        raise EditDataError(
            f"{where}: no edit fields found; expected ZsRE keys ({', '.join(_ZSRE_KEYS)}) "
            f"or EasyEdit keys ({', '.join(_EASY_KEYS)})"
        )
    keys = _ZSRE_KEYS if zsre else _EASY_KEYS
    values = {}
    for field, key in zip(_FIELDS, keys):
        if key not in obj:
            raise EditDataError(f"{where}: missing field '{key}'")
        values[field] = _text(obj[key], key, where)
    subject = obj.get("subject")
    if subject is not None:
        if not isinstance(subject, str) or not subject.strip():
            raise EditDataError(f"{where}: field 'subject' must be a non-empty string or null")
        subject = subject.strip()
    return EditRecord(subject=subject, **values, **_specificity(obj, bool(zsre), where))


_SPEC_KEYS = {True: ("specificity", "specificity_ans", "specificity_relation"),
              False: ("relation_specificity_prompt", "relation_specificity_ground_truth",
                      "relation_specificity_relation")}


def _text_list(value: Any, key: str, where: str) -> list[str]:
    items = value if isinstance(value, list) else [value]
    return [_text(v, key, where) for v in items]


def _specificity(obj: dict, zsre: bool, where: str) -> dict:
    """The optional ``relation`` and same-subject specificity fields of a record."""
    out: dict[str, Any] = {}
    relation = obj.get("relation")
    if relation is not None:
        out["relation"] = _text(relation, "relation", where)
    p_key, a_key, r_key = _SPEC_KEYS[zsre]
    nested = obj.get("locality") if not zsre else None
    if isinstance(nested, dict) and "Relation_Specificity" in nested and p_key not in obj:
        items = nested["Relation_Specificity"]
        if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
            raise EditDataError(f"{where}: 'locality.Relation_Specificity' must be a list of objects "
                                "with 'prompt' and 'ground_truth'")
        key = "locality.Relation_Specificity"
        prompts = [_text(i.get("prompt"), "prompt", f"{where}: {key}") for i in items]
        answers = [_text(_first(i.get("ground_truth")), "ground_truth", f"{where}: {key}") for i in items]
        relations = [i.get("relation") for i in items]
    elif p_key in obj or a_key in obj:
        if p_key not in obj or a_key not in obj:
            raise EditDataError(f"{where}: '{p_key}' and '{a_key}' must be given together")
        prompts, answers = _text_list(obj[p_key], p_key, where), _text_list(obj[a_key], a_key, where)
        raw = obj.get(r_key)
        relations = [None] * len(prompts) if raw is None else (raw if isinstance(raw, list) else [raw])
    else:
        return out
    if not prompts:
        return out
    if len(prompts) != len(answers) or len(relations) != len(prompts):
        raise EditDataError(f"{where}: '{p_key}' has {len(prompts)} prompts but {len(answers)} answers"
                            f" and {len(relations)} relations; give one answer (and relation) per prompt")
    if not all(r is None or (isinstance(r, str) and r.strip()) for r in relations):
        raise EditDataError(f"{where}: every specificity relation must be a non-empty string or null")
    out.update(specificity=tuple(prompts), specificity_ans=tuple(answers),
               specificity_relation=tuple(r.strip() if r else None for r in relations))
    return out


def _first(value: Any) -> Any:
    """KnowEdit's ground_truth may be a list (of lists) of aliases: take the first."""
    while isinstance(value, list) and value:
        value = value[0]
    return value


def _json_error(name: str, err: json.JSONDecodeError, line: int | None = None) -> EditDataError:
    at = f"line {line if line is not None else err.lineno}, column {err.colno}"
    return EditDataError(f"{name}: invalid JSON at {at}: {err.msg}")


def _iter_jsonl(text: str, name: str) -> Iterator[tuple[Any, str]]:
    """(object, where) per non-blank line; a line that is not JSON gives (EditDataError, where)."""
    number = 0
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        number += 1
        where = f"{name}: record {number} (line {lineno})"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            if number == 1:  # maybe a pretty-printed JSON document, not JSONL
                try:
                    whole = json.loads(text)
                except json.JSONDecodeError:
                    pass
                else:
                    raise EditDataError(
                        f"{name}: expected a JSON list of edit records or JSONL (one object "
                        f"per line), got a single JSON {type(whole).__name__}"
                    ) from None
            yield _json_error(name, err, line=lineno), where
            continue
        yield obj, where


def _iter_json(text: str, name: str) -> Iterator[tuple[Any, str]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise _json_error(name, err) from None
    if not isinstance(data, list):
        raise EditDataError(
            f"{name}: expected a JSON list of edit records, got a {type(data).__name__}"
        )
    if not data:
        raise EditDataError(f"{name}: the JSON list holds no edit records")
    for number, obj in enumerate(data, start=1):
        yield obj, f"{name}: record {number}"


@dataclass(frozen=True)
class SkippedRecord:
    """A record ``load_edits(..., skip_invalid=True)`` left out, and why."""

    number: int  # 1-based record number in the file (blank JSONL lines not counted)
    reason: str  # the error message it would have raised


class EditList(list):
    """The records ``load_edits`` returns (a plain list of EditRecord) plus ``skipped``: the
    invalid records left out with ``skip_invalid=True`` (always empty without it)."""

    def __init__(self, records: Iterable[EditRecord] = (), skipped: Iterable[SkippedRecord] = ()) -> None:
        super().__init__(records)
        self.skipped: list[SkippedRecord] = list(skipped)

    def skipped_summary(self, shown: int = 5) -> str:
        """One line naming how many records were skipped and the first few with their reasons."""
        if not self.skipped:
            return "no invalid records"
        parts = [f"record {s.number} ({s.reason.split(': ', 2)[-1]})" for s in self.skipped[:shown]]
        more = f" and {len(self.skipped) - shown} more" if len(self.skipped) > shown else ""
        return f"skipped {len(self.skipped)} invalid record(s): {'; '.join(parts)}{more}"


def load_edits(path: str | os.PathLike, limit: int | None = None,
               skip_invalid: bool = False) -> EditList:
    """Read and validate an edit file (JSON list or JSONL); return its first ``limit`` records.

    An invalid record raises EditDataError naming it; with ``skip_invalid=True`` invalid records
    are left out instead and listed in the result's ``skipped`` (``limit`` counts valid records).
    Problems with the file as a whole (missing, not UTF-8, not a JSON list) always raise.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"limit must be a positive integer or None, got {limit!r}")
    path = Path(path).expanduser()
    name = str(path)
    if not path.exists():
        raise EditDataError(f"edit file not found: {name}")
    if not path.is_file():
        raise EditDataError(f"edit file is not a regular file: {name}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise EditDataError(f"{name}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise EditDataError(f"{name}: cannot read: {err.strerror or err}") from None
    stripped = text.lstrip()
    if not stripped:
        raise EditDataError(f"{name}: the file is empty; expected edit records")
    # .jsonl -> JSONL; otherwise by content: a JSON list starts with '[', JSONL with '{'.
    is_jsonl = path.suffix.lower() == ".jsonl" or not stripped.startswith("[")
    records, skipped = [], []
    for number, (obj, where) in enumerate((_iter_jsonl if is_jsonl else _iter_json)(text, name), start=1):
        try:
            if isinstance(obj, EditDataError):
                raise obj
            records.append(_record(obj, where))
        except EditDataError as err:
            if not skip_invalid:
                raise EditDataError(f"{err} (pass skip_invalid=True, CLI --skip-invalid, to skip "
                                    f"invalid records and report them)") from None
            skipped.append(SkippedRecord(number, str(err)))
        if limit is not None and len(records) >= limit:
            break
    if not records:
        raise EditDataError(f"{name}: no valid edit records ({len(skipped)} invalid, first: "
                            f"{skipped[0].reason})")
    return EditList(records, skipped)


def save_edits(edits: Iterable[EditRecord], path: str | os.PathLike) -> Path:
    """Write edits as JSONL in the ZsRE form (``subject`` only when set); return the path."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for e in edits:
        if not isinstance(e, EditRecord):
            raise ConfigError(f"save_edits expects EditRecord items, got {type(e).__name__}")
        obj = {"src": e.prompt, "alt": e.target, "rephrase": e.rephrase,
               "loc": e.loc_prompt, "loc_ans": e.loc_answer}
        if e.subject is not None:
            obj = {"subject": e.subject, **obj}
        if e.relation is not None:
            obj["relation"] = e.relation
        if e.specificity:
            obj.update(specificity=list(e.specificity), specificity_ans=list(e.specificity_ans))
            if any(r is not None for r in e.specificity_relation):
                obj["specificity_relation"] = list(e.specificity_relation)
        lines.append(json.dumps(obj, ensure_ascii=False))
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


@functools.lru_cache(maxsize=1)
def _unrelated() -> tuple[str, ...]:
    prompts: list[str] = []
    for path in (BUNDLED_UNRELATED, BUNDLED_UNRELATED_POOL):
        if not path.is_file():
            raise EditDataError(f"bundled unrelated prompts missing: {path}")
        prompts += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return tuple(dict.fromkeys(prompts))


def bundled_unrelated_prompts() -> list[str]:
    """Unrelated prompts for gate calibration (and the query centre): the 300 synthetic prompts
    of ``unrelated_prompts.txt`` and the 3,135 real-looking ones of ``unrelated_pool.txt``;
    disjoint from every scored locality and specificity prompt of the bundled set and of the
    shared ZsRE file. Measured (routing only, T=100, `scripts/measure_gate.py`): with the pool,
    held-out ZsRE locality questions reaching an expert fell from 11% to 0% at the same
    paraphrase routing (0.93); the bundled set kept 0% at 0.96 (0.97 before)."""
    return list(_unrelated())
