"""KV-anchor routing, one home for both backends: "prompt vectors -> expert ids, weights".

The query of an input is its pooled vector (token embeddings or the target MLP's input),
centred, passed through the small projection ``W_up SiLU(W_down .)`` and L2-normalised.
Anchors are L2-normalised too, so a score is a cosine similarity in [-1, 1] and a gate
threshold means the same thing for every expert.

Layout (as Liger-Kernel keeps an op's reference, launch function and module apart):

* ``QueryEncoder``, ``masked_mean``: the queries (eager, both backends);
* ``anchor_scores`` + ``route_scores`` = ``route_eager``: the reference, and the CPU path;
* ``route_kernels``: the same contract through the Triton kernels of ``lemoe_engine.kernels``
  (``anchor_route``: one anchor per expert and one query per row, one launch;
  ``pooled_route``: max pooling over prompt tokens and/or several anchors per expert, two
  launches);
* ``route``: picks one of the two; ``LEMoELayer`` calls it.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import LEMoEConfig


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float(), dim=-1, eps=1e-6)


def normalize_anchors(anchors: torch.Tensor) -> torch.Tensor:
    """Anchors as the layer stores them: unit length, an all-zero row (a placeholder) kept zero."""
    anchors = anchors.float()
    nonzero = anchors.abs().sum(dim=-1, keepdim=True) > 0
    return torch.where(nonzero, l2_normalize(anchors), anchors)


def acts_from(starts: torch.Tensor, length: int) -> torch.Tensor:
    """bool [B, T, k]: whether route slot ``k`` of sequence ``b`` acts at position ``t``
    (``t >= starts[b, k]``; ``expert_span='key'``)."""
    return torch.arange(length, device=starts.device)[None, :, None] >= starts[:, None, :]


def window_mean(vectors: torch.Tensor, mask: Optional[torch.Tensor], window: int) -> torch.Tensor:
    """[B, T, d]: at each position, the mean of the vectors of it and the ``window - 1`` positions
    before it, counting only positions where ``mask`` [B, T] is non-zero (padding, a target
    after its prompt); a masked position keeps its own vector. ``window=1``: ``vectors``."""
    if window <= 1:
        return vectors
    weights = (torch.ones(vectors.shape[:2], device=vectors.device) if mask is None
               else mask.to(device=vectors.device, dtype=torch.float32))
    # a running sum taken window by window (a cumulative sum over a long prompt loses fp32 bits)
    padded = F.pad((vectors.float() * weights.unsqueeze(-1)).transpose(1, 2), (window - 1, 0))
    counts = F.pad(weights.unsqueeze(1), (window - 1, 0))
    summed = padded.unfold(2, window, 1).sum(-1).transpose(1, 2)                     # [B, T, d]
    count = counts.unfold(2, window, 1).sum(-1).transpose(1, 2)                      # [B, T, 1]
    mean = (summed / count.clamp_min(1.0)).to(vectors.dtype)
    return torch.where(weights.unsqueeze(-1) > 0, mean, vectors)


def token_queries(encoder: "QueryEncoder", vectors: torch.Tensor, mask: Optional[torch.Tensor],
                  windows: int) -> torch.Tensor:
    """Unit queries of every token pooled over 1..``windows`` tokens, [W, B, T, key]: ``[w - 1]``
    is made of ``window_mean(vectors, mask, w)``, the token and the ``w - 1`` prompt tokens
    before it. An anchor of window w (``LEMoELayer.anchor_window``) is scored against ``[w - 1]``
    only: a key made of a subject's last tokens meets the same tokens, not the last one alone."""
    return torch.stack([encoder(window_mean(vectors, mask, w)) for w in range(1, windows + 1)])


def window_order(anchor_window: torch.Tensor) -> torch.Tensor:
    """The anchors grouped by key window, int32 [M] (a stable argsort): the order in which the
    ``pooled_route`` kernel visits them, so that an anchor block holds one or two windows."""
    return torch.argsort(anchor_window, stable=True).to(torch.int32)


