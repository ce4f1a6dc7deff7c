"""Routing of the default configuration in two launches: max pooling over prompt tokens,
several anchors per expert, gate, top-k and softmax.

``pooled_route(queries[B, T, D], mask[B, T] | None, anchors[M, D], expert_start[E + 1],
thresholds[M], top_k, temperature)`` returns ``ids`` (int32 [B, top_k], -1 = no expert) and
``weights`` (fp32 [B, top_k]) with the semantics of ``lemoe_engine.routing.route_eager`` for
max pooling (and, with T = 1, for mean pooling or token routing with several anchors):

1. ``score[b, m] = max over tokens t of row b with mask[b, t] != 0 of queries[b, t] . anchors[m]``
   (fp32-level products and sums: ``_common.route_dot_precision``; a NaN token score or no
   token at all leaves no score). With ``anchor_window`` (int32 [M], values 1..W) the queries
   are ``[W, B, T, D]`` (``routing.token_queries``: window w in ``queries[w - 1]``) and anchor m
   is scored against ``queries[anchor_window[m] - 1]`` only. The pool launch then visits the
   anchors in ``anchor_order`` (a permutation grouping equal windows, e.g. a stable argsort of
   the windows; made per call when not given), so that an anchor block holds one window, or
   two at a boundary, and skips the windows it does not hold: W windows cost about one pass,
   not W;
2. gate: an anchor whose pooled score is not finite or is below ``thresholds[m]`` drops out;
3. an expert's score is the best of its remaining anchors; anchors are stored in expert order,
   expert ``e`` owning rows ``[expert_start[e], expert_start[e + 1])``;
4. top-k experts by score (ties to the lower id), softmax of score / temperature over them;
   empty slots id -1, weight 0.

Launch 1 (``_pool_kernel``, grid: sequences x anchor blocks x token splits) computes the
[tokens x anchors] score tiles with ``tl.dot`` and pools them over its split of the sequence's
tokens, writing one fp32 partial score per (sequence, split, anchor) to a scratch [B, S, M] (NaN
where the split met a NaN score). Splitting the tokens keeps the GPU busy when B x anchor blocks
is small (one long prompt, few experts): without it one program walked all T tokens alone, and a
2048-token prompt took 38 ms with key windows on an H200. Launch 2 (``_select_kernel``, grid:
blocks of sequences) walks the experts in blocks, reduces each anchor's splits, applies the gate,
takes each expert's max over its anchors (a gather loop of length max anchors per expert in the
block) and merges the block into the running top-k of ``anchor_route``; then softmax and store.
No host synchronisation: with ``out_ids``/``out_weights``/``scratch`` given the call allocates
nothing (``pooled_route_scratch_shape`` gives the scratch's shape).
"""

from __future__ import annotations

import math
import numbers

import torch
import triton
import triton.language as tl

from ._common import (FLOAT_DTYPES, check_devices, check_tensor, device_guard, is_interpreted,
                      route_dot_precision)
from .anchor_route import MAX_TOP_K, _merge_tile, _score_tile, _store_topk

MASK_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int32, torch.int64, torch.float32,
               torch.float16, torch.bfloat16)


