"""LifelongEditor: each batch of edits becomes a new expert, trained, frozen and gated.

For one batch: the batch's instance queries give the new expert's anchor (their normalised
mean: the key that routes this batch here); only the new expert's weights train, on the
target tokens' NLL with the prompt masked; then it is frozen and its gate threshold is set
from its own edits' scores and the scores of unrelated prompts (never the scored locality
prompts). Older experts are never touched, so earlier edits cannot be overwritten.
"""

from __future__ import annotations

import dataclasses
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
from .layer import LEMoELayer
from .patching import adaptors_disabled, attach, find_layer, query_mask
from .planner import plan_order
from .storage import save
from .tokens import collate, encode_pairs


@dataclass
class EditorConfig:
    """Training knobs of the editor (the layer's own knobs are in LEMoEConfig)."""

    learning_rate: float = 1e-3
    max_steps: int = 60
    """Optimiser steps per batch at most (each over all of the batch's edits)."""
    stop_loss: float = 0.02
    """Early stop once the mean target NLL is below this and every target token is argmax-correct."""
    weight_decay: float = 0.0
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
        self._unrelated_queries: Optional[torch.Tensor] = None
        model.requires_grad_(False)
        self.device = next(model.parameters()).device
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    # --------------------------------------------------------------- queries
    def pooled_vectors(self, prompts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """The layer's pooled query vectors of each prompt (before centring), [n, d]."""
        if self.layer.config.routing == "token":
            raise ConfigError("LifelongEditor trains sequence-routed adaptors (routing='sequence')")
        captured: list[torch.Tensor] = []
        hook = self.layer.register_forward_hook(
            lambda module, args, output: captured.append(module.pooled_vectors(args[0]).cpu()))
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
        return torch.cat(captured)

    def queries(self, prompts: Sequence[str]) -> torch.Tensor:
        """Unit-norm routing queries of ``prompts`` (what the layer routes them by), [n, key]."""
        with torch.no_grad():
            return self.layer.query_encoder(self.pooled_vectors(prompts).to(self.device))

    def _fit_center(self, prompts: Sequence[str]) -> None:
        """Before the first expert: remove the mean direction all sentences share. Fixed after."""
        pooled = self.pooled_vectors(list(prompts) + self.unrelated_prompts)
        with torch.no_grad():
            self.layer.query_encoder.center.copy_(pooled.mean(dim=0))
        self._unrelated_queries = None

    def _unrelated(self) -> torch.Tensor:
        if self._unrelated_queries is None:
            self._unrelated_queries = self.queries(self.unrelated_prompts)
        return self._unrelated_queries

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
        queries = self.queries([e.prompt for e in edits])
        index = layer.add_expert(anchor=queries.mean(dim=0), n_edits=len(edits))
        try:
            with torch.no_grad():
                ids, _ = layer._route_queries(queries, torch.full_like(layer.thresholds, float("-inf")))
            misrouted = int((ids[:, 0] != index).sum())
            steps, loss = self._train(edits)
            layer.freeze_expert()
        except BaseException:
            layer.remove_expert()  # never leave a half-trained expert behind
            raise
        threshold = self._calibrate(index, queries)
        return BatchReport(expert=index, n_edits=len(edits), steps=steps, loss=loss, misrouted=misrouted,
                           threshold=threshold, seconds=time.perf_counter() - started)

    def _train(self, edits: Sequence[EditRecord]) -> tuple[int, float]:
        cfg = self.editor_config
        rows = encode_pairs(self.tokenizer, [e.prompt for e in edits], [e.target for e in edits])
        batches = []
        for start in range(0, len(rows), cfg.micro_batch):
            chunk = rows[start:start + cfg.micro_batch]
            ids, attention, prompt_mask = collate(chunk, self.pad_id, self.device)
            labels = ids.masked_fill((prompt_mask == 1) | (attention == 0), -100)
            batches.append((ids, attention, prompt_mask, labels))
        n_targets = sum(int((b[3] != -100).sum()) for b in batches)
        params = list(self.layer.trainable.values())
        optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        was_training = self.model.training
        self.model.train(False)  # dropout off: the expert must learn the function it will serve
        loss_value = float("nan")
        try:
            for step in range(1, cfg.max_steps + 1):
                optimizer.zero_grad(set_to_none=True)
                total, correct = 0.0, 0
                for ids, attention, prompt_mask, labels in batches:
                    with query_mask(self.model, prompt_mask):
                        logits = self.model(input_ids=ids, attention_mask=attention, use_cache=False).logits
                    shifted, targets = logits[:, :-1].float(), labels[:, 1:]
                    loss = F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), targets.reshape(-1),
                                           ignore_index=-100, reduction="sum") / n_targets
                    loss.backward()
                    total += float(loss)
                    scored = targets != -100
                    correct += int((shifted.argmax(-1)[scored] == targets[scored]).sum())
                loss_value = total
                if loss_value < cfg.stop_loss and correct == n_targets:
                    return step, loss_value
                optimizer.step()
            return cfg.max_steps, loss_value
        finally:
            self.model.train(was_training)

    def _calibrate(self, index: int, queries: torch.Tensor) -> float:
        """Threshold = best unrelated score + margin, but never above the batch's own weakest
        score: the batch's own edits always pass their gate."""
        anchor = self.layer.anchors[index]
        own = float((queries @ anchor).min())
        unrelated = float((self._unrelated() @ anchor).max())
        threshold = min(unrelated + self.layer.config.gate_margin, own - 1e-6)
        self.layer.set_threshold(index, threshold)
        return threshold

    def edit(self, edits: Sequence[EditRecord], *, batch_size: int = 20, plan: str = "kmeans",
             seed: int = 0, save_to: Union[str, os.PathLike, None] = None, progress: bool = True,
             on_batch: Optional[Callable[[BatchReport], None]] = None) -> list[BatchReport]:
        """Plan ``edits`` into batches and edit them one after another.

        On KeyboardInterrupt the unfinished expert is dropped and, with ``save_to``, the adaptor
        holding every completed batch is saved before the interrupt propagates.
        """
        edits = list(edits)
        if not edits:
            raise ConfigError("no edits given")
        features = None
        if plan == "kmeans":
            if self.layer.num_experts == 0 and not self.layer.query_encoder.center.any():
                self._fit_center([e.prompt for e in edits])
            features = self.queries([e.prompt for e in edits]).cpu().numpy()
        batches = plan_order(edits, batch_size=batch_size, plan=plan, seed=seed, features=features)
        reports: list[BatchReport] = []
        bar = tqdm(batches, desc="editing", unit="batch", disable=not progress)
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

    def remove_last_batch(self) -> None:
        """Roll back the newest expert (the last edit batch)."""
        self.layer.remove_expert()


def report_dict(report: BatchReport) -> dict:
    return dataclasses.asdict(report)
