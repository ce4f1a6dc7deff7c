"""Triton kernels of the LEMoE engine and their launch wrappers.

Importing this package makes no CUDA call, so it works on machines without a GPU. Set
``TRITON_INTERPRET=1`` *before* importing it to run the kernels in Triton's CPU interpreter
(Triton decides interpreted vs compiled when the ``@triton.jit`` decorators run).

* :func:`anchor_route` - scores -> gate -> top-k -> softmax, one launch (one anchor per
  expert, one query per row).
* :func:`pooled_route` - the default routing: scores of every prompt token against every
  anchor, masked max over the prompt, gate, per-expert max over its anchors, top-k, softmax;
  two launches.
* :func:`grouped_expert_ffn` - expert-grouped FFN (up [+gate] + activation, down + routing
  weight) added in place into an output buffer, no host synchronisation; with a cached
  :func:`grouped_layout` only the FFN kernels launch (a decode step).

Every launch is guarded by the tensors' device. ``compile_check`` compiles every launch
configuration for sm_80/86/89/90 without a GPU (registers, spills, shared memory).
"""

from .anchor_route import anchor_route
from .grouped_ffn import GroupedLayout, grouped_expert_ffn, grouped_layout, pad_expert_hidden
from .pooled_route import pooled_route, pooled_route_scratch_shape

__all__ = ["anchor_route", "pooled_route", "pooled_route_scratch_shape", "grouped_expert_ffn", "grouped_layout", "GroupedLayout",
           "pad_expert_hidden"]
