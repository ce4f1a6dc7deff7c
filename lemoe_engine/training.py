"""Blocked training: the new experts of a run train together, each exactly as it would alone.

Why this is possible: every training row (an edit's prompt + target) reaches exactly one new
expert (sequence routing, top-1, decided by the prompt against frozen anchors; the editor
checks the route before training), and every older expert is frozen. So the experts of a run
are independent problems that can share forward/backward passes:

* **Forced route.** In a pass, row ``r`` of job ``j`` gets ``scale * w_r * f_j(x_r)`` added at
  the target layer (``w_r`` is the route weight its own expert gets when served: 1.0 with
  top-1). Rows never see another new expert, so an edit's loss reaches only its own expert.
  Rows whose served route is another expert are dropped by the editor before training (they
  could not reach this expert when served; one-at-a-time training spent steps on them in vain).
* **Separate gradients.** Each job's weights are their own leaf tensors; the loss of a pass is
  ``sum_j loss_j`` and rows are independent in a transformer forward (attention stays within
  a sequence, norms are per token), so ``d loss / d W_j`` is job ``j``'s gradient alone.
* **Separate optimiser state.** One ``torch.optim.AdamW`` per job: its step count, bias
  correction and moments are the job's own, exactly as when it trains alone.
* **Per-job early stop.** After every step each job checks its own stop rule (mean target NLL
  below ``stop_loss`` and every target token argmax-correct, the one-at-a-time rule). A job
  that stops leaves the block: its rows leave the passes, its optimiser is dropped, its
  weights are never touched again (bit-unchanged); the next queued jobs take its place.

Cost: everything below the target layer is frozen and runs once per edit per run (when the
edit's job enters a block): the target layer's MLP input ``x`` and its block output with no
expert (``out0``) are cached. A step then computes ``out0 + delta(x)`` and runs only the
decoder layers above the target, and the LM head only at scored positions. With
``expert_span='key'`` (the default) an expert acts only from its row's key token on (the prompt
token that best matches its anchors, as served), so every position before it keeps the unedited
model's states at every layer: ``_prepare`` records their keys and values above the target once,
and a step runs the upper layers on the positions after the prefix only ("prefix" mode; a chat
row's system turn and the words before the subject are never recomputed). The per-pass
arguments of those layers (attention mask, rotary embeddings) come from the model's own code,
run with every decoder layer short-circuited (cheap). A self-check against full forwards on
the first pass picks the first cached path ("prefix", then "tail") that gives the full model's
logits, and falls back to full forwards if an architecture computes anything both miss.
Within a step the block's rows are sorted by length and run in passes of ``micro_batch``
rows, so little compute goes to padding.
With a ``compute_dtype`` (``EditorConfig.train_dtype``: by default bf16 where the device
multiplies it natively and the model is fp32, ``training_dtype``) the upper layers and the LM
head run under autocast, their matrices cast once per run; the experts, their optimiser state
and every cached tensor stay fp32.

Extra loss terms (e.g. a KL-to-base term on negative prompts routed to an expert) plug in as
``LossTerm`` objects: a row names its term; terms that need the unedited model's logits get
them computed once, when the row's job enters a block.
"""

from __future__ import annotations

import inspect
import math
import time
from collections import deque
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .errors import ConfigError
from .experts import ACTIVATION_FNS, expert_ffn_reference
from .layer import LEMoELayer
from .patching import adaptors_disabled, decoder_layers, final_norm, layer_index
from .routing import acts_from, best_match_position, normalize_anchors, token_queries

MAX_AUTO_BLOCK = 128
"""Largest automatic block (edits trained at once). Larger blocks only add experts whose rows
wait in more passes per step; throughput is set by ``micro_batch``-row passes."""
MIN_SHARED_LEAD = 8
"""Rows of a preparation pass that all begin with at least this many equal tokens (a chat
template's system turn) run them once (``BlockTrainer._prepare``)."""
AUTO_MEMORY_FRACTION = 0.25
"""Share of the free memory an automatic block may fill (CPU: MemAvailable; CUDA: free)."""


# --------------------------------------------------------------------------- jobs and rows
@dataclass
class TrainRow:
    """One training sequence of one job.

    ``labels[t]`` is the token to predict at position ``t`` from position ``t - 1`` (-100:
    not scored). ``weight`` is the route weight the job's expert gets on this row when served
    (1.0 with top-1); ``frozen_route`` lists ``(expert, weight)`` of older (frozen) experts
    also mixed into this row when ``top_k > 1``. ``term`` names the ``LossTerm`` scoring it."""

    ids: list[int]
    labels: list[int]
    weight: float = 1.0
    frozen_route: tuple[tuple[int, float], ...] = ()
    term: str = "target"

    @property
    def prompt_len(self) -> int:
        """Positions before the first scored label: the prompt a served route is decided on."""
        return next((t for t, label in enumerate(self.labels) if label != -100), len(self.labels))


@dataclass
class ExpertJob:
    """One new expert to train: its initial weights, its rows (at least one) and, for
    ``expert_span='key'``, its anchors as they will be served ([A, key]: each row's expert then
    acts from the prompt token that best matches them, as ``LEMoELayer.route`` decides)."""

    weights: dict[str, torch.Tensor]
    rows: list[TrainRow]
    anchors: Optional[torch.Tensor] = None
    anchor_windows: Optional[torch.Tensor] = None
    """Per anchor, how many prompt tokens its key pools (``LEMoELayer.anchor_window``; None: 1)."""


@dataclass
class JobResult:
    weights: dict[str, torch.Tensor]
    steps: int
    loss: float
    seconds: float
    """Wall time attributed to this job: its share (by rows) of every pass it took part in,
    plus its share of its block's preparation."""


