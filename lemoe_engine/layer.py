"""LEMoELayer: the base MLP plus a mixture of frozen, anchor-routed expert FFNs.

    h(x) = base(x) + scale * sum_{i in topk} g_i(x) * f_i(x)

The layer wraps the original MLP module (``base_layer``) and replaces it in its parent
(see ``patching.attach``). Frozen experts live stacked (``w_up[E, d, H]`` ...), so the
Triton kernels read one tensor per weight; the one expert being trained, if any, lives in
separate parameters until ``freeze_expert`` appends it to the stack.
"""

from __future__ import annotations

import copy
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
from torch import nn

from .config import LEMoEConfig
from .errors import ConfigError
from .experts import expert_ffn_reference, init_expert
from . import routing
from .routing import QueryEncoder, l2_normalize, masked_mean

WEIGHT_NAMES = ("w_up", "w_gate", "w_down")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class RouteContext:
    """What the model-level hooks tell the layer about the current forward call."""

    attention_mask: Optional[torch.Tensor] = None
    embeddings: Optional[torch.Tensor] = None  # the per-token query source vectors [B, T, d]
    continuing: bool = False  # a KV-cache decode step of sequences already routed
    input_ids: Optional[torch.Tensor] = None  # the call's token ids [B, T] (for a route filter)


