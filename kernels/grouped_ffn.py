"""Grouped expert FFN: ``out[n] += scale * sum_j weights[n, j] * FFN_{ids[n, j]}(x[n])``.

Semantics are those of ``lemoe_engine.experts.expert_ffn_reference``: stacked weights in
"x @ W" orientation, ``w_up[E, d, H]``, optional ``w_gate[E, d, H]`` (gated: ``h =
act(x @ w_gate) * (x @ w_up)``, otherwise ``h = act(x @ w_up)``), ``w_down[E, H, d]``; a slot
with an id outside ``[0, E)`` (``-1`` = gated off) contributes nothing, and a row with no
valid slot is never written (it stays bit-identical).

Layout (built on the device, no host synchronisation; compare vLLM's
``moe_align_block_size`` and ScatterMoE's ``padded_block_indices``):

1. the ``N*k`` (token, slot) pairs are keyed by expert (invalid ids get key ``E``) and
   stably sorted: ``sorted_slot[p]`` is the flat slot index ``n*k + j`` at sorted position
   ``p``; expert ``e`` owns positions ``[start[e], start[e+1])`` (``searchsorted``), and
   invalid slots sort to the end where no block ever reaches them;
2. expert ``e`` is cut into ``ceil(count_e / BLOCK_M)`` row blocks; ``blk_end`` is the
   inclusive prefix sum of those counts and ``block_expert[b]`` (``searchsorted``) says which
   expert block ``b`` belongs to (``E`` = unused);
3. the grid has a fixed number of row blocks that depends on shapes only:
   ``sum_e ceil(c_e / BM) <= (N*k + min(E, N*k) * (BM - 1)) // BM`` and ``<= N*k``, so its
   size is known without reading device memory; blocks past the used ones exit at once.
   Nothing is padded in memory: a block masks the rows past its expert's end.

Kernels:

* ``_up_kernel`` (grid: row blocks x H blocks) gathers ``x`` rows of its tokens, runs the up
  (and gate) GEMMs with fp32 accumulators, applies the activation and writes ``h`` to an
  intermediate ``[N*k, H]`` buffer in sorted order (the weights' dtype: fp16/bf16 halves the
  traffic and feeds tensor cores; fp32 stays fp32).
* ``_down_kernel`` (grid: row blocks x d blocks) multiplies ``h`` by ``w_down[e]`` in fp32
  and scales each row by ``scale * weights[slot]``. Then:
  - ``top_k == 1``: each token has one slot, so each ``out`` element is owned by exactly
    one (row block, column block) program: it reads ``out``, adds in fp32, rounds once and
    stores. Race-free without atomics, deterministic.
  - ``top_k > 1``: slots of one token live in different blocks, so each program writes its
    fp32 rows to a per-slot scratch ``[N*k, d]`` (every slot row has exactly one writer), and
    ``_combine_kernel`` (one program per token block) sums a token's valid slots in fp32 and
    adds the sum into ``out`` once, rounding once. Race-free and deterministic; no atomics,
    so fp16/bf16 ``out`` behave exactly like fp32 ``out`` except for that final rounding.

Dtypes: ``w_up``, ``w_gate``, ``w_down`` share one dtype (fp32, fp16 or bf16) that is the
compute dtype; ``x`` may be any of the three and is cast to it in the kernel (as the eager
reference does); ``out`` may be any of the three; accumulation is always fp32; fp32 GEMMs use
IEEE fp32 (never TF32). No ``.item()``, no host-dependent shapes: the call can be captured in
a CUDA graph (torch allocates its scratch from the graph's pool during capture).

``out`` may be ``x`` itself: ``x`` is fully read by the up kernel before any ``out`` write.
Ids are not range-checked on the host (that would need a sync): an id outside ``[0, E)``
is treated like -1.
"""

from __future__ import annotations

import functools
import math
import numbers

import torch
import triton
import triton.language as tl

from ._common import FLOAT_DTYPES, check_devices, check_tensor, is_interpreted

ACTIVATIONS = {"silu": 0, "gelu": 1, "relu": 2}


