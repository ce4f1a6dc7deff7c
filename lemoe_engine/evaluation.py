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

* specificity: prompts about the SAME subject asking OTHER relations (``EditRecord.specificity``
  / ``specificity_ans``); scored like locality, against the unedited model.  A specificity prompt
  whose (subject, relation) is itself edited somewhere in the evaluated edits is skipped (its
  answer is meant to change); the metric is the mean over the prompts scored.

Each metric is the per-edit fraction, averaged over edits.  Every scored forward runs inside
``query_mask(model, mask)`` with ``mask`` 1 on the prompt tokens only, so LEMoE routing sees
the prompt and never the answer it is being scored on.

``mode="generate"`` scores what a user sees instead: greedy decoding, batched with left padding.
An edit (prompt or paraphrase) counts when the continuation STARTS with the target, both
normalised (``normalize``: case, punctuation and spacing ignored; the target must end at a word
boundary, so "Paris" does not match "Parisian"); locality / specificity count when the first
``GREEDY_LOCALITY_TOKENS`` (8) greedy tokens equal the unedited model's.  ``chat=True`` (implies
generation) asks every prompt through the tokenizer's chat template as the user turn with the
generation prompt (``chat_text``): an edit counts when the first ``CHAT_NEW_TOKENS`` (32) new
tokens CONTAIN the normalised target (as whole words); locality / specificity when the unedited
model's first ``CHAT_LOCALITY_TOKENS`` (16) tokens are reproduced.  Generation stops at an
end-of-sequence token, which is not part of the compared tokens.

Leak rate: the fraction of locality prompts whose prompt reaches any expert at all (LEMoE: the
layer's own ``route``, exactly as served, top-1 or top-k, after the gate; GRACE: a codebook
hit), measured on the prompt as it is asked in that mode (raw, or through the chat template).
None when the model has no router (unedited model, FT-L).
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import unicodedata
from typing import Any, Callable, Optional, Sequence

import torch
from tqdm.auto import tqdm

from .errors import ConfigError
from .tokens import collate, encode_pairs, pad_id, special_prefix

__all__ = ["EditMetrics", "Reference", "evaluate", "locality_reference", "unedited_reference",
           "chat_text", "greedy_continuations", "normalize", "starts_with_target",
           "contains_target", "specificity_items", "MODES"]

MODES = ("teacher_forced", "generate")
GREEDY_LOCALITY_TOKENS = 8
"""Greedy (raw prompt) locality / specificity: the first 8 tokens must equal the unedited model's."""
CHAT_NEW_TOKENS = 32
"""Chat form: an edit counts when the first 32 new tokens contain the target."""
CHAT_LOCALITY_TOKENS = 16
"""Chat form locality / specificity: the unedited model's first 16 tokens must be reproduced."""
GREEDY_EXTRA_TOKENS = 2
"""Greedy (raw prompt) edits: tokens generated past the target's own length, so that a target
continued by more letters ("Paris" -> "Parisian") is seen and does not count."""


@dataclasses.dataclass
class EditMetrics:
    reliability: float
    generality: float
    locality: float
    n_edits: int
    specificity: Optional[float] = None
    """Same-subject prompts about other relations (None when the edits carry none)."""
    n_specificity: int = 0
    """Specificity prompts scored (after skipping those about facts edited in the same set)."""
    leak_rate: Optional[float] = None
    """Fraction of locality prompts that reach any expert (None: the model has no router)."""
    specificity_leak_rate: Optional[float] = None
    """The same for the specificity prompts (same subject: reaching the expert is expected today)."""
    mode: str = "teacher_forced"
    chat: bool = False

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def average(self) -> float:
        """Mean of reliability, generality and locality (the three metrics of the paper)."""
        return (self.reliability + self.generality + self.locality) / 3.0


@dataclasses.dataclass
class Reference:
    """The unedited model's answers on the locality and specificity prompts of a set of edits,
    for one scoring style: argmax tokens at the answer positions (teacher-forced) or the first
    greedy tokens (generate / chat).  Made by ``unedited_reference``; ``evaluate`` compares with it."""

    mode: str
    chat: bool
    locality: list          # per edit: a CPU int64 tensor
    specificity: list       # per scored specificity prompt (``specificity_items`` order)
    specificity_prompts: list


