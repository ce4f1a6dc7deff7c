"""Edit metrics as EasyEdit computes them: teacher-forced token accuracy.

For every (prompt, answer) pair the text ``prompt + " " + answer`` is tokenised *jointly* and the
answer tokens are the ones that follow the prompt's own tokens in that joint tokenisation
(DESIGN.md trap #1: on a BPE vocabulary the leading space merges into the first answer token, so
encoding the answer alone gives different tokens).  One forward pass scores all answer tokens:
position ``j`` is right when ``argmax(logits[j - 1]) == ids[j]``.

* reliability: answer = edit target, prompt = edit prompt;
* generality:  answer = edit target, prompt = its paraphrase;
* locality:    prompt/answer = the unrelated pair; a position counts when the argmax equals the
  UNEDITED model's argmax at that position (``locality_reference``).

Each metric is the per-edit fraction, averaged over edits.  Every scored forward runs inside
``query_mask(model, mask)`` with ``mask`` 1 on the prompt tokens only, so LEMoE routing sees
the prompt and never the answer it is being scored on.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

from .tokens import collate, encode_pairs, pad_id

__all__ = ["EditMetrics", "evaluate", "locality_reference"]


@dataclasses.dataclass
class EditMetrics:
    reliability: float
    generality: float
    locality: float
    n_edits: int

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def average(self) -> float:
        return (self.reliability + self.generality + self.locality) / 3.0


# --------------------------------------------------------------------------------------------
# model helpers
# --------------------------------------------------------------------------------------------

def _patching() -> tuple[Callable[..., Any], Callable[..., Any]]:
    # imported lazily: patching imports the layer stack, evaluation must stay importable alone
    from lemoe_engine import patching
    return patching.query_mask, patching.adaptors_disabled


def _model_device(model) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@contextlib.contextmanager
def _eval_mode(model):
    """Eval mode + no grad; restores every submodule's own ``training`` flag afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, mode in modes:
            m.training = mode


def _score(model, tokenizer, prompts: Sequence[str], answers: Sequence[str], *,
           batch_size: int, bar=None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Batched teacher-forced scoring of (prompt, answer) pairs.

    Returns, per pair and in input order, ``(pred, target)``: two int64 CPU tensors of the
    answer's length, ``pred[i]`` the argmax of the logits at the position before answer token
    ``i`` and ``target[i]`` that token.  Batches are right-padded (pads after the real tokens, so
    a causal model's real positions never see them) and sorted by length to keep padding small;
    the order does not change any result.  The caller must have put the model in eval/no-grad.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    query_mask, _ = _patching()
    enc = encode_pairs(tokenizer, prompts, answers)
    device = _model_device(model)
    kwargs = {"use_cache": False} if hasattr(model, "config") else {}
    order = sorted(range(len(enc)), key=lambda i: len(enc[i].ids))
    results: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(enc)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        rows = [enc[i] for i in idx]
        input_ids, attention, qmask = collate(rows, pad_id(tokenizer), device)
        with query_mask(model, qmask):
            out = model(input_ids=input_ids, attention_mask=attention, **kwargs)
        logits = out.logits if hasattr(out, "logits") else out[0]
        argmax = logits.argmax(dim=-1).to("cpu", torch.long)   # [B, T], one transfer per batch
        for b, (i, r) in enumerate(zip(idx, rows)):
            n, p = len(r.ids), r.prompt_len
            results[i] = (argmax[b, p - 1:n - 1].clone(),
                          torch.tensor(r.ids[p:n], dtype=torch.long))
        if bar is not None:
            bar.update(len(rows))
    return results  # type: ignore[return-value]


def _fraction(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a == b).double().mean().item()


def _check_edits(edits) -> list:
    edits = list(edits)
    if not edits:
        raise ValueError("no edits to evaluate")
    return edits


def _loc_reference(model, tokenizer, edits, batch_size, bar) -> list[torch.Tensor]:
    res = _score(model, tokenizer, [e.loc_prompt for e in edits],
                 [e.loc_answer for e in edits], batch_size=batch_size, bar=bar)
    return [pred for pred, _ in res]


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------

def locality_reference(model, tokenizer, edits, *, batch_size: int = 32,
                       progress: bool = True) -> list[torch.Tensor]:
    """Argmax tokens of ``model`` at every ``loc_answer`` position, one CPU tensor per edit.

    Call it on the unedited model (before editing); ``evaluate`` compares against it.  The model
    is run as given: adaptors are NOT disabled here (``evaluate`` does that when it has to compute
    the reference itself).
    """
    edits = _check_edits(edits)
    with _eval_mode(model), tqdm(total=len(edits), desc="locality reference",
                                 disable=not progress, leave=False) as bar:
        return _loc_reference(model, tokenizer, edits, batch_size, bar)


def evaluate(model, tokenizer, edits, *, locality_ref: list[torch.Tensor] | None = None,
             batch_size: int = 32, progress: bool = True) -> EditMetrics:
    """Reliability, generality and locality over ``edits`` (objects with ``prompt``, ``target``,
    ``rephrase``, ``loc_prompt``, ``loc_answer``).

    ``locality_ref``: the output of ``locality_reference`` on the unedited model.  Without it the
    reference is computed here with the LEMoE adaptors disabled, which is the unedited model.
    """
    edits = _check_edits(edits)
    if locality_ref is not None and len(locality_ref) != len(edits):
        raise ValueError(f"locality_ref has {len(locality_ref)} entries for {len(edits)} edits")
    _, adaptors_disabled = _patching()
    passes = 3 if locality_ref is not None else 4
    with _eval_mode(model), tqdm(total=passes * len(edits), desc="evaluate",
                                 disable=not progress, leave=False) as bar:
        if locality_ref is None:
            with adaptors_disabled(model):
                locality_ref = _loc_reference(model, tokenizer, edits, batch_size, bar)
        targets = [e.target for e in edits]
        rel = _score(model, tokenizer, [e.prompt for e in edits], targets,
                     batch_size=batch_size, bar=bar)
        gen = _score(model, tokenizer, [e.rephrase for e in edits], targets,
                     batch_size=batch_size, bar=bar)
        loc = _score(model, tokenizer, [e.loc_prompt for e in edits],
                     [e.loc_answer for e in edits], batch_size=batch_size, bar=bar)
    loc_scores = []
    for k, ((pred, _), ref) in enumerate(zip(loc, locality_ref)):
        ref = torch.as_tensor(ref).to("cpu", torch.long).reshape(-1)
        if ref.shape != pred.shape:
            raise ValueError(f"locality_ref[{k}] has {ref.numel()} tokens, the locality answer "
                             f"has {pred.numel()}: reference from another tokenizer or data set?")
        loc_scores.append(_fraction(pred, ref))
    n = len(edits)
    return EditMetrics(
        reliability=sum(_fraction(p, t) for p, t in rel) / n,
        generality=sum(_fraction(p, t) for p, t in gen) / n,
        locality=sum(loc_scores) / n,
        n_edits=n,
    )
