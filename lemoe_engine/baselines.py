"""Baseline editors for side-by-side comparisons with LEMoE: FT-L, GRACE and no edit.

All share the editor interface the comparison harness relies on: a ``name``, ``edit_batch(edits)``
returning a report with ``n_edits``, ``steps``, ``loss`` and ``seconds``, and ``edit(edits, ...)``
that plans the stream into batches first. Every editor works on the same target layer as LEMoE's
default (``LEMoEConfig().resolved_layer(num_layers)``) unless told otherwise, and trains on the
same objective: the target tokens' NLL with the prompt masked, tokenised jointly with the prompt
(``tokens.encode_pairs``), with the editor's early stop (mean NLL below ``stop_loss`` and every
target token argmax-correct).

* ``FTLEditor`` (FT-L): fine-tunes the target layer's MLP down-projection (LLaMA
  ``mlp.down_proj.weight``, GPT-2 ``mlp.c_proj.weight``) on each batch with AdamW. Nothing
  protects earlier edits: it is the classic baseline that forgets. (EasyEdit calls this
  prompt-masked objective FT-M; its FT-L trains the last prompt position only. ``norm_constraint``
  gives the L-inf box around the original weights of ROME's FT-L; off by default.)
* ``GraceEditor`` (Hartvigsen et al., NeurIPS 2023): a codebook of (key, value, radius) entries
  beside the target layer's MLP, see ``GraceAdaptor`` for the algorithm and the choices made.
* ``NoEditEditor``: does nothing; the floor.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import LEMoEConfig
from .errors import ConfigError
from .patching import decoder_layers, watch_calls
from .tokens import collate, encode_pairs, pad_id, supervised_batches

__all__ = [
    "BaselineReport", "FTLConfig", "FTLEditor", "GraceConfig", "GraceAdaptor", "GraceEditor",
    "NoEditEditor", "find_grace", "target_layer_index",
    "down_projection",
]


# --------------------------------------------------------------------------------------------
# shared helpers
# --------------------------------------------------------------------------------------------

@dataclass
class BaselineReport:
    """What happened to one batch of edits (the fields LEMoE's BatchReport shares, plus details)."""

    n_edits: int
    steps: int
    loss: float
    seconds: float
    details: dict = field(default_factory=dict)


def target_layer_index(model: nn.Module, layer: Optional[int] = None) -> int:
    """The decoder layer LEMoE would edit (its default: 3/4 of the depth), or ``layer``."""
    return LEMoEConfig(layer=layer).resolved_layer(len(decoder_layers(model)))


def _mlp(model: nn.Module, index: int) -> nn.Module:
    mlp = getattr(decoder_layers(model)[index], "mlp", None)
    if mlp is None:
        raise ConfigError(f"decoder layer {index} of {type(model).__name__} has no 'mlp' module")
    return mlp


def down_projection(model: nn.Module, index: int) -> tuple[str, nn.Parameter]:
    """(qualified name, weight) of decoder layer ``index``'s MLP down-projection."""
    mlp = _mlp(model, index)
    mlp = getattr(mlp, "base_layer", mlp)  # an adaptor wrapping the MLP
    for attr in ("down_proj", "c_proj"):   # LLaMA / Mistral / Qwen2, GPT-2
        proj = getattr(mlp, attr, None)
        if proj is not None and isinstance(getattr(proj, "weight", None), nn.Parameter):
            weight = proj.weight
            for name, param in model.named_parameters():
                if param is weight:
                    return name, weight
    raise ConfigError(f"the MLP of decoder layer {index} has no down_proj / c_proj weight")


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _supervised_batches(tokenizer, edits, micro_batch: int, device):
    return supervised_batches(tokenizer, [e.prompt for e in edits], [e.target for e in edits], micro_batch, device)


def _fit(model: nn.Module, batches, optimizer: torch.optim.Optimizer, *, max_steps: int,
         stop_loss: float, mask_context: Callable[[torch.Tensor], ContextManager],
         after_step: Optional[Callable[[], None]] = None) -> tuple[int, float]:
    """The editor's loop: full-batch steps (micro-batches accumulate), stop once the mean target
    NLL is below ``stop_loss`` and every target token is argmax-correct (checked before the step,
    so the weights returned are the ones that met it). Returns (steps, last loss)."""
    n_targets = sum(int((b[3] != -100).sum()) for b in batches)
    was_training = model.training
    model.train(False)  # dropout off: the edit must hold for the function that will be served
    loss_value = float("nan")
    try:
        for step in range(1, max_steps + 1):
            optimizer.zero_grad(set_to_none=True)
            total, correct = 0.0, 0
            for ids, attention, prompt_mask, labels in batches:
                with mask_context(prompt_mask):
                    logits = model(input_ids=ids, attention_mask=attention, use_cache=False).logits
                shifted, targets = logits[:, :-1].float(), labels[:, 1:]
                loss = F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), targets.reshape(-1),
                                       ignore_index=-100, reduction="sum") / n_targets
                loss.backward()
                total += float(loss.detach())
                scored = targets != -100
                correct += int((shifted.argmax(-1)[scored] == targets[scored]).sum())
            loss_value = total
            if loss_value < stop_loss and correct == n_targets:
                return step, loss_value
            optimizer.step()
            if after_step is not None:
                after_step()
        return max_steps, loss_value
    finally:
        model.train(was_training)