class LEMoELayer(nn.Module):
    """Drop-in replacement of one decoder layer's MLP with the LEMoE adaptor."""

    def __init__(self, base_layer: nn.Module, hidden_size: int, config: LEMoEConfig,
                 device: Optional[torch.device] = None,
                 dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        if not isinstance(config, LEMoEConfig):
            raise ConfigError(f"config must be a LEMoEConfig, got {type(config).__name__}")
        self.base_layer = base_layer
        self.config = config
        self.hidden_size = hidden_size
        if device is None or dtype is None:
            reference = next(base_layer.parameters(), None)
            device = device if device is not None else (reference.device if reference is not None else "cpu")
            dtype = dtype if dtype is not None else (reference.dtype if reference is not None else torch.float32)
        self.expert_dtype = _DTYPES[config.dtype] if config.dtype else dtype
        self.query_encoder = QueryEncoder(hidden_size, config, device=device)
        key_dim = config.anchor_dim(hidden_size)
        # anchors (keys) of all experts; expert i owns the rows where anchor_expert == i
        self.register_buffer("anchors", torch.zeros(0, key_dim, device=device))
        self.register_buffer("anchor_expert", torch.zeros(0, dtype=torch.int32, device=device))
        # how many prompt tokens each anchor's key pools (1..config.query_window; routing.token_queries)
        self.register_buffer("anchor_window", torch.zeros(0, dtype=torch.int32, device=device))
        self.register_buffer("thresholds", torch.zeros(0, device=device))
        width = config.expert_hidden
        shapes = {"w_up": (0, hidden_size, width), "w_gate": (0, hidden_size, width),
                  "w_down": (0, width, hidden_size)}
        for name in self.weight_names:
            empty = torch.zeros(shapes[name], device=device, dtype=self.expert_dtype)
            setattr(self, name, nn.Parameter(empty, requires_grad=False))
        self.trainable = nn.ParameterDict()  # the expert being trained, if any
        self.expert_info: list[dict[str, Any]] = []
        self.base_info: dict[str, Any] = {}  # identity of the base model, set by attach
        # the adaptor folder this layer was loaded from / last saved to: {path, revision, tensors_sha256};
        # save() refuses to overwrite that folder if another writer changed it since
        self.adaptor_origin: Optional[dict[str, Any]] = None
        self.ledger: list = []  # ledger.LedgerEntry per edit that shaped the adaptor (saved with it)
        self.disabled = False
        self._context = RouteContext()
        # called as route_filter(layer, x, ids, weights) on each fresh sequence route [B, k]
        # (question_gate.enable); returns the ids and weights to serve
        self.route_filter: Optional[Any] = None
        self._query_mask: Optional[torch.Tensor] = None
        self._sequence_route: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        # the grouped order of the sequence route for the FFN kernels: (key, GroupedLayout)
        self._route_layout: Optional[tuple[Any, Any]] = None
        self._route_layout_stale = True
        self._expert_start_cache: Optional[tuple[Any, tuple[torch.Tensor, int]]] = None

    # ------------------------------------------------------------------ experts
    @property
    def weight_names(self) -> tuple[str, ...]:
        return WEIGHT_NAMES if self.config.expert_gated else ("w_up", "w_down")

    @property
    def num_experts(self) -> int:
        return len(self.expert_info)

    @property
    def num_anchors(self) -> int:
        return self.anchors.shape[0]

    @property
    def num_frozen(self) -> int:
        return self.w_up.shape[0]

    def add_expert(self, anchors: Optional[torch.Tensor] = None, thresholds: Any = float("-inf"),
                   trainable: bool = True, windows: Any = 1, **info: Any) -> int:
        """Append a new expert (an exact no-op until trained) and return its index.

        ``anchors``: its key(s), [key_dim] or [n, key_dim] (normalised to unit length); an
        input is routed to the expert whose best anchor matches it best. ``thresholds``: one
        gate threshold per anchor (a float applies to all; -inf = never gated). ``windows``: per
        anchor, how many prompt tokens its key pools (an int applies to all; see
        ``routing.token_queries``).
        ``trainable=True`` makes its weights trainable parameters (older experts stay frozen);
        call ``freeze_expert`` when its batch is done. ``info`` is free-form metadata saved with
        the adaptor (e.g. ``n_edits``).
        """
        if len(self.trainable):
            raise ConfigError("an expert is still trainable: call freeze_expert() before adding another")
        index = self.num_experts
        device = self.anchors.device
        if anchors is None:
            anchors = torch.zeros(1, self.anchors.shape[1], device=device)
        anchors = anchors.detach().to(device).float().reshape(-1, anchors.shape[-1])
        if anchors.shape[1] != self.anchors.shape[1] or anchors.shape[0] == 0:
            raise ConfigError(f"anchors must have shape [n >= 1, {self.anchors.shape[1]}], "
                              f"got {tuple(anchors.shape)}")
        thresholds = torch.as_tensor(thresholds, dtype=torch.float32, device=device).expand(anchors.shape[0])
        windows = torch.as_tensor(windows, dtype=torch.int32, device=device).expand(anchors.shape[0])
        if bool((windows < 1).any()) or bool((windows > max(self.config.query_window, 1)).any()):
            raise ConfigError(f"anchor windows must be in 1..query_window ({self.config.query_window}), "
                              f"got {windows.tolist()}")
        weights = init_expert(self.hidden_size, self.config.expert_hidden, self.config.expert_gated,
                              seed=self.config.seed * 1_000_003 + index, device=device,
                              dtype=self.expert_dtype)
        self.anchors = torch.cat([self.anchors, routing.normalize_anchors(anchors)])
        self.anchor_expert = torch.cat([self.anchor_expert, torch.full(
            (anchors.shape[0],), index, dtype=torch.int32, device=device)])
        self.thresholds = torch.cat([self.thresholds, thresholds.clone()])
        self.anchor_window = torch.cat([self.anchor_window, windows.clone()])
        if trainable:
            for name in self.weight_names:
                self.trainable[name] = nn.Parameter(weights[name].float())
        else:
            self._append_frozen(weights)
        self.expert_info.append({"created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **info})
        self._sequence_route = None
        return index

    def freeze_expert(self) -> None:
        """Move the trainable expert into the frozen stack (``requires_grad=False``)."""
        if not len(self.trainable):
            raise ConfigError("there is no trainable expert to freeze")
        self._append_frozen({name: p.detach() for name, p in self.trainable.items()})
        self.trainable = nn.ParameterDict()

    def add_experts(self, experts: list[dict[str, Any]]) -> list[int]:
        """Append several trained experts, frozen, in order: each a dict with ``anchors``,
        ``thresholds``, ``weights`` ({name: tensor}) and optional ``info``. The same as
        ``add_expert`` + setting the weights + ``freeze_expert`` for each, but the weight stacks
        are copied once for all of them, not once per expert (the editor's blocked training)."""
        indices, new = [], {name: [] for name in self.weight_names}
        for spec in experts:
            indices.append(self.add_expert(spec["anchors"], spec["thresholds"], trainable=True,
                                           windows=spec.get("windows", 1), **spec.get("info", {})))
            self.trainable = nn.ParameterDict()  # its stack rows are the given weights, below
            for name in self.weight_names:
                new[name].append(spec["weights"][name].detach())
        if indices:
            self._append_frozen({name: torch.stack(new[name]) for name in self.weight_names}, stacked=True)
        return indices

    def remove_expert(self, index: Optional[int] = None) -> None:
        """Remove expert ``index`` (default: the newest, i.e. roll back the last edit batch) and
        its anchors; the experts after it move down by one (their anchors stay in expert order)."""
        if self.num_experts == 0:
            raise ConfigError("the layer has no expert to remove")
        newest = self.num_experts - 1
        index = newest if index is None else index
        self._check_index(index)
        if len(self.trainable):
            if index != newest:
                raise ConfigError("an expert is being trained: only it (the newest) can be removed now")
            self.trainable = nn.ParameterDict()
        else:
            for name in self.weight_names:
                stack = getattr(self, name)
                kept = torch.cat([stack[:index], stack[index + 1:]])
                setattr(self, name, nn.Parameter(kept.clone(), requires_grad=False))
        keep = self.anchor_expert != index
        owners = self.anchor_expert[keep]
        self.anchors = self.anchors[keep].clone()
        self.anchor_expert = torch.where(owners > index, owners - 1, owners).clone()
        self.thresholds = self.thresholds[keep].clone()
        self.anchor_window = self.anchor_window[keep].clone()
        self.expert_info.pop(index)
        for entry in self.ledger:  # ledger entries follow their experts' new ids
            if entry.expert is not None and entry.expert >= index:
                entry.expert = entry.expert - 1 if entry.expert > index else None
        self._sequence_route = None

    def snapshot(self) -> dict[str, Any]:
        """A copy of every expert, anchor, threshold and the ledger, for ``restore``: an editing
        run that drops older experts before training their replacements rolls back with it."""
        if len(self.trainable):
            raise ConfigError("an expert is being trained: freeze it before taking a snapshot")
        names = (*self.weight_names, "anchors", "anchor_expert", "anchor_window", "thresholds")
        return {"tensors": {name: getattr(self, name).detach().clone() for name in names},
                "expert_info": copy.deepcopy(self.expert_info), "ledger": copy.deepcopy(self.ledger)}

    def restore(self, snapshot: dict[str, Any]) -> None:
        """Put back the experts, anchors, thresholds and ledger of ``snapshot``."""
        self.trainable = nn.ParameterDict()
        for name, tensor in snapshot["tensors"].items():
            if name in self.weight_names:
                setattr(self, name, nn.Parameter(tensor.clone(), requires_grad=False))
            else:
                setattr(self, name, tensor.clone())
        self.expert_info = copy.deepcopy(snapshot["expert_info"])
        self.ledger = copy.deepcopy(snapshot["ledger"])
        self._sequence_route = None

    def anchor_rows(self, expert: int) -> torch.Tensor:
        """Indices of expert ``expert``'s anchors in ``anchors`` / ``thresholds``."""
        self._check_index(expert)
        return (self.anchor_expert == expert).nonzero(as_tuple=True)[0]

    def set_anchor(self, expert: int, anchor: torch.Tensor) -> None:
        """Replace expert ``expert``'s anchors by ``anchor`` ([key_dim] or as many rows as it has)."""
        rows = self.anchor_rows(expert)
        values = anchor.to(self.anchors.device).float().reshape(-1, self.anchors.shape[1])
        self.anchors[rows] = l2_normalize(values).expand(len(rows), -1)

    def set_threshold(self, expert: int, threshold: Any) -> None:
        """Set the gate threshold(s) of expert ``expert``'s anchors (cosine; -inf = never gated)."""
        rows = self.anchor_rows(expert)
        self.thresholds[rows] = torch.as_tensor(threshold, dtype=torch.float32,
                                                device=self.thresholds.device).expand(len(rows))

    def _check_index(self, index: int) -> None:
        if not 0 <= index < self.num_experts:
            raise ConfigError(f"expert index {index} out of range (the layer has {self.num_experts})")

    def _append_frozen(self, weights: dict[str, torch.Tensor], stacked: bool = False) -> None:
        for name in self.weight_names:
            stack = getattr(self, name)
            new = weights[name].to(device=stack.device, dtype=stack.dtype)
            new = new if stacked else new.unsqueeze(0)
            setattr(self, name, nn.Parameter(torch.cat([stack.detach(), new]), requires_grad=False))

    def expert_weights(self) -> dict[str, Any]:
        """Per-weight expert tensors indexable by expert id (stacked when all are frozen)."""
        if not len(self.trainable):
            return {name: getattr(self, name) for name in self.weight_names}
        return {name: [*getattr(self, name).unbind(0), self.trainable[name]] for name in self.weight_names}

    # ------------------------------------------------------------------ routing
    def set_route_context(self, context: RouteContext) -> None:
        self._context = context

    @contextmanager
    def query_mask(self, mask: Optional[torch.Tensor]) -> Iterator[None]:
        """Pool the sequence query only over positions where ``mask`` [B, T] is 1 (e.g. the prompt
        of a prompt+target sequence), as generation would."""
        previous, self._query_mask = self._query_mask, mask
        try:
            yield
        finally:
            self._query_mask = previous

    def token_vectors(self, x: torch.Tensor) -> torch.Tensor:
        """The per-token vectors queries are made of, [B, T, d] (before centring/projection)."""
        if self.config.query_source == "hidden":
            return x
        source = self._context.embeddings
        if source is None or source.shape[:2] != x.shape[:2]:
            raise ConfigError(
                f"query_source={self.config.query_source!r} needs vectors from the model's forward "
                "call: attach the layer with lemoe_engine.attach(model, config) and call the model "
                "(or use query_source='hidden' for a standalone layer)")
        return source

    def token_queries(self, x: torch.Tensor, windows: Optional[int] = None) -> torch.Tensor:
        """Unit queries of every token of ``x``'s prompts pooled over 1..``windows`` tokens
        (default: the most any anchor pools), [W, B, T, key] (``routing.token_queries``)."""
        windows = self._anchor_layout()[2] if windows is None else windows
        return routing.token_queries(self.query_encoder, self.token_vectors(x), self.prompt_mask(x), windows)

    def prompt_mask(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """[B, T] mask of the positions a sequence is routed by (its prompt, no padding)."""
        mask = self._context.attention_mask
        if mask is not None:
            mask = mask[:, -x.shape[1]:].to(x.device)
        if self._query_mask is not None:
            query_mask = self._query_mask.to(x.device)
            mask = query_mask if mask is None else mask * query_mask
        return mask

    def pooled_vectors(self, x: torch.Tensor) -> torch.Tensor:
        """Mean of the token vectors over the prompt, [B, d] (the paper's query, before centring)."""
        return masked_mean(self.token_vectors(x), self.prompt_mask(x))

    def anchor_scores(self, x: torch.Tensor) -> torch.Tensor:
        """Cosine score of every anchor: [B*T, M] for token routing, [B, M] for sequence routing
        (mean pooling: of the pooled query; max pooling: of the best-matching prompt token)."""
        return routing.anchor_scores(self.config, self.query_encoder, self.anchors, self.token_vectors(x),
                                     self.prompt_mask(x), self.anchor_window, self._anchor_layout()[2])

    def served_route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A fresh route as it is served ([B, k] per sequence, [B*T, k] per token): the anchors'
        decision (``_route``) through the route filter (``question_gate``), no state kept."""
        ids, weights = self._route(x)
        if self.route_filter is not None and self.config.routing == "sequence" and self.num_experts:
            ids, weights = self.route_filter(self, x, ids, weights)
        return ids, weights

    def route(self, x: torch.Tensor, store: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert ids and weights per token, [B*T, top_k] each.

        Sequence routing keeps a fresh route for the decode steps that follow (``store``); a
        caller routing a batch outside the model's own forward (a serving scheduler) passes
        ``store=False`` so the kept route is left as it was."""
        batch, length = x.shape[0], x.shape[1]
        reuse = (store and self.config.routing == "sequence" and self._context.continuing
                 and self._sequence_route is not None and self._sequence_route[0].shape[0] == batch)
        starts = None
        if reuse:  # decode steps: every token comes after the prompt, so after any key
            ids, weights = self._sequence_route
        else:
            ids, weights = self.served_route(x)
            if self.config.acts_from_key and self.num_experts:
                starts = self.key_positions(x, ids)
            if self.config.routing == "sequence" and store:
                ids, weights = self._keep_sequence_route(ids, weights)
        if self.config.routing == "sequence":
            k = ids.shape[1]
            ids = ids[:, None, :].expand(batch, length, k)
            weights = weights[:, None, :].expand(batch, length, k)
            if starts is not None:  # expert_span='key': no expert before its matched token
                after = routing.acts_from(starts, length)
                ids = torch.where(after, ids, torch.full_like(ids, -1))
                weights = torch.where(after, weights, torch.zeros_like(weights))
            # contiguous: for one sequence the reshape is a stride-0 view, which the kernels refuse
            ids = ids.reshape(-1, k).contiguous()
            weights = weights.reshape(-1, k).contiguous()
        return ids, weights

    def key_positions(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """For a sequence route ``ids`` [B, k] of batch ``x``, the prompt position from which each
        slot's expert acts (``expert_span='key'``): the token whose query best matches that
        expert's anchors (``routing.expert_key_positions``), int64 [B, k]."""
        start, max_anchors, windows, _ = self._anchor_layout()
        return routing.expert_key_positions(self.query_encoder, self.anchors, start, max_anchors,
                                            self.token_vectors(x), self.prompt_mask(x), ids,
                                            self.anchor_window, windows)

    def _keep_sequence_route(self, ids: torch.Tensor, weights: torch.Tensor):
        """Store a fresh sequence route in persistent buffers: a route of the same shape is
        copied into the previous one's memory, so a CUDA graph captured at a decode step reads
        the current route, never a stale or freed one. Marks the cached grouped order stale."""
        kept = self._sequence_route
        if (kept is not None and kept[0].shape == ids.shape and kept[0].dtype == ids.dtype
                and kept[0].device == ids.device and kept[1].dtype == weights.dtype):
            kept[0].copy_(ids)
            kept[1].copy_(weights)
        else:
            self._sequence_route = (ids, weights)
        self._route_layout_stale = True
        return self._sequence_route

    def gate_thresholds(self) -> torch.Tensor:
        return self.thresholds if self.config.gate else torch.full_like(self.thresholds, float("-inf"))

    def _route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Ids and weights, [B*T, k] (token routing) or [B, k] (sequence routing): see
        ``routing.route`` (eager reference, or the fused kernels on the triton backend)."""
        use_kernels = self._use_kernels(x)
        mask = self.prompt_mask(x) if self.config.routing == "sequence" else None
        start, _, windows, order = self._anchor_layout()
        return routing.route(self.config, self.query_encoder, self.anchors, self.anchor_expert,
                             self.gate_thresholds(), self.num_experts, self.token_vectors(x), mask,
                             use_kernels=use_kernels,
                             expert_start=start if use_kernels else None,
                             anchor_window=self.anchor_window if windows > 1 else None, windows=windows,
                             anchor_order=order if (use_kernels and windows > 1) else None)

    def _anchor_layout(self) -> tuple[torch.Tensor, int, int, torch.Tensor]:
        """(``routing.expert_starts``, the most anchors one expert owns, the most tokens one
        anchor's key pools, the anchors grouped by window for the kernels: ``routing.window_order``),
        cached until the anchor table changes (the counts are read on the host once per change,
        never per call)."""
        owner, window = self.anchor_expert, self.anchor_window
        key = (owner.data_ptr(), owner._version, owner.shape[0], self.num_experts, owner.device,
               window.data_ptr(), window._version)
        if self._expert_start_cache is None or self._expert_start_cache[0] != key:
            start = routing.expert_starts(owner, self.num_experts)
            most = int((start[1:] - start[:-1]).max()) if self.num_experts else 0
            windows = int(window.max()) if window.numel() else 1
            self._expert_start_cache = (key, (start, most, windows, routing.window_order(window)))
        return self._expert_start_cache[1]

    # ------------------------------------------------------------------ forward
    def _use_kernels(self, x: torch.Tensor) -> bool:
        backend = self.config.backend
        if backend == "eager" or self.training or len(self.trainable) or torch.is_grad_enabled():
            return False
        if backend == "triton" and not x.is_cuda:
            import os
            if os.environ.get("TRITON_INTERPRET") != "1":
                raise ConfigError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for the "
                                  "CPU interpreter); use backend='auto' or 'eager' on CPU")
        return backend == "triton" or x.is_cuda

    def _kernel_experts(self) -> dict[str, Any]:
        """The frozen stacks as the kernels read them: H zero-padded to a multiple of 16 when
        ``expert_hidden`` is not one (exact; costs a copy per call: prefer multiples of 16)."""
        from .kernels import pad_expert_hidden
        w_up, w_gate, w_down = pad_expert_hidden(self.w_up, getattr(self, "w_gate", None)
                                                 if self.config.expert_gated else None, self.w_down)
        return {"w_up": w_up, "w_gate": w_gate, "w_down": w_down}

    def _decode_layout(self, x: torch.Tensor, w_up: torch.Tensor):
        """The grouped (expert-sorted) order of the sequence route, kept with it.

        Rebuilt when a new route is stored (at prefill, outside any CUDA graph), into the same
        buffers when shapes allow; a decode step (one new token per sequence) with the route
        unchanged passes it to the FFN kernels and launches only those. None when not usable."""
        route = self._sequence_route
        if self.config.routing != "sequence" or route is None or route[0].shape[0] != x.shape[0]:
            return None
        from .kernels import grouped_layout
        key = (route[0].data_ptr(), tuple(route[0].shape), tuple(w_up.shape), w_up.dtype, w_up.device)
        cached = self._route_layout
        if cached is None or cached[0] != key or self._route_layout_stale:
            fresh = grouped_layout(route[0], w_up)
            if cached is not None and cached[0] == key and cached[1].matches(fresh):
                cached[1].copy_(fresh)
            else:
                self._route_layout = (key, fresh)
            self._route_layout_stale = False
        return self._route_layout[1] if x.shape[1] == 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.num_experts == 0 or self.disabled:
            return out
        ids, weights = self.route(x)
        return self.apply_experts(x, out, ids, weights, sequence_layout=True)

    def apply_experts(self, x: torch.Tensor, out: torch.Tensor, ids: torch.Tensor,
                      weights: torch.Tensor, sequence_layout: bool = False) -> torch.Tensor:
        """``out[n] += scale * sum_j weights[n, j] * f_{ids[n, j]}(x[n])`` over the flattened
        tokens of ``x`` / ``out`` ([..., d]; ``ids`` / ``weights`` [N, top_k], -1 = no expert):
        the fused kernel on the kernel path, the eager reference elsewhere. Returns the result
        (shaped like ``out``; use it, ``out`` itself may be left unchanged).
        ``sequence_layout``: ``x`` is the [B, T, d] batch of the kept sequence route, whose
        grouped order a decode step reuses (``LEMoELayer.forward``)."""
        shape = out.shape
        flat_x = x.reshape(-1, x.shape[-1])
        if self._use_kernels(x):
            from .kernels import grouped_expert_ffn
            # the kernel adds into ``out`` in place: a non-contiguous base output would be
            # reshaped into a copy and the experts' contribution lost
            out = out.contiguous()
            experts = self._kernel_experts()
            layout = self._decode_layout(x, experts["w_up"]) if sequence_layout else None
            grouped_expert_ffn(flat_x.contiguous(), ids, weights, experts["w_up"], experts["w_gate"],
                               experts["w_down"], self.config.expert_activation, out.view(-1, shape[-1]),
                               self.config.scale, layout=layout)
            return out
        experts = self.expert_weights()
        flat_out = expert_ffn_reference(flat_x, ids, weights, experts["w_up"], experts.get("w_gate"),
                                        experts["w_down"], self.config.expert_activation,
                                        out.reshape(-1, shape[-1]), self.config.scale)
        return flat_out.reshape(shape)

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}, hidden={self.config.expert_hidden}, "
                f"top_k={self.config.top_k}, routing={self.config.routing}, backend={self.config.backend}")