def window_scores(queries: torch.Tensor, anchors: torch.Tensor,
                  anchor_window: Optional[torch.Tensor]) -> torch.Tensor:
    """Scores [B, T, M] of queries [W, B, T, key] (``token_queries``) against anchors [M, key]
    (or each sequence's own, [B, M, key]), each anchor against the queries of its own window
    (``anchor_window`` [M] or [B, M], values 1..W; None: all 1)."""
    scores = queries[0] @ anchors.transpose(-1, -2)
    if anchor_window is None:
        return scores
    window = anchor_window.to(scores.device).unsqueeze(-2)                 # [1, M] or [B, 1, M]
    for w in range(2, queries.shape[0] + 1):
        scores = torch.where(window == w, queries[w - 1] @ anchors.transpose(-1, -2), scores)
    return scores


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


def route_scores(
    scores: torch.Tensor,
    thresholds: torch.Tensor,
    anchor_expert: torch.Tensor,
    num_experts: int,
    top_k: int,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Route from anchor scores [S, M] (M anchors, each owned by expert ``anchor_expert[m]``).

    1. Gate: an anchor whose score is under its threshold, or not finite, cannot be chosen.
    2. An expert's score is the best score among its remaining anchors.
    3. The ``top_k`` experts by score (ties to the lower expert id) get
       ``softmax(score / temperature)`` over the chosen ones; empty slots are id -1, weight 0.
    Returns ``ids`` (int32 [S, top_k]) and ``weights`` (fp32 [S, top_k]).
    """
    num_queries = scores.shape[0]
    ids = torch.full((num_queries, top_k), -1, dtype=torch.int32, device=scores.device)
    weights = torch.zeros((num_queries, top_k), dtype=torch.float32, device=scores.device)
    if num_experts == 0 or num_queries == 0:
        return ids, weights
    scores = scores.float()
    passed = torch.isfinite(scores) & (scores >= thresholds.float())
    scores = torch.where(passed, scores, torch.full_like(scores, float("-inf")))
    per_expert = torch.full((num_queries, num_experts), float("-inf"), device=scores.device)
    index = anchor_expert.long().unsqueeze(0).expand(num_queries, -1)
    per_expert = per_expert.scatter_reduce(1, index, scores, reduce="amax", include_self=True)
    k = min(top_k, num_experts)
    # a stable descending sort keeps the lower expert id first among equal scores
    top_scores, top_ids = torch.sort(per_expert, dim=1, descending=True, stable=True)
    top_scores, top_ids = top_scores[:, :k], top_ids[:, :k]
    keep = torch.isfinite(top_scores)
    logits = torch.where(keep, top_scores / temperature, torch.full_like(top_scores, float("-inf")))
    probs = torch.nan_to_num(torch.softmax(logits, dim=1), nan=0.0)  # all -inf rows: no expert
    ids[:, :k] = torch.where(keep, top_ids.to(torch.int32), torch.full_like(top_ids, -1, dtype=torch.int32))
    weights[:, :k] = torch.where(keep, probs, torch.zeros_like(probs))
    return ids, weights


def route_reference(
    queries: torch.Tensor,
    anchors: torch.Tensor,
    thresholds: torch.Tensor,
    top_k: int,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager routing with one anchor per expert: the oracle of the ``anchor_route`` kernel.

    ``scores = queries @ anchors.T`` (both unit-norm: cosine), then ``route_scores``: anchors
    under their threshold are dropped first, then top-k by score with ties to the lower id,
    softmax over the chosen scores / temperature, id -1 / weight 0 for empty slots.
    """
    scores = queries.float() @ anchors.float().T
    experts = torch.arange(anchors.shape[0], device=anchors.device)
    return route_scores(scores, thresholds, experts, anchors.shape[0], top_k, temperature)


def anchor_scores(config: LEMoEConfig, encoder: QueryEncoder, anchors: torch.Tensor,
                  vectors: torch.Tensor, mask: Optional[torch.Tensor],
                  anchor_window: Optional[torch.Tensor] = None, windows: int = 1) -> torch.Tensor:
    """Eager cosine score of every anchor: [B*T, M] for token routing, [B, M] for sequence
    routing (mean pooling: of the pooled query; max pooling: of the best-matching prompt token,
    each anchor against queries of its own window, ``window_scores``; ``windows`` >= the
    largest ``anchor_window``). ``vectors`` [B, T, d] are the per-token query sources, ``mask``
    [B, T] the prompt (or None)."""
    if config.routing == "token":
        return encoder(vectors.reshape(-1, vectors.shape[-1])) @ anchors.T
    if config.query_pooling == "mean":
        return encoder(masked_mean(vectors, mask)) @ anchors.T
    scores = window_scores(token_queries(encoder, vectors, mask, windows), anchors, anchor_window)  # [B, T, M]
    if mask is not None:
        scores = scores.masked_fill(mask.unsqueeze(-1) == 0, float("-inf"))
    return scores.max(dim=1).values


def route_eager(config: LEMoEConfig, encoder: QueryEncoder, anchors: torch.Tensor,
                anchor_expert: torch.Tensor, thresholds: torch.Tensor, num_experts: int,
                vectors: torch.Tensor, mask: Optional[torch.Tensor],
                anchor_window: Optional[torch.Tensor] = None, windows: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: ``route_scores(anchor_scores(...))``. ``thresholds`` are the gate's
    (-inf everywhere when the gate is off)."""
    return route_scores(anchor_scores(config, encoder, anchors, vectors, mask, anchor_window, windows), thresholds,
                        anchor_expert, num_experts, config.top_k, config.temperature)


def best_match_position(queries: torch.Tensor, anchors: torch.Tensor,
                        token_mask: Optional[torch.Tensor] = None,
                        anchor_mask: Optional[torch.Tensor] = None,
                        anchor_window: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Index of the token whose query best matches any of the anchors, [B] (int64): queries
    [W, B, T, key] (``token_queries``; [B, T, key] = one window), anchors [B, A, key]
    (unit-norm), each scored against the queries of its ``anchor_window`` [B, A] (None: 1),
    ``token_mask`` [B, T] (the prompt), ``anchor_mask`` [B, A] (which anchors count). Ties go
    to the earliest token; a row with no token or no anchor gets 0. The one rule for
    ``expert_span='key'``: the layer applies it to a served route's experts, the trainer to
    each training row."""
    if queries.dim() == 3:
        queries = queries.unsqueeze(0)
    scores = window_scores(queries.float(), anchors.float(), anchor_window)   # [B, T, A]
    if anchor_mask is not None:
        scores = scores.masked_fill(~anchor_mask.bool()[:, None, :], float("-inf"))
    best = scores.amax(dim=2) if scores.shape[2] else scores.new_full(scores.shape[:2], float("-inf"))
    if token_mask is not None:
        best = best.masked_fill(token_mask.to(best.device) == 0, float("-inf"))
    best = torch.nan_to_num(best, nan=float("-inf"))
    return best.argmax(dim=1)


def expert_key_positions(encoder: QueryEncoder, anchors: torch.Tensor, expert_start: torch.Tensor,
                         max_anchors: int, vectors: torch.Tensor, mask: Optional[torch.Tensor],
                         ids: torch.Tensor, anchor_window: Optional[torch.Tensor] = None,
                         windows: int = 1) -> torch.Tensor:
    """Per sequence route slot, the prompt position where its expert's key matched: int64
    [B, k] (``best_match_position`` of the prompt's token queries against the expert's own
    anchors; empty slots: 0). ``expert_start`` as ``expert_starts``; ``max_anchors`` the most
    anchors an expert owns; ``anchor_window`` / ``windows`` as ``anchor_scores``."""
    batch, k = ids.shape
    queries = token_queries(encoder, vectors, mask, windows)                # [W, B, T, key]
    expert = ids.long().clamp_min(0)
    first = expert_start.long()[expert]                                     # [B, k]
    count = expert_start.long()[expert + 1] - first
    offset = torch.arange(max(max_anchors, 1), device=ids.device)
    rows = (first[..., None] + offset).clamp_max(max(anchors.shape[0] - 1, 0))
    owned = (offset < count[..., None]) & (ids[..., None] >= 0)             # [B, k, A]
    chosen = anchors[rows.reshape(-1)].reshape(batch * k, offset.numel(), anchors.shape[1])
    chosen_window = None if anchor_window is None else anchor_window[rows.reshape(-1)].reshape(batch * k, -1)
    tokens = None if mask is None else mask.repeat_interleave(k, dim=0)
    position = best_match_position(queries.repeat_interleave(k, dim=1), chosen, tokens,
                                   owned.reshape(batch * k, -1), chosen_window)
    return position.reshape(batch, k)


def expert_starts(anchor_expert: torch.Tensor, num_experts: int) -> torch.Tensor:
    """int32 [E + 1]: expert e owns anchor rows [start[e], start[e + 1]) (anchors are stored in
    expert order). Device ops only, no host synchronisation."""
    bounds = torch.arange(num_experts + 1, device=anchor_expert.device, dtype=anchor_expert.dtype)
    return torch.searchsorted(anchor_expert.contiguous(), bounds, out_int32=True)


def route_kernels(config: LEMoEConfig, encoder: QueryEncoder, anchors: torch.Tensor,
                  anchor_expert: torch.Tensor, thresholds: torch.Tensor, num_experts: int,
                  vectors: torch.Tensor, mask: Optional[torch.Tensor],
                  expert_start: Optional[torch.Tensor] = None, anchor_window: Optional[torch.Tensor] = None,
                  windows: int = 1, anchor_order: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``route_eager``'s contract through the Triton kernels (queries are encoded eagerly).

    One anchor per expert and one query per row (token routing, mean pooling): the fused
    ``anchor_route`` (one launch). Otherwise (max pooling over the prompt's tokens - the
    default - or several anchors per expert): ``pooled_route`` (two launches)."""
    from .kernels import anchor_route, pooled_route
    thresholds = thresholds.float().contiguous()
    anchors = anchors.contiguous()
    if config.routing == "token" or config.query_pooling == "mean":
        rows = (vectors.reshape(-1, vectors.shape[-1]) if config.routing == "token"
                else masked_mean(vectors, mask))
        queries = encoder(rows).contiguous()
        # every expert has >= 1 anchor, so equal counts mean anchor i is expert i's only one
        if anchors.shape[0] == num_experts:
            return anchor_route(queries, anchors, thresholds, config.top_k, config.temperature)
        queries, mask = queries.unsqueeze(1), None
    elif windows > 1:                                                     # [W, B, T, key_dim]
        queries = token_queries(encoder, vectors, mask, windows).contiguous()
    else:
        queries = encoder(vectors).contiguous()                           # [B, T, key_dim]
    if expert_start is None:
        expert_start = expert_starts(anchor_expert, num_experts)
    window = anchor_window.to(torch.int32).contiguous() if queries.dim() == 4 else None
    return pooled_route(queries, mask, anchors, expert_start, thresholds, config.top_k, config.temperature,
                        anchor_window=window, anchor_order=anchor_order if window is not None else None)


def route(config: LEMoEConfig, encoder: QueryEncoder, anchors: torch.Tensor, anchor_expert: torch.Tensor,
          thresholds: torch.Tensor, num_experts: int, vectors: torch.Tensor, mask: Optional[torch.Tensor],
          use_kernels: bool = False, expert_start: Optional[torch.Tensor] = None,
          anchor_window: Optional[torch.Tensor] = None, windows: int = 1,
          anchor_order: Optional[torch.Tensor] = None):
    """Expert ids (int32) and weights (fp32), [rows, top_k]: rows = B*T for token routing, B
    for sequence routing. ``use_kernels``: the Triton path (CUDA, or the CPU interpreter).
    ``anchor_window`` [M] (1..``windows``): how many tokens each anchor's key pools
    (``token_queries``; max pooling only, None = 1); ``anchor_order``: the kernels' visiting
    order of the anchors (``window_order``; made per call when None)."""
    if use_kernels:
        return route_kernels(config, encoder, anchors, anchor_expert, thresholds, num_experts,
                             vectors, mask, expert_start, anchor_window, windows, anchor_order)
    return route_eager(config, encoder, anchors, anchor_expert, thresholds, num_experts, vectors, mask,
                       anchor_window, windows)
