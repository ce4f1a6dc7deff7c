"""The edit ledger: every edit that shaped an adaptor, stored with it (manifest key ``edits``).

An entry records what was asked (prompt, target, paraphrase, subject, relation), when, which
expert holds it, and what became of it: ``superseded_by`` (a newer edit of the same fact) or
``removed_at`` (``LifelongEditor.remove``). Ids are never reused. Only *active* entries are
held by an expert; superseded and removed ones stay listed for the record.

"The same fact" (``same_fact``): the same prompt after normalising case, spaces and final
punctuation, or, when both edits name a ``subject`` and a ``relation``, the same subject and
relation (so a re-worded question about the same relation counts too when the data says so).
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, fields
from typing import Any, Iterable, Optional, Sequence

from .data import EditRecord
from .errors import AdaptorError


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass
class LedgerEntry:
    id: int
    prompt: str
    target: str
    rephrase: Optional[str] = None
    subject: Optional[str] = None
    relation: Optional[str] = None
    time: str = ""
    expert: Optional[int] = None  # the expert holding it while active
    superseded_by: Optional[int] = None
    removed_at: Optional[str] = None

    @property
    def status(self) -> str:
        if self.removed_at is not None:
            return "removed"
        if self.superseded_by is not None:
            return "superseded"
        return "active"

    @property
    def active(self) -> bool:
        return self.status == "active"

    def record(self) -> EditRecord:
        """The edit to train again when its expert is rebuilt (locality fields are not kept)."""
        return EditRecord(prompt=self.prompt, target=self.target, rephrase=self.rephrase or self.prompt,
                          loc_prompt="", loc_answer="", subject=self.subject, relation=self.relation)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "status": self.status}

    @classmethod
    def from_dict(cls, data: Any, where: str) -> "LedgerEntry":
        if not isinstance(data, dict):
            raise AdaptorError(f"{where}: every ledger entry must be an object")
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        ok = (isinstance(values.get("id"), int) and not isinstance(values.get("id"), bool)
              and all(isinstance(values.get(k), str) for k in ("prompt", "target"))
              and all(values.get(k) is None or isinstance(values[k], str)
                      for k in ("rephrase", "subject", "relation", "time", "removed_at"))
              and all(values.get(k) is None or (isinstance(values[k], int) and not isinstance(values[k], bool))
                      for k in ("expert", "superseded_by")))
        if not ok:
            raise AdaptorError(f"{where}: malformed ledger entry {data!r:.200}")
        return cls(**values)


def entry_for(edit: EditRecord, entry_id: int) -> LedgerEntry:
    return LedgerEntry(id=entry_id, prompt=edit.prompt, target=edit.target,
                       rephrase=edit.rephrase if edit.rephrase != edit.prompt else None,
                       subject=edit.subject, relation=getattr(edit, "relation", None), time=now())


def _norm(text: Optional[str]) -> str:
    return re.sub(r"\s+", " ", (text or "").lower()).strip().rstrip("?.!:; ").strip()


def same_fact(a: Any, b: Any) -> bool:
    """Whether edits (EditRecord or LedgerEntry) ``a`` and ``b`` set the same fact."""
    if _norm(a.prompt) == _norm(b.prompt):
        return True
    subject_a, subject_b = getattr(a, "subject", None), getattr(b, "subject", None)
    relation_a, relation_b = getattr(a, "relation", None), getattr(b, "relation", None)
    return bool(subject_a and subject_b and relation_a and relation_b
                and _norm(subject_a) == _norm(subject_b) and _norm(relation_a) == _norm(relation_b))


def next_id(entries: Sequence[LedgerEntry]) -> int:
    return max((e.id for e in entries), default=0) + 1


def check_ledger(entries: Sequence[LedgerEntry], num_experts: int, where: str) -> None:
    """Ids unique, active entries on existing experts, links to existing entries."""
    ids = [e.id for e in entries]
    if len(set(ids)) != len(ids):
        raise AdaptorError(f"{where}: the edit ledger repeats an id")
    known = set(ids)
    for e in entries:
        if e.active and e.expert is not None and not 0 <= e.expert < num_experts:
            raise AdaptorError(f"{where}: ledger entry {e.id} points at expert {e.expert}, "
                               f"but the adaptor has {num_experts}")
        if e.superseded_by is not None and e.superseded_by not in known:
            raise AdaptorError(f"{where}: ledger entry {e.id} is superseded by unknown entry {e.superseded_by}")


def entries_from_manifest(raw: Any, num_experts: int, where: str) -> list[LedgerEntry]:
    if raw is None:
        return []  # adaptors written before the ledger existed
    if not isinstance(raw, list):
        raise AdaptorError(f"{where}: 'edits' (the edit ledger) must be a list")
    entries = [LedgerEntry.from_dict(item, where) for item in raw]
    check_ledger(entries, num_experts, where)
    return entries


def select(entries: Iterable[LedgerEntry], ids: Sequence[int] = (), subject: Optional[str] = None
           ) -> list[LedgerEntry]:
    """Active entries with one of ``ids`` or about ``subject`` (case-insensitive)."""
    wanted = set(ids)
    return [e for e in entries if e.active and (e.id in wanted or
                                                (subject is not None and _norm(e.subject) == _norm(subject)))]


@dataclass
class RunPlan:
    """Ledger bookkeeping of one editing run, decided before any training.

    ``edits[i]`` is trained and then held by ``entries[i]`` (a new entry, or an active entry of a
    dropped expert that is rebuilt without what it lost). ``drop``: experts removed before
    training, because an edit they hold was superseded or removed. ``added``: new entries for
    the ledger (an edit superseded by a later one of the same run is listed, never trained).
    """

    edits: list[EditRecord]
    entries: list[LedgerEntry]
    added: list[LedgerEntry]
    superseded: list[tuple[LedgerEntry, int]]
    drop: list[int]
    rebuilds: int  # how many of ``edits`` are older edits trained again


def _fact_keys(edit: Any) -> list[tuple]:
    keys = [("prompt", _norm(edit.prompt))]
    subject, relation = getattr(edit, "subject", None), getattr(edit, "relation", None)
    if subject and relation:
        keys.append(("relation", _norm(subject), _norm(relation)))
    return keys


def plan_run(ledger: Sequence[LedgerEntry], new_edits: Sequence[EditRecord],
             removed: Sequence[LedgerEntry] = ()) -> RunPlan:
    """Decide what a run trains: ``new_edits`` (a later record of the same fact wins within the
    run; an active ledger entry of the same fact is superseded) plus the other active edits of
    every expert that loses an edit (to ``removed`` entries or to supersession)."""
    first_id = next_id(ledger)
    added = [entry_for(edit, first_id + i) for i, edit in enumerate(new_edits)]
    latest: dict[tuple, int] = {}
    for i, edit in enumerate(new_edits):
        for key in _fact_keys(edit):
            latest[key] = i
    superseded: list[tuple[LedgerEntry, int]] = []
    keep: list[int] = []
    for i, edit in enumerate(new_edits):
        winner = max(latest[key] for key in _fact_keys(edit))
        if winner != i:
            added[i].superseded_by = added[winner].id
        else:
            keep.append(i)
    kept_keys = {key: i for i in keep for key in _fact_keys(new_edits[i])}
    losing: set[int] = {e.expert for e in removed if e.expert is not None}
    for entry in ledger:
        if not entry.active:
            continue
        hits = [kept_keys[key] for key in _fact_keys(entry) if key in kept_keys]
        if hits:
            superseded.append((entry, added[max(hits)].id))
            if entry.expert is not None:
                losing.add(entry.expert)
    gone = {id(e) for e in removed} | {id(e) for e, _ in superseded}
    rebuilt = [e for e in ledger if e.active and e.expert in losing and id(e) not in gone]
    edits = [new_edits[i] for i in keep] + [e.record() for e in rebuilt]
    entries = [added[i] for i in keep] + rebuilt
    return RunPlan(edits=edits, entries=entries, added=added, superseded=superseded, drop=sorted(losing),
                   rebuilds=len(rebuilt))
