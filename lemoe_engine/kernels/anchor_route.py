"""Anchor routing in one launch: scores -> gate -> running top-k -> softmax.

``anchor_route(queries[S, D], anchors[E, D], thresholds[E], top_k, temperature)`` returns
``ids`` (int32 [S, top_k], -1 = no expert) and ``weights`` (fp32 [S, top_k]) with the
semantics of ``lemoe_engine.routing.route_reference``:

* ``scores = queries @ anchors.T`` in fp32 (fp16/bf16 inputs are multiplied exactly and
  accumulated in fp32; fp32 inputs, compiled, use three TF32 products (tf32x3, fp32-level
  error; ``_common.ROUTE_FP32_DOT``), never plain TF32);
* gate first: an anchor whose score is below ``thresholds[id]``, or not finite (NaN, +-inf),
  is never chosen;
* top-k by score among the rest, descending, ties to the lower expert id;
* ``weights = softmax(top_scores / temperature)`` over the chosen slots only;
* slots beyond the number of experts that passed are id -1 / weight 0.

Kernel layout: the grid is one program per block of ``BLOCK_S`` queries. A program walks
the anchors in blocks of ``BLOCK_E`` (D in blocks of ``BLOCK_D``), computes the score tile
with ``tl.dot`` and merges the tile's best ``top_k`` candidates into a running, sorted
top-k held in registers (k <= 4 pairs of [BLOCK_S] vectors). Because anchor blocks are
visited in increasing id order and candidates are inserted with the (score desc, id asc)
order, ties resolve to the lower id across blocks too. Any S >= 1 and E >= 0 work; E and D
need not be powers of two (masks).

With ``out_ids``/``out_weights`` given the call allocates nothing and never synchronises
with the host, so it can be captured in a CUDA graph.
"""

from __future__ import annotations

import math
import numbers

import torch
import triton
import triton.language as tl

from ._common import (FLOAT_DTYPES, check_devices, check_tensor, device_guard, is_interpreted,
                      route_dot_precision)

MAX_TOP_K = 4


@triton.jit
def _insert_step(v, i, cv, ci):
    """One position of an insertion into a list sorted by (score desc, id asc).

    ``(v, i)`` is the list entry, ``(cv, ci)`` the carried candidate; returns the new entry
    and the new carry. An empty entry is (-inf, -1) and is beaten by any finite candidate."""
    take = (cv > v) | ((cv == v) & (ci < i))
    nv = tl.where(take, cv, v)
    ni = tl.where(take, ci, i)
    cv = tl.where(take, v, cv)
    ci = tl.where(take, i, ci)
    return nv, ni, cv, ci


@triton.jit
def _merge_tile(s, cols, v0, i0, v1, i1, v2, i2, v3, i3, K: tl.constexpr):
    """Merge the best ``K`` candidates of a score tile ``s`` [rows, C] (column ids ``cols``,
    -inf = not a candidate) into the running top-k lists (v*, i*) of each row."""
    NEG_INF: tl.constexpr = float("-inf")
    BIG: tl.constexpr = 2147483647
    for _t in tl.static_range(K):
        m = tl.max(s, axis=1)
        mi = tl.min(tl.where(s == m[:, None], cols[None, :], BIG), axis=1)
        s = tl.where(cols[None, :] == mi[:, None], NEG_INF, s)
        v0, i0, m, mi = _insert_step(v0, i0, m, mi)
        if K > 1:
            v1, i1, m, mi = _insert_step(v1, i1, m, mi)
        if K > 2:
            v2, i2, m, mi = _insert_step(v2, i2, m, mi)
        if K > 3:
            v3, i3, m, mi = _insert_step(v3, i3, m, mi)
    return v0, i0, v1, i1, v2, i2, v3, i3