def _check_training_knobs(owner: str, learning_rate, max_steps, stop_loss, micro_batch) -> None:
    if not (isinstance(learning_rate, (int, float)) and learning_rate > 0 and math.isfinite(learning_rate)):
        raise ConfigError(f"{owner}: learning_rate must be a positive number, got {learning_rate!r}")
    for name, value in (("max_steps", max_steps), ("micro_batch", micro_batch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{owner}: {name} must be a positive int, got {value!r}")
    if not stop_loss >= 0:
        raise ConfigError(f"{owner}: stop_loss must be >= 0, got {stop_loss!r}")


class _Baseline:
    """``edit``: plan a stream into batches (LEMoE's planner), then ``edit_batch`` each."""

    name = "baseline"

    def edit_batch(self, edits) -> BaselineReport:  # pragma: no cover - overridden
        raise NotImplementedError

    def edit(self, edits, *, batch_size: int = 20, plan: str = "kmeans", seed: int = 0,
             progress: bool = True, features=None) -> list[BaselineReport]:
        """Plan ``edits`` with ``planner.plan_order`` (k-means on ``features``, by default the
        planner's sentence embeddings of the prompts) and edit batch after batch."""
        from tqdm.auto import tqdm

        from .planner import plan_order
        edits = list(edits)
        if not edits:
            raise ConfigError("no edits given")
        batches = plan_order(edits, batch_size=batch_size, plan=plan, seed=seed, features=features)
        return [self.edit_batch([edits[i] for i in batch])
                for batch in tqdm(batches, desc=self.name, unit="batch", disable=not progress)]


# --------------------------------------------------------------------------------------------
# no edit
# --------------------------------------------------------------------------------------------

class NoEditEditor(_Baseline):
    """The floor: ``edit_batch`` leaves the model untouched."""

    name = "none"

    def __init__(self, model: nn.Module = None, tokenizer=None, config=None) -> None:
        self.model, self.tokenizer = model, tokenizer

    def unedited(self) -> ContextManager:
        return contextlib.nullcontext()

    def edit_batch(self, edits) -> BaselineReport:
        edits = list(edits)
        if not edits:
            raise ConfigError("edit_batch needs at least one edit")
        return BaselineReport(n_edits=len(edits), steps=0, loss=float("nan"), seconds=0.0)


# --------------------------------------------------------------------------------------------
# FT-L
# --------------------------------------------------------------------------------------------

@dataclass
class FTLConfig:
    layer: Optional[int] = None
    """Decoder layer whose MLP down-projection is fine-tuned; None: LEMoE's default layer."""
    learning_rate: float = 5e-4
    max_steps: int = 60
    stop_loss: float = 0.02
    weight_decay: float = 0.0
    """AdamW decay pulls the pretrained weights towards zero: leave it at 0 for editing."""
    micro_batch: int = 32
    norm_constraint: Optional[float] = None
    """When set, every weight stays within +-norm_constraint of its original value (ROME's FT-L)."""

    def __post_init__(self) -> None:
        _check_training_knobs("FTLConfig", self.learning_rate, self.max_steps, self.stop_loss, self.micro_batch)
        if self.weight_decay < 0:
            raise ConfigError("FTLConfig: weight_decay must be >= 0")
        if self.norm_constraint is not None and not self.norm_constraint > 0:
            raise ConfigError(f"FTLConfig: norm_constraint must be positive or None, got {self.norm_constraint!r}")


class FTLEditor(_Baseline):
    """FT-L: each batch fine-tunes one MLP down-projection; earlier edits are not protected."""

    name = "ft-l"

    def __init__(self, model: nn.Module, tokenizer, config: Optional[FTLConfig] = None) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.config = config or FTLConfig()
        self.layer_index = target_layer_index(model, self.config.layer)
        self.param_name, self.weight = down_projection(model, self.layer_index)
        self.original = self.weight.detach().clone()  # one matrix: kept for unedited() and the box
        model.requires_grad_(False)

    @contextlib.contextmanager
    def unedited(self) -> Iterator[None]:
        """Run the model with the original down-projection inside the block."""
        edited = self.weight.detach().clone()
        with torch.no_grad():
            self.weight.copy_(self.original)
        try:
            yield
        finally:
            with torch.no_grad():
                self.weight.copy_(edited)

    def _constrain(self) -> None:
        eps = self.config.norm_constraint
        with torch.no_grad():
            self.weight.copy_(torch.clamp(self.weight, self.original - eps, self.original + eps))

    def edit_batch(self, edits) -> BaselineReport:
        edits = list(edits)
        if not edits:
            raise ConfigError("edit_batch needs at least one edit")
        started = time.perf_counter()
        cfg = self.config
        batches = _supervised_batches(self.tokenizer, edits, cfg.micro_batch, _model_device(self.model))
        self.weight.requires_grad_(True)
        try:
            optimizer = torch.optim.AdamW([self.weight], lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
            steps, loss = _fit(self.model, batches, optimizer, max_steps=cfg.max_steps, stop_loss=cfg.stop_loss,
                               mask_context=lambda mask: contextlib.nullcontext(),
                               after_step=self._constrain if cfg.norm_constraint is not None else None)
        finally:
            self.weight.requires_grad_(False)
            self.weight.grad = None
        return BaselineReport(n_edits=len(edits), steps=steps, loss=loss,
                              seconds=time.perf_counter() - started,
                              details={"parameter": self.param_name})


# --------------------------------------------------------------------------------------------
# GRACE
# --------------------------------------------------------------------------------------------

@dataclass
class GraceConfig:
    layer: Optional[int] = None
    """Decoder layer whose MLP output the codebook replaces; None: LEMoE's default layer."""
    init_eps: float = 1.0
    """Radius of a new entry, in the units of the key distance (GRACE/EasyEdit default 1.0 on raw
    Euclidean distances). On SmolLM2-135M's layer-16 MLP input (norm ~3.1) the nearest other edit
    prompt lies at a median 0.83, an edit's own paraphrase at 1.37 and the nearest locality prompt
    at >= 1.29 (bundled edits), so 1.0 keeps GRACE's character: exact recall, weak paraphrases."""
    normalize_keys: bool = False
    """Compare L2-normalised keys (distances in [0, 2]) instead of raw MLP inputs."""
    learning_rate: float = 1.0
    """Adam learning rate of the values (EasyEdit's GRACE: 1.0, from a cold init)."""
    max_steps: int = 100
    stop_loss: float = 0.02
    micro_batch: int = 32
    value_init: str = "cold"
    """'cold': uniform [0, 1) (EasyEdit); 'warm': the MLP's own output at the key token."""
    seed: int = 0

    def __post_init__(self) -> None:
        _check_training_knobs("GraceConfig", self.learning_rate, self.max_steps, self.stop_loss, self.micro_batch)
        if not (isinstance(self.init_eps, (int, float)) and self.init_eps > 0 and math.isfinite(self.init_eps)):
            raise ConfigError(f"GraceConfig: init_eps must be a positive number, got {self.init_eps!r}")
        if self.value_init not in ("cold", "warm"):
            raise ConfigError(f"GraceConfig: value_init must be 'cold' or 'warm', got {self.value_init!r}")


class GraceAdaptor(nn.Module):
    """A GRACE codebook wrapped around one MLP (``base_layer``).

    Entries are (key, value, radius eps, label). The key of an input is the MLP input at its last
    prompt token: while scoring prompt+target teacher-forced it is the last position where the
    prompt mask (``query_mask``) is 1; otherwise the last attended position, which in generation
    is the prompt's last token, and the decision made there is reused for every KV-cache decode
    step (as LEMoE reuses its route). If the nearest key lies within its radius, the entry's value
    REPLACES the MLP output at every position from that token on (the positions that predict the
    answer); any other input gets the base MLP's output bit for bit.

    Codebook update (GRACE, Alg. 1), for a new edit with key h and label y (its target text;
    EasyEdit compares the mean label id, a proxy for the same target), nearest entry j at
    distance d:
      * no entry, or d > init_eps + eps_j: add (h, new value, init_eps);
      * else, y != y_j (conflict, the balls would overlap): add (h, new value, d/2) and shrink
        eps_j to d/2 - 1e-5. Deviation: eps_j never GROWS here (GRACE/EasyEdit assign d/2 even
        when eps_j was already smaller, which can re-open an overlap an earlier split closed);
      * else (same label): expand eps_j to d if d > eps_j ("coverage") and train value j further.
    Keys never change after insertion; the key of an input does not depend on the codebook (it
    is this layer's input), so a batch's entries are inserted first and their values trained
    together afterwards. With batch size 1 this is GRACE's one-edit-at-a-time procedure.
    """

    def __init__(self, base_layer: nn.Module, hidden_size: int, normalize_keys: bool = False) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.hidden_size = hidden_size
        self.normalize_keys = normalize_keys
        reference = next(base_layer.parameters(), None)
        device = reference.device if reference is not None else torch.device("cpu")
        self.register_buffer("keys", torch.zeros(0, hidden_size, device=device))
        self.register_buffer("values", torch.zeros(0, hidden_size, device=device))
        self.register_buffer("epsilons", torch.zeros(0, device=device))
        self.labels: list[str] = []
        self.disabled = False
        self.record_queries = False
        self.last_queries: Optional[torch.Tensor] = None
        self.last_keys_out: Optional[torch.Tensor] = None
        self._query_mask: Optional[torch.Tensor] = None
        self._attention_mask: Optional[torch.Tensor] = None
        self._continuing = False
        self._decision: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        self._training_values: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        self._handles: list = []

    @property
    def num_entries(self) -> int:
        return self.keys.shape[0]

    # ------------------------------------------------------------------ context
    @contextlib.contextmanager
    def query_mask(self, mask: Optional[torch.Tensor]) -> Iterator[None]:
        """Take the key at the last position where ``mask`` [B, T] is 1 (the prompt)."""
        previous, self._query_mask = self._query_mask, mask
        try:
            yield
        finally:
            self._query_mask = previous

    def set_call_context(self, attention_mask: Optional[torch.Tensor], continuing: bool) -> None:
        self._attention_mask, self._continuing = attention_mask, continuing

    def key_positions(self, x: torch.Tensor) -> torch.Tensor:
        """Index of the key token of each row of ``x`` [B, T, d]."""
        batch, length = x.shape[:2]
        mask = torch.ones(batch, length, device=x.device)
        if self._attention_mask is not None and self._attention_mask.dim() == 2:
            attention = self._attention_mask[:, -length:].to(x.device)
            if attention.shape == mask.shape:
                mask = mask * attention
        if self._query_mask is not None:
            mask = mask * self._query_mask.to(x.device)
        steps = torch.arange(1, length + 1, device=x.device)
        last = (mask * steps).argmax(dim=1)
        return torch.where(mask.any(dim=1), last, torch.full_like(last, length - 1))

    def _as_key(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        return F.normalize(x, dim=-1) if self.normalize_keys else x

    # ------------------------------------------------------------------ codebook
    def nearest(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(distance, index) of the nearest key to each query [n, d] (keys must exist)."""
        return torch.cdist(queries.float(), self.keys).min(dim=1)

    def insert(self, key: torch.Tensor, label: str, init_eps: float,
               value: Optional[torch.Tensor] = None) -> tuple[int, str]:
        """GRACE's codebook update for one edit; returns (entry it trains, action)."""
        key = key.detach().float().reshape(1, -1).to(self.keys.device)
        if self.num_entries:
            distance, j = self.nearest(key)
            d, j = float(distance), int(j)
            if d <= init_eps + float(self.epsilons[j]):
                if self.labels[j] == label:
                    if d > float(self.epsilons[j]):
                        self.epsilons[j] = d
                        return j, "expand"
                    return j, "reuse"
                self.epsilons[j] = min(float(self.epsilons[j]), d / 2 - 1e-5)
                return self._add(key, label, min(init_eps, d / 2), value), "split"
        return self._add(key, label, init_eps, value), "add"

    def _add(self, key, label, eps, value) -> int:
        value = torch.zeros(1, self.hidden_size) if value is None else value.detach().float().reshape(1, -1)
        self.keys = torch.cat([self.keys, key])
        self.values = torch.cat([self.values, value.to(self.values.device)])
        self.epsilons = torch.cat([self.epsilons, self.epsilons.new_tensor([float(eps)])])
        self.labels.append(label)
        self._decision = None
        return self.num_entries - 1

    @contextlib.contextmanager
    def training_values(self, entries: torch.Tensor, values: torch.Tensor) -> Iterator[None]:
        """Serve ``values`` [n, d] (trainable) for codebook ``entries`` [n] inside the block."""
        previous, self._training_values = self._training_values, (entries, values)
        try:
            yield
        finally:
            self._training_values = previous

    def _current_values(self) -> torch.Tensor:
        if self._training_values is None:
            return self.values
        entries, values = self._training_values
        return self.values.index_put((entries.to(self.values.device),), values.float())

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.record_queries:
            positions = self.key_positions(x)
            rows = torch.arange(x.shape[0], device=x.device)
            self.last_queries = self._as_key(x[rows, positions]).detach()
            self.last_keys_out = out[rows, positions].detach().float()
        if self.disabled or self.num_entries == 0:
            return out
        batch, length = x.shape[:2]
        reuse = self._continuing and self._decision is not None and self._decision[0].shape[0] == batch
        if reuse:
            entry, hit = self._decision
            start = torch.zeros(batch, dtype=torch.long, device=x.device)
        else:
            start = self.key_positions(x)
            rows = torch.arange(batch, device=x.device)
            distance, entry = self.nearest(self._as_key(x[rows, start]))
            hit = distance <= self.epsilons[entry]
            self._decision = (entry, hit)
        if not bool(hit.any()):
            return out
        value = self._current_values()[entry].to(out.dtype)  # [B, d]
        replace = (torch.arange(length, device=x.device)[None, :] >= start[:, None]) & hit[:, None]
        return torch.where(replace[..., None], value[:, None, :], out)

    def extra_repr(self) -> str:
        return f"entries={self.num_entries}, normalize_keys={self.normalize_keys}"


def find_grace(model: nn.Module) -> Optional[GraceAdaptor]:
    for module in model.modules():
        if isinstance(module, GraceAdaptor):
            return module
    return None


def _install_context_hook(model: nn.Module, adaptor: GraceAdaptor) -> list:
    """Tell the adaptor each call's attention mask and whether it continues cached sequences."""
    return [watch_calls(model, lambda mask, embeds, continuing, ids: adaptor.set_call_context(mask, continuing))]


class GraceEditor(_Baseline):
    """GRACE: edits become codebook entries at the target layer's MLP (see ``GraceAdaptor``)."""

    name = "grace"

    def __init__(self, model: nn.Module, tokenizer, config: Optional[GraceConfig] = None) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.config = config or GraceConfig()
        model.requires_grad_(False)
        adaptor = find_grace(model)
        if adaptor is None:
            self.layer_index = target_layer_index(model, self.config.layer)
            parent = decoder_layers(model)[self.layer_index]
            adaptor = GraceAdaptor(_mlp(model, self.layer_index), int(model.config.hidden_size),
                                   normalize_keys=self.config.normalize_keys)
            parent.mlp = adaptor
            adaptor._handles = _install_context_hook(model, adaptor)
            adaptor._parent = (parent,)
        elif adaptor.normalize_keys != self.config.normalize_keys:
            raise ConfigError("the model's GRACE adaptor uses another normalize_keys setting")
        self.adaptor = adaptor
        self._generator = torch.Generator().manual_seed(self.config.seed)

    @contextlib.contextmanager
    def unedited(self) -> Iterator[None]:
        """Run the model without the codebook inside the block."""
        previous, self.adaptor.disabled = self.adaptor.disabled, True
        try:
            yield
        finally:
            self.adaptor.disabled = previous

    def detach(self) -> nn.Module:
        """Put the original MLP back; returns it."""
        for handle in self.adaptor._handles:
            handle.remove()
        self.adaptor._parent[0].mlp = self.adaptor.base_layer
        return self.adaptor.base_layer

    def keys(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys of ``prompts`` (MLP input at the last prompt token) and the MLP's own output
        there (the 'warm' value init), [n, d] each."""
        rows = encode_pairs(self.tokenizer, list(prompts), ["x"] * len(prompts))
        ids, attention, prompt_mask = collate(rows, pad_id(self.tokenizer), _model_device(self.model))
        adaptor = self.adaptor
        previous, adaptor.record_queries = adaptor.record_queries, True
        try:
            with torch.no_grad(), adaptor.query_mask(prompt_mask):
                self.model(input_ids=ids, attention_mask=attention, use_cache=False)
            return adaptor.last_queries, adaptor.last_keys_out
        finally:
            adaptor.record_queries = previous

    def edit_batch(self, edits) -> BaselineReport:
        edits = list(edits)
        if not edits:
            raise ConfigError("edit_batch needs at least one edit")
        started = time.perf_counter()
        cfg, adaptor = self.config, self.adaptor
        queries, warm = self.keys([e.prompt for e in edits])
        actions: dict[str, int] = {"add": 0, "split": 0, "expand": 0, "reuse": 0}
        chosen = []
        for k, edit in enumerate(edits):
            if cfg.value_init == "warm":
                value = warm[k]
            else:
                value = torch.rand(self.adaptor.hidden_size, generator=self._generator)
            entry, action = adaptor.insert(queries[k], edit.target, cfg.init_eps, value=value)
            actions[action] += 1
            chosen.append(entry)
        with torch.no_grad():
            distance, nearest = adaptor.nearest(queries)
            reached = (nearest == torch.tensor(chosen, device=nearest.device)) & \
                (distance <= adaptor.epsilons[nearest])
        entries = torch.tensor(sorted(set(chosen)), dtype=torch.long, device=adaptor.values.device)
        values = nn.Parameter(adaptor.values[entries].clone())
        batches = _supervised_batches(self.tokenizer, edits, cfg.micro_batch, _model_device(self.model))
        optimizer = torch.optim.Adam([values], lr=cfg.learning_rate)
        with adaptor.training_values(entries, values):
            steps, loss = _fit(self.model, batches, optimizer, max_steps=cfg.max_steps, stop_loss=cfg.stop_loss,
                               mask_context=adaptor.query_mask)
        with torch.no_grad():
            adaptor.values[entries] = values.detach().to(adaptor.values.dtype)
        adaptor._decision = None
        return BaselineReport(n_edits=len(edits), steps=steps, loss=loss, seconds=time.perf_counter() - started,
                              details={"entries": adaptor.num_entries, **actions,
                                       "unreachable": int((~reached).sum())})


BASELINES: dict[str, Callable[..., Any]] = {
    NoEditEditor.name: NoEditEditor,
    FTLEditor.name: FTLEditor,
    GraceEditor.name: GraceEditor,
}


def config_dict(config: Any) -> dict:
    return dataclasses.asdict(config) if dataclasses.is_dataclass(config) else {}
