"""Edit records: the loader for ZsRE / EasyEdit files and the bundled edit set.

Two record forms are accepted, in a JSON list or in JSONL (one object per line):

* ZsRE (MEND / EasyEdit ``zsre_mend_eval.json``): ``src``, ``alt``, ``rephrase``, ``loc``,
  ``loc_ans``, optional ``subject``; other keys (``answers``, ``pred``, ``cond``, ...) are
  ignored.
* Flattened EasyEdit / KnowEdit: ``prompt``, ``target_new``, ``rephrase_prompt``,
  ``locality_prompt``, ``locality_ground_truth``, optional ``subject``; ``target_new`` and
  ``locality_ground_truth`` may be a list, whose first element is taken.

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
    return EditRecord(subject=subject, **values)


def _json_error(name: str, err: json.JSONDecodeError, line: int | None = None) -> EditDataError:
    at = f"line {line if line is not None else err.lineno}, column {err.colno}"
    return EditDataError(f"{name}: invalid JSON at {at}: {err.msg}")


def _iter_jsonl(text: str, name: str) -> Iterator[tuple[Any, str]]:
    number = 0
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        number += 1
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
            raise _json_error(name, err, line=lineno) from None
        yield obj, f"{name}: record {number} (line {lineno})"


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


def load_edits(path: str | os.PathLike, limit: int | None = None) -> list[EditRecord]:
    """Read and validate an edit file (JSON list or JSONL); return its first ``limit`` records."""
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
    records = []
    for obj, where in (_iter_jsonl if is_jsonl else _iter_json)(text, name):
        records.append(_record(obj, where))
        if limit is not None and len(records) >= limit:
            break
    return records


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
        lines.append(json.dumps(obj, ensure_ascii=False))
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


@functools.lru_cache(maxsize=1)
def _unrelated() -> tuple[str, ...]:
    if not BUNDLED_UNRELATED.is_file():
        raise EditDataError(f"bundled unrelated prompts missing: {BUNDLED_UNRELATED}")
    lines = BUNDLED_UNRELATED.read_text(encoding="utf-8").splitlines()
    return tuple(line.strip() for line in lines if line.strip())


def bundled_unrelated_prompts() -> list[str]:
    """Unrelated prompts for training / gate calibration; disjoint from the bundled loc prompts."""
    return list(_unrelated())