# --------------------------------------------------------------------------------------------
# text helpers
# --------------------------------------------------------------------------------------------

def normalize(text: str) -> str:
    """Lower case, Unicode NFKC, every non-alphanumeric character a space, spaces collapsed."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return " ".join("".join(c if c.isalnum() else " " for c in text).split())


def starts_with_target(continuation: str, target: str) -> bool:
    """True when ``continuation`` starts with ``target`` (normalised), ending at a word boundary."""
    c, t = normalize(continuation), normalize(target)
    if not t:  # a target of punctuation only: compare the raw texts
        return continuation.strip().casefold().startswith(target.strip().casefold())
    return c == t or c.startswith(t + " ")


def contains_target(text: str, target: str) -> bool:
    """True when ``target`` (normalised) occurs in ``text`` (normalised) as whole words."""
    c, t = normalize(text), normalize(target)
    if not t:
        return target.strip().casefold() in text.casefold()
    return f" {t} " in f" {c} "


def chat_text(tokenizer, prompt: str) -> str:
    """``prompt`` as the user turn of the tokenizer's chat template, with the generation prompt
    (the assistant turn's opening), as text.  ConfigError when the tokenizer has no template."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("the tokenizer has no chat template: the chat form needs one "
                          "(an instruct model's tokenizer)")
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)


def _prompt_ids(tokenizer, prompts: Sequence[str], chat: bool) -> list[list[int]]:
    """Token ids of each prompt as it is asked: raw (the same tokens teacher-forced scoring puts
    before the answer: BOS if any + the prompt) or through the chat template (its own specials)."""
    if chat:
        texts = [chat_text(tokenizer, p) for p in prompts]
        return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    prefix = special_prefix(tokenizer)
    if prefix is None:
        return [list(ids) for ids in tokenizer(list(prompts), add_special_tokens=True)["input_ids"]]
    return [prefix + list(ids) for ids in tokenizer(list(prompts), add_special_tokens=False)["input_ids"]]


def specificity_items(edits) -> list[tuple[int, str, str]]:
    """(edit index, prompt, answer) of every specificity prompt that is scored: all of each edit's
    ``specificity`` prompts except those about a (subject, relation) that some edit of ``edits``
    changes (needs ``subject``, ``relation`` and ``specificity_relation``; without them every
    prompt is scored)."""
    def key(subject, relation):
        return (subject.casefold(), relation.casefold()) if subject and relation else None
    edited = {key(getattr(e, "subject", None), getattr(e, "relation", None)) for e in edits} - {None}
    items = []
    for i, e in enumerate(edits):
        prompts = tuple(getattr(e, "specificity", ()) or ())
        answers = tuple(getattr(e, "specificity_ans", ()) or ())
        relations = tuple(getattr(e, "specificity_relation", ()) or ()) or (None,) * len(prompts)
        if len(answers) != len(prompts) or len(relations) != len(prompts):
            raise ValueError(f"edit {i}: {len(prompts)} specificity prompts, {len(answers)} answers, "
                             f"{len(relations)} relations")
        for prompt, answer, relation in zip(prompts, answers, relations):
            if key(getattr(e, "subject", None), relation) in edited:
                continue
            items.append((i, prompt, answer))
    return items


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


def _lemoe_reached(layer, x: torch.Tensor) -> torch.Tensor:
    """[B] bool: the sequence reaches some expert of the LEMoE ``layer`` (its own route)."""
    batch, length = x.shape[0], x.shape[1]
    if getattr(layer, "disabled", False) or layer.num_experts == 0:
        return torch.zeros(batch, dtype=torch.bool)
    # the layer's routing decision as served (gate, top-k, question gate), without the side effects
    # of ``route`` (which also stores the sequence route for the decode steps)
    ids, _ = layer.served_route(x)
    if ids.shape[0] != batch * length:
        return (ids >= 0).any(dim=-1).reshape(batch).cpu()
    hit = (ids.reshape(batch, length, -1) >= 0).any(dim=-1)
    mask = layer.prompt_mask(x)
    if mask is not None:
        hit = hit & mask.to(hit.device).bool()
    return hit.any(dim=-1).cpu()