# --------------------------------------------------------------------------- loss terms
class LossTerm:
    """Scores the positions of the rows that name it.

    ``losses(logits, targets, base)`` gets the logits at the scored positions [n, vocab]
    (fp32), their targets [n] and, when ``needs_base``, the unedited model's logits there
    [n, vocab]; it returns the per-position losses [n] and a per-position bool tensor of
    "already right" (or None). A job's loss for the term is the mean over its positions;
    ``done(mean, all_right)`` says whether the term lets the job stop."""

    needs_base = False

    def losses(self, logits: torch.Tensor, targets: torch.Tensor,
               base: Optional[torch.Tensor]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        raise NotImplementedError

    def done(self, mean: float, all_right: bool) -> bool:
        raise NotImplementedError


class TargetNLL(LossTerm):
    """The edit's own term: NLL of the target tokens; done once the mean is below ``stop_loss``
    and every target token is the argmax."""

    def __init__(self, stop_loss: float) -> None:
        self.stop_loss = stop_loss

    def losses(self, logits, targets, base):
        return F.cross_entropy(logits, targets, reduction="none"), logits.argmax(-1) == targets

    def done(self, mean: float, all_right: bool) -> bool:
        return mean < self.stop_loss and all_right


class BaseKL(LossTerm):
    """KL(base || edited) at the scored positions: the expert must leave these rows' output
    distribution unchanged (e.g. same-subject prompts about another relation routed to it).
    Done once the mean KL is below ``stop`` and every position keeps the unedited model's
    top token (a small KL can still flip the argmax of a flat distribution)."""

    needs_base = True

    def __init__(self, stop: float = 0.01) -> None:
        self.stop = stop

    def losses(self, logits, targets, base):
        base_logp = base.log_softmax(-1)
        kl = (base_logp.exp() * (base_logp - logits.log_softmax(-1))).sum(-1)
        return kl, logits.argmax(-1) == base.argmax(-1)

    def done(self, mean: float, all_right: bool) -> bool:
        return mean < self.stop and all_right


# --------------------------------------------------------------------------- memory rule
def available_memory(device: torch.device) -> int:
    """Free bytes on ``device`` (CUDA: free device memory; CPU: MemAvailable)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


def native_bfloat16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bf16 matrices natively: a CUDA GPU with bf16, or a CPU with
    AVX512-BF16 or AMX (where oneDNN runs bf16 matmuls about twice as fast as fp32)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu, private but stable
        return any(bool(getattr(torch.cpu, probe, lambda: False)()) for probe in probes)
    return False


def training_dtype(name: Optional[str], model: nn.Module) -> Optional[torch.dtype]:
    """The dtype the frozen layers above the target run in while training (``EditorConfig.train_dtype``),
    None for the model's own. ``"auto"``: bf16 when the model is fp32 and its device computes bf16
    natively (``native_bfloat16``), else the model's own."""
    parameter = next(model.parameters())
    if name == "auto":
        name = "bfloat16" if parameter.dtype == torch.float32 and native_bfloat16(parameter.device) else None
    dtype = getattr(torch, name) if name else None
    return None if dtype == parameter.dtype else dtype


def editing_attention(device: torch.device):
    """Attention backends for editing on CUDA: every SDPA backend but cuDNN's. Editing runs many
    forward/backward passes of varying padded lengths, and cuDNN attention builds an execution
    plan for each new shape (~10 ms each: 8 of 13 s of a T=100 run on a 7B-shaped model on an
    H200, scripts/profile_gpu.py). Elsewhere a no-op."""
    if device.type != "cuda":
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def auto_block_size(model: nn.Module, layer: LEMoELayer, mean_rows_per_job: float = 1.0,
                    mean_tokens: float = 16.0, micro_batch: int = 32) -> int:
    """Edits to train at once, from free memory.

    What a block holds per edit: its cached target-layer tensors (``2 * tokens * d`` values),
    its prefix's keys and values above the target ("prefix" mode) and a share of its job's
    expert, gradient and two AdamW moments (``4 * expert size`` fp32 values); what one pass
    adds on top: the activations of ``micro_batch`` rows through the layers above the target
    (about ``8 d + 4 ffn`` values per token and layer) and their logits. The block gets
    ``AUTO_MEMORY_FRACTION`` of the free memory, minus the pass, capped at ``MAX_AUTO_BLOCK``
    and at least ``micro_batch`` (or 1)."""
    config = model.config
    d = int(config.hidden_size)
    ffn = int(getattr(config, "intermediate_size", None) or 4 * d)
    vocab = int(config.vocab_size)
    element = next(model.parameters()).element_size()
    upper = len(decoder_layers(model)) - layer_index(model, layer)
    expert = sum(w.numel() for w in _shapes(layer).values())
    heads = int(getattr(config, "num_attention_heads", 1) or 1)
    kv = int(getattr(config, "num_key_value_heads", None) or heads) * (d // heads)
    # cached x and out0, the prefix's keys and values above the target (at most every token),
    # and a share of the job's expert with its gradient and AdamW moments
    per_edit = (2 * mean_tokens * d * element + 2 * mean_tokens * upper * kv * element
                + 4 * 4 * expert / max(mean_rows_per_job, 1.0))
    per_pass = micro_batch * (mean_tokens * upper * (8 * d + 4 * ffn) * element + 4 * vocab * 4 * 3)
    budget = AUTO_MEMORY_FRACTION * available_memory(next(model.parameters()).device) - per_pass
    return int(max(min(micro_batch, MAX_AUTO_BLOCK), min(MAX_AUTO_BLOCK, budget // per_edit)))


def _shapes(layer: LEMoELayer) -> dict[str, torch.Size]:
    d, h = layer.hidden_size, layer.config.expert_hidden
    shapes = {"w_up": torch.Size((d, h)), "w_down": torch.Size((h, d))}
    if layer.config.expert_gated:
        shapes["w_gate"] = torch.Size((d, h))
    return shapes


# --------------------------------------------------------------------------- the trainer
class _Stop(Exception):
    """Raised by a hook to end a forward pass early."""


@dataclass
class _Row:
    job: int
    spec: TrainRow
    length: int
    x: torch.Tensor = None        # target MLP input [T, d]
    out0: torch.Tensor = None     # target block output with no expert [T, d]
    const: Optional[torch.Tensor] = None  # frozen experts' part of the delta [T, d] (top_k > 1)
    base: Optional[torch.Tensor] = None   # unedited logits at the scored positions (needs_base)
    start: int = 0                # first position its job's expert acts on (expert_span='key')
    prefix: int = 0               # positions before every expert's start: the unedited model's
    past: Optional[list] = None   # (keys, values) of the prefix per layer above the target


@dataclass
class _Active:
    params: dict[str, torch.Tensor]
    optimizer: torch.optim.Optimizer
    rows: list[_Row]
    counts: dict[str, int]  # scored positions per term
    step: int = 0
    seconds: float = 0.0
    sums: dict[str, float] = field(default_factory=dict)
    right: dict[str, bool] = field(default_factory=dict)


class BlockTrainer:
    """Trains ``ExpertJob``s in blocks of up to ``block_size`` edits (see the module doc).

    ``run(jobs, on_done)`` trains every job and calls ``on_done(index, JobResult)`` as each one
    finishes (jobs finish out of order; the caller commits them in order). A
    KeyboardInterrupt propagates after the ``on_done`` calls of the jobs already finished.
    """

    def __init__(self, model: nn.Module, layer: LEMoELayer, *, learning_rate: float, weight_decay: float,
                 max_steps: int, block_size: int, micro_batch: int,
                 terms: dict[str, LossTerm], compute_dtype: Optional[torch.dtype] = None) -> None:
        self.model = model
        self.layer = layer
        self.lr, self.weight_decay, self.max_steps = learning_rate, weight_decay, max_steps
        self.block_size, self.micro_batch = block_size, micro_batch
        self.terms = terms
        self.compute_dtype = compute_dtype  # autocast the frozen layers above the target (e.g. bf16)
        blocks = list(decoder_layers(model))
        self.target = layer_index(model, layer)
        self.blocks = blocks
        self.upper = blocks[self.target + 1:]
        self.norm = final_norm(model)
        self.head = model.get_output_embeddings()
        # the frozen matrices above the target in ``compute_dtype``, cast once: autocast would
        # cast every one of them again on every pass (for SmolLM2's tied 49152 x 576 head that
        # cast cost more than the head's matmul)
        self.low_weights: dict[nn.Module, dict[str, torch.Tensor]] = {}
        if compute_dtype is not None:
            for module in [*self.upper, self.head]:
                self.low_weights[module] = {name: p.detach().to(compute_dtype)
                                            for name, p in module.named_parameters()
                                            if p.dim() == 2 and p.dtype != compute_dtype}
        self.device = next(model.parameters()).device
        self.pad = int(getattr(model.config, "pad_token_id", None) or 0)
        # "prefix" (cached target output and the prefix's keys/values above it), "tail" (cached
        # target output) or "full"; decided on the first pass
        self.mode: Optional[str] = None
        self.passes = 0
        self.from_key = layer.config.acts_from_key
        self.job_anchors: dict[int, tuple[torch.Tensor, Optional[torch.Tensor]]] = {}  # anchors, windows
        self._cache_arg = _cache_argument(self.upper)
        # "prefix" builds its own attention mask: only for SDPA / eager attention, and only while
        # rows fit a sliding window (Mistral), where the window changes nothing
        attention = getattr(model.config, "_attn_implementation", None) or "sdpa"
        self.window = _sliding_window(self.upper, model.config)
        self.prefix_allowed = self.from_key and self._cache_arg is not None and attention in ("sdpa", "eager")
        # rows beginning with the same lead run it once (``_prepare``): None until checked once
        model_arguments = inspect.signature(model.base_model.forward).parameters
        self._model_cache_arg = next((n for n in ("cache", "past_key_values") if n in model_arguments), None)
        self.share_lead: Optional[bool] = None if self._model_cache_arg else False

    # ------------------------------------------------------------------ preparation
    def _prepare(self, rows: list[_Row], check: bool) -> Optional[torch.Tensor]:
        """One forward of the unedited model over ``rows``, caching each row's target tensors:
        up to the target layer, or to the end when ``check``, when a row needs base logits, or
        (``expert_span='key'``) to record the keys and values of each row's prefix above the
        target. Returns the logits when computed.

        When every row begins with the same lead (a chat template's system turn), the lead runs
        once and the rows continue it from its key/value cache (``_lead_length``); the first
        time, both ways run and the shared one is kept only if it gives the same states."""
        ids, attention = self._ids(rows)
        needs_logits = check or any(self.terms[r.spec.term].needs_base for r in rows)
        if self.window is not None and any(r.length > self.window for r in rows):
            self.prefix_allowed = False  # a row longer than the window: its mask is the model's own
            if self.mode == "prefix":
                self.mode = "tail"
        record = self.prefix_allowed and self.mode in (None, "prefix")
        lead = self._lead_length(rows) if record and not needs_logits and self.share_lead is not False else 0
        if lead and self.share_lead is None:  # first use: keep it only if it gives the same states
            states, logits = self._row_states(rows, ids, attention, needs_logits, record, 0)
            try:
                shared, _ = self._row_states(rows, ids, attention, needs_logits, record, lead)
                self.share_lead = _same_states(shared, states)
            except torch.OutOfMemoryError:
                raise
            except (AttributeError, TypeError, KeyError, RuntimeError, ValueError):  # a cache this path misreads
                self.share_lead = False
        else:
            states, logits = self._row_states(rows, ids, attention, needs_logits, record, lead)
        for row, state in zip(rows, states):
            for name, value in state.items():
                setattr(row, name, value)
        return logits

    def _lead_length(self, rows: list[_Row]) -> int:
        """Tokens every row of ``rows`` begins with (and each has at least one more), when there
        are at least ``MIN_SHARED_LEAD`` of them and more than one row; else 0."""
        if len(rows) < 2:
            return 0
        first, length = rows[0].spec.ids, min(r.length for r in rows) - 1
        for row in rows[1:]:
            ids = row.spec.ids
            length = next((t for t in range(length) if ids[t] != first[t]), length)
        return length if length >= MIN_SHARED_LEAD else 0

    def _row_states(self, rows, ids, attention, needs_logits: bool, record: bool, lead: int):
        """Each row's cached tensors (``_Row`` fields: x, out0, base, start, prefix, past,
        const) from one forward of the unedited model, and its logits when ``needs_logits``.
        ``lead`` > 0: the first ``lead`` tokens (the same in every row) run once, as a key/value
        cache the rows' remaining tokens extend."""
        layer = self.layer
        full = needs_logits or record
        target_block = self.blocks[self.target]
        captured: dict[str, torch.Tensor] = {}

        def at_mlp(module, args, output):
            captured["x"] = args[0]
            if self.from_key:  # the query vectors of every position, for each row's key
                captured["vectors"], captured["mask"] = layer.token_vectors(args[0]), layer.prompt_mask(args[0])

        def after_block(module, args, kwargs, output):
            captured["out"] = output[0] if isinstance(output, tuple) else output
            if not full:
                raise _Stop

        recorder = _KeyValueRecorder()
        handles = [layer.register_forward_hook(at_mlp),
                   target_block.register_forward_hook(after_block, with_kwargs=True)]
        logits = None
        try:
            with torch.no_grad(), adaptors_disabled(self.model):
                cache = None
                if lead:  # the shared lead once, its cache repeated for every row
                    out = self.model.base_model(input_ids=ids[:1, :lead], attention_mask=attention[:1, :lead],
                                                use_cache=True)
                    cache = out["cache"] if "cache" in out else out["past_key_values"]
                    cache.batch_repeat_interleave(len(rows))
                    head = {name: value.expand(len(rows), *value.shape[1:]) for name, value in captured.items()}
                if record:
                    for index, block in enumerate(self.upper):
                        handles.append(block.self_attn.register_forward_pre_hook(
                            recorder.hook(index, self._cache_arg), with_kwargs=True))
                if needs_logits:  # the model's own logits: the self-check's reference
                    logits = self.model(input_ids=ids, attention_mask=attention, use_cache=False).logits
                elif lead:
                    self.model.base_model(input_ids=ids[:, lead:], attention_mask=attention,
                                          use_cache=True, **{self._model_cache_arg: cache})
                else:
                    self.model.base_model(input_ids=ids, attention_mask=attention, use_cache=False)
        except _Stop:
            pass
        finally:
            for handle in handles:
                handle.remove()
        if lead:
            captured = {name: torch.cat([head[name], value], dim=1) for name, value in captured.items()}
        queries = None
        if self.from_key:  # every key window a job or a frozen expert may use
            windows = max(layer.config.query_window, layer._anchor_layout()[2])
            queries = token_queries(layer.query_encoder, captured["vectors"], captured["mask"], windows)
        recorded = list(zip(recorder.keys, recorder.values))
        states = []
        for b, row in enumerate(rows):
            n = row.length
            state = {"x": captured["x"][b, :n].detach(), "out0": captured["out"][b, :n].detach()}
            if logits is not None and self.terms[row.spec.term].needs_base:
                scored = torch.tensor(row.spec.labels[1:], device=self.device) != -100
                state["base"] = logits[b, :n - 1][scored].float()
            slot_starts = []
            if self.from_key:
                row_queries = queries[:, b, :row.spec.prompt_len]
                state["start"] = self._start(row_queries, *self.job_anchors.get(row.job, (None, None)))
                slot_starts = [self._start(row_queries, layer.anchors[rows], layer.anchor_window[rows])
                               for rows in (layer.anchor_rows(e) for e, _ in row.spec.frozen_route)]
                state["prefix"] = min([state["start"], *slot_starts])
                if recorded and state["prefix"] > 0:
                    state["past"] = [(k[b, :, :state["prefix"]].clone(), v[b, :, :state["prefix"]].clone())
                                     for k, v in recorded]
            if row.spec.frozen_route:
                state["const"] = self._frozen_delta(row, state["x"], slot_starts)
            states.append(state)
        return states, logits

    @staticmethod
    def _start(queries: torch.Tensor, anchors: Optional[torch.Tensor], windows: Optional[torch.Tensor]) -> int:
        """``routing.best_match_position`` of one row's prompt queries [W, T, key] against anchors
        of key ``windows`` (0: no anchors)."""
        if anchors is None or anchors.shape[0] == 0 or queries.shape[1] == 0:
            return 0
        windows = None if windows is None else windows.to(queries.device)[None]
        return int(best_match_position(queries[:, None], anchors.to(queries.device)[None], anchor_window=windows)[0])

    def _frozen_delta(self, row: _Row, x: torch.Tensor, slot_starts: Sequence[int] = ()) -> torch.Tensor:
        layer = self.layer
        ids = torch.tensor([[e for e, _ in row.spec.frozen_route]], dtype=torch.int32,
                           device=x.device).expand(x.shape[0], -1)
        if slot_starts:  # expert_span='key': each frozen expert from its own matched token
            after = acts_from(torch.tensor([slot_starts], device=x.device), x.shape[0])[0]
            ids = torch.where(after, ids, torch.full_like(ids, -1))
        weights = torch.tensor([[w for _, w in row.spec.frozen_route]], dtype=torch.float32,
                               device=x.device).expand(x.shape[0], -1)
        experts = {name: getattr(layer, name) for name in layer.weight_names}
        with torch.no_grad():
            out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
            return expert_ffn_reference(x, ids.contiguous(), weights, experts["w_up"], experts.get("w_gate"),
                                        experts["w_down"], layer.config.expert_activation, out,
                                        layer.config.scale)

    def _ids(self, rows: list[_Row]) -> tuple[torch.Tensor, torch.Tensor]:
        length = max(r.length for r in rows)
        ids = torch.full((len(rows), length), self.pad, dtype=torch.long)
        attention = torch.zeros((len(rows), length), dtype=torch.long)
        for b, row in enumerate(rows):
            ids[b, :row.length] = torch.tensor(row.spec.ids)
            attention[b, :row.length] = 1
        return ids.to(self.device), attention.to(self.device)

    @contextmanager
    def _short_circuit(self) -> Iterator[None]:
        """Every decoder layer returns its input unchanged (instance-level ``forward``)."""
        def identity(hidden_states, *args, **kwargs):
            return hidden_states
        for block in self.blocks:
            block.forward = identity
        try:
            yield
        finally:
            for block in self.blocks:
                del block.forward

    def _layer_calls(self, ids: torch.Tensor, attention: torch.Tensor, blocks) -> list[tuple]:
        """The (args, kwargs) each of ``blocks`` is called with for this batch: masks and rotary
        embeddings from the model's own code, every decoder layer short-circuited."""
        calls: list[tuple] = []
        handles = [block.register_forward_pre_hook(
            lambda module, args, kwargs: calls.append((args, kwargs)), with_kwargs=True) for block in blocks]
        try:
            with torch.no_grad(), self._short_circuit():
                self.model.base_model(input_ids=ids, attention_mask=attention, use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
        return calls

    # ------------------------------------------------------------------ one pass
    def _delta(self, rows: list[_Row], jobs: list[int], active: dict[int, _Active], length: int):
        """The experts' contribution at the target layer for ``rows``, [B, T, d] (fp32)."""
        layer = self.layer
        position = {job: k for k, job in enumerate(jobs)}
        index = torch.tensor([position[r.job] for r in rows], device=self.device)
        first = active[jobs[0]].params["w_up"]
        x = torch.zeros(len(rows), length, layer.hidden_size, device=self.device, dtype=first.dtype)
        for b, row in enumerate(rows):
            x[b, :row.length] = row.x.to(first.dtype)
        stacked = {name: torch.stack([active[j].params[name] for j in jobs])[index]
                   for name in layer.weight_names}
        act = ACTIVATION_FNS[layer.config.expert_activation]
        up = torch.bmm(x, stacked["w_up"])
        hidden = act(torch.bmm(x, stacked["w_gate"])) * up if "w_gate" in stacked else act(up)
        scale = torch.tensor([r.spec.weight * layer.config.scale for r in rows], device=self.device)
        delta = torch.bmm(hidden, stacked["w_down"]).float() * scale[:, None, None]
        if self.from_key:
            delta = delta * self._from_start(rows, length)
        if any(r.const is not None for r in rows):
            const = torch.zeros_like(delta)
            for b, row in enumerate(rows):
                if row.const is not None:
                    const[b, :row.length] = row.const
            delta = delta + const
        return delta

    def _from_start(self, rows: list[_Row], length: int) -> torch.Tensor:
        """[B, T, 1] fp32: 1 from each row's expert start on, 0 before (``expert_span='key'``)."""
        return acts_from(torch.tensor([[r.start] for r in rows], device=self.device), length).float()

    def _pass(self, rows: list[_Row], active: dict[int, _Active], delta_override=None) -> torch.Tensor:
        """Forward and backward of one pass; adds each job's loss sums to its state. Returns
        the scored logits (for the self-check)."""
        jobs = sorted({r.job for r in rows})
        length = max(r.length for r in rows)
        delta = self._delta(rows, jobs, active, length) if delta_override is None else delta_override
        ids, attention = self._ids(rows)
        low = self.compute_dtype is not None and delta_override is None
        with torch.autocast(self.device.type, dtype=self.compute_dtype, enabled=low):
            hidden, positions = self._hidden(rows, ids, attention, delta, length, low)
            labels = torch.full((len(rows), length + 1), -100, dtype=torch.long)
            for b, row in enumerate(rows):
                labels[b, :row.length] = torch.tensor(row.spec.labels)
            # the label each position predicts (the next token's), at the positions computed
            targets_all = labels[:, 1:].to(self.device).gather(1, positions)
            scored = targets_all != -100
            logits = self._call(self.head, low, hidden[scored]).float()
        return self._score(rows, jobs, active, logits, targets_all, scored, delta_override is not None)

    def _call(self, module: nn.Module, low: bool, *args, **kwargs):
        """``module(*args, **kwargs)``; with ``low``, its matrices are the ``compute_dtype`` copies."""
        if low and self.low_weights.get(module):
            return functional_call(module, self.low_weights[module], args, kwargs, strict=False)
        return module(*args, **kwargs)

    def _hidden(self, rows, ids, attention, delta, length, low: bool = False):
        """Final-norm output of the model with ``delta`` added at the target layer, [B, S, d], and
        the position of each of its S rows in the sequence, [B, S] (``prefix`` mode computes only
        the positions after each row's prefix; the other modes all T)."""
        everything = torch.arange(length, device=self.device).expand(len(rows), -1)
        if self.mode == "full":
            return self._full_forward(rows, ids, attention, delta), everything
        out0 = torch.zeros(len(rows), length, self.layer.hidden_size, device=self.device,
                           dtype=rows[0].out0.dtype)
        for b, row in enumerate(rows):
            out0[b, :row.length] = row.out0
        hidden = out0 + delta.to(out0.dtype)
        calls = self._layer_calls(ids, attention, self.upper)
        if self.mode == "prefix":
            return self._prefix_tail(rows, hidden, calls, low)
        for block, (args, kwargs) in zip(self.upper, calls):
            out = (self._call(block, low, hidden, *args[1:], **kwargs) if args
                   else self._call(block, low, **{**kwargs, "hidden_states": hidden}))
            hidden = out[0] if isinstance(out, tuple) else out
        return self.norm(hidden), everything

    def _prefix_tail(self, rows: list[_Row], hidden: torch.Tensor, calls: list[tuple], low: bool = False):
        """The layers above the target on each row's positions after its prefix only; the
        prefix (no expert acts there: the unedited model's states) is attended to through the
        keys and values ``_prepare`` recorded. Rows are packed left ([B, S], S the longest
        suffix); their prefixes are left-padded to the longest (P) and masked."""
        device = self.device
        prefix = torch.tensor([r.prefix for r in rows], device=device)
        lengths = torch.tensor([r.length for r in rows], device=device)
        longest_prefix, longest = int(prefix.max()), int((lengths - prefix).max())
        steps = torch.arange(longest, device=device)
        positions = torch.minimum(prefix[:, None] + steps[None, :], lengths[:, None] - 1)   # [B, S]
        real = steps[None, :] < (lengths - prefix)[:, None]
        h = hidden.gather(1, positions[..., None].expand(-1, -1, hidden.shape[-1]))
        past_ok = torch.arange(longest_prefix, device=device)[None, :] >= (longest_prefix - prefix)[:, None]
        causal = torch.ones(longest, longest, dtype=torch.bool, device=device).tril()
        # padded query rows see at least themselves (an all-masked row would be NaN in backward)
        own = causal[None] & real[:, None, :] | torch.eye(longest, dtype=torch.bool, device=device)[None]
        allowed = torch.cat([past_ok[:, None, :].expand(-1, longest, -1), own], dim=2)[:, None]
        pasts = self._padded_pasts(rows, longest_prefix)
        pick = lambda t: t.expand(len(rows), -1, -1).gather(1, positions[..., None].expand(-1, -1, t.shape[-1]))
        built: dict = {}  # the layers share their mask and rotary tensors: build each once per pass

        def layer_inputs(mask, cos, sin):
            key = (id(mask), id(cos), id(sin))
            if key not in built:
                if mask is not None and mask.dtype != torch.bool:  # an additive float mask
                    mask = torch.zeros(allowed.shape, dtype=mask.dtype, device=device).masked_fill(
                        ~allowed, torch.finfo(mask.dtype).min)
                else:
                    mask = allowed
                built[key] = {"attention_mask": mask, "position_embeddings": (pick(cos), pick(sin))}
            return built[key]

        for index, (block, (args, kwargs)) in enumerate(zip(self.upper, calls)):
            call = {key: value for key, value in kwargs.items() if key not in _CACHE_NAMES}
            call.update(layer_inputs(kwargs.get("attention_mask"), *kwargs["position_embeddings"]),
                        position_ids=positions)
            call[self._cache_arg] = _PrefixCache(*pasts[index])
            out = self._call(block, low, h, **call)
            h = out[0] if isinstance(out, tuple) else out
        return self.norm(h), positions

    def _padded_pasts(self, rows: list[_Row], longest: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer above the target, the rows' prefix keys and values [B, heads, P, head_dim],
        each row's right-aligned (left padding)."""
        sample = next((r.past for r in rows if r.past), None)
        pasts = []
        for index in range(len(self.upper)):
            if sample is None:
                shape = (len(rows), 1, 0, 1)
                pasts.append((torch.zeros(shape, device=self.device), torch.zeros(shape, device=self.device)))
                continue
            k0, v0 = sample[index]
            keys = k0.new_zeros(len(rows), k0.shape[0], longest, k0.shape[2])
            values = v0.new_zeros(len(rows), v0.shape[0], longest, v0.shape[2])
            for b, row in enumerate(rows):
                if row.past:
                    keys[b, :, longest - row.prefix:] = row.past[index][0]
                    values[b, :, longest - row.prefix:] = row.past[index][1]
            pasts.append((keys, values))
        return pasts

    def _score(self, rows, jobs, active, logits, targets_all, scored, probe: bool) -> torch.Tensor:
        targets = targets_all[scored]
        row_of = scored.nonzero(as_tuple=True)[0]
        if probe:
            return logits
        total = logits.new_zeros(())
        position = {job: k for k, job in enumerate(jobs)}
        for name, term in self.terms.items():
            pick = torch.tensor([rows[int(b)].spec.term == name for b in row_of.tolist()],
                                dtype=torch.bool, device=self.device)
            if not bool(pick.any()):
                continue
            base = None
            if term.needs_base:
                base = torch.cat([r.base for r in rows if r.spec.term == name])
            losses, right = term.losses(logits[pick], targets[pick], base)
            owner = torch.tensor([position[rows[int(b)].job] for b in row_of[pick].tolist()], device=self.device)
            norm = torch.tensor([float(max(active[j].counts.get(name, 0), 1)) for j in jobs],
                                device=self.device)
            per_job = losses.new_zeros(len(jobs)).index_add(0, owner, losses)
            total = total + (per_job / norm).sum()
            wrong = None
            if right is not None:
                wrong = torch.zeros(len(jobs), dtype=torch.long, device=self.device).index_add(
                    0, owner, (~right).long())
            sums = (per_job / norm).detach().cpu().tolist()
            wrong = wrong.cpu().tolist() if wrong is not None else [0] * len(jobs)
            for k, job in enumerate(jobs):
                state = active[job]
                state.sums[name] = state.sums.get(name, 0.0) + sums[k]
                state.right[name] = state.right.get(name, True) and wrong[k] == 0
        total.backward()
        self.passes += 1
        return logits

    def _full_forward(self, rows, ids, attention, delta):
        """Fallback: the whole model, with the delta added to the target MLP's output."""
        def add_delta(module, args, output):
            return output + delta.to(output.dtype)
        handle = self.layer.register_forward_hook(add_delta)
        captured = {}

        def before_norm(module, args):
            captured["h"] = args[0]
        norm_handle = self.norm.register_forward_pre_hook(before_norm)
        try:
            with adaptors_disabled(self.model):
                self.model.base_model(input_ids=ids, attention_mask=attention, use_cache=False)
        finally:
            handle.remove()
            norm_handle.remove()
        return self.norm(captured["h"])

    def _self_check(self, rows: list[_Row], reference: torch.Tensor, active: dict[int, _Active]) -> None:
        """Decide the mode on the first pass: a cached path ("prefix" when experts act from
        their key and the architecture's attention takes a key/value cache, else "tail") must
        give the full model's logits, with no expert and with a (random) expert delta; the
        first that does is used, else full forwards."""
        length = max(r.length for r in rows)
        labels = torch.full((len(rows), length), -100, dtype=torch.long)
        for b, row in enumerate(rows):
            labels[b, :row.length] = torch.tensor(row.spec.labels)
        scored = labels[:, 1:] != -100
        candidates = (["prefix"] if self.prefix_allowed else []) + ["tail"]
        with torch.no_grad():
            zero = torch.zeros(len(rows), length, self.layer.hidden_size, device=self.device)
            expected = reference[:, :length - 1][scored.to(self.device)].float()
            generator = torch.Generator().manual_seed(0)
            probe = (torch.randn(zero.shape, generator=generator) * 0.1).to(self.device)
            if self.from_key:
                probe = probe * self._from_start(rows, length)
            self.mode = "full"
            full_probe = self._pass(rows, active, delta_override=probe)
            for mode in candidates:
                self.mode = mode
                try:
                    ok = (torch.allclose(self._pass(rows, active, delta_override=zero), expected, atol=1e-3, rtol=1e-3)
                          and torch.allclose(self._pass(rows, active, delta_override=probe), full_probe,
                                             atol=1e-3, rtol=1e-3))
                except torch.OutOfMemoryError:
                    raise
                except (TypeError, KeyError, RuntimeError, ValueError):  # an architecture this path misreads
                    ok = False
                if ok:
                    return
        self.mode = "full"

    # ------------------------------------------------------------------ the loop
    def run(self, jobs: Sequence[ExpertJob], on_done: Callable[[int, JobResult], None],
            on_step: Optional[Callable[[int, int], None]] = None) -> None:
        queue = deque(range(len(jobs)))
        active: dict[int, _Active] = {}
        was_training = self.model.training
        self.model.train(False)  # dropout off: an expert must learn the function it will serve
        try:
            while queue or active:
                admitted = self._admit(jobs, queue, active)
                if admitted:
                    started = time.perf_counter()
                    rows = [row for job in admitted for row in active[job].rows]
                    check = self.mode is None
                    for chunk in _preparation_chunks(rows, self.micro_batch):
                        reference = self._prepare(chunk, check)
                        if check:
                            self._self_check(chunk, reference, active)
                            check = False
                    share = (time.perf_counter() - started) / max(len(rows), 1)
                    for job in admitted:
                        active[job].seconds += share * len(active[job].rows)
                for job in [j for j, state in active.items() if not state.rows]:
                    state = active.pop(job)  # nothing reaches this expert: it stays as it starts
                    on_done(job, JobResult(weights=_detached(state.params), steps=0, loss=float("nan"),
                                           seconds=state.seconds))
                if not active:
                    continue
                self._step(active, on_done)
                if on_step is not None:
                    on_step(len(active), sum(len(s.rows) for s in active.values()))
        finally:
            self.model.train(was_training)

    def _admit(self, jobs, queue, active) -> list[int]:
        """Move queued jobs into the block while their edits fit (always at least one job).
        A partly full block is refilled only once half a pass (``micro_batch // 2`` rows) is
        free: admitted rows are prepared together, and a few rows at a time would make small,
        slow preparation chunks (and too few chat rows to share their lead). When a job joins
        does not change how it trains."""
        admitted = []
        load = sum(len(state.rows) for state in active.values())
        if active and self.block_size - load < min(self.micro_batch, self.block_size) // 2:
            return admitted
        while queue:
            size = len(jobs[queue[0]].rows)
            if active and load + size > self.block_size:
                break
            job = queue.popleft()
            spec = jobs[job]
            params = {name: w.detach().to(self.device).float().clone().requires_grad_(True)
                      for name, w in spec.weights.items()}
            rows = [_Row(job=job, spec=row, length=len(row.ids)) for row in spec.rows]
            counts: dict[str, int] = {}
            for row in spec.rows:
                counts[row.term] = counts.get(row.term, 0) + sum(1 for t in row.labels[1:] if t != -100)
            if self.from_key and spec.anchors is None:
                raise ConfigError("expert_span='key': an ExpertJob needs its expert's anchors (ExpertJob.anchors) "
                                  "to know where the expert acts in each row, as LEMoELayer.route decides")
            if spec.anchors is not None:  # normalised as the layer stores them (add_expert)
                self.job_anchors[job] = (normalize_anchors(spec.anchors.detach().to(self.device)),
                                         spec.anchor_windows)
            optimizer = torch.optim.AdamW(list(params.values()), lr=self.lr, weight_decay=self.weight_decay)
            active[job] = _Active(params=params, optimizer=optimizer, rows=rows, counts=counts)
            admitted.append(job)
            load += size
            if load >= self.block_size:
                break
        return admitted

    def _step(self, active: dict[int, _Active], on_done) -> None:
        for state in active.values():
            state.step += 1
            state.sums, state.right = {}, {}
        # by the length a pass computes (after the prefix, in "prefix" mode), so passes pad little
        rows = sorted((row for state in active.values() for row in state.rows),
                      key=lambda r: (r.length - r.prefix, r.prefix) if self.mode == "prefix" else r.length)
        for chunk in _chunks(rows, self.micro_batch):
            started = time.perf_counter()
            self._pass(chunk, active)
            share = (time.perf_counter() - started) / len(chunk)
            for row in chunk:
                active[row.job].seconds += share
        for job in list(active):
            state = active[job]
            done = all(self.terms[name].done(state.sums.get(name, 0.0), state.right.get(name, True))
                       for name in state.counts)
            loss = sum(state.sums.values())
            if not done:
                state.optimizer.step()
                state.optimizer.zero_grad(set_to_none=True)
            if done or state.step >= self.max_steps:
                del active[job]
                on_done(job, JobResult(weights=_detached(state.params), steps=state.step, loss=loss,
                                       seconds=state.seconds))


_CACHE_NAMES = ("cache", "past_key_values", "past_key_value")


def _cache_argument(blocks) -> Optional[str]:
    """The keyword under which the attention of ``blocks`` takes a key/value cache (it differs
    across transformers versions), or None when it has no such attention (no "prefix" mode)."""
    attention = getattr(blocks[0], "self_attn", None) if len(blocks) else None
    if attention is None:
        return None
    try:
        names = inspect.signature(attention.forward).parameters
        block_names = inspect.signature(blocks[0].forward).parameters
    except (TypeError, ValueError):
        return None
    return next((n for n in _CACHE_NAMES if n in names and n in block_names), None)


def _sliding_window(blocks, config) -> Optional[int]:
    """The smallest attention window of ``blocks`` (None: full attention)."""
    windows = []
    for block in blocks:
        attention = getattr(block, "self_attn", None)
        window = (getattr(attention, "sliding_window", None) if hasattr(attention, "sliding_window")
                  else getattr(config, "sliding_window", None))
        if isinstance(window, int) and window > 0:
            windows.append(window)
    return min(windows) if windows else None


class _PrefixCache:
    """A key/value cache holding one layer's prefix, read-only: an attention call gets the
    prefix's keys and values in front of its own (and nothing is stored)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.keys, self.values = keys, values

    def update(self, key_states, value_states, *args, **kwargs):
        if self.keys.shape[2] == 0:
            return key_states, value_states
        return (torch.cat([self.keys.to(key_states.dtype), key_states], dim=2),
                torch.cat([self.values.to(value_states.dtype), value_states], dim=2))


class _KeyValueRecorder:
    """Records the keys and values (rotary applied) each attention computes in a forward, by
    handing it a cache that stores what it is given: with no past, or in front of the past of
    the cache the call came with."""

    def __init__(self) -> None:
        self.recorded: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def keys(self) -> list[torch.Tensor]:
        return [self.recorded[i][0] for i in sorted(self.recorded)]

    @property
    def values(self) -> list[torch.Tensor]:
        return [self.recorded[i][1] for i in sorted(self.recorded)]

    def hook(self, index: int, name: str):
        recorder = self

        class _Record:
            def __init__(self, cache) -> None:
                self.cache = cache

            def update(self, key_states, value_states, *args, **kwargs):
                if self.cache is not None:  # a real cache (a shared lead): record what it returns
                    key_states, value_states = self.cache.update(key_states, value_states, *args, **kwargs)
                recorder.recorded[index] = (key_states.detach(), value_states.detach())
                return key_states, value_states

        def pre_hook(module, args, kwargs):
            cache = next((kwargs[k] for k in _CACHE_NAMES if kwargs.get(k) is not None), None)
            kwargs = {k: v for k, v in kwargs.items() if k not in _CACHE_NAMES}
            kwargs[name] = _Record(cache)
            return args, kwargs
        return pre_hook


def _preparation_chunks(rows: list[_Row], size: int) -> list[list[_Row]]:
    """``rows`` in the chunks preparation runs: rows that begin with the same
    ``MIN_SHARED_LEAD`` tokens (a chat template's system turn) in chunks of their own, so their
    lead can run once, when they fill at least a quarter of a chunk; each group sorted by length
    (little padding); at most ``size`` rows a chunk."""
    groups: dict[tuple, list[_Row]] = {}
    for row in rows:
        groups.setdefault(tuple(row.spec.ids[:MIN_SHARED_LEAD]), []).append(row)
    shared, single = [], []
    for group in groups.values():
        # a group shares its lead when it fills a quarter of a chunk: smaller ones join the rest
        if len(group) > 1 and 4 * len(group) >= size:
            shared.append(group)
        else:
            single.extend(group)
    return [chunk for group in [single, *shared]
            for chunk in _chunks(sorted(group, key=lambda r: r.length), size)]


def _same_states(states: list[dict], other: list[dict], tolerance: float = 1e-4) -> bool:
    """Whether two ``_row_states`` results agree (same keys, positions and prefix lengths;
    tensors within ``tolerance``, relative to each tensor's scale)."""
    def close(a, b) -> bool:
        if isinstance(a, torch.Tensor):
            return (a.shape == b.shape and bool(torch.isfinite(a).all())
                    and float((a - b).abs().max()) <= tolerance * max(float(b.abs().max()), 1.0))
        if isinstance(a, (list, tuple)):
            return len(a) == len(b) and all(close(x, y) for x, y in zip(a, b))
        return a == b
    return all(one.keys() == two.keys() and all(close(one[k], two[k]) for k in one)
               for one, two in zip(states, other))


def _detached(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in params.items()}


def _chunks(items: list, size: int) -> list[list]:
    """``items`` in consecutive chunks of at most ``size``, as even as possible."""
    if not items:
        return []
    count = math.ceil(len(items) / size)
    per = math.ceil(len(items) / count)
    return [items[i:i + per] for i in range(0, len(items), per)]
