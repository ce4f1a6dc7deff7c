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

Launches: up, down (and combine for top_k > 1) under a guard of the tensors' device; the
sort/align step (~15 torch ops) is skipped when a ``GroupedLayout`` of the same ids is passed
(``grouped_layout``: a decode step reusing its prompt's route). ``E`` and ``N`` are not
value-specialised (no recompile when an expert is added); ``d`` and ``H`` are (an H that is
not a multiple of 16 loses vector loads: ``pad_expert_hidden``).

``out`` may be ``x`` itself: ``x`` is fully read by the up kernel before any ``out`` write.
Ids are not range-checked on the host (that would need a sync): an id outside ``[0, E)``
is treated like -1.
"""

from __future__ import annotations

import functools
import math
import numbers
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import FLOAT_DTYPES, check_devices, check_tensor, device_guard, is_interpreted

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


# E (experts) and N (tokens) change while serving: not value-specialised, so a new expert or
# batch size never triggers a recompile (e.g. inside a CUDA-graph capture); d and H stay
# specialised (``% 16`` divisibility lets loads vectorise).
@triton.jit(do_not_specialize=["E", "R"])
def _up_kernel(
    x_ptr, wu_ptr, wg_ptr, h_ptr, part_ptr,
    sorted_slot_ptr, block_expert_ptr, start_ptr, blk_end_ptr,
    d, H, E, R, k_split,
    K: tl.constexpr, GATED: tl.constexpr, ACT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
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
    # split over K (SPLIT_K > 1, decode): this program reduces d-range [k_lo, k_hi) only, so one
    # expert's weights are streamed by SPLIT_K x (H / BLOCK_N) programs instead of H / BLOCK_N
    k_lo = tl.program_id(2) * k_split
    k_hi = tl.minimum(k_lo + k_split, d)

    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if GATED:
        acc_gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k_idx = k0 + kk
        k_mask = k_idx < k_hi
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
    out_mask = row_mask[:, None] & col_mask[None, :]
    if SPLIT_K == 1:
        if GATED:
            h = _activation(acc_gate, ACT) * acc_up
        else:
            h = _activation(acc_up, ACT)
        h_ptrs = h_ptr + rows.to(tl.int64)[:, None] * H + cols[None, :]
        tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=out_mask)
    else:
        # fp32 partial sums, one writer per element; the down kernel adds the SPLIT_K parts in
        # a fixed order (deterministic, no atomics) and applies the activation
        split = tl.program_id(2).to(tl.int64)
        rows64 = rows.to(tl.int64)
        tl.store(part_ptr + (split * R + rows64)[:, None] * H + cols[None, :], acc_up, mask=out_mask)
        if GATED:   # gate parts after the SPLIT_K up parts
            tl.store(part_ptr + ((SPLIT_K + split) * R + rows64)[:, None] * H + cols[None, :], acc_gate,
                     mask=out_mask)


@triton.jit(do_not_specialize=["E", "R"])
def _down_kernel(
    h_ptr, wd_ptr, weights_ptr, out_ptr, scratch_ptr, part_ptr,
    sorted_slot_ptr, block_expert_ptr, start_ptr, blk_end_ptr,
    d, H, E, R, scale,
    K: tl.constexpr, DIRECT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, GATED: tl.constexpr, ACT: tl.constexpr,
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
        h_mask = row_mask[:, None] & k_mask[None, :]
        if SPLIT_K == 1:
            hs = tl.load(h_ptr + rows64[:, None] * H + k_idx[None, :], mask=h_mask, other=0.0)
        else:
            # the up kernel's split-K partial sums, added in split order, then the activation;
            # rounded to the weights' dtype like the unsplit h
            up = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
            gate = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
            for sp in range(SPLIT_K):
                up += tl.load(part_ptr + (sp * R + rows64)[:, None] * H + k_idx[None, :],
                              mask=h_mask, other=0.0)
                if GATED:
                    gate += tl.load(part_ptr + ((SPLIT_K + sp) * R + rows64)[:, None] * H + k_idx[None, :],
                                    mask=h_mask, other=0.0)
            if GATED:
                hs = _activation(gate, ACT) * up
            else:
                hs = _activation(up, ACT)
            hs = hs.to(h_ptr.dtype.element_ty)
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


@triton.jit(do_not_specialize=["N", "E"])
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
# cores), so it gets smaller tiles. Stages (then K, then N tiles) are cut to the device's
# per-block shared-memory limit (``gpu_config``): the 4-stage gated decode tile needs 108 KiB,
# over the 99 KiB of sm_86/sm_89.
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
# tests set this to force the split-K path (e.g. under the interpreter); None = the table's
_SPLIT_K_OVERRIDE: int | None = None
# Decode (the first M bucket) splits the up projection over K: with the default expert width
# H = 64 the unsplit up kernel runs one program per (row block, expert) and streams that
# expert's d x H weights through one SM. Modelled share of HBM bandwidth for one active
# expert on a 132-SM H100, taking one SM's share of bandwidth as ~1/132 of the machine's
# (an upper bound for one CTA): unsplit 1/132 = 0.8%; split 16 ways (d = 4096) 16/132 = 12%;
# every further active expert adds as many programs (8 active experts: ~100%). Not measured:
# no GPU has run these kernels yet.
DECODE_SPLIT_K_MAX = 16
DECODE_K_PER_SPLIT = 256


# Per-block shared memory a kernel may use (opt-in maximum), by compute capability; the
# device's own figure is used when there is one (``device_limits``).
SMEM_LIMITS = {(7, 0): 96 * 1024, (7, 5): 64 * 1024, (8, 0): 163 * 1024, (8, 6): 99 * 1024,
               (8, 7): 163 * 1024, (8, 9): 99 * 1024, (9, 0): 227 * 1024}
# what Triton adds beyond the pipelined operand buffers (layout conversions, barriers); the
# compile check (tests/test_kernel_compile.py) holds the estimate against real compiles
_SMEM_SLACK = 8 * 1024


def smem_limit_for(capability: tuple[int, int]) -> int:
    if tuple(capability) in SMEM_LIMITS:
        return SMEM_LIMITS[tuple(capability)]
    major = capability[0]
    return 227 * 1024 if major >= 9 else (99 * 1024 if major == 8 else 64 * 1024)


@functools.lru_cache(maxsize=None)
def device_limits(device_index: int) -> tuple[tuple[int, int], int]:
    """(compute capability, per-block shared memory limit in bytes) of one CUDA device."""
    capability = torch.cuda.get_device_capability(device_index)
    props = torch.cuda.get_device_properties(device_index)
    smem = getattr(props, "shared_memory_per_block_optin", None)
    if not smem:
        try:
            from triton.runtime import driver
            smem = driver.active.utils.get_device_properties(device_index)["max_shared_mem"]
        except Exception:  # pragma: no cover - no driver utilities
            smem = smem_limit_for(capability)
    return capability, int(smem)


def ffn_config(M: int, d: int, H: int, dtype: torch.dtype, device: torch.device,
               interpreted: bool, gated: bool = True) -> dict:
    """Launch configuration keyed by (M bucket, d, H, dtype, gated, device)."""
    if interpreted:
        return _tiles(_INTERPRETER_CONFIG[1:], d, H, combine=(64, 512), esize=4, gated=gated, smem=None)
    if device.type == "cuda":
        cc, smem = device_limits(device.index if device.index is not None else torch.cuda.current_device())
    else:
        cc, smem = (9, 0), smem_limit_for((9, 0))
    return gpu_config(M, d, H, dtype, cc, smem, gated)


def gpu_config(M: int, d: int, H: int, dtype: torch.dtype, capability: tuple[int, int],
               smem_limit: int | None = None, gated: bool = True) -> dict:
    """The compiled-kernel entry of the table for a device of compute ``capability`` whose
    blocks may use ``smem_limit`` bytes of shared memory (default: the architecture's).

    The table's stages (then K, then N tiles) are cut until the pipelined operand buffers fit
    the limit: the 4-stage 16x64x128 decode tile needs 108 KiB with a gate, more than the
    99 KiB of sm_86/sm_89. Every choice is compiled for sm_80/86/89/90 in CI."""
    table = _GPU_CONFIGS["fp32" if dtype == torch.float32 else "half"]
    for max_m, bm, bn, bk, warps, stages in table:
        if max_m is None or M <= max_m:
            break
    if capability[0] < 9 and bm >= 64:
        # mma.sync (pre-Hopper) keeps more in registers: 128-row tiles and 4 warps spill there
        bm, warps = 64, 8
    if capability[0] < 8:
        stages = min(stages, 2)  # pre-Ampere: less shared memory, no cp.async pipelining
    limit = smem_limit if smem_limit is not None else smem_limit_for(capability)
    esize = 4 if dtype == torch.float32 else 2
    split_k = min(DECODE_SPLIT_K_MAX, max(1, d // DECODE_K_PER_SPLIT)) if M <= table[0][0] else 1
    return _tiles((bm, bn, bk, warps, stages), d, H, combine=(16, 256), esize=esize, gated=gated,
                  smem=limit, split_k=split_k,
                  split_warps_down=8 if (capability[0] < 9 or dtype == torch.float32) else 4)


def pipeline_smem(bm: int, bn: int, bk: int, stages: int, esize: int, b_tiles: int) -> int:
    """Bytes of the pipelined operand buffers of one ``tl.dot`` loop: (stages - 1) copies of
    the A tile (bm x bk) and ``b_tiles`` B tiles (bk x bn), plus slack."""
    return max(stages - 1, 1) * (bm * bk + b_tiles * bk * bn) * esize + _SMEM_SLACK


def _fit(bm: int, bn: int, bk: int, stages: int, esize: int, b_tiles: int, smem: int | None):
    """Cut stages, then BLOCK_K, then BLOCK_N (never below 16 / 1 stage) until it fits."""
    while smem is not None and pipeline_smem(bm, bn, bk, stages, esize, b_tiles) > smem:
        if stages > 2:
            stages -= 1
        elif bk > 32:
            bk //= 2
        elif bn > 32:
            bn //= 2
        elif stages > 1:
            stages -= 1
        else:
            break
    return bn, bk, stages


def _tiles(entry, d: int, H: int, combine, esize: int, gated: bool, smem: int | None,
           split_k: int = 1, split_warps_down: int | None = None) -> dict:
    bm, bn, bk, warps, stages = entry
    np2 = triton.next_power_of_2
    # never wider than the problem (tl.dot needs >= 16 on every side)
    bn_up, bk_up = min(bn, max(16, np2(H))), min(bk, max(16, np2(d)))
    bn_down, bk_down = min(bn, max(16, np2(d))), min(bk, max(16, np2(H)))
    bn_up, bk_up, stages_up = _fit(bm, bn_up, bk_up, stages, esize, 2 if gated else 1, smem)
    bn_down, bk_down, stages_down = _fit(bm, bn_down, bk_down, stages, esize, 1, smem)
    if _SPLIT_K_OVERRIDE is not None:
        split_k = _SPLIT_K_OVERRIDE
    # K range per split: whole BLOCK_K steps; the number of splits actually needed
    k_split = triton.cdiv(triton.cdiv(d, max(1, split_k)), bk_up) * bk_up
    split_k = max(1, triton.cdiv(d, k_split))
    return dict(BLOCK_M=bm, BLOCK_N_UP=bn_up, BLOCK_K_UP=bk_up, STAGES_UP=stages_up,
                SPLIT_K=split_k, K_SPLIT=k_split if split_k > 1 else max(d, 1),
                # the down kernel's split-K prologue spills at 4 warps on sm_80/86/89 and at 8
                # on sm_90 (compile check)
                WARPS_DOWN=(split_warps_down or warps) if split_k > 1 else warps,
                BLOCK_N_DOWN=bn_down, BLOCK_K_DOWN=bk_down, STAGES_DOWN=stages_down,
                num_warps=warps, num_stages=max(stages_up, stages_down),
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


def ffn_launches(x, ids, weights, w_up, w_gate, w_down, out, h, scratch, grouped, num_blocks,
                 scale, activation, cfg, interpreted, part=None):
    """The kernel launches of one ``grouped_expert_ffn`` call: ``[(kernel, grid, args,
    kwargs)]`` (up, down, and combine for top_k > 1). The wrapper launches them; the compile
    check (tests/test_kernel_compile.py) compiles exactly these for each GPU architecture.
    ``grouped`` = (sorted_slot, block_expert, start, blk_end); ``part``: fp32 split-K partial
    sums [SPLIT_K * (2 if gated else 1), N*k, H] when ``cfg["SPLIT_K"] > 1`` (``h`` then only
    gives the compute dtype)."""
    part = h if part is None else part
    N, d = x.shape
    E, _, H = w_up.shape
    top_k = ids.shape[1]
    compute = w_up.dtype
    upcast = compute == torch.float32 or (interpreted and compute == torch.bfloat16)
    sorted_slot, block_expert, start, blk_end = grouped
    bm = cfg["BLOCK_M"]
    direct = top_k == 1
    split = cfg["SPLIT_K"]
    R = ids.shape[0] * top_k
    launches = [
        (_up_kernel, (num_blocks, triton.cdiv(H, cfg["BLOCK_N_UP"]), split),
         (x, w_up, w_gate if w_gate is not None else w_up, h, part, sorted_slot, block_expert, start, blk_end,
          d, H, E, R, cfg["K_SPLIT"]),
         dict(K=top_k, GATED=w_gate is not None, ACT=ACTIVATIONS[activation], BLOCK_M=bm,
              BLOCK_N=cfg["BLOCK_N_UP"], BLOCK_K=cfg["BLOCK_K_UP"], SPLIT_K=split, UPCAST=upcast,
              DOT_PRECISION="ieee", num_warps=cfg["num_warps"], num_stages=cfg["STAGES_UP"])),
        (_down_kernel, (num_blocks, triton.cdiv(d, cfg["BLOCK_N_DOWN"])),
         (h, w_down, weights, out, scratch, part, sorted_slot, block_expert, start, blk_end, d, H, E, R, scale),
         dict(K=top_k, DIRECT=direct, BLOCK_M=bm, BLOCK_N=cfg["BLOCK_N_DOWN"], BLOCK_K=cfg["BLOCK_K_DOWN"],
              SPLIT_K=split, GATED=w_gate is not None, ACT=ACTIVATIONS[activation],
              UPCAST=upcast, DOT_PRECISION="ieee", num_warps=cfg["WARPS_DOWN"],
              num_stages=cfg["STAGES_DOWN"])),
    ]
    if not direct:
        bt, bn = cfg["COMBINE_T"], cfg["COMBINE_N"]
        launches.append((_combine_kernel, (triton.cdiv(N, bt), triton.cdiv(d, bn)),
                         (out, scratch, ids, N, d, E), dict(K=top_k, BLOCK_T=bt, BLOCK_N=bn, num_warps=4)))
    return launches


# --------------------------------------------------------------------------- wrapper
@dataclass
class GroupedLayout:
    """The expert-grouped row order of one ``ids`` tensor (see ``align_rows``), reusable while
    ``ids`` is unchanged: a decode step whose sequences keep their prompt's route skips the
    ~15 torch ops of the sort/align step and launches only the FFN kernels.

    Build it with ``grouped_layout``; it is valid for calls with the same ``ids`` values, the
    same number of experts and expert shapes/dtype, on the same device."""

    sorted_slot: torch.Tensor
    start: torch.Tensor
    blk_end: torch.Tensor
    block_expert: torch.Tensor
    num_rows: int
    top_k: int
    num_experts: int
    block_m: int
    num_blocks: int

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.sorted_slot, self.start, self.blk_end, self.block_expert

    def copy_(self, other: "GroupedLayout") -> "GroupedLayout":
        """Overwrite this layout's buffers in place (same shapes): keeps the addresses a
        captured CUDA graph reads."""
        if not self.matches(other):
            raise ValueError("GroupedLayout.copy_: layouts of different shapes")
        for mine, theirs in zip(self.tensors(), other.tensors()):
            mine.copy_(theirs)
        return self

    def matches(self, other: "GroupedLayout") -> bool:
        return ((self.num_rows, self.top_k, self.num_experts, self.block_m, self.num_blocks)
                == (other.num_rows, other.top_k, other.num_experts, other.block_m, other.num_blocks)
                and self.sorted_slot.device == other.sorted_slot.device)


def grouped_layout(ids: torch.Tensor, w_up: torch.Tensor) -> GroupedLayout:
    """The grouped order of ``ids`` (int32 [N, k]) for experts ``w_up`` [E, d, H] (their count,
    shape and dtype pick the row-block size). Torch ops on the device, no host sync."""
    check_tensor("ids", ids, 2, (torch.int32,), dtype_hint="expert ids, -1 = no expert")
    check_tensor("w_up", w_up, 3, FLOAT_DTYPES)
    interpreted = is_interpreted(_up_kernel)
    device = check_devices({"ids": ids, "w_up": w_up}, interpreted)
    E, d, H = w_up.shape
    rows = ids.shape[0] * ids.shape[1]
    bm = ffn_config(rows, d, H, w_up.dtype, device, interpreted)["BLOCK_M"]
    num_blocks = max_row_blocks(rows, E, bm)
    return GroupedLayout(*align_rows(ids, E, bm, num_blocks), num_rows=rows, top_k=ids.shape[1],
                         num_experts=E, block_m=bm, num_blocks=num_blocks)


def pad_expert_hidden(w_up: torch.Tensor, w_gate: torch.Tensor | None, w_down: torch.Tensor,
                      multiple: int = 16):
    """Zero-pad the expert width H to a multiple of ``multiple``: ``w_up``/``w_gate`` get zero
    columns, ``w_down`` zero rows. Exact for silu, gelu and relu (act(0) = 0, and a zero row of
    ``w_down`` adds nothing). Returns the tensors unchanged when H is already a multiple.

    An H that is not a multiple of 16 makes every expert row start unaligned: the compiled
    kernels lose their vector loads and spill; ``LEMoELayer`` pads through this on the kernel
    path (prefer ``expert_hidden`` a multiple of 16: then nothing is copied)."""
    H = w_up.shape[2]
    pad = (-H) % multiple
    if pad == 0:
        return w_up, w_gate, w_down
    pad_cols = lambda t: torch.nn.functional.pad(t, (0, pad)) if t is not None else None  # noqa: E731
    return pad_cols(w_up), pad_cols(w_gate), torch.nn.functional.pad(w_down, (0, 0, 0, pad))


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
    layout: GroupedLayout | None = None,
) -> torch.Tensor:
    """``out[n] += scale * sum_j weights[n, j] * FFN_{ids[n, j]}(x[n])`` in place; returns ``out``.

    x [N, d]; ids int32 [N, k] (ids outside [0, E), e.g. -1, contribute nothing); weights fp32
    [N, k]; w_up [E, d, H]; w_gate [E, d, H] or None; w_down [E, H, d]; activation one of
    "silu", "gelu" (exact erf), "relu"; out [N, d]. All contiguous, on one device (CUDA, or
    any device under TRITON_INTERPRET=1). See the module docstring for layout and dtypes.
    ``layout``: the ``grouped_layout`` of these ``ids`` (skips the sort/align step); its
    shapes are checked, its values are trusted. Launches: up + down (+ combine for k > 1).
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

    cfg = ffn_config(rows, d, H, w_up.dtype, device, interpreted, gated=w_gate is not None)
    bm = cfg["BLOCK_M"]
    if layout is None:
        num_blocks = max_row_blocks(rows, E, bm)
        sorted_slot, start, blk_end, block_expert = align_rows(ids, E, bm, num_blocks)
    else:
        if not isinstance(layout, GroupedLayout):
            raise TypeError(f"layout must be a GroupedLayout, got {type(layout).__name__}")
        want = (rows, top_k, E, bm)
        have = (layout.num_rows, layout.top_k, layout.num_experts, layout.block_m)
        if want != have or layout.sorted_slot.device != device:
            raise ValueError(f"layout was built for (rows, top_k, experts, block_m) = {have} on "
                             f"{layout.sorted_slot.device}; this call needs {want} on {device}")
        num_blocks = layout.num_blocks
        sorted_slot, start, blk_end, block_expert = layout.tensors()

    compute = w_up.dtype
    scratch = out if top_k == 1 else torch.empty((rows, d), dtype=torch.float32, device=device)
    if cfg["SPLIT_K"] > 1:   # partial sums instead of h (h: a placeholder naming the dtype)
        h = torch.empty((1,), dtype=compute, device=device)
        part = torch.empty((cfg["SPLIT_K"] * (2 if w_gate is not None else 1), rows, H),
                           dtype=torch.float32, device=device)
    else:
        h = torch.empty((rows, H), dtype=compute, device=device)
        part = None
    launches = ffn_launches(x, ids, weights, w_up, w_gate, w_down, out, h, scratch,
                            (sorted_slot, block_expert, start, blk_end), num_blocks, scale,
                            activation, cfg, interpreted, part)
    with device_guard(device):
        for kernel, grid, args, kwargs in launches:
            kernel[grid](*args, **kwargs)
    return out
