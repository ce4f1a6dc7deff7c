"""LifelongEditor: each batch of edits becomes a new expert, trained, frozen and gated.

The planner groups the edits into batches (default: edits whose routing keys the router
cannot tell apart share one expert; every other edit gets its own). For one batch: every
edit's key (its subject's last-token query) becomes an anchor of the new expert; only the new
expert's weights train, on the target tokens' NLL with the prompt masked; then it is frozen
and each anchor's gate threshold is set from its edit's own score and the scores of
unrelated prompts (never the scored locality prompts). Older experts are never touched, so
earlier edits cannot be overwritten.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .config import LEMoEConfig
from .data import EditRecord, bundled_unrelated_prompts
from .errors import ConfigError
from .layer import LEMoELayer, RouteContext
from .patching import adaptors_disabled, attach, decoder_layers, final_norm, find_layer, query_mask
from .planner import KEY_GROUP_SIMILARITY, check_plan, plan_order
from .storage import save
from .tokens import collate, encode_pairs, pad_id, supervised_batches


DEFAULT_PLAN = "keys"
"""How edits are grouped into experts (see ``planner``; measured on the bundled data: README)."""
DEFAULT_BATCH_SIZE = 10
"""Edits per expert with ``plan="kmeans"`` or ``"none"`` unless told otherwise."""


@dataclass
class EditorConfig:
    """Training knobs of the editor (the layer's own knobs are in LEMoEConfig)."""

    learning_rate: float = 5e-3
    max_steps: int = 60
    """Optimiser steps per batch at most (each over all of the batch's edits)."""
    stop_loss: float = 0.02
    """Early stop once the mean target NLL is below this and every target token is argmax-correct."""
    weight_decay: float = 0.0
    train_eos: bool = True
    """Also train the tokenizer's end-of-sequence token after each target, so greedy generation
    stops after the new answer instead of repeating it (the EOS is not scored by ``evaluate``)."""
    micro_batch: int = 32
    """Edits per forward pass (gradients are accumulated over the batch)."""

    def __post_init__(self) -> None:
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ConfigError(f"EditorConfig: learning_rate must be positive, got {self.learning_rate!r}")
        for name in ("max_steps", "micro_batch"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"EditorConfig: {name} must be a positive int, got {value!r}")
        if self.stop_loss < 0 or self.weight_decay < 0:
            raise ConfigError("EditorConfig: stop_loss and weight_decay must be >= 0")


@dataclass
class BatchReport:
    """What happened to one batch of edits."""

    expert: int
    n_edits: int
    steps: int
    loss: float
    misrouted: int
    """Edits of the batch whose own prompt routes to another expert (they cannot be learned)."""
    threshold: float
    seconds: float
    shared_keys: int = 0
    """Edits whose routing key coincides with an older expert's anchor (cosine >=
    ``planner.KEY_GROUP_SIMILARITY``): their paraphrases may reach that expert instead."""


class _TailForward:
    """Target-token logits computed from the target decoder layer on.

    Everything below the target layer is frozen, so its output (the input of the target
    decoder layer) is computed once per batch and cached with the arguments each later layer
    was called with; a training step then runs only the remaining layers, and the LM head only
    at the scored positions. A self-check against the full model's logits falls back to full
    forwards if an architecture computes anything this shortcut misses.
    """

    def __init__(self, model: nn.Module, layer: LEMoELayer) -> None:
        self.model = model
        self.layer = layer
        all_layers = decoder_layers(model)
        start = next(i for i, block in enumerate(all_layers) if block.mlp is layer)
        self.blocks = list(all_layers)[start:]
        self.norm = final_norm(model)
        self.head = model.get_output_embeddings()
        self.cached: list[tuple] = []
        self.usable = True

    def prepare(self, batches: Sequence[tuple]) -> None:
        self.cached = []
        for ids, attention, prompt_mask, labels in batches:
            calls: list[tuple] = []
            handles = [block.register_forward_pre_hook(
                lambda module, args, kwargs: calls.append((args, kwargs)), with_kwargs=True)
                for block in self.blocks]
            try:
                with torch.no_grad(), query_mask(self.model, prompt_mask):
                    full = self.model(input_ids=ids, attention_mask=attention, use_cache=False).logits
            finally:
                for handle in handles:
                    handle.remove()
            context = RouteContext(attention_mask=attention, embeddings=self.layer._context.embeddings)
            self.cached.append((calls, context, prompt_mask, labels))
            if self.usable:
                with torch.no_grad():
                    positions, _ = self._positions(labels)
                    tail = self._logits(len(self.cached) - 1)
                    reference = full[:, :-1][positions].float()
                    self.usable = bool(torch.allclose(tail, reference, atol=1e-3, rtol=1e-3))

    @staticmethod
    def _positions(labels: torch.Tensor):
        targets = labels[:, 1:]
        scored = targets != -100
        return scored, targets[scored]

    def _logits(self, index: int) -> torch.Tensor:
        calls, context, prompt_mask, labels = self.cached[index]
        hidden = calls[0][0][0] if calls[0][0] else calls[0][1]["hidden_states"]
        self.layer.set_route_context(context)
        with self.layer.query_mask(prompt_mask):
            for block, (args, kwargs) in zip(self.blocks, calls):
                if args:
                    out = block(hidden, *args[1:], **kwargs)
                else:
                    out = block(**{**kwargs, "hidden_states": hidden})
                hidden = out[0] if isinstance(out, tuple) else out
        scored, _ = self._positions(labels)
        return self.head(self.norm(hidden[:, :-1][scored])).float()

    def scored_logits(self, index: int, batch: tuple) -> torch.Tensor:
        """Logits at the scored positions of micro-batch ``index`` ([n_scored, vocab])."""
        if self.usable:
            return self._logits(index)
        ids, attention, prompt_mask, labels = batch
        with query_mask(self.model, prompt_mask):
            logits = self.model(input_ids=ids, attention_mask=attention, use_cache=False).logits
        scored, _ = self._positions(labels)
        return logits[:, :-1][scored].float()


class LifelongEditor:
    """Edits ``model`` batch after batch, LEMoE style.

    ``unrelated_prompts`` are prompts the edits must leave alone; they fit the query centre
    and calibrate each expert's gate. Never pass the locality prompts you score.
    """

    def __init__(self, model: nn.Module, tokenizer, config: Optional[LEMoEConfig] = None,
                 editor_config: Optional[EditorConfig] = None,
                 unrelated_prompts: Optional[Sequence[str]] = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.editor_config = editor_config or EditorConfig()
        layer = find_layer(model)
        if layer is None:
            layer = attach(model, config or LEMoEConfig())
        elif config is not None and config != layer.config:
            raise ConfigError("the model already carries an adaptor with another config: "
                              "continue with LifelongEditor(model, tokenizer) or detach it first")
        self.layer: LEMoELayer = layer
        prompts = list(unrelated_prompts) if unrelated_prompts is not None else bundled_unrelated_prompts()
        if not prompts:
            raise ConfigError("unrelated_prompts is empty: the gate needs prompts the edits must not touch")
        self.unrelated_prompts = prompts
        self._unrelated_raw: Optional[list[torch.Tensor]] = None
        self._unrelated_queries = None
        model.requires_grad_(False)
        self.device = next(model.parameters()).device
        self.pad_id = pad_id(tokenizer)

    # --------------------------------------------------------------- queries
    def _run_prompts(self, prompts: Sequence[str], capture: Callable, batch_size: int = 64) -> list:
        """Forward ``prompts`` (adaptor off) and collect ``capture(layer, layer_input)`` per batch."""
        captured: list = []
        hook = self.layer.register_forward_hook(
            lambda module, args, output: captured.append(capture(module, args[0])))
        try:
            with torch.no_grad(), adaptors_disabled(self.model):
                for start in range(0, len(prompts), batch_size):
                    chunk = list(prompts[start:start + batch_size])
                    rows = encode_pairs(self.tokenizer, chunk, ["x"] * len(chunk))
                    ids, attention, prompt_mask = collate(rows, self.pad_id, self.device)
                    with query_mask(self.model, prompt_mask):
                        self.model(input_ids=ids, attention_mask=attention, use_cache=False)
        finally:
            hook.remove()
        return captured

    def token_vectors(self, prompts: Sequence[str]) -> list[torch.Tensor]:
        """Per prompt, the raw source vector of each of its tokens, [n_i, d] (before centring)."""
        def capture(layer: LEMoELayer, x: torch.Tensor):
            mask = layer.prompt_mask(x).bool()
            return [v[m].float().cpu() for v, m in zip(layer.token_vectors(x), mask)]
        return [v for batch in self._run_prompts(prompts, capture) for v in batch]

    def _encode(self, vectors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        encoder = self.layer.query_encoder
        with torch.no_grad():
            return [encoder(v.to(self.device)).cpu() for v in vectors]

    def token_queries(self, prompts: Sequence[str]) -> list[torch.Tensor]:
        """Per prompt, the unit-norm routing query of each of its tokens, [n_i, key]."""
        return self._encode(self.token_vectors(prompts))

    def sequence_queries(self, prompts: Sequence[str]) -> torch.Tensor:
        """Mean-pooled unit queries of ``prompts`` [n, key] (the paper's instance query)."""
        return self._pooled_queries(self.token_vectors(prompts))

    def _pooled_queries(self, vectors: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.cat(self._encode([v.mean(dim=0, keepdim=True) for v in vectors]))

    def routes(self, prompts: Sequence[str]) -> torch.Tensor:
        """The expert each prompt routes to now (top-1, -1 = none), exactly as served."""
        def capture(layer: LEMoELayer, x: torch.Tensor):
            return layer._route(x)[0][:, 0].cpu()
        return torch.cat(self._run_prompts(prompts, capture))

    def _unrelated_vectors(self) -> list[torch.Tensor]:
        """Raw token vectors of the unrelated prompts: computed once (the layers below the query
        source are frozen), then centred/encoded as needed."""
        if self._unrelated_raw is None:
            self._unrelated_raw = self.token_vectors(self.unrelated_prompts)
        return self._unrelated_raw

    def _fit_center(self, prompts: Sequence[str]) -> None:
        """Before the first expert: remove the mean direction all token vectors share. Fixed after."""
        vectors = torch.cat(self.token_vectors(prompts) + self._unrelated_vectors())
        with torch.no_grad():
            self.layer.query_encoder.center.copy_(vectors.mean(dim=0).to(self.device))
        self._unrelated_queries = None

    def _unrelated(self):
        if self._unrelated_queries is None:
            raw = self._unrelated_vectors()
            if self._max_pooling:
                self._unrelated_queries = _pad(self._encode(raw))
            else:
                self._unrelated_queries = self._pooled_queries(raw)
        return self._unrelated_queries

    @property
    def _max_pooling(self) -> bool:
        return self.layer.config.query_pooling == "max"

    def _key_positions(self, edits: Sequence[EditRecord], queries: list[torch.Tensor]) -> list[int]:
        """Token whose vector keys an edit: the subject's last token when the subject is known
        (where the model recalls facts about it), else the prompt token least like any token of
        the unrelated prompts."""
        positions = []
        unrelated, unrelated_mask = self._unrelated()
        pool = unrelated[unrelated_mask]
        for edit, query in zip(edits, queries):
            position = _subject_last_token(self.tokenizer, edit.prompt, edit.subject, len(query))
            if position is None:
                position = int((query @ pool.T).max(dim=1).values.argmin())
            positions.append(position)
        return positions

    def _new_anchors(self, edits: Sequence[EditRecord]) -> tuple[torch.Tensor, torch.Tensor]:
        """Anchors of the batch's new expert and their gate thresholds (cosine).

        A threshold sits ``gate_margin`` above the best score any unrelated prompt reaches on
        that anchor, but never above the score of the edit the anchor was made from."""
        margin = self.layer.config.gate_margin
        prompts = [e.prompt for e in edits]
        if self._max_pooling:
            queries = self.token_queries(prompts)
            positions = self._key_positions(edits, queries)
            anchors = torch.stack([q[p] for q, p in zip(queries, positions)])
            unrelated, unrelated_mask = self._unrelated()
            unrelated_best = _max_sim(unrelated, unrelated_mask, anchors).max(dim=0).values
            padded, mask = _pad(queries)
            own = _max_sim(padded, mask, anchors).diagonal()
        else:
            queries = self.sequence_queries(prompts)
            anchors = F.normalize(queries.mean(dim=0, keepdim=True), dim=-1)
            unrelated_best = (self._unrelated() @ anchors.T).max(dim=0).values
            own = (queries @ anchors.T).min(dim=0).values
        thresholds = torch.minimum(unrelated_best + margin, own - 1e-6)
        return anchors, thresholds

    # --------------------------------------------------------------- editing
    def edit_batch(self, edits: Sequence[EditRecord]) -> BatchReport:
        """Turn ``edits`` into one new, trained, frozen and calibrated expert."""
        edits = list(edits)
        if not edits:
            raise ConfigError("edit_batch needs at least one edit")
        if self.layer.config.routing == "token":
            raise ConfigError("LifelongEditor trains sequence-routed adaptors (routing='sequence')")
        started = time.perf_counter()
        layer = self.layer
        if layer.num_experts == 0 and not layer.query_encoder.center.any():
            self._fit_center([e.prompt for e in edits])
        anchors, thresholds = self._new_anchors(edits)
        shared_keys = 0
        if layer.num_anchors:
            similarity = F.normalize(anchors.float().cpu(), dim=-1) @ layer.anchors.float().cpu().T
            shared_keys = int((similarity.max(dim=1).values >= KEY_GROUP_SIMILARITY).sum())
        index = layer.add_expert(anchors=anchors, thresholds=thresholds, n_edits=len(edits))
        try:
            misrouted = int((self.routes([e.prompt for e in edits]) != index).sum())
            steps, loss = self._train(edits)
            layer.freeze_expert()
        except BaseException:
            layer.remove_expert()  # never leave a half-trained expert behind
            raise
        return BatchReport(expert=index, n_edits=len(edits), steps=steps, loss=loss, misrouted=misrouted,
                           threshold=float(thresholds.mean()), seconds=time.perf_counter() - started,
                           shared_keys=shared_keys)

    def _train(self, edits: Sequence[EditRecord]) -> tuple[int, float]:
        cfg = self.editor_config
        eos = getattr(self.tokenizer, "eos_token_id", None)
        batches = supervised_batches(self.tokenizer, [e.prompt for e in edits], [e.target for e in edits],
                                     cfg.micro_batch, self.device,
                                     end_token=eos if cfg.train_eos and isinstance(eos, int) else None)
        n_targets = sum(int((b[3] != -100).sum()) for b in batches)
        tail = _TailForward(self.model, self.layer)
        tail.prepare(batches)
        params = list(self.layer.trainable.values())
        optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        was_training = self.model.training
        self.model.train(False)  # dropout off: the expert must learn the function it will serve
        loss_value = float("nan")
        try:
            for step in range(1, cfg.max_steps + 1):
                optimizer.zero_grad(set_to_none=True)
                total, correct = 0.0, 0
                for index, batch in enumerate(batches):
                    logits = tail.scored_logits(index, batch)
                    _, targets = tail._positions(batch[3])
                    loss = F.cross_entropy(logits, targets, reduction="sum") / n_targets
                    if not loss.requires_grad:  # no edit of this micro-batch reaches the new expert
                        continue
                    loss.backward()
                    total += float(loss.detach())
                    correct += int((logits.argmax(-1) == targets).sum())
                loss_value = total
                if loss_value < cfg.stop_loss and correct == n_targets:
                    return step, loss_value
                optimizer.step()
            return cfg.max_steps, loss_value
        finally:
            self.model.train(was_training)

    def edit(self, edits: Sequence[EditRecord], *, plan: str = DEFAULT_PLAN, batch_size: Optional[int] = None,
             seed: int = 0, save_to: Union[str, os.PathLike, None] = None, progress: bool = True,
             on_batch: Optional[Callable[[BatchReport], None]] = None) -> list[BatchReport]:
        """Plan ``edits`` into batches and edit them one after another.

        ``plan="keys"`` (default): one expert per group of edits whose routing keys coincide
        (``planner.key_groups``); ``batch_size`` must then be None. ``plan="kmeans"`` (the
        paper's clustering) or ``"none"`` (arrival order): batches of ``batch_size`` edits
        (default ``DEFAULT_BATCH_SIZE``).
        On KeyboardInterrupt the unfinished expert is dropped and, with ``save_to``, the adaptor
        holding every completed batch is saved before the interrupt propagates.
        """
        edits = list(edits)
        if not edits:
            raise ConfigError("no edits given")
        check_plan(plan, batch_size=batch_size)
        features = None
        if plan in ("keys", "kmeans"):
            features = self.plan_features(edits)
        if plan != "keys" and batch_size is None:
            batch_size = DEFAULT_BATCH_SIZE
        batches = plan_order(edits, batch_size=batch_size, plan=plan, seed=seed, features=features)
        reports: list[BatchReport] = []
        bar = tqdm(batches, desc="editing", unit="expert", disable=not progress)
        try:
            for batch in bar:
                report = self.edit_batch([edits[i] for i in batch])
                reports.append(report)
                bar.set_postfix(expert=report.expert, loss=f"{report.loss:.3f}", steps=report.steps)
                if on_batch is not None:
                    on_batch(report)
        except KeyboardInterrupt:
            if save_to is not None and self.layer.num_experts:
                save(self.model, save_to)
            raise
        if save_to is not None:
            save(self.model, save_to)
        return reports

    def plan_features(self, edits: Sequence[EditRecord]):
        """What the planner groups edits by: the vectors that will route them (their keys, or
        their pooled queries), so a batch is a region of routing space."""
        if self.layer.num_experts == 0 and not self.layer.query_encoder.center.any():
            self._fit_center([e.prompt for e in edits])
        prompts = [e.prompt for e in edits]
        if self._max_pooling:
            queries = self.token_queries(prompts)
            positions = self._key_positions(edits, queries)
            return torch.stack([q[p] for q, p in zip(queries, positions)]).numpy()
        return self.sequence_queries(prompts).numpy()

    def remove_last_batch(self) -> None:
        """Roll back the newest expert (the last edit batch)."""
        self.layer.remove_expert()


def _pad(queries: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack per-prompt token queries [n_i, k] into [P, T, k] plus a [P, T] validity mask."""
    length = max(q.shape[0] for q in queries)
    padded = torch.zeros(len(queries), length, queries[0].shape[1])
    mask = torch.zeros(len(queries), length, dtype=torch.bool)
    for i, q in enumerate(queries):
        padded[i, :q.shape[0]] = q
        mask[i, :q.shape[0]] = True
    return padded, mask


def _max_sim(padded: torch.Tensor, mask: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """Max-pooled scores [P, M]: each prompt's best token against each anchor."""
    scores = padded @ anchors.T.cpu()
    return scores.masked_fill(~mask.unsqueeze(-1), float("-inf")).max(dim=1).values


def _subject_last_token(tokenizer, prompt: str, subject: Optional[str], n_tokens: int) -> Optional[int]:
    """Index of the prompt token holding the subject's last character, or None."""
    if not subject:
        return None
    end = prompt.rfind(subject)
    if end < 0:
        return None
    end += len(subject)
    try:
        offsets = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    except (NotImplementedError, TypeError, ValueError):  # slow tokenizers have no offsets
        return len(tokenizer(prompt[:end], add_special_tokens=False)["input_ids"]) - 1
    shift = n_tokens - len(offsets)  # special tokens the model input has in front
    hits = [i for i, (a, b) in enumerate(offsets) if a < end and b > a]
    return hits[-1] + shift if hits else None
