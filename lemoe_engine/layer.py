"""LEMoELayer: the base MLP plus a mixture of frozen, anchor-routed expert FFNs.

    h(x) = base(x) + scale * sum_{i in topk} g_i(x) * f_i(x)

The layer wraps the original MLP module (``base_layer``) and replaces it in its parent
(see ``patching.attach``). Frozen experts live stacked (``w_up[E, d, H]`` ...), so the
Triton kernels read one tensor per weight; the one expert being trained, if any, lives in
separate parameters until ``freeze_expert`` appends it to the stack.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
from torch import nn

from .config import LEMoEConfig
from .errors import ConfigError
from .experts import expert_ffn_reference, init_expert
from .routing import QueryEncoder, l2_normalize, masked_mean, route_reference

WEIGHT_NAMES = ("w_up", "w_gate", "w_down")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class RouteContext:
    """What the model-level hooks tell the layer about the current forward call."""

    attention_mask: Optional[torch.Tensor] = None
    embeddings: Optional[torch.Tensor] = None
    continuing: bool = False  # a KV-cache decode step of sequences already routed


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
        self.register_buffer("anchors", torch.zeros(0, key_dim, device=device))
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
        self.disabled = False
        self._context = RouteContext()
        self._query_mask: Optional[torch.Tensor] = None
        self._sequence_route: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    # ------------------------------------------------------------------ experts
    @property
    def weight_names(self) -> tuple[str, ...]:
        return WEIGHT_NAMES if self.config.expert_gated else ("w_up", "w_down")

    @property
    def num_experts(self) -> int:
        return self.anchors.shape[0]

    @property
    def num_frozen(self) -> int:
        return self.w_up.shape[0]

    def add_expert(self, anchor: Optional[torch.Tensor] = None, threshold: float = float("-inf"),
                   trainable: bool = True, **info: Any) -> int:
        """Append a new expert (an exact no-op until trained) and return its index.

        ``trainable=True`` makes its weights trainable parameters (older experts stay
        frozen); call ``freeze_expert`` when its batch is done. ``info`` is free-form
        metadata saved with the adaptor (e.g. ``n_edits``).
        """
        if len(self.trainable):
            raise ConfigError("an expert is still trainable: call freeze_expert() before adding another")
        index = self.num_experts
        device = self.anchors.device
        weights = init_expert(self.hidden_size, self.config.expert_hidden, self.config.expert_gated,
                              seed=self.config.seed * 1_000_003 + index, device=device,
                              dtype=self.expert_dtype)
        if anchor is None:
            anchor = torch.zeros(self.anchors.shape[1], device=device)
        self._append_anchor(anchor, threshold)
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

    def remove_expert(self) -> None:
        """Remove the newest expert (roll back the last edit batch)."""
        if self.num_experts == 0:
            raise ConfigError("the layer has no expert to remove")
        if len(self.trainable):
            self.trainable = nn.ParameterDict()
        else:
            for name in self.weight_names:
                stack = getattr(self, name)
                setattr(self, name, nn.Parameter(stack[:-1].clone(), requires_grad=False))
        self.anchors = self.anchors[:-1].clone()
        self.thresholds = self.thresholds[:-1].clone()
        self.expert_info.pop()
        self._sequence_route = None

    def set_anchor(self, index: int, anchor: torch.Tensor) -> None:
        """Set expert ``index``'s key anchor (normalised to unit length)."""
        self._check_index(index)
        self.anchors[index] = l2_normalize(anchor.to(self.anchors.device).reshape(-1))

    def set_threshold(self, index: int, threshold: float) -> None:
        """Set expert ``index``'s gate threshold (cosine score; -inf = never gated)."""
        self._check_index(index)
        self.thresholds[index] = float(threshold)

    def _check_index(self, index: int) -> None:
        if not 0 <= index < self.num_experts:
            raise ConfigError(f"expert index {index} out of range (the layer has {self.num_experts})")

    def _append_anchor(self, anchor: torch.Tensor, threshold: float) -> None:
        anchor = anchor.to(self.anchors.device).reshape(1, -1)
        if anchor.shape[1] != self.anchors.shape[1]:
            raise ConfigError(f"anchor must have {self.anchors.shape[1]} elements, got {anchor.shape[1]}")
        unit = l2_normalize(anchor) if anchor.abs().sum() > 0 else anchor.float()
        self.anchors = torch.cat([self.anchors, unit])
        self.thresholds = torch.cat([self.thresholds, self.thresholds.new_tensor([float(threshold)])])

    def _append_frozen(self, weights: dict[str, torch.Tensor]) -> None:
        for name in self.weight_names:
            stack = getattr(self, name)
            new = weights[name].to(device=stack.device, dtype=stack.dtype).unsqueeze(0)
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

    def pooled_vectors(self, x: torch.Tensor) -> torch.Tensor:
        """The vectors queries are made of, before centring and projection: [B, d] for sequence
        routing (mean over the prompt), [B*T, d] for token routing."""
        source = x
        if self.config.query_source == "embedding":
            source = self._context.embeddings
            if source is None or source.shape[:2] != x.shape[:2]:
                raise ConfigError(
                    "query_source='embedding' needs the token embeddings of this forward call: attach "
                    "the layer to its model with lemoe_engine.attach(model, config) and call the model "
                    "(or use query_source='hidden' for a standalone layer)")
        if self.config.routing == "token":
            return source.reshape(-1, source.shape[-1]).float()
        mask = self._context.attention_mask
        if mask is not None and mask.shape[1] != x.shape[1]:
            mask = mask[:, -x.shape[1]:]
        if self._query_mask is not None:
            query_mask = self._query_mask.to(x.device)
            mask = query_mask if mask is None else mask.to(x.device) * query_mask
        return masked_mean(source, mask)

    def queries(self, x: torch.Tensor) -> torch.Tensor:
        """Unit-norm queries: [B, key] for sequence routing, [B*T, key] for token routing."""
        return self.query_encoder(self.pooled_vectors(x))

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert ids and weights per token, [B*T, top_k] each."""
        batch, length = x.shape[0], x.shape[1]
        reuse = (self.config.routing == "sequence" and self._context.continuing
                 and self._sequence_route is not None and self._sequence_route[0].shape[0] == batch)
        if reuse:
            ids, weights = self._sequence_route
        else:
            thresholds = self.thresholds if self.config.gate else torch.full_like(self.thresholds, float("-inf"))
            ids, weights = self._route_queries(self.queries(x), thresholds)
            if self.config.routing == "sequence":
                self._sequence_route = (ids, weights)
        if self.config.routing == "sequence":
            k = ids.shape[1]
            ids = ids[:, None, :].expand(batch, length, k).reshape(-1, k)
            weights = weights[:, None, :].expand(batch, length, k).reshape(-1, k)
        return ids, weights

    def _route_queries(self, queries: torch.Tensor, thresholds: torch.Tensor):
        if self._use_kernels(queries):
            from kernels import anchor_route
            return anchor_route(queries.contiguous(), self.anchors, thresholds.float().contiguous(),
                                self.config.top_k, self.config.temperature)
        return route_reference(queries, self.anchors, thresholds, self.config.top_k, self.config.temperature)

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.num_experts == 0 or self.disabled:
            return out
        ids, weights = self.route(x)
        flat_x = x.reshape(-1, x.shape[-1])
        flat_out = out.reshape(-1, out.shape[-1])
        experts = self.expert_weights()
        if self._use_kernels(x):
            from kernels import grouped_expert_ffn
            grouped_expert_ffn(flat_x.contiguous(), ids, weights, experts["w_up"], experts.get("w_gate"),
                               experts["w_down"], self.config.expert_activation, flat_out,
                               self.config.scale)
            return out
        flat_out = expert_ffn_reference(flat_x, ids, weights, experts["w_up"], experts.get("w_gate"),
                                        experts["w_down"], self.config.expert_activation, flat_out,
                                        self.config.scale)
        return flat_out.reshape(out.shape)

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}, hidden={self.config.expert_hidden}, "
                f"top_k={self.config.top_k}, routing={self.config.routing}, backend={self.config.backend}")