# --------------------------------------------------------------------------- kernels
@triton.jit
def _block_rows(pid_m, block_expert_ptr, start_ptr, blk_end_ptr, BLOCK_M: tl.constexpr):
    """Sorted positions of row block ``pid_m``: (expert, rows, row mask).

    Call only for used blocks (``block_expert[pid_m] < E``)."""
    e = tl.load(block_expert_ptr + pid_m)
    seg_start = tl.load(start_ptr + e)
    seg_end = tl.load(start_ptr + e + 1)
    n_blocks = (seg_end - seg_start + BLOCK_M - 1) // BLOCK_M
    first_block = tl.load(blk_end_ptr + e) - n_blocks
    rows = seg_start + (pid_m - first_block) * BLOCK_M + tl.arange(0, BLOCK_M)
    return e, rows, rows < seg_end


@triton.jit
def _activation(g, ACT: tl.constexpr):
    if ACT == 0:  # silu
        g = g / (1.0 + tl.exp(-g))
    elif ACT == 1:  # exact (erf) gelu
        g = 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))
    else:  # relu
        g = tl.maximum(g, 0.0)
    return g


@triton.jit
def _up_kernel(
    x_ptr, wu_ptr, wg_ptr, h_ptr,
    sorted_slot_ptr, block_expert_ptr, start_ptr, blk_end_ptr,
    d, H, E,
    K: tl.constexpr, GATED: tl.constexpr, ACT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if tl.load(block_expert_ptr + pid_m) >= E:
        return
    e, rows, row_mask = _block_rows(pid_m, block_expert_ptr, start_ptr, blk_end_ptr, BLOCK_M)
    slot = tl.load(sorted_slot_ptr + rows, mask=row_mask, other=0)
    tok = (slot // K).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < H
    kk = tl.arange(0, BLOCK_K)
    w_base = e.to(tl.int64) * d * H

    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if GATED:
        acc_gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, d, BLOCK_K):
        k_idx = k0 + kk
        k_mask = k_idx < d
        xs = tl.load(x_ptr + tok[:, None] * d + k_idx[None, :],
                     mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w_off = w_base + k_idx[:, None].to(tl.int64) * H + cols[None, :]
        w_mask = k_mask[:, None] & col_mask[None, :]
        wu = tl.load(wu_ptr + w_off, mask=w_mask, other=0.0)
        # cast x to the weights' dtype first (the reference computes in that dtype)
        xs = xs.to(wu.dtype)
        if UPCAST:
            xs = xs.to(tl.float32)
            wu = wu.to(tl.float32)
        acc_up = tl.dot(xs, wu, acc_up, input_precision=DOT_PRECISION)
        if GATED:
            wg = tl.load(wg_ptr + w_off, mask=w_mask, other=0.0)
            if UPCAST:
                wg = wg.to(tl.float32)
            acc_gate = tl.dot(xs, wg, acc_gate, input_precision=DOT_PRECISION)
    if GATED:
        h = _activation(acc_gate, ACT) * acc_up
    else:
        h = _activation(acc_up, ACT)
    h_ptrs = h_ptr + rows.to(tl.int64)[:, None] * H + cols[None, :]
    tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _down_kernel(
    h_ptr, wd_ptr, weights_ptr, out_ptr, scratch_ptr,
    sorted_slot_ptr, block_expert_ptr, start_ptr, blk_end_ptr,
    d, H, E, scale,
    K: tl.constexpr, DIRECT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if tl.load(block_expert_ptr + pid_m) >= E:
        return
    e, rows, row_mask = _block_rows(pid_m, block_expert_ptr, start_ptr, blk_end_ptr, BLOCK_M)
    slot = tl.load(sorted_slot_ptr + rows, mask=row_mask, other=0)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < d
    kk = tl.arange(0, BLOCK_K)
    rows64 = rows.to(tl.int64)
    w_base = e.to(tl.int64) * H * d

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        k_idx = k0 + kk
        k_mask = k_idx < H
        hs = tl.load(h_ptr + rows64[:, None] * H + k_idx[None, :],
                     mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        wd = tl.load(wd_ptr + w_base + k_idx[:, None].to(tl.int64) * d + cols[None, :],
                     mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        if UPCAST:
            hs = hs.to(tl.float32)
            wd = wd.to(tl.float32)
        acc = tl.dot(hs, wd, acc, input_precision=DOT_PRECISION)

    coef = tl.load(weights_ptr + slot, mask=row_mask, other=0.0) * scale
    y = acc * coef[:, None]
    mask = row_mask[:, None] & col_mask[None, :]
    if DIRECT:
        # top_k == 1: this program is the only writer of these out elements
        o_ptrs = out_ptr + (slot // K).to(tl.int64)[:, None] * d + cols[None, :]
        o = tl.load(o_ptrs, mask=mask, other=0.0)
        tl.store(o_ptrs, (o.to(tl.float32) + y).to(out_ptr.dtype.element_ty), mask=mask)
    else:
        # one writer per slot row: the combine kernel adds a token's slots once
        tl.store(scratch_ptr + slot.to(tl.int64)[:, None] * d + cols[None, :], y, mask=mask)


@triton.jit
def _combine_kernel(
    out_ptr, scratch_ptr, ids_ptr, N, d, E,
    K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    toks = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    tok_mask = toks < N
    toks64 = toks.to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < d
    acc = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
    any_valid = tl.zeros([BLOCK_T], dtype=tl.int32)
    for j in tl.static_range(K):
        ej = tl.load(ids_ptr + toks64 * K + j, mask=tok_mask, other=-1)
        vj = tok_mask & (ej >= 0) & (ej < E)
        # invalid slots were never written: their scratch rows are not read
        yj = tl.load(scratch_ptr + (toks64 * K + j)[:, None] * d + cols[None, :],
                     mask=vj[:, None] & col_mask[None, :], other=0.0)
        acc += yj
        any_valid = any_valid | vj.to(tl.int32)
    mask = (any_valid != 0)[:, None] & col_mask[None, :]
    o_ptrs = out_ptr + toks64[:, None] * d + cols[None, :]
    o = tl.load(o_ptrs, mask=mask, other=0.0)
    tl.store(o_ptrs, (o.to(tl.float32) + acc).to(out_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- configs
# Block sizes per M bucket (M = N * top_k routed rows), vLLM style. Tuple fields:
# (max M, BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages); the same tiles serve the up
# GEMM (N = H, K = d) and the down GEMM (N = d, K = H). fp32 runs IEEE FMA dots (no tensor
# cores), so it gets smaller tiles. Shared memory of the largest half tile with the gate:
# (128*64 + 2*64*128) * 2 B * 3 stages = 144 KiB, under the 227 KiB of an H100 SM.
_GPU_CONFIGS = {
    "half": [
        (32, 16, 64, 128, 4, 4),
        (256, 32, 64, 64, 4, 4),
        (2048, 64, 128, 64, 4, 3),
        (None, 128, 128, 64, 8, 3),
    ],
    "fp32": [
        (32, 16, 64, 32, 4, 2),
        (256, 32, 64, 32, 4, 2),
        (None, 64, 64, 32, 4, 2),
    ],
}
# one interpreter-friendly config: large tiles, few numpy iterations
_INTERPRETER_CONFIG = (None, 64, 256, 256, 4, 1)


@functools.lru_cache(maxsize=None)
def _capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


def ffn_config(M: int, d: int, H: int, dtype: torch.dtype, device: torch.device,
               interpreted: bool) -> dict:
    """Launch configuration keyed by (M bucket, d, H, dtype, device)."""
    if interpreted:
        return _tiles(_INTERPRETER_CONFIG[1:], d, H, combine=(64, 512))
    cc = _capability(device.index or 0) if device.type == "cuda" else (9, 0)
    return gpu_config(M, d, H, dtype, cc)


def gpu_config(M: int, d: int, H: int, dtype: torch.dtype, capability: tuple[int, int]) -> dict:
    """The compiled-kernel entry of the table for a device of compute ``capability``.

    Checked by compiling every entry for sm_90 and sm_80 (no register spills)."""
    table = _GPU_CONFIGS["fp32" if dtype == torch.float32 else "half"]
    for max_m, bm, bn, bk, warps, stages in table:
        if max_m is None or M <= max_m:
            break
    if capability[0] < 9 and bm >= 64:
        # mma.sync (pre-Hopper) keeps more in registers: 128-row tiles and 4 warps spill there
        bm, warps = 64, 8
    if capability[0] < 8:
        stages = min(stages, 2)  # pre-Ampere: less shared memory, no cp.async pipelining
    return _tiles((bm, bn, bk, warps, stages), d, H, combine=(16, 256))


def _tiles(entry, d: int, H: int, combine) -> dict:
    bm, bn, bk, warps, stages = entry
    np2 = triton.next_power_of_2
    # never wider than the problem (tl.dot needs >= 16 on every side)
    return dict(BLOCK_M=bm,
                BLOCK_N_UP=min(bn, max(16, np2(H))), BLOCK_K_UP=min(bk, max(16, np2(d))),
                BLOCK_N_DOWN=min(bn, max(16, np2(d))), BLOCK_K_DOWN=min(bk, max(16, np2(H))),
                num_warps=warps, num_stages=stages,
                COMBINE_T=combine[0], COMBINE_N=min(combine[1], max(16, np2(d))))


def max_row_blocks(num_rows: int, num_experts: int, block_m: int) -> int:
    """Upper bound on row blocks for ``num_rows`` routed rows over ``num_experts`` experts.

    Each non-empty expert wastes at most ``block_m - 1`` padding rows and there are at most
    ``min(E, rows)`` of them; each used block also holds at least one row."""
    if num_rows == 0 or num_experts == 0:
        return 0
    bound = (num_rows + min(num_experts, num_rows) * (block_m - 1)) // block_m
    return min(num_rows, bound)


def align_rows(ids: torch.Tensor, num_experts: int, block_m: int, num_blocks: int):
    """Expert-grouped row order on the device (torch ops only, no host sync).

    Returns ``sorted_slot`` (int32 [N*k]), ``start`` (int32 [E+1], expert segment bounds in
    sorted order), ``blk_end`` (int32 [E], inclusive prefix sum of blocks per expert) and
    ``block_expert`` (int32 [num_blocks], ``E`` for unused blocks)."""
    device = ids.device
    flat = ids.reshape(-1)
    valid = (flat >= 0) & (flat < num_experts)
    key = torch.where(valid, flat, torch.full_like(flat, num_experts))
    sorted_key, order = torch.sort(key, stable=True)
    sorted_slot = order.to(torch.int32)
    start = torch.searchsorted(
        sorted_key, torch.arange(num_experts + 1, device=device, dtype=torch.int32), out_int32=True)
    blocks = torch.div(start[1:] - start[:-1] + (block_m - 1), block_m, rounding_mode="floor")
    blk_end = torch.cumsum(blocks, 0, dtype=torch.int32)
    block_expert = torch.searchsorted(
        blk_end, torch.arange(num_blocks, device=device, dtype=torch.int32), right=True,
        out_int32=True)
    return sorted_slot, start, blk_end, block_expert


# --------------------------------------------------------------------------- wrapper
def grouped_expert_ffn(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    w_up: torch.Tensor,
    w_gate: torch.Tensor | None,
    w_down: torch.Tensor,
    activation: str,
    out: torch.Tensor,
    scale: float = 1.0,
) -> torch.Tensor:
    """``out[n] += scale * sum_j weights[n, j] * FFN_{ids[n, j]}(x[n])`` in place; returns ``out``.

    x [N, d]; ids int32 [N, k] (ids outside [0, E), e.g. -1, contribute nothing); weights fp32
    [N, k]; w_up [E, d, H]; w_gate [E, d, H] or None; w_down [E, H, d]; activation one of
    "silu", "gelu" (exact erf), "relu"; out [N, d]. All contiguous, on one device (CUDA, or
    any device under TRITON_INTERPRET=1). See the module docstring for layout and dtypes.
    """
    interpreted = is_interpreted(_up_kernel)
    check_tensor("x", x, 2, FLOAT_DTYPES)
    check_tensor("ids", ids, 2, (torch.int32,), dtype_hint="expert ids, -1 = no expert")
    check_tensor("weights", weights, 2, (torch.float32,))
    check_tensor("w_up", w_up, 3, FLOAT_DTYPES)
    if w_gate is not None:
        check_tensor("w_gate", w_gate, 3, FLOAT_DTYPES)
    check_tensor("w_down", w_down, 3, FLOAT_DTYPES)
    check_tensor("out", out, 2, FLOAT_DTYPES)
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a float, got {type(scale).__name__}")
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")

    N, d = x.shape
    E, d_up, H = w_up.shape
    if d_up != d:
        raise ValueError(f"w_up must be [E, {d}, H] to match x [N, {d}], got {tuple(w_up.shape)}")
    if w_gate is not None and w_gate.shape != w_up.shape:
        raise ValueError(f"w_gate must have the shape of w_up {tuple(w_up.shape)}, got {tuple(w_gate.shape)}")
    if tuple(w_down.shape) != (E, H, d):
        raise ValueError(f"w_down must be [{E}, {H}, {d}] (E, H, d of w_up), got {tuple(w_down.shape)}")
    for name, t in (("w_gate", w_gate), ("w_down", w_down)):
        if t is not None and t.dtype != w_up.dtype:
            raise TypeError(f"{name} dtype {t.dtype} differs from w_up dtype {w_up.dtype}; "
                            "expert weights must share one dtype")
    if ids.shape[0] != N:
        raise ValueError(f"ids must have one row per token ({N}), got shape {tuple(ids.shape)}")
    top_k = ids.shape[1]
    if top_k < 1:
        raise ValueError(f"ids must have at least one slot per token, got shape {tuple(ids.shape)}")
    if tuple(weights.shape) != tuple(ids.shape):
        raise ValueError(f"weights must have the shape of ids {tuple(ids.shape)}, got {tuple(weights.shape)}")
    if tuple(out.shape) != (N, d):
        raise ValueError(f"out must be [{N}, {d}] like x, got {tuple(out.shape)}")
    device = check_devices({"x": x, "ids": ids, "weights": weights, "w_up": w_up, "w_gate": w_gate,
                            "w_down": w_down, "out": out}, interpreted)

    rows = N * top_k
    if rows == 0 or E == 0 or d == 0 or H == 0:
        return out  # nothing can be routed, or every expert is the zero map

    cfg = ffn_config(rows, d, H, w_up.dtype, device, interpreted)
    bm = cfg["BLOCK_M"]
    num_blocks = max_row_blocks(rows, E, bm)
    sorted_slot, start, blk_end, block_expert = align_rows(ids, E, bm, num_blocks)

    compute = w_up.dtype
    h = torch.empty((rows, H), dtype=compute, device=device)
    upcast = compute == torch.float32 or (interpreted and compute == torch.bfloat16)
    common = dict(UPCAST=upcast, DOT_PRECISION="ieee", num_warps=cfg["num_warps"],
                  num_stages=cfg["num_stages"])
    bn_up, bk_up = cfg["BLOCK_N_UP"], cfg["BLOCK_K_UP"]
    bn_down, bk_down = cfg["BLOCK_N_DOWN"], cfg["BLOCK_K_DOWN"]

    _up_kernel[(num_blocks, triton.cdiv(H, bn_up))](
        x, w_up, w_gate if w_gate is not None else w_up, h,
        sorted_slot, block_expert, start, blk_end,
        d, H, E,
        K=top_k, GATED=w_gate is not None, ACT=ACTIVATIONS[activation],
        BLOCK_M=bm, BLOCK_N=bn_up, BLOCK_K=bk_up, **common,
    )
    direct = top_k == 1
    scratch = out if direct else torch.empty((rows, d), dtype=torch.float32, device=device)
    _down_kernel[(num_blocks, triton.cdiv(d, bn_down))](
        h, w_down, weights, out, scratch,
        sorted_slot, block_expert, start, blk_end,
        d, H, E, scale,
        K=top_k, DIRECT=direct,
        BLOCK_M=bm, BLOCK_N=bn_down, BLOCK_K=bk_down, **common,
    )
    if not direct:
        bt, bn = cfg["COMBINE_T"], cfg["COMBINE_N"]
        _combine_kernel[(triton.cdiv(N, bt), triton.cdiv(d, bn))](
            out, scratch, ids, N, d, E,
            K=top_k, BLOCK_T=bt, BLOCK_N=bn, num_warps=4,
        )
    return out