# B (sequences), T (tokens), M (anchors) and E (experts) change while serving: never
# value-specialised (no recompile for a new expert or prompt length); D stays specialised.
@triton.jit(do_not_specialize=["B", "T", "M", "mask_stride", "W", "T_CHUNK"])
def _pool_kernel(
    q_ptr, mask_ptr, a_ptr, pooled_ptr, win_ptr, order_ptr,
    B, T, M, D, mask_stride, W, T_CHUNK,
    HAS_MASK: tl.constexpr, HAS_WINDOWS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr, ONE_D_BLOCK: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)      # sequences on axis 0: more than 65535 allowed
    pid_m = tl.program_id(1)
    split = tl.program_id(2)               # tokens [split * T_CHUNK, (split + 1) * T_CHUNK)
    n_splits = tl.num_programs(2)
    t_begin = split * T_CHUNK
    t_end = tl.minimum(T, t_begin + T_CHUNK)
    cols = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    col_mask = cols < M
    if HAS_WINDOWS:  # this block's anchors in window order: one window per block, or two
        cols = tl.load(order_ptr + cols, mask=col_mask, other=0)
        win = tl.load(win_ptr + cols, mask=col_mask, other=0)
    cols64 = cols.to(tl.int64)
    dd = tl.arange(0, BLOCK_D)
    tt = tl.arange(0, BLOCK_T)
    NEG_INF: tl.constexpr = float("-inf")

    best = tl.full([BLOCK_M], NEG_INF, tl.float32)
    nan_seen = tl.zeros([BLOCK_M], dtype=tl.int32)
    if ONE_D_BLOCK:
        a_one = tl.load(a_ptr + cols64[:, None] * D + dd[None, :],
                        mask=col_mask[:, None] & (dd[None, :] < D), other=0.0)
        if UPCAST:
            a_one = a_one.to(tl.float32)
    w_lo = 0
    w_hi = W
    if HAS_WINDOWS:  # only the windows this block holds (anchors come window-sorted: one or two)
        w_lo = tl.min(tl.where(col_mask, win, W + 1), axis=0) - 1
        w_hi = tl.max(tl.where(col_mask, win, 0), axis=0)
    for t0 in range(t_begin, t_end, BLOCK_T):
        toks = t0 + tt
        tok_ok = toks < t_end
        if HAS_MASK:
            keep = tl.load(mask_ptr + b * mask_stride + toks, mask=tok_ok, other=0)
            tok_ok = tok_ok & (keep != 0)
        for w in range(w_lo, w_hi):  # one pass without windows; else each window's queries in turn
            q_rows = ((w * B + b) * T + toks).to(tl.int64)
            acc = tl.zeros([BLOCK_T, BLOCK_M], dtype=tl.float32)
            if ONE_D_BLOCK:
                q = tl.load(q_ptr + q_rows[:, None] * D + dd[None, :],
                            mask=tok_ok[:, None] & (dd[None, :] < D), other=0.0)
                if UPCAST:
                    q = q.to(tl.float32)
                acc = tl.dot(q, tl.trans(a_one), acc, input_precision=DOT_PRECISION)
            else:
                acc = _score_tile(q_ptr, q_rows, tok_ok, a_ptr, cols64, col_mask, D, acc,
                                  BLOCK_D, UPCAST, DOT_PRECISION)
            valid = tok_ok[:, None] & col_mask[None, :]
            if HAS_WINDOWS:  # an anchor meets only the queries of its own window
                valid = valid & (win == w + 1)[None, :]
            is_nan = acc != acc
            nan_seen = nan_seen | tl.max(tl.where(valid & is_nan, 1, 0), axis=0)
            best = tl.maximum(best, tl.max(tl.where(valid & (acc == acc), acc, NEG_INF), axis=0))
    # this split's best score of each anchor, NaN if it met a NaN (the select launch gates)
    tl.store(pooled_ptr + (b * n_splits + split) * M + cols64, tl.where(nan_seen == 0, best, float("nan")),
             mask=col_mask)


