"""Expert FFNs: activations, initialisation and the eager grouped-FFN reference.

Experts are stored stacked, one tensor per weight, in "x @ W" orientation:
``w_up[E, d, H]``, ``w_gate[E, d, H]`` (gated experts only), ``w_down[E, H, d]``.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

ACTIVATION_FNS = {
    "silu": F.silu,
    "gelu": F.gelu,  # exact (erf) GELU
    "relu": F.relu,
}

# a stacked [E, ...] tensor, or a sequence of per-expert tensors (used while one expert trains)
ExpertWeights = Union[torch.Tensor, Sequence[torch.Tensor]]


def init_expert(hidden_size: int, expert_hidden: int, gated: bool, seed: int,
                device=None, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Weights of one new expert. ``w_down`` is zero, so a new expert is an exact no-op."""
    generator = torch.Generator().manual_seed(seed)
    bound = hidden_size ** -0.5

    def uniform() -> torch.Tensor:
        w = (torch.rand(hidden_size, expert_hidden, generator=generator) * 2 - 1) * bound
        return w.to(device=device, dtype=dtype)

    weights = {"w_up": uniform(),
               "w_down": torch.zeros(expert_hidden, hidden_size, device=device, dtype=dtype)}
    if gated:
        weights["w_gate"] = uniform()
    return weights


def expert_hidden_states(x: torch.Tensor, w_up: torch.Tensor, w_gate: Optional[torch.Tensor],
                         activation: str) -> torch.Tensor:
    """h = act(x W_gate) * (x W_up) for gated experts, act(x W_up) otherwise."""
    act = ACTIVATION_FNS[activation]
    up = x @ w_up
    return act(x @ w_gate) * up if w_gate is not None else act(up)


def expert_ffn_reference(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    w_up: ExpertWeights,
    w_gate: Optional[ExpertWeights],
    w_down: ExpertWeights,
    activation: str,
    out: torch.Tensor,
    scale: float = 1.0,
) -> torch.Tensor:
    """Eager grouped expert FFN: ``out[n] += scale * sum_j weights[n, j] * f_{ids[n, j]}(x[n])``.

    Only rows with at least one expert are written (others stay bit-identical). Returns
    ``out``; the add is out of place when autograd needs the graph, in place otherwise.
    """
    for slot in range(ids.shape[1]):
        slot_ids = ids[:, slot]
        for expert in torch.unique(slot_ids[slot_ids >= 0]).tolist():
            rows = (slot_ids == expert).nonzero(as_tuple=True)[0]
            xs = x[rows].to(w_up[expert].dtype)  # a trainable expert may differ from the stack
            gate = w_gate[expert] if w_gate is not None else None
            h = expert_hidden_states(xs, w_up[expert], gate, activation)
            y = (h @ w_down[expert]).float() * (weights[rows, slot].float() * scale).unsqueeze(1)
            y = y.to(out.dtype)
            out = out.index_add(0, rows, y) if torch.is_grad_enabled() else out.index_add_(0, rows, y)
    return out
