"""KV-anchor routing: the instance query and the eager routing reference.

The query of an input is its pooled vector (token embeddings or the target MLP's input),
centred, passed through the small projection ``W_up SiLU(W_down .)`` and L2-normalised.
Anchors are L2-normalised too, so a score is a cosine similarity in [-1, 1] and a gate
threshold means the same thing for every expert.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import LEMoEConfig


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float(), dim=-1, eps=1e-6)


def masked_mean(vectors: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean of ``vectors[B, T, d]`` over positions where ``mask[B, T]`` is non-zero (fp32)."""
    vectors = vectors.float()
    if mask is None:
        return vectors.mean(dim=1)
    weights = mask.to(device=vectors.device, dtype=torch.float32).unsqueeze(-1)
    return (vectors * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


class QueryEncoder(nn.Module):
    """Maps pooled vectors [..., d] to unit-norm queries [..., key_dim].

    Its weights are fixed (buffers): a projection shared by all experts that kept training
    would move the routing of experts that are already frozen, which is exactly what the
    paper's routing consistency forbids. ``center`` is fitted once, before the first
    expert exists (see ``LifelongEditor``), and removes the direction every sentence shares.
    """

    def __init__(self, hidden_size: int, config: LEMoEConfig, device=None) -> None:
        super().__init__()
        self.register_buffer("center", torch.zeros(hidden_size, device=device))
        self.has_projection = config.query_hidden > 0
        if self.has_projection:
            generator = torch.Generator().manual_seed(config.seed)
            down = torch.randn(hidden_size, config.query_hidden, generator=generator)
            up = torch.randn(config.query_hidden, config.key_dim, generator=generator)
            self.register_buffer("down", (down / hidden_size ** 0.5).to(device))
            self.register_buffer("up", (up / config.query_hidden ** 0.5).to(device))

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        v = pooled.float() - self.center
        if self.has_projection:
            v = F.silu(v @ self.down) @ self.up
        return l2_normalize(v)


def route_reference(
    queries: torch.Tensor,
    anchors: torch.Tensor,
    thresholds: torch.Tensor,
    top_k: int,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager routing: the oracle the ``anchor_route`` kernel is checked against.

    Returns ``ids`` (int32 [S, top_k], -1 = no expert) and ``weights`` (fp32 [S, top_k]):
    top-k by cosine score (ties to the lower id), softmax over the chosen scores / temperature,
    then each slot whose score is under its expert's threshold is dropped (id -1, weight 0).
    Non-finite scores never route.
    """
    num_queries, num_experts = queries.shape[0], anchors.shape[0]
    ids = torch.full((num_queries, top_k), -1, dtype=torch.int32, device=queries.device)
    weights = torch.zeros((num_queries, top_k), dtype=torch.float32, device=queries.device)
    if num_experts == 0 or num_queries == 0:
        return ids, weights
    scores = queries.float() @ anchors.float().T
    scores = torch.where(torch.isfinite(scores), scores, torch.full_like(scores, float("-inf")))
    k = min(top_k, num_experts)
    # a stable descending sort keeps the lower expert id first among equal scores
    top_scores, top_ids = torch.sort(scores, dim=1, descending=True, stable=True)
    top_scores, top_ids = top_scores[:, :k], top_ids[:, :k]
    finite = torch.isfinite(top_scores)
    logits = torch.where(finite, top_scores / temperature, torch.full_like(top_scores, float("-inf")))
    probs = torch.softmax(logits, dim=1)
    keep = finite & (top_scores >= thresholds.float()[top_ids])
    ids[:, :k] = torch.where(keep, top_ids.to(torch.int32), torch.full_like(top_ids, -1, dtype=torch.int32))
    weights[:, :k] = torch.where(keep, probs, torch.zeros_like(probs))
    return ids, weights