@triton.jit
def _score_tile(q_ptr, q_rows64, q_mask, a_ptr, cols64, col_mask, D, acc,
                BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """``acc + queries[q_rows] @ anchors[cols].T``, D in steps of ``BLOCK_D`` (masked rows,
    columns and the D tail read 0): the score tile of both routing kernels when D does not fit
    one block."""
    dd = tl.arange(0, BLOCK_D)
    for d0 in range(0, D, BLOCK_D):
        d_idx = d0 + dd
        d_mask = d_idx < D
        q = tl.load(q_ptr + q_rows64[:, None] * D + d_idx[None, :],
                    mask=q_mask[:, None] & d_mask[None, :], other=0.0)
        a = tl.load(a_ptr + cols64[:, None] * D + d_idx[None, :],
                    mask=col_mask[:, None] & d_mask[None, :], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
            a = a.to(tl.float32)
        acc = tl.dot(q, tl.trans(a), acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _store_topk(ids_ptr, w_ptr, rows64, row_mask, temperature, v0, i0, v1, i1, v2, i2, v3, i3,
                K: tl.constexpr):
    """Renormalised softmax over the chosen slots (v0 is the largest) and the store of every
    slot (empty slots: id -1, weight 0)."""
    ok0 = i0 >= 0
    ok1 = i1 >= 0
    ok2 = i2 >= 0
    ok3 = i3 >= 0
    top = tl.where(ok0, v0 / temperature, 0.0)     # no -inf - -inf (NaN) for an empty row
    e0_ = tl.where(ok0, tl.exp(v0 / temperature - top), 0.0)
    total = e0_
    if K > 1:
        e1_ = tl.where(ok1, tl.exp(v1 / temperature - top), 0.0)
        total += e1_
    if K > 2:
        e2_ = tl.where(ok2, tl.exp(v2 / temperature - top), 0.0)
        total += e2_
    if K > 3:
        e3_ = tl.where(ok3, tl.exp(v3 / temperature - top), 0.0)
        total += e3_
    total = tl.where(total > 0.0, total, 1.0)
    out_base = rows64 * K
    tl.store(ids_ptr + out_base, i0, mask=row_mask)
    tl.store(w_ptr + out_base, tl.where(ok0, e0_ / total, 0.0), mask=row_mask)
    if K > 1:
        tl.store(ids_ptr + out_base + 1, i1, mask=row_mask)
        tl.store(w_ptr + out_base + 1, tl.where(ok1, e1_ / total, 0.0), mask=row_mask)
    if K > 2:
        tl.store(ids_ptr + out_base + 2, i2, mask=row_mask)
        tl.store(w_ptr + out_base + 2, tl.where(ok2, e2_ / total, 0.0), mask=row_mask)
    if K > 3:
        tl.store(ids_ptr + out_base + 3, i3, mask=row_mask)
        tl.store(w_ptr + out_base + 3, tl.where(ok3, e3_ / total, 0.0), mask=row_mask)


# S and E change while serving (batch size, a new expert): not value-specialised (Triton
# specialises int arguments on ``== 1`` and ``% 16``), so they never trigger a recompile,
# e.g. inside a CUDA-graph capture. D (the model's width) stays specialised.
@triton.jit(do_not_specialize=["S", "E"])
def _anchor_route_kernel(
    q_ptr, a_ptr, thr_ptr, ids_ptr, w_ptr,
    S, E, D, temperature,
    K: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
    ONE_D_BLOCK: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_S + tl.arange(0, BLOCK_S)
    row_mask = rows < S
    rows64 = rows.to(tl.int64)
    dd = tl.arange(0, BLOCK_D)
    cols0 = tl.arange(0, BLOCK_E)

    NEG_INF: tl.constexpr = float("-inf")

    v0 = tl.full([BLOCK_S], NEG_INF, tl.float32)
    v1 = tl.full([BLOCK_S], NEG_INF, tl.float32)
    v2 = tl.full([BLOCK_S], NEG_INF, tl.float32)
    v3 = tl.full([BLOCK_S], NEG_INF, tl.float32)
    i0 = tl.full([BLOCK_S], -1, tl.int32)
    i1 = tl.full([BLOCK_S], -1, tl.int32)
    i2 = tl.full([BLOCK_S], -1, tl.int32)
    i3 = tl.full([BLOCK_S], -1, tl.int32)

    if ONE_D_BLOCK:
        # D fits one block: load the query tile once for all anchor blocks
        q_one = tl.load(q_ptr + rows64[:, None] * D + dd[None, :],
                        mask=row_mask[:, None] & (dd[None, :] < D), other=0.0)
        if UPCAST:
            q_one = q_one.to(tl.float32)

    for e0 in range(0, E, BLOCK_E):
        cols = e0 + cols0
        col_mask = cols < E
        cols64 = cols.to(tl.int64)
        acc = tl.zeros([BLOCK_S, BLOCK_E], dtype=tl.float32)
        if ONE_D_BLOCK:
            a = tl.load(a_ptr + cols64[:, None] * D + dd[None, :],
                        mask=col_mask[:, None] & (dd[None, :] < D), other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
            acc = tl.dot(q_one, tl.trans(a), acc, input_precision=DOT_PRECISION)
        else:
            acc = _score_tile(q_ptr, rows64, row_mask, a_ptr, cols64, col_mask, D, acc,
                              BLOCK_D, UPCAST, DOT_PRECISION)

        # gate first: an anchor under its threshold, a non-finite score (NaN, +-inf) and a
        # padding column can never be chosen
        thr = tl.load(thr_ptr + cols, mask=col_mask, other=float("inf"))
        ok = col_mask[None, :] & (tl.abs(acc) < float("inf")) & (acc >= thr[None, :])
        s = tl.where(ok, acc, NEG_INF)
        # merge this tile's best K candidates into the running top-k
        v0, i0, v1, i1, v2, i2, v3, i3 = _merge_tile(s, cols, v0, i0, v1, i1, v2, i2, v3, i3, K)

    _store_topk(ids_ptr, w_ptr, rows64, row_mask, temperature, v0, i0, v1, i1, v2, i2, v3, i3, K)


def route_config(S: int, E: int, D: int, dtype: torch.dtype, interpreted: bool) -> dict:
    """Block sizes for one call. The interpreter runs each loop iteration in numpy, so it
    gets large blocks and few iterations; compiled code gets register-sized tiles."""
    np2 = triton.next_power_of_2
    if interpreted:
        return dict(BLOCK_S=min(128, max(16, np2(S))), BLOCK_E=min(512, max(16, np2(E))),
                    BLOCK_D=min(256, max(16, np2(D))), num_warps=4)
    block_s = 16 if S <= 16 else (32 if S <= 32 else 64)
    block_e = min(64, max(16, np2(E)))
    # D step and warps from the compile check (sm_80/86/89/90, k = 1..4, no spills): 16 rows
    # take 64-wide D steps at 4 warps; 32/64 rows take 32-wide (half) or 16-wide (fp32) steps
    # at 8 warps - wider steps or 4 warps spill 4-16 B on some architecture
    if block_s == 16:
        block_d, num_warps = 64, 4
    else:
        block_d, num_warps = (16 if dtype == torch.float32 else 32), 8
        if block_s == 32:
            block_e = min(block_e, 32)    # 32x64 tiles with k = 3/4 spill on sm_80/86/89
    block_d = min(block_d, max(16, np2(D)))
    return dict(BLOCK_S=block_s, BLOCK_E=block_e, BLOCK_D=block_d, num_warps=num_warps)


def route_launches(queries, anchors, thresholds, out_ids, out_weights, top_k, temperature,
                   interpreted):
    """The launches of one ``anchor_route`` call, ``[(kernel, grid, args, kwargs)]``: the wrapper
    runs them; the compile check compiles exactly these for each GPU architecture."""
    S, D = queries.shape
    E = anchors.shape[0]
    cfg = route_config(S, E, D, queries.dtype, interpreted)
    same = queries.dtype == anchors.dtype
    # fp32 and mixed inputs: fp32 dot (route_dot_precision). fp16/bf16: native dot, exact
    # products, fp32 sums.
    # The interpreter cannot multiply bf16 (numpy has no bf16), so it upcasts them.
    upcast = (not same) or queries.dtype == torch.float32 or (interpreted and queries.dtype == torch.bfloat16)
    return [(_anchor_route_kernel, (triton.cdiv(S, cfg["BLOCK_S"]),),
             (queries, anchors, thresholds, out_ids, out_weights, S, E, D, temperature),
             dict(K=top_k, BLOCK_S=cfg["BLOCK_S"], BLOCK_E=cfg["BLOCK_E"], BLOCK_D=cfg["BLOCK_D"],
                  ONE_D_BLOCK=D <= cfg["BLOCK_D"], UPCAST=upcast,
                  DOT_PRECISION=route_dot_precision(upcast, interpreted),
                  num_warps=cfg["num_warps"]))]


def anchor_route(
    queries: torch.Tensor,
    anchors: torch.Tensor,
    thresholds: torch.Tensor,
    top_k: int,
    temperature: float,
    out_ids: torch.Tensor | None = None,
    out_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Route ``queries[S, D]`` to ``top_k`` of ``anchors[E, D]`` (see the module docstring).

    ``thresholds`` is fp32 [E] (-inf = never gated). ``out_ids`` (int32 [S, top_k]) and
    ``out_weights`` (fp32 [S, top_k]) may be given to write into preallocated buffers; every
    element is written. Returns ``(ids, weights)``.
    """
    interpreted = is_interpreted(_anchor_route_kernel)
    check_tensor("queries", queries, 2, FLOAT_DTYPES)
    check_tensor("anchors", anchors, 2, FLOAT_DTYPES)
    check_tensor("thresholds", thresholds, 1, (torch.float32,))
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise TypeError(f"top_k must be an int, got {type(top_k).__name__}")
    if not 1 <= top_k <= MAX_TOP_K:
        raise ValueError(f"top_k must be in 1..{MAX_TOP_K}, got {top_k}")
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature must be a float, got {type(temperature).__name__}")
    temperature = float(temperature)
    if not (math.isfinite(temperature) and temperature > 0.0):
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    S, D = queries.shape
    E = anchors.shape[0]
    if anchors.shape[1] != D:
        raise ValueError(f"anchors must be [E, {D}] to match queries [S, {D}], got {tuple(anchors.shape)}")
    if thresholds.shape[0] != E:
        raise ValueError(f"thresholds must have one entry per anchor ({E}), got {thresholds.shape[0]}")
    if out_ids is not None:
        check_tensor("out_ids", out_ids, 2, (torch.int32,))
        if tuple(out_ids.shape) != (S, top_k):
            raise ValueError(f"out_ids must be [{S}, {top_k}], got {tuple(out_ids.shape)}")
    if out_weights is not None:
        check_tensor("out_weights", out_weights, 2, (torch.float32,))
        if tuple(out_weights.shape) != (S, top_k):
            raise ValueError(f"out_weights must be [{S}, {top_k}], got {tuple(out_weights.shape)}")
    device = check_devices({"queries": queries, "anchors": anchors, "thresholds": thresholds,
                            "out_ids": out_ids, "out_weights": out_weights}, interpreted)

    if out_ids is None:
        out_ids = torch.empty((S, top_k), dtype=torch.int32, device=device)
    if out_weights is None:
        out_weights = torch.empty((S, top_k), dtype=torch.float32, device=device)
    if S == 0:
        return out_ids, out_weights

    with device_guard(device):
        for kernel, grid, args, kwargs in route_launches(queries, anchors, thresholds, out_ids,
                                                         out_weights, top_k, temperature, interpreted):
            kernel[grid](*args, **kwargs)
    return out_ids, out_weights