@triton.jit(do_not_specialize=["B", "M", "E", "S"])
def _select_kernel(
    pooled_ptr, start_ptr, thr_ptr, ids_ptr, w_ptr,
    B, M, E, S, temperature,
    K: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_E: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < B
    rows64 = rows.to(tl.int64)
    NEG_INF: tl.constexpr = float("-inf")
    v0 = tl.full([BLOCK_B], NEG_INF, tl.float32)
    v1 = tl.full([BLOCK_B], NEG_INF, tl.float32)
    v2 = tl.full([BLOCK_B], NEG_INF, tl.float32)
    v3 = tl.full([BLOCK_B], NEG_INF, tl.float32)
    i0 = tl.full([BLOCK_B], -1, tl.int32)
    i1 = tl.full([BLOCK_B], -1, tl.int32)
    i2 = tl.full([BLOCK_B], -1, tl.int32)
    i3 = tl.full([BLOCK_B], -1, tl.int32)
    for e0 in range(0, E, BLOCK_E):
        ex = e0 + tl.arange(0, BLOCK_E)
        ex_ok = ex < E
        first = tl.load(start_ptr + ex, mask=ex_ok, other=0)
        count = tl.load(start_ptr + ex + 1, mask=ex_ok, other=0) - first
        count = tl.where(ex_ok, count, 0)
        s = tl.full([BLOCK_B, BLOCK_E], NEG_INF, tl.float32)
        for j in range(0, tl.max(count, axis=0)):
            take = row_mask[:, None] & (j < count)[None, :]
            anchor = (first + j).to(tl.int64)
            best = tl.full([BLOCK_B, BLOCK_E], NEG_INF, tl.float32)
            nan_seen = tl.zeros([BLOCK_B, BLOCK_E], dtype=tl.int1)
            for split in range(0, S):  # the pool launch's token splits of this anchor
                v = tl.load(pooled_ptr + (rows64[:, None] * S + split) * M + anchor[None, :],
                            mask=take, other=NEG_INF)
                nan_seen = nan_seen | (v != v)
                best = tl.maximum(best, tl.where(v == v, v, NEG_INF))
            # the gate: a NaN among the prompt's scores, a non-finite best or one under its
            # threshold leaves the anchor out
            thr = tl.load(thr_ptr + anchor, mask=(j < count), other=float("inf"))
            ok = take & ~nan_seen & (tl.abs(best) < float("inf")) & (best >= thr[None, :])
            s = tl.maximum(s, tl.where(ok, best, NEG_INF))
        v0, i0, v1, i1, v2, i2, v3, i3 = _merge_tile(s, ex, v0, i0, v1, i1, v2, i2, v3, i3, K)
    _store_topk(ids_ptr, w_ptr, rows64, row_mask, temperature, v0, i0, v1, i1, v2, i2, v3, i3, K)


def pooled_route_config(B: int, T: int, M: int, E: int, D: int, dtype: torch.dtype,
                        interpreted: bool, windowed: bool = False, masked: bool = True) -> dict:
    """Block sizes: the interpreter gets large blocks (few numpy iterations), compiled code
    register-sized tiles (checked for spills on sm_80/86/89/90 by the compile check)."""
    np2 = triton.next_power_of_2
    if interpreted:
        return dict(BLOCK_T=min(128, max(16, np2(T))), BLOCK_M=min(512, max(16, np2(M))),
                    BLOCK_D=min(256, max(16, np2(D))), warps_pool=4,
                    BLOCK_B=min(64, max(16, np2(B))), BLOCK_E=min(512, max(16, np2(E))))
    # tiles from the compile check (sm_80/86/89/90, masked or not, no spills): fp32 dots run on
    # FMA units with operands in registers, so fp32 takes 16 or 32 tokens x 64 anchors with
    # 16-wide D steps at 4 warps (8 warps, or 32-wide steps, spill 4-16 B somewhere); half
    # dtypes take 32-wide D steps
    block_m = 64
    if dtype == torch.float32:
        block_t, block_d = (16 if T <= 16 else 32), 16
        warps, block_m = 4, 64
        if windowed or not masked:  # the window loop keeps more live (16 x 64 spills 8 B on sm_86/89);
            block_t, block_m = 16, 32  # so does the unmasked loop since token splits (8-20 B on sm_80-90)
        if not masked and M <= 16:     # ... and its 16 x 16 tile at 16-wide D steps (8 B on sm_80-89)
            block_d = 32

    else:
        block_t = 16 if T <= 16 else (32 if T <= 32 else 64)
        block_d, warps = 32, (4 if block_t == 16 else 8)
    return dict(BLOCK_T=block_t, BLOCK_M=min(block_m, max(16, np2(M))), BLOCK_D=min(block_d, max(16, np2(D))),
                warps_pool=warps,
                # 32 rows with k = 2..4 running lists spill at 4 warps: 16 rows per program
                BLOCK_B=16, BLOCK_E=min(64, max(16, np2(E))))


# token splits of the pool launch: enough programs for a few per SM on a 100-132-SM GPU, at most
# MAX_SPLITS (the select launch reads every split of every anchor)
SPLIT_TARGET_PROGRAMS = 1024
MAX_SPLITS = 256
INTERPRETER_MAX_SPLITS = 4  # the interpreter splits too (long prompts in the CPU tests), a little


def _token_splits(B: int, T: int, M: int, cfg: dict, interpreted: bool) -> tuple[int, int]:
    """(S, tokens per split): S splits of whole BLOCK_T tiles, none empty."""
    tiles = triton.cdiv(max(T, 1), cfg["BLOCK_T"])
    programs = max(1, B * triton.cdiv(M, cfg["BLOCK_M"]))  # B or M may be 0 (nothing is launched then)
    wanted = INTERPRETER_MAX_SPLITS if interpreted else min(MAX_SPLITS, triton.cdiv(SPLIT_TARGET_PROGRAMS, programs))
    chunk = triton.cdiv(tiles, max(1, min(tiles, wanted))) * cfg["BLOCK_T"]
    return triton.cdiv(max(T, 1), chunk), chunk


def _plan(queries, mask, anchors, expert_start, anchor_window, interpreted):
    B, T, D = queries.shape[-3:]
    M = anchors.shape[0]
    E = expert_start.shape[0] - 1
    cfg = pooled_route_config(B, T, M, E, D, queries.dtype, interpreted, windowed=anchor_window is not None,
                              masked=mask is not None)
    return cfg, _token_splits(B, T, M, cfg, interpreted)


def pooled_route_scratch_shape(queries: torch.Tensor, mask: torch.Tensor | None, anchors: torch.Tensor,
                               expert_start: torch.Tensor,
                               anchor_window: torch.Tensor | None = None) -> tuple[int, int, int]:
    """The shape [B, S, M] of ``pooled_route``'s fp32 scratch for these arguments (S: token splits)."""
    interpreted = is_interpreted(_pool_kernel)
    _, (splits, _) = _plan(queries, mask, anchors, expert_start, anchor_window, interpreted)
    return queries.shape[-3], splits, anchors.shape[0]


def pooled_route_launches(queries, mask, anchors, expert_start, thresholds, out_ids, out_weights,
                          scratch, top_k, temperature, interpreted, anchor_window=None, anchor_order=None):
    """The two launches of one call, ``[(kernel, grid, args, kwargs)]`` (run by the wrapper,
    compiled per architecture by the compile check); ``scratch`` is fp32
    ``pooled_route_scratch_shape(...)``; ``anchor_order`` goes with ``anchor_window``."""
    B, T, D = queries.shape[-3:]
    W = queries.shape[0] if anchor_window is not None else 1
    M = anchors.shape[0]
    E = expert_start.shape[0] - 1
    cfg, (splits, chunk) = _plan(queries, mask, anchors, expert_start, anchor_window, interpreted)
    if anchor_window is not None and anchor_order is None:
        from ..routing import window_order
        anchor_order = window_order(anchor_window)
    upcast = (queries.dtype != anchors.dtype or queries.dtype == torch.float32
              or (interpreted and queries.dtype == torch.bfloat16))
    has_mask = mask is not None
    return [
        (_pool_kernel, (B, triton.cdiv(M, cfg["BLOCK_M"]), splits),
         (queries, mask if has_mask else queries, anchors, scratch,
          anchor_window if anchor_window is not None else thresholds,
          anchor_order if anchor_window is not None else thresholds,
          B, T, M, D, mask.stride(0) if has_mask else 0, W, chunk),
         dict(HAS_MASK=has_mask, HAS_WINDOWS=anchor_window is not None, BLOCK_T=cfg["BLOCK_T"], BLOCK_M=cfg["BLOCK_M"], BLOCK_D=cfg["BLOCK_D"],
              ONE_D_BLOCK=D <= cfg["BLOCK_D"], UPCAST=upcast,
              DOT_PRECISION=route_dot_precision(upcast, interpreted),
              num_warps=cfg["warps_pool"])),
        (_select_kernel, (triton.cdiv(B, cfg["BLOCK_B"]),),
         (scratch, expert_start, thresholds, out_ids, out_weights, B, M, E, splits, temperature),
         dict(K=top_k, BLOCK_B=cfg["BLOCK_B"], BLOCK_E=cfg["BLOCK_E"], num_warps=4)),
    ]


def pooled_route(
    queries: torch.Tensor,
    mask: torch.Tensor | None,
    anchors: torch.Tensor,
    expert_start: torch.Tensor,
    thresholds: torch.Tensor,
    top_k: int,
    temperature: float,
    out_ids: torch.Tensor | None = None,
    out_weights: torch.Tensor | None = None,
    scratch: torch.Tensor | None = None,
    anchor_window: torch.Tensor | None = None,
    anchor_order: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Route each of ``B`` token sequences (see the module docstring). ``mask`` [B, T] (any
    int/bool/float dtype, non-zero = a prompt token; rows may be strided) or None (every token);
    ``expert_start`` int32 [E + 1] (trusted: 0 = start[0] <= ... <= start[E] = M, no host check);
    ``scratch`` fp32 ``pooled_route_scratch_shape(...)`` (optional); ``anchor_window`` int32 [M] (values 1..W, trusted) with
    queries [W, B, T, D], else None with queries [B, T, D]; ``anchor_order`` int32 [M] (a permutation
    of the anchors grouping equal windows, trusted; default: ``routing.window_order`` made here,
    two small launches: a caller routing many prompts keeps one). Returns
    ``(ids, weights)``."""
    interpreted = is_interpreted(_pool_kernel)
    check_tensor("queries", queries, 3 if anchor_window is None else 4, FLOAT_DTYPES)
    if anchor_window is not None:
        check_tensor("anchor_window", anchor_window, 1, (torch.int32,))
    if anchor_order is not None:
        if anchor_window is None:
            raise ValueError("anchor_order orders anchors by their key windows: pass anchor_window too")
        check_tensor("anchor_order", anchor_order, 1, (torch.int32,))
    check_tensor("anchors", anchors, 2, FLOAT_DTYPES)
    check_tensor("thresholds", thresholds, 1, (torch.float32,))
    check_tensor("expert_start", expert_start, 1, (torch.int32,))
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise TypeError(f"top_k must be an int, got {type(top_k).__name__}")
    if not 1 <= top_k <= MAX_TOP_K:
        raise ValueError(f"top_k must be in 1..{MAX_TOP_K}, got {top_k}")
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature must be a float, got {type(temperature).__name__}")
    temperature = float(temperature)
    if not (math.isfinite(temperature) and temperature > 0.0):
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    B, T, D = queries.shape[-3:]
    M = anchors.shape[0]
    E = expert_start.shape[0] - 1
    if anchors.shape[1] != D:
        raise ValueError(f"anchors must be [M, {D}] to match queries [..., B, T, {D}], got {tuple(anchors.shape)}")
    for name, t in (("anchor_window", anchor_window), ("anchor_order", anchor_order)):
        if t is not None and t.shape[0] != M:
            raise ValueError(f"{name} must have one entry per anchor ({M}), got {t.shape[0]}")
    if thresholds.shape[0] != M:
        raise ValueError(f"thresholds must have one entry per anchor ({M}), got {thresholds.shape[0]}")
    if E < 0:
        raise ValueError("expert_start must have E + 1 >= 1 entries")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or tuple(mask.shape) != (B, T):
            raise ValueError(f"mask must be a [{B}, {T}] tensor, got "
                             f"{tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}")
        if mask.dtype not in MASK_DTYPES:
            raise TypeError(f"mask has dtype {mask.dtype}; expected a bool, int or float dtype")
        if mask.stride(1) != 1 and T > 1:
            mask = mask.contiguous()
        if mask.dtype == torch.bool:
            mask = mask.view(torch.uint8)
    for name, t, dtype in (("out_ids", out_ids, torch.int32), ("out_weights", out_weights, torch.float32)):
        if t is not None:
            check_tensor(name, t, 2, (dtype,))
            if tuple(t.shape) != (B, top_k):
                raise ValueError(f"{name} must be [{B}, {top_k}], got {tuple(t.shape)}")
    if scratch is not None:
        check_tensor("scratch", scratch, 3, (torch.float32,))
        wanted = pooled_route_scratch_shape(queries, mask, anchors, expert_start, anchor_window)
        if tuple(scratch.shape) != wanted:
            raise ValueError(f"scratch must be {list(wanted)} (pooled_route_scratch_shape), got "
                             f"{list(scratch.shape)}")
    device = check_devices({"queries": queries, "mask": mask, "anchors": anchors, "expert_start": expert_start,
                            "thresholds": thresholds, "out_ids": out_ids, "out_weights": out_weights,
                            "scratch": scratch, "anchor_window": anchor_window,
                            "anchor_order": anchor_order}, interpreted)
    if out_ids is None:
        out_ids = torch.empty((B, top_k), dtype=torch.int32, device=device)
    if out_weights is None:
        out_weights = torch.empty((B, top_k), dtype=torch.float32, device=device)
    if B == 0:
        return out_ids, out_weights
    if M == 0 or E == 0 or T == 0:
        out_ids.fill_(-1)
        out_weights.zero_()
        return out_ids, out_weights
    if scratch is None:
        scratch = torch.empty(pooled_route_scratch_shape(queries, mask, anchors, expert_start, anchor_window),
                              dtype=torch.float32, device=device)
    with device_guard(device):
        for kernel, grid, args, kwargs in pooled_route_launches(
                queries, mask, anchors, expert_start, thresholds, out_ids, out_weights, scratch,
                top_k, temperature, interpreted, anchor_window, anchor_order):
            kernel[grid](*args, **kwargs)
    return out_ids, out_weights


def pooled_route_cases(arch: int, full: bool, make, case_type):
    """Compile-check cases of both launches (see ``compile_check``)."""
    # (B, T, M, E, D): token blocks 16/32/64, one or several anchor and D blocks; T = 1 is mean
    # pooling or token routing with several anchors per expert
    shapes = ([(1, 8, 16, 8, 256), (2, 12, 300, 100, 576), (64, 1, 4096, 1024, 256), (4, 64, 1024, 256, 256),
               (8, 2048, 16384, 4096, 256), (2, 30, 600, 200, 576)]
              if full else [(1, 64, 1024, 256, 256), (8, 2048, 16384, 4096, 256), (64, 1, 4096, 1024, 576)])
    dtypes = (torch.float32, torch.float16, torch.bfloat16) if full else (torch.float32,)
    for dtype in dtypes:
        for k in ((1, 2, 3, 4) if full else (1, 2)):
            for B, T, M, E, D in shapes:
                for has_mask in ((True, False) if full else (True,)):
                    launches = pooled_route_launches(
                        make((B, T, D), dtype), make((B, T), torch.int64) if has_mask else None,
                        make((M, D), dtype), make((E + 1,), torch.int32), make((M,), torch.float32),
                        make((B, k), torch.int32), make((B, k), torch.float32), make((B, 2, M), torch.float32),
                        k, 0.1, False)
                    for kernel, _, args, kwargs in launches:
                        if kernel is _pool_kernel:
                            if k != 1:
                                continue      # the pool launch does not depend on top_k
                            name = (f"pooled_route.pool {str(dtype)[6:]} mask={int(has_mask)} T={T} M={M} D={D} "
                                    f"T{kwargs['BLOCK_T']}xM{kwargs['BLOCK_M']}xD{kwargs['BLOCK_D']} "
                                    f"w{kwargs['num_warps']}")
                        else:
                            if dtype != torch.float32 or not has_mask or (B, T, M, E, D) != shapes[-1]:
                                continue      # fp32 scores only; sizes are not specialised
                            name = (f"pooled_route.select k={k} B={B} E={E} "
                                    f"B{kwargs['BLOCK_B']}xE{kwargs['BLOCK_E']} w4")
                        yield case_type(name, arch, kernel, args, kwargs)
        # per-anchor key windows (the editor's default): queries [W, B, T, D]
        B, T, M, E, D = shapes[0]
        kernel, _, args, kwargs = pooled_route_launches(
            make((3, B, T, D), dtype), make((B, T), torch.int64), make((M, D), dtype), make((E + 1,), torch.int32),
            make((M,), torch.float32), make((B, 1), torch.int32), make((B, 1), torch.float32),
            make((B, 2, M), torch.float32), 1, 0.1, False, anchor_window=make((M,), torch.int32),
            anchor_order=make((M,), torch.int32))[0]
        name = (f"pooled_route.pool {str(dtype)[6:]} mask=1 windows=3 T={T} M={M} D={D} "
                f"T{kwargs['BLOCK_T']}xM{kwargs['BLOCK_M']}xD{kwargs['BLOCK_D']} w{kwargs['num_warps']}")
        yield case_type(name, arch, kernel, args, kwargs)
