"""Triton kernels of the LEMoE engine and their launch wrappers.

Importing this package makes no CUDA call, so it works on machines without a GPU. Set
``TRITON_INTERPRET=1`` *before* importing it to run the kernels in Triton's CPU interpreter
(Triton decides interpreted vs compiled when the ``@triton.jit`` decorators run).

* :func:`anchor_route` - scores -> top-k -> softmax -> per-slot gate, one launch.
* :func:`grouped_expert_ffn` - expert-grouped FFN (up [+gate] + activation, down + routing
  weight) added in place into an output buffer, no host synchronisation.
"""

from .anchor_route import anchor_route
from .grouped_ffn import grouped_expert_ffn

__all__ = ["anchor_route", "grouped_expert_ffn"]
