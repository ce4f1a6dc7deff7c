"""LifelongEditor: each batch of edits becomes a new expert, trained, frozen and gated.

The planner groups the edits into batches (default: every edit gets its own expert, and the
question gate serves, among the experts of one subject, the one holding the question asked;
with the gate off, edits whose routing keys the router cannot tell apart share one expert). For each batch: every
edit's key (its subject's last-token query) becomes an anchor of the new expert, and each
anchor's gate threshold is set from its edit's own score and the scores of unrelated prompts
(never the scored locality prompts); all of this is decided before any training, from the
prompts alone (``calibration.Calibration``). Then the run's new experts train together in
blocks (``training``): only new experts' weights train, on the target tokens' NLL with the
prompt masked, each exactly as if trained alone; each is frozen when done. Older experts are never touched, so earlier edits
cannot be overwritten.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from . import question_gate
from .augment import prompt_variants
from .calibration import Calibrated, Calibration
from .config import LEMoEConfig
from .data import EditRecord, bundled_unrelated_prompts
from .errors import ConfigError
from .experts import init_expert
from .layer import LEMoELayer
from .ledger import LedgerEntry, RunPlan, plan_run, select
from .ledger import now as ledger_now
from .patching import adaptors_disabled, attach, find_layer
from .planner import check_plan, plan_order
from .storage import check_save_target, save
from .evaluation import chat_text, greedy_token_ids
from .negatives import negative_prompts, subject_of
from .tokens import encode_pairs, special_prefix
from .training import (BaseKL, BlockTrainer, ExpertJob, JobResult, TargetNLL, TrainRow, auto_block_size,
                       editing_attention, training_dtype)


DEFAULT_PLAN = "keys"
"""How edits are grouped into experts (see ``planner``; measured on the bundled data: README)."""
DEFAULT_BATCH_SIZE = 10
"""Edits per expert with ``plan="kmeans"`` or ``"none"`` unless told otherwise."""


@dataclass
class EditorConfig:
    """Training knobs of the editor (the layer's own knobs are in LEMoEConfig)."""

    learning_rate: float = 2e-2
    """AdamW step size. 0.02 since the question gate became the default (it keeps same-subject
    questions off the experts, which a larger step had hurt): chosen on held-out slices (bundled
    records 1000-1099, real ZsRE 600-699), where it trained 1.8-2.7x faster than 0.005 with
    generality as high or higher (README, *Editing speed*)."""
    max_steps: int = 60
    """Optimiser steps per batch at most (each over all of the batch's edits)."""
    stop_loss: float = 0.02
    """Early stop once the mean target NLL is below this and every target token is argmax-correct."""
    weight_decay: float = 0.0
    train_eos: bool = True
    """Also train the tokenizer's end-of-sequence token after each target, so greedy generation
    stops after the new answer instead of repeating it (the EOS is not scored by ``evaluate``)."""
    micro_batch: int = 32
    """Edits per forward pass (a step runs its block's edits, sorted by length, in passes of at
    most this many; gradients accumulate per expert over the step's passes)."""
    train_dtype: Optional[str] = "auto"
    """Run the frozen layers above the target (and the LM head) in this dtype while training
    (autocast, weights cast once). "auto" (the default): "bfloat16" when the model is fp32 and
    its device computes bf16 natively (a CUDA GPU with bf16, a CPU with AVX512-BF16 or AMX:
    ``training.native_bfloat16``), else the model's dtype. None: the model's dtype, in which
    blocked training gives exactly the experts one-at-a-time training gives (the tests pin
    this). With bf16 the gradients are approximate, the experts are still served in the
    model's dtype; measured on held-out edits at T=200 and T=1000 it edits 1.5-1.9x faster on
    this project's CPU, every metric within 0.01 (README, *Editing speed*)."""
    negatives: int = 0
    """Same-subject negative prompts per subject of an expert (``negatives``): the expert must
    leave the unedited model's next-token distribution on them unchanged, so other facts about
    an edited subject stay. Off by default: measured on the bundled set (T=20, README) 4
    negatives raised teacher-forced specificity from 0.32 to 0.77 but cut generality from 1.00
    to 0.50 and tripled editing time. ``remove`` always trains the removed edits' prompts as
    negatives of the experts it rebuilds."""
    train_chat: bool = True
    """Also train each edit asked through the tokenizer's chat template (when it has one), so the
    edit holds when an instruct model is asked as a chat."""
    augment: int = 0
    """Rewordings of each edit's prompt trained as positives beside it (``augment``: its
    statement form, lead-in forms), meant to keep an expert trained with ``negatives`` answering
    paraphrases of the edited question (measured in the README; off by default)."""
    block_size: Optional[int] = None
    """Edits trained at the same time: the new experts of a run train together, whole experts,
    up to this many edits (a block); as an expert finishes the next ones take its place. Each
    expert trains exactly as alone (``training``). None: chosen from free memory
    (``training.auto_block_size``); 1: one expert at a time."""

    def __post_init__(self) -> None:
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ConfigError(f"EditorConfig: learning_rate must be positive, got {self.learning_rate!r}")
        for name in ("max_steps", "micro_batch"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"EditorConfig: {name} must be a positive int, got {value!r}")
        for name in ("negatives", "augment"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"EditorConfig: {name} must be an int >= 0, got {value!r}")
        if self.train_dtype not in (None, "auto", "float32", "float16", "bfloat16"):
            raise ConfigError(f"EditorConfig: train_dtype must be None, auto, float32, float16 or bfloat16, "
                              f"got {self.train_dtype!r}")
        if self.block_size is not None and (not isinstance(self.block_size, int)
                                            or isinstance(self.block_size, bool) or self.block_size < 1):
            raise ConfigError(f"EditorConfig: block_size must be a positive int or None, got {self.block_size!r}")
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
    """Edits of the batch whose own prompt routes to another expert (they cannot be learned, and
    are left out of the expert's training)."""
    threshold: float
    seconds: float
    """Training time attributed to this expert (its share, by edits, of every pass it was in)."""
    shared_keys: int = 0
    """Edits whose routing key coincides with an older expert's anchor (cosine >=
    ``planner.KEY_GROUP_SIMILARITY``): their paraphrases may reach that expert instead."""


@dataclass
class RemovalReport:
    """What ``LifelongEditor.remove`` did."""

    removed: list[int]
    """Ledger ids of the removed edits."""
    rebuilt: int
    """Other edits of their experts, retrained into new experts."""
    dropped_experts: int


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
        elif config is not None and config.replace(question_gate=layer.config.question_gate,
                                                   question_gate_margin=layer.config.question_gate_margin,
                                                   question_gate_selects=layer.config.question_gate_selects,
                                                   question_gate_by_name=layer.config.question_gate_by_name,
                                                   question_gate_name_floor=layer.config.question_gate_name_floor
                                                   ) != layer.config:
            raise ConfigError("the model already carries an adaptor with another config: "
                              "continue with LifelongEditor(model, tokenizer) or detach it first")
        self.layer: LEMoELayer = layer
        question_gate.sync(layer, tokenizer)  # served edits: the gate as the config says (custom filters stay)
        prompts = list(unrelated_prompts) if unrelated_prompts is not None else bundled_unrelated_prompts()
        if not prompts:
            raise ConfigError("unrelated_prompts is empty: the gate needs prompts the edits must not touch")
        self.calibration = Calibration(model, tokenizer, layer, prompts)
        self._forget: list[str] = []  # prompts of the edits being removed, during remove()
        self._continuations: dict[str, list[int]] = {}  # negative prompt -> unedited greedy tokens, per run
        self.last_run: dict = {}  # how the last run trained: block size, cached-tail path, forward passes
        model.requires_grad_(False)
        self.device = next(model.parameters()).device

    # ------------------------------------------------- queries (``calibration``)
    @property
    def unrelated_prompts(self) -> list[str]:
        return self.calibration.unrelated_prompts

    def token_vectors(self, prompts: Sequence[str]) -> list[torch.Tensor]:
        """Per prompt, the raw source vector of each of its tokens, [n_i, d] (before centring)."""
        return self.calibration.token_vectors(prompts)

    def token_queries(self, prompts: Sequence[str]) -> list[torch.Tensor]:
        """Per prompt, the unit-norm routing query of each of its tokens, [n_i, key]."""
        return self.calibration.token_queries(prompts)

    def sequence_queries(self, prompts: Sequence[str]) -> torch.Tensor:
        """Mean-pooled unit queries of ``prompts`` [n, key] (the paper's instance query)."""
        return self.calibration.sequence_queries(prompts)

    def routes(self, prompts: Sequence[str]) -> torch.Tensor:
        """The expert each prompt routes to now as the anchors decide (top-1, -1 = none): the question
        gate, when on, then drops the route, picks another expert of the same subject, or serves a
        prompt left without one by the edited subject it names."""
        return self.calibration.routes(prompts)

    # ------------------------------------------------------------- training

    def _job(self, calibrated: Calibrated) -> ExpertJob:
        """The training job of one batch: its expert's initial weights (as ``add_expert`` makes
        them), a row per edit that reaches the expert when served (and the same edit asked
        through the chat template, and its ``augment`` rewordings), and the negative rows of its
        subjects (``negatives``). Rewordings and chat rows take the prompt's route and weight."""
        cfg, layer, tok = self.editor_config, self.layer, self.tokenizer
        eos = getattr(tok, "eos_token_id", None)
        end = [eos] if cfg.train_eos and isinstance(eos, int) else []
        edits = calibrated.edits
        pairs = encode_pairs(tok, [e.prompt for e in edits], [e.target for e in edits])
        chat = cfg.train_chat and bool(getattr(tok, "chat_template", None))
        rows = []
        for edit, pair, (ids, weights) in zip(edits, pairs, calibrated.routes):
            if calibrated.expert not in ids:
                continue
            slot = ids.index(calibrated.expert)
            frozen = tuple((e, w) for e, w in zip(ids, weights) if e >= 0 and e != calibrated.expert)
            sequences = [(pair.ids + end, pair.prompt_len)]
            variants = prompt_variants(edit.prompt, cfg.augment)
            for variant in encode_pairs(tok, variants, [edit.target] * len(variants)) if variants else []:
                sequences.append((variant.ids + end, variant.prompt_len))
            if chat:
                asked = tok(chat_text(tok, edit.prompt), add_special_tokens=False)["input_ids"]
                answer = tok(edit.target, add_special_tokens=False)["input_ids"]
                sequences.append((list(asked) + list(answer) + end, len(asked)))
            for sequence, prompt_len in sequences:
                rows.append(TrainRow(ids=sequence, labels=[-100] * prompt_len + sequence[prompt_len:],
                                     weight=weights[slot], frozen_route=frozen))
        if rows:
            rows += self._negative_rows(calibrated, rows[0].weight)
        weights = init_expert(layer.hidden_size, layer.config.expert_hidden, layer.config.expert_gated,
                              seed=layer.config.seed * 1_000_003 + calibrated.expert, device=self.device,
                              dtype=layer.expert_dtype)
        return ExpertJob(weights={name: w.float() for name, w in weights.items()}, rows=rows,
                         anchors=calibrated.anchors, anchor_windows=calibrated.windows)

    def _negative_prompts(self, calibrated: Calibrated) -> list[str]:
        """Same-subject prompts from the negative bank for the expert's subjects, and the prompts
        of the edits being removed (``remove``: every expert it rebuilds learns to leave them
        alone, whichever of them they would reach)."""
        subjects: dict[str, list] = {}
        for edit in calibrated.edits:
            subject = subject_of(edit)
            if subject:
                subjects.setdefault(subject, []).append(edit)
        prompts: list[str] = []
        for subject, edits in subjects.items():
            # the edit prompts only: a record's paraphrase is what a user may ask (and what the
            # generality metric scores), not a hint at which bank questions to leave out
            texts = [edit.prompt for edit in edits]
            prompts += negative_prompts(subject, texts, self.editor_config.negatives,
                                        relations=[getattr(edit, "relation", None) for edit in edits])
        return list(dict.fromkeys(prompts + self._forget))

    def _prepare_negatives(self, calibrated: Sequence[Calibrated]) -> None:
        """The unedited model's greedy continuation of every negative prompt of the run (one
        batched pass), which the negative rows are scored along."""
        prompts = sorted({p for c in calibrated for p in self._negative_prompts(c)})
        self._continuations = {}
        if prompts:
            with adaptors_disabled(self.model):
                tokens = greedy_token_ids(self.model, self.tokenizer, prompts, NEGATIVE_TOKENS, batch_size=64)
            self._continuations = dict(zip(prompts, tokens))

    def _negative_rows(self, calibrated: Calibrated, weight: float) -> list[TrainRow]:
        """Rows on which the expert must keep the unedited model's next-token distributions
        (``BaseKL``): each negative prompt followed by the unedited model's own greedy
        continuation, scored at the prompt's last position and along the continuation."""
        prompts = self._negative_prompts(calibrated)
        if not prompts:
            return []
        prefix = special_prefix(self.tokenizer) or []
        eos = getattr(self.tokenizer, "eos_token_id", None)
        rows = []
        for prompt, ids in zip(prompts, self.tokenizer(prompts, add_special_tokens=not prefix)["input_ids"]):
            ids = prefix + list(ids)
            answer = list(self._continuations.get(prompt) or [])
            if not answer:  # it ends at once: only the first position is scored (BaseKL ignores the label)
                answer = [eos if isinstance(eos, int) else ids[-1]]
            rows.append(TrainRow(ids=ids + answer, labels=[-100] * len(ids) + answer, weight=weight,
                                 term="base_kl"))
        return rows

    def block_size(self, jobs: Sequence[ExpertJob] = ()) -> int:
        """Edits trained at once: ``EditorConfig.block_size``, else chosen from free memory;
        1 when ``top_k > 1`` (an edit's output then mixes in older experts, which must be final)."""
        if self.layer.config.top_k > 1:
            return 1
        if self.editor_config.block_size is not None:
            return self.editor_config.block_size
        rows = [len(r.ids) for job in jobs for r in job.rows]
        return auto_block_size(self.model, self.layer, mean_rows_per_job=len(rows) / max(len(jobs), 1),
                               mean_tokens=sum(rows) / len(rows) if rows else 16.0,
                               micro_batch=self.editor_config.micro_batch)

    # --------------------------------------------------------------- editing
    def edit_batch(self, edits: Sequence[EditRecord]) -> BatchReport:
        """Turn ``edits`` into one new, trained, frozen and calibrated expert."""
        edits = list(edits)
        if not edits:
            raise ConfigError("edit_batch needs at least one edit")
        with editing_attention(self.device):
            return self._edit_batches([edits], progress=False)[0]

    def _edit_batches(self, batches: Sequence[Sequence[EditRecord]], *, save_to=None, progress: bool = False,
                      on_batch: Optional[Callable[[BatchReport], None]] = None,
                      by_question: bool = False) -> list[BatchReport]:
        """Calibrate every batch, train their experts in blocks, commit them in order.
        ``by_question``: served through a question gate that picks among same-key experts.

        On KeyboardInterrupt (or any error) the experts completed in plan order so far are
        kept (and, with ``save_to``, saved); the rest, finished or not, are dropped, so the
        adaptor is what the first batches alone would have made."""
        if self.layer.config.routing == "token":
            raise ConfigError("LifelongEditor trains sequence-routed adaptors (routing='sequence')")
        layer, cfg = self.layer, self.editor_config
        fresh_cache = self.calibration.vector_cache is None
        if fresh_cache:
            self.calibration.vector_cache = {}
        try:
            if layer.num_experts == 0 and not layer.query_encoder.center.any():
                self.calibration.fit_center([e.prompt for batch in batches for e in batch])
            calibrated = self.calibration.calibrate(batches, by_question=by_question)
            self._prepare_negatives(calibrated)
            jobs = [self._job(c) for c in calibrated]
        finally:
            if fresh_cache:
                self.calibration.vector_cache = None
        block = self.block_size(jobs)
        compute_dtype = training_dtype(cfg.train_dtype, self.model)
        trained_in = str(compute_dtype or next(self.model.parameters()).dtype).replace("torch.", "")
        trainer = BlockTrainer(self.model, layer, learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay,
                               max_steps=cfg.max_steps, block_size=block, micro_batch=cfg.micro_batch,
                               terms={"target": TargetNLL(cfg.stop_loss), "base_kl": BaseKL()},
                               compute_dtype=compute_dtype)
        total = sum(len(c.edits) for c in calibrated)
        bar = tqdm(total=total, desc="editing", unit="edit", disable=not progress)
        finished: dict[int, JobResult] = {}
        ready: list[tuple[Calibrated, JobResult]] = []
        reports: list[BatchReport] = []

        def commit() -> None:
            if ready:
                layer.add_experts([dict(anchors=c.anchors, thresholds=c.thresholds, windows=c.windows, weights=r.weights,
                                        info={"n_edits": len(c.edits)}) for c, r in ready])
                ready.clear()

        def on_done(job: int, result: JobResult) -> None:
            finished[job] = result
            bar.update(len(calibrated[job].edits))
            while len(reports) in finished:
                number = len(reports)
                c, r = calibrated[number], finished.pop(number)
                ready.append((c, r))
                if layer.config.top_k > 1 or len(ready) >= COMMIT_EVERY:
                    commit()
                misrouted = sum(1 for ids, _ in c.routes if ids[0] != c.expert)
                report = BatchReport(expert=c.expert, n_edits=len(c.edits), steps=r.steps, loss=r.loss,
                                     misrouted=misrouted, threshold=float(c.thresholds.mean()),
                                     seconds=r.seconds, shared_keys=c.shared_keys)
                reports.append(report)
                bar.set_postfix(experts=f"{len(reports)}/{len(calibrated)}", block=block, refresh=False)
                if on_batch is not None:
                    on_batch(report)

        try:
            trainer.run(jobs, on_done)
            self.last_run = {"block_size": block, "tail_path": trainer.mode != "full", "mode": trainer.mode,
                             "passes": trainer.passes, "shared_lead": trainer.share_lead,
                             "train_dtype": trained_in}
        except BaseException:
            commit()
            if save_to is not None and layer.num_experts:
                save(self.model, save_to)
            raise
        finally:
            bar.close()
        commit()
        return reports

    def edit(self, edits: Sequence[EditRecord], *, plan: str = DEFAULT_PLAN, batch_size: Optional[int] = None,
             seed: int = 0, save_to: Union[str, os.PathLike, None] = None, progress: bool = True,
             on_batch: Optional[Callable[[BatchReport], None]] = None) -> list[BatchReport]:
        """Plan ``edits`` into batches, one new expert each, and train them (in blocks).

        ``plan="keys"`` (default): one expert per edit when the adaptor is served through the
        question gate with ``LEMoEConfig.question_gate_selects`` (the default), else one expert
        per group of edits whose routing keys coincide (``planner.key_groups``); ``batch_size``
        must then be None. ``plan="kmeans"`` (the
        paper's clustering) or ``"none"`` (arrival order): batches of ``batch_size`` edits
        (default ``DEFAULT_BATCH_SIZE``). ``on_batch`` gets each expert's report in plan order.

        Facts that change again: an edit of a fact the ledger already holds (``ledger.same_fact``:
        the same prompt, or the same subject and relation) supersedes it, and within ``edits``
        the later record of a fact wins. The expert holding a superseded edit is dropped and
        rebuilt from its other edits in this run, so the old value is gone everywhere.
        Every edit is recorded in the adaptor's ledger (``layer.ledger``).

        On KeyboardInterrupt the experts completed in plan order are kept (the unfinished ones,
        and any finished after the first unfinished one, are dropped) and, with ``save_to``,
        the adaptor holding them is saved before the interrupt propagates; a run that rebuilds
        older experts is rolled back whole instead (the adaptor stays as it was).
        """
        edits = list(edits)
        if not edits:
            raise ConfigError("no edits given")
        check_plan(plan, batch_size=batch_size)
        if save_to is not None:
            check_save_target(save_to)  # refuse a bad folder before the work, not after it
        run = plan_run(self.layer.ledger, edits)
        return self._run_ledger(run, plan=plan, batch_size=batch_size, seed=seed, save_to=save_to,
                                progress=progress, on_batch=on_batch)

    def remove(self, ids: Sequence[int] = (), subject: Optional[str] = None, *,
               save_to: Union[str, os.PathLike, None] = None, progress: bool = True) -> "RemovalReport":
        """Remove active ledger edits (by id, or every one about ``subject``): the model then
        behaves as if they had never been made. Their experts are dropped and rebuilt from the
        edits they also held (retrained), so a subject's other edits are kept."""
        ids = list(ids)
        if not ids and subject is None:
            raise ConfigError("remove: give edit ids or a subject")
        targets = select(self.layer.ledger, ids, subject)
        missing = sorted(set(ids) - {e.id for e in targets})
        if missing:
            known = {e.id: e.status for e in self.layer.ledger}
            detail = ", ".join(f"{i} ({known[i]})" if i in known else f"{i} (unknown)" for i in missing)
            raise ConfigError(f"remove: no active edit with id {detail}; see `lemoe list`")
        if not targets:
            raise ConfigError(f"remove: no active edit about subject {subject!r}; see `lemoe list`")
        if save_to is not None:
            check_save_target(save_to)
        run = plan_run(self.layer.ledger, [], removed=targets)
        # the rebuilt experts learn to leave the removed edits' prompts alone (negative rows)
        self._forget = [text for e in targets for text in (e.prompt, e.rephrase) if text]
        try:
            self._run_ledger(run, removed=targets, stamp=ledger_now(), save_to=save_to, progress=progress)
        finally:
            self._forget = []
        return RemovalReport(removed=[e.id for e in targets], rebuilt=run.rebuilds, dropped_experts=len(run.drop))

    def _run_ledger(self, run: RunPlan, *, removed: Sequence[LedgerEntry] = (), stamp: str = "",
                    plan: str = DEFAULT_PLAN, batch_size: Optional[int] = None, seed: int = 0,
                    save_to=None, progress: bool = True,
                    on_batch: Optional[Callable[[BatchReport], None]] = None) -> list[BatchReport]:
        """Drop the experts ``run`` rebuilds, train ``run.edits`` into new experts, record it all
        in the ledger; on any error with experts dropped, put the adaptor back as it was."""
        with editing_attention(self.device):
            return self._run_ledger_inner(run, removed=removed, stamp=stamp, plan=plan,
                                          batch_size=batch_size, seed=seed, save_to=save_to,
                                          progress=progress, on_batch=on_batch)

    def _run_ledger_inner(self, run: RunPlan, *, removed, stamp, plan, batch_size, seed, save_to,
                          progress, on_batch) -> list[BatchReport]:
        layer = self.layer
        snapshot = layer.snapshot() if run.drop else None
        reports: list[BatchReport] = []
        try:
            for expert in reversed(run.drop):
                layer.remove_expert(expert)
            if run.edits:
                reports = self._plan_and_train(run, plan=plan, batch_size=batch_size, seed=seed,
                                               save_to=None if snapshot is not None else save_to,
                                               progress=progress, on_batch=on_batch)
        except BaseException:
            if snapshot is not None:
                layer.restore(snapshot)
            raise
        for entry, newer in run.superseded:
            entry.superseded_by = newer
            entry.expert = None
        for entry in removed:
            entry.removed_at = stamp
            entry.expert = None
        layer.ledger.extend(e for e in run.added if e.expert is not None or e.superseded_by is not None)
        if save_to is not None:
            save(self.model, save_to)
        return reports

    def _plan_and_train(self, run: RunPlan, *, plan: str, batch_size: Optional[int], seed: int, save_to,
                        progress: bool, on_batch) -> list[BatchReport]:
        edits = run.edits
        self.calibration.vector_cache = {}  # every prompt's lower layers run once in this run
        self.calibration.progress = progress
        # a serving-time route filter (question_gate) stays out of the run: routes are decided
        # and checked as the anchors decide them
        route_filter, self.layer.route_filter = self.layer.route_filter, None
        try:
            by_question = self._served_by_question(route_filter)
            if plan == "keys" and by_question:
                # the gate tells a subject's facts apart where its shared key cannot: an expert each
                batches = [[i] for i in range(len(edits))]
            else:
                features = self.plan_features(edits) if plan in ("keys", "kmeans") else None
                if plan != "keys" and batch_size is None:
                    batch_size = DEFAULT_BATCH_SIZE
                batches = plan_order(edits, batch_size=batch_size, plan=plan, seed=seed, features=features)
            reports: list[BatchReport] = []

            def record(report: BatchReport) -> None:  # ledger entries follow their expert as it lands
                for i in batches[len(reports)]:
                    run.entries[i].expert = report.expert
                reports.append(report)
                if on_batch is not None:
                    on_batch(report)

            try:
                self._edit_batches([[edits[i] for i in batch] for batch in batches], save_to=None,
                                   progress=progress, on_batch=record, by_question=by_question)
            except BaseException:
                # completed experts stay (and are saved): so do their ledger entries, saved or not
                self.layer.ledger.extend(e for e in run.added if e.expert is not None)
                if save_to is not None and self.layer.num_experts:
                    save(self.model, save_to)
                raise
        finally:
            self.calibration.vector_cache = None
            self.calibration.progress = False
            self.layer.route_filter = route_filter
            question_gate.sync(self.layer, self.tokenizer)  # (a new adaptor's gate starts here)
            self.layer._sequence_route = None
        return reports

    def _served_by_question(self, route_filter) -> bool:
        """Whether the adaptor is served through a question gate that picks among same-key experts
        (``LEMoEConfig.question_gate_selects``): then every edit gets its own expert."""
        return isinstance(route_filter, question_gate.QuestionGate) and self.layer.config.selects_by_question

    def plan_features(self, edits: Sequence[EditRecord]):
        """What the planner groups edits by: the vectors that will route them (their keys, or
        their pooled queries), so a batch is a region of routing space."""
        if self.layer.num_experts == 0 and not self.layer.query_encoder.center.any():
            self.calibration.fit_center([e.prompt for e in edits])
        if self.calibration.max_pooling:
            return self.calibration.keys(edits)[0].numpy()
        return self.calibration.sequence_queries([e.prompt for e in edits]).numpy()

    def remove_last_batch(self) -> None:
        """Roll back the newest expert (the last edit batch)."""
        self.layer.remove_expert()


NEGATIVE_TOKENS = 3
"""Tokens of the unedited model's greedy answer along which a negative row is scored."""

COMMIT_EVERY = 64
"""Completed experts are appended to the layer this many at a time (one copy of the weight
stacks each time), and at the end of the run or on an interrupt."""