def _grace_reached(adaptor, x: torch.Tensor) -> torch.Tensor:
    batch = x.shape[0]
    decision = getattr(adaptor, "_decision", None)
    if adaptor.disabled or adaptor.num_entries == 0 or decision is None:
        return torch.zeros(batch, dtype=torch.bool)
    return decision[1].reshape(-1).bool().cpu()


class _RouteProbe:
    """Which sequences of a forward pass reach an edit: LEMoE layers (any expert after the gate)
    and GRACE adaptors (a codebook hit).  ``arm()`` before a forward (or a ``generate`` call):
    only the first forward after it is recorded (the prompt; decode steps reuse its route)."""

    def __init__(self, model) -> None:
        from .layer import LEMoELayer
        try:
            from .baselines import GraceAdaptor
        except ImportError:  # pragma: no cover
            GraceAdaptor = ()
        self.model = model
        self.modules = [(m, _lemoe_reached) for m in model.modules() if isinstance(m, LEMoELayer)]
        if GraceAdaptor:
            self.modules += [(m, _grace_reached) for m in model.modules() if isinstance(m, GraceAdaptor)]
        self.armed = False
        self.result: Optional[torch.Tensor] = None

    @property
    def supported(self) -> bool:
        return bool(self.modules)

    def arm(self) -> None:
        self.armed, self.result = True, None

    @contextlib.contextmanager
    def active(self):
        handles = []
        for module, fn in self.modules:
            def hook(mod, args, output, fn=fn):
                if self.armed:
                    x = args[0] if args else None
                    if x is not None:
                        hit = fn(mod, x)
                        self.result = hit if self.result is None else self.result | hit
            handles.append(module.register_forward_hook(hook))
        handles.append(self.model.register_forward_hook(lambda *a: setattr(self, "armed", False)))
        try:
            yield self
        finally:
            for h in handles:
                h.remove()


