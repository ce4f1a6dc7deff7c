"""The question gate: keep a route only when the prompt asks one of the expert's edited questions.

Subject routing sends every question about an edited subject to that subject's expert, which then
answers every such question with the edit's target (same-subject specificity 0.29 at T=100 on
the bundled set). The model's own vectors cannot tell "the capital of France?" from "the currency
of France?" (README: AUC 0.61-0.84 at any layer), but a sentence encoder can (MiniLM-L6, the
planner's encoder: AUC 0.977 on bundled records outside every scored set). With the gate on,
each fresh sequence route is checked once, at prefill: the prompt's text (its prompt tokens
decoded; the user turn when asked through the chat template) is embedded, and a route whose
expert holds no edit prompt (the adaptor's ledger) within cosine ``threshold`` of it is dropped,
so the sequence gets the base MLP's output, bit for bit, as for any gated-off prompt. Decode steps
reuse the gated route. Experts without ledger entries (adaptors made outside the editor) are
never gated. Top-k > 1: the weights of the kept slots are renormalised (a softmax over the kept
experts, as the anchor gate gives).

A serving-time option, not saved in the adaptor: ``enable(model, tokenizer, threshold)``, or the
CLI's ``--question-gate``. Not available in vLLM serving. It costs one encoder pass (22M
parameters) per prompt at prefill.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .errors import ConfigError
from .patching import find_layer

DEFAULT_THRESHOLD = 0.74
"""Chosen on bundled records 1000-1149 (outside every scored set): the best global threshold there
keeps 95% of paraphrases and blocks 91% of same-subject questions about another relation; it keeps
97% of real ZsRE paraphrases (records 0-399)."""
_SENTINEL = "\u2063lemoe-question\u2063"


class QuestionGate:
    """The route filter ``enable`` installs on a layer (see the module docstring)."""

    def __init__(self, tokenizer, threshold: float) -> None:
        if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or not -1.0 <= threshold <= 1.0:
            raise ConfigError(f"question gate threshold must be a cosine in [-1, 1], got {threshold!r}")
        self.tokenizer = tokenizer
        self.threshold = float(threshold)
        self._questions: Optional[tuple] = None  # (ledger signature, embeddings [N, d], owner [N])
        self._chat = _chat_affixes(tokenizer)

    def expert_questions(self, layer) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings [N, d] of the active edits' prompts and the expert holding each [N]."""
        from .planner import sentence_features
        active = [(e.prompt, e.expert) for e in layer.ledger
                  if e.status == "active" and e.expert is not None and 0 <= e.expert < layer.num_experts]
        signature = tuple(active)
        if self._questions is None or self._questions[0] != signature:
            prompts = [p for p, _ in active]
            embeddings = torch.from_numpy(sentence_features(prompts)) if prompts else torch.zeros(0, 1)
            owner = torch.tensor([e for _, e in active], dtype=torch.long)
            self._questions = (signature, embeddings, owner)
        return self._questions[1], self._questions[2]

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
        from .planner import sentence_features
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
        queries = torch.from_numpy(sentence_features(texts))
        # per (sequence, expert) the best cosine to any of the expert's questions; experts with
        # no question on record start at +inf (include_self) and so are never gated
        held = torch.zeros(layer.num_experts, dtype=torch.bool)
        held[owner] = True
        start = torch.where(held, float("-inf"), float("inf")).expand(len(texts), -1)
        per_expert = start.scatter_reduce(1, owner[None].expand(len(texts), -1), queries @ embeddings.T,
                                          "amax").to(ids.device)
        slot = ids.long().clamp_min(0)
        keep = (ids >= 0) & (per_expert.gather(1, slot) >= self.threshold)
        kept = torch.where(keep, weights, torch.zeros_like(weights))
        total = kept.sum(dim=1, keepdim=True)
        kept = torch.where(total > 0, kept / total.clamp_min(1e-30), kept)
        return torch.where(keep, ids, torch.full_like(ids, -1)), kept


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


def enable(model: nn.Module, tokenizer, threshold: float = DEFAULT_THRESHOLD) -> QuestionGate:
    """Turn the question gate on for ``model``'s adaptor (see the module docstring)."""
    layer = find_layer(model)
    if layer is None:
        raise ConfigError("this model has no LEMoE adaptor attached: attach or load one before the question gate")
    if layer.config.routing != "sequence":
        raise ConfigError("the question gate checks sequence routes; this adaptor routes tokens")
    gate = QuestionGate(tokenizer, threshold)
    layer.route_filter = gate
    layer._sequence_route = None
    return gate


def disable(model: nn.Module) -> None:
    """Turn the question gate off (routes are served as the anchors decide)."""
    layer = find_layer(model)
    if layer is not None:
        layer.route_filter = None
        layer._sequence_route = None