def _score(model, tokenizer, prompts: Sequence[str], answers: Sequence[str], *,
           batch_size: int, bar=None, reached: Optional[list] = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Batched teacher-forced scoring of (prompt, answer) pairs.

    Returns, per pair and in input order, ``(pred, target)``: two int64 CPU tensors of the
    answer's length, ``pred[i]`` the argmax of the logits at the position before answer token
    ``i`` and ``target[i]`` that token.  Batches are right-padded (pads after the real tokens, so
    a causal model's real positions never see them) and sorted by length to keep padding small;
    the order does not change any result.  The caller must have put the model in eval/no-grad.
    ``reached``: a list filled (in input order) with whether each prompt reaches an edit
    (``_RouteProbe``), left empty when the model has no router.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    query_mask, _ = _patching()
    enc = encode_pairs(tokenizer, prompts, answers)
    device = _model_device(model)
    kwargs = {"use_cache": False} if hasattr(model, "config") else {}
    order = sorted(range(len(enc)), key=lambda i: len(enc[i].ids))
    results: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(enc)
    probe = _RouteProbe(model) if reached is not None else None
    hits: list = [None] * len(enc)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        rows = [enc[i] for i in idx]
        input_ids, attention, qmask = collate(rows, pad_id(tokenizer), device)
        with query_mask(model, qmask), (probe.active() if probe else contextlib.nullcontext()):
            if probe:
                probe.arm()
            out = model(input_ids=input_ids, attention_mask=attention, **kwargs)
        if probe and probe.supported and probe.result is not None:
            for b, i in enumerate(idx):
                hits[i] = bool(probe.result[b])
        logits = out.logits if hasattr(out, "logits") else out[0]
        argmax = logits.argmax(dim=-1).to("cpu", torch.long)   # [B, T], one transfer per batch
        for b, (i, r) in enumerate(zip(idx, rows)):
            n, p = len(r.ids), r.prompt_len
            results[i] = (argmax[b, p - 1:n - 1].clone(),
                          torch.tensor(r.ids[p:n], dtype=torch.long))
        if bar is not None:
            bar.update(len(rows))
    if reached is not None and all(h is not None for h in hits):
        reached.extend(hits)
    return results  # type: ignore[return-value]


def _eos_ids(model, tokenizer) -> list[int]:
    ids = set()
    for value in (getattr(tokenizer, "eos_token_id", None),
                  getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return sorted(ids)


def _greedy(model, tokenizer, prompt_ids: Sequence[Sequence[int]], max_new: Sequence[int], *,
            batch_size: int, bar=None, reached: Optional[list] = None) -> list[list[int]]:
    """Greedy continuations (token ids, cut before the first end-of-sequence token and at
    ``max_new[i]`` tokens) of each prompt, in input order.

    Batched with LEFT padding (the real tokens of every row end at the same position, so all rows
    decode in step; ``generate`` derives positions from the attention mask).  Rows are sorted by
    (tokens to generate, prompt length) to keep padding and wasted decode steps small; batching
    does not change the result beyond float rounding.  The caller puts the model in eval/no-grad.
    ``reached``: as for ``_score``, whether each prompt (its prefill) reaches an edit.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not hasattr(model, "generate"):
        raise ConfigError("mode='generate' needs a model with a generate() method (a Hugging Face "
                          "causal LM)")
    device = _model_device(model)
    pad, eos = pad_id(tokenizer), _eos_ids(model, tokenizer)
    order = sorted(range(len(prompt_ids)), key=lambda i: (max_new[i], len(prompt_ids[i])))
    results: list = [None] * len(prompt_ids)
    hits: list = [None] * len(prompt_ids)
    probe = _RouteProbe(model) if reached is not None else None
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        length = max(len(prompt_ids[i]) for i in idx)
        input_ids = torch.full((len(idx), length), pad, dtype=torch.long)
        attention = torch.zeros((len(idx), length), dtype=torch.long)
        for b, i in enumerate(idx):
            ids = prompt_ids[i]
            input_ids[b, length - len(ids):] = torch.tensor(list(ids), dtype=torch.long)
            attention[b, length - len(ids):] = 1
        steps = max(max_new[i] for i in idx)
        with probe.active() if probe else contextlib.nullcontext():
            if probe:
                probe.arm()
            out = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                                 max_new_tokens=steps, min_new_tokens=0, do_sample=False, num_beams=1,
                                 pad_token_id=pad, eos_token_id=eos or None,
                                 top_p=None, top_k=None, temperature=None)
        new = (out.sequences if hasattr(out, "sequences") else out)[:, length:].to("cpu").tolist()
        for b, i in enumerate(idx):
            tokens = []
            for t in new[b][:max_new[i]]:
                if t in eos:
                    break
                tokens.append(t)
            results[i] = tokens
            if probe and probe.supported and probe.result is not None:
                hits[i] = bool(probe.result[b])
        if bar is not None:
            bar.update(len(idx))
    if reached is not None and all(h is not None for h in hits):
        reached.extend(hits)
    return results


def greedy_token_ids(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 20, *,
                     chat: bool = False, batch_size: int = 32) -> list[list[int]]:
    """Greedy continuations of ``prompts`` as token ids (cut before the end-of-sequence token),
    raw or asked through the chat template, exactly as ``evaluate(mode="generate")`` makes them."""
    with _eval_mode(model):
        return _greedy(model, tokenizer, _prompt_ids(tokenizer, prompts, chat),
                       [max_new_tokens] * len(prompts), batch_size=batch_size)


def greedy_continuations(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 20, *,
                         chat: bool = False, batch_size: int = 32) -> list[str]:
    """Greedy continuations of ``prompts`` as text (see ``greedy_token_ids``)."""
    ids = greedy_token_ids(model, tokenizer, prompts, max_new_tokens, chat=chat, batch_size=batch_size)
    return [tokenizer.decode(t, skip_special_tokens=True) for t in ids]


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


def _check_mode(mode: Optional[str], chat: bool) -> str:
    if mode is None:
        return "generate" if chat else "teacher_forced"
    if mode not in MODES:
        raise ConfigError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if chat and mode != "generate":
        raise ConfigError("the chat form is scored by generation: use mode='generate' (or leave "
                          "mode unset) with chat=True")
    return mode


def _reference_tokens(mode: str, chat: bool) -> int:
    return CHAT_LOCALITY_TOKENS if chat else GREEDY_LOCALITY_TOKENS


def _reference(model, tokenizer, edits, items, mode, chat, batch_size, bar) -> Reference:
    """The model's own answers on the locality and scored specificity prompts (as run)."""
    loc_prompts = [e.loc_prompt for e in edits]
    spec_prompts = [p for _, p, _ in items]
    if mode == "teacher_forced":
        res = _score(model, tokenizer, loc_prompts + spec_prompts,
                     [e.loc_answer for e in edits] + [a for _, _, a in items],
                     batch_size=batch_size, bar=bar)
        preds = [pred for pred, _ in res]
    else:
        n = _reference_tokens(mode, chat)
        ids = _greedy(model, tokenizer, _prompt_ids(tokenizer, loc_prompts + spec_prompts, chat),
                      [n] * (len(loc_prompts) + len(spec_prompts)), batch_size=batch_size, bar=bar)
        preds = [torch.tensor(t, dtype=torch.long) for t in ids]
    return Reference(mode=mode, chat=chat, locality=preds[:len(edits)],
                     specificity=preds[len(edits):], specificity_prompts=spec_prompts)


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------

def locality_reference(model, tokenizer, edits, *, batch_size: int = 32,
                       progress: bool = True) -> list[torch.Tensor]:
    """Argmax tokens of ``model`` at every ``loc_answer`` position, one CPU tensor per edit.

    Call it on the unedited model (before editing); ``evaluate`` compares against it.  The model
    is run as given: adaptors are NOT disabled here (``evaluate`` does that when it has to compute
    the reference itself).  ``unedited_reference`` gives every style's reference, specificity
    included.
    """
    edits = _check_edits(edits)
    with _eval_mode(model), tqdm(total=len(edits), desc="locality reference",
                                 disable=not progress, leave=False) as bar:
        return _loc_reference(model, tokenizer, edits, batch_size, bar)


def unedited_reference(model, tokenizer, edits, *, mode: Optional[str] = None, chat: bool = False,
                       batch_size: int = 32, progress: bool = True) -> Reference:
    """The model's answers on the locality and specificity prompts of ``edits`` in one scoring
    style (``mode`` / ``chat`` as for ``evaluate``): call it on the unedited model, before
    editing, and pass it to ``evaluate(..., locality_ref=...)``.  Run as given (adaptors on)."""
    edits = _check_edits(edits)
    mode = _check_mode(mode, chat)
    items = specificity_items(edits)
    with _eval_mode(model), tqdm(total=len(edits) + len(items), desc="unedited reference",
                                 disable=not progress, leave=False) as bar:
        return _reference(model, tokenizer, edits, items, mode, chat, batch_size, bar)


def _same(pred: torch.Tensor, ref, what: str, mode: str) -> float:
    ref = torch.as_tensor(ref).to("cpu", torch.long).reshape(-1)
    if mode == "teacher_forced":
        if ref.shape != pred.shape:
            raise ValueError(f"{what} has {ref.numel()} tokens, the answer has {pred.numel()}: "
                             "reference from another tokenizer or data set?")
        return _fraction(pred, ref)
    return float(pred.tolist() == ref.tolist())


def _rate(flags: list) -> Optional[float]:
    return sum(flags) / len(flags) if flags else None


def evaluate(model, tokenizer, edits, *, locality_ref=None, batch_size: int = 32,
             progress: bool = True, mode: Optional[str] = None, chat: bool = False) -> EditMetrics:
    """Reliability, generality, locality and specificity over ``edits`` (objects with ``prompt``,
    ``target``, ``rephrase``, ``loc_prompt``, ``loc_answer``; optional ``subject``, ``relation``,
    ``specificity``, ``specificity_ans``, ``specificity_relation``), plus the leak rate.

    ``mode``: ``"teacher_forced"`` (default; EasyEdit's token accuracy) or ``"generate"`` (greedy
    decoding, see the module docstring); ``chat=True`` asks through the chat template (implies
    ``"generate"``).  ``locality_ref``: the unedited model's answers, from ``unedited_reference``
    with the same mode and chat (or, teacher-forced only, ``locality_reference``'s list, the
    specificity reference then being taken with the adaptors disabled).  Without it the reference
    is computed here with the LEMoE adaptors disabled, which is the unedited model.
    """
    edits = _check_edits(edits)
    mode = _check_mode(mode, chat)
    items = specificity_items(edits)
    if locality_ref is not None:
        if isinstance(locality_ref, Reference):
            if (locality_ref.mode, locality_ref.chat) != (mode, chat):
                raise ValueError(f"locality_ref was taken for mode={locality_ref.mode!r} chat="
                                 f"{locality_ref.chat}, this evaluation is mode={mode!r} chat={chat}")
            if locality_ref.specificity_prompts != [p for _, p, _ in items]:
                raise ValueError("locality_ref was taken on other specificity prompts (another "
                                 "data set or subset?)")
        elif mode != "teacher_forced":
            raise ValueError("for mode='generate' pass unedited_reference(..., mode='generate', "
                             "chat=...) as locality_ref")
        n_loc = len(locality_ref.locality if isinstance(locality_ref, Reference) else locality_ref)
        if n_loc != len(edits):
            raise ValueError(f"locality_ref has {n_loc} entries for {len(edits)} edits")
    _, adaptors_disabled = _patching()
    n = len(edits)
    need_ref = locality_ref is None or (not isinstance(locality_ref, Reference) and items)
    total = 3 * n + len(items) + (n + len(items) if need_ref else 0)
    with _eval_mode(model), tqdm(total=total, desc="evaluate", disable=not progress, leave=False) as bar:
        if locality_ref is None:
            with adaptors_disabled(model):
                reference = _reference(model, tokenizer, edits, items, mode, chat, batch_size, bar)
        elif not isinstance(locality_ref, Reference):
            spec = []
            if items:
                with adaptors_disabled(model):
                    spec = _reference(model, tokenizer, [], items, mode, chat, batch_size, bar).specificity
            reference = Reference(mode, chat, list(locality_ref), spec, [p for _, p, _ in items])
        else:
            reference = locality_ref
        targets = [e.target for e in edits]
        prompts = [e.prompt for e in edits] + [e.rephrase for e in edits]
        loc_prompts = [e.loc_prompt for e in edits]
        spec_prompts = [p for _, p, _ in items]
        reached: list = []
        if mode == "teacher_forced":
            edit_scores = [_fraction(p, t) for p, t in
                           _score(model, tokenizer, prompts, targets + targets, batch_size=batch_size, bar=bar)]
            answered = _score(model, tokenizer, loc_prompts + spec_prompts,
                              [e.loc_answer for e in edits] + [a for _, _, a in items],
                              batch_size=batch_size, bar=bar, reached=reached)
            answered = [pred for pred, _ in answered]
        else:
            if chat:
                budget = [CHAT_NEW_TOKENS] * (2 * n)
            else:
                lengths = [len(r.ids) - r.prompt_len for r in encode_pairs(tokenizer, prompts, targets + targets)]
                budget = [k + GREEDY_EXTRA_TOKENS for k in lengths]
            ids = _greedy(model, tokenizer, _prompt_ids(tokenizer, prompts, chat), budget,
                          batch_size=batch_size, bar=bar)
            texts = [tokenizer.decode(t, skip_special_tokens=True) for t in ids]
            hit = contains_target if chat else starts_with_target
            edit_scores = [float(hit(text, target)) for text, target in zip(texts, targets + targets)]
            k = _reference_tokens(mode, chat)
            answered = _greedy(model, tokenizer, _prompt_ids(tokenizer, loc_prompts + spec_prompts, chat),
                               [k] * (n + len(items)), batch_size=batch_size, bar=bar, reached=reached)
            answered = [torch.tensor(t, dtype=torch.long) for t in answered]
    loc_scores = [_same(pred, ref, f"locality_ref[{i}]", mode)
                  for i, (pred, ref) in enumerate(zip(answered[:n], reference.locality))]
    spec_scores = [_same(pred, ref, f"specificity reference [{i}]", mode)
                   for i, (pred, ref) in enumerate(zip(answered[n:], reference.specificity))]
    return EditMetrics(
        reliability=sum(edit_scores[:n]) / n,
        generality=sum(edit_scores[n:]) / n,
        locality=sum(loc_scores) / n,
        n_edits=n,
        specificity=_rate(spec_scores),
        n_specificity=len(spec_scores),
        leak_rate=_rate(reached[:n]),
        specificity_leak_rate=_rate(reached[n:]),
        mode=mode,
        chat=chat,
    )
