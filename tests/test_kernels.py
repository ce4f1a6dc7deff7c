"""Triton kernels (lemoe_engine.kernels: anchor_route, grouped_expert_ffn) against float64 references
written here, independent of lemoe_engine's eager references.

On a machine without CUDA the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1 is
set before ``lemoe_engine.kernels`` is imported: by tests/conftest.py, and again below for running this
file alone). Cases marked ``gpu`` need CUDA: compiled kernels, native bf16 dots, larger
shapes, CUDA-graph capture.

Tolerances (relative error ||got - ref|| / ||ref|| against float64 on the same rounded inputs):
  fp32: 1e-5 (fp32 accumulation, IEEE fp32 dots)
  fp16: 3e-3 (the intermediate h and the output are rounded to fp16, 2^-11 each;
        measured ~7e-4 under the interpreter)
  bf16: 3e-2 (the same with 2^-8; measured ~1e-2 under the interpreter)
Routing ids are compared exactly on rows whose float64 scores have no near-tie (gap > 1e-5
between the sorted scores that decide the choice, and from each chosen expert's threshold);
random continuous inputs make such rows rare, and the tests assert that almost all rows are
checked. Exact ties are tested separately with integer-valued vectors (exact dot products in
fp32 in any order): no test assumes that floats computed in different blocks or places are
bit-equal.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from lemoe_engine.kernels import anchor_route, grouped_expert_ffn  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (compiled Triton); none here")

FLOAT_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
FFN_TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 3e-2}
MARGIN = 1e-5


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def unit(rows: int, dim: int, g: torch.Generator, dtype=torch.float32) -> torch.Tensor:
    v = torch.randn(rows, dim, generator=g, dtype=torch.float64)
    v = v / v.norm(dim=1, keepdim=True)
    return v.to(dtype).to(DEV)


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.double().cpu(), ref.double().cpu()
    return ((got - ref).norm() / ref.norm()).item()


# --------------------------------------------------------------------------- references
def route_ref64(q, a, thr, top_k, temperature):
    """float64 routing: scores, gate (under threshold -> never chosen), top-k (ties to lower
    id), softmax over the chosen.

    Returns ids [S, k] int64, weights [S, k] float64, and per-row ``clear`` (no near-tie)."""
    q64, a64 = q.double().cpu(), a.double().cpu()
    thr64 = thr.double().cpu()
    S, E = q64.shape[0], a64.shape[0]
    ids = torch.full((S, top_k), -1, dtype=torch.int64)
    w = torch.zeros((S, top_k), dtype=torch.float64)
    clear = torch.ones(S, dtype=torch.bool)
    if E == 0:
        return ids, w, clear
    s = q64 @ a64.T
    s = torch.where(torch.isfinite(s), s, torch.full_like(s, -math.inf))
    raw = s
    s = torch.where(s >= thr64[None, :], s, torch.full_like(s, -math.inf))
    order = torch.sort(s, dim=1, descending=True, stable=True)
    k = min(top_k, E)
    top_s, top_i = order.values[:, :k], order.indices[:, :k]
    chosen = torch.isfinite(top_s)
    logits = torch.where(chosen, top_s / temperature, torch.full_like(top_s, -math.inf))
    probs = torch.where(chosen, torch.softmax(torch.where(chosen, logits, torch.full_like(logits, -1e300)), 1),
                        torch.zeros_like(logits))
    ids[:, :k] = torch.where(chosen, top_i, torch.full_like(top_i, -1))
    w[:, :k] = torch.where(chosen, probs, torch.zeros_like(probs))
    # near-ties: between consecutive sorted scores that decide the top-k, and vs thresholds
    decide = order.values[:, :min(k + 1, E)]
    gaps = (decide[:, :-1] - decide[:, 1:]).abs()
    fin = torch.isfinite(decide[:, :-1]) & torch.isfinite(decide[:, 1:])
    clear &= ~(fin & (gaps < MARGIN)).any(1)
    # an anchor close to its own threshold, where passing or failing the gate could change the
    # top-k: its score reaches the k-th chosen score (any score, when fewer than k pass). Far
    # below the k-th it cannot matter (with thousands of anchors some always sit near their
    # threshold, and the row is still decided).
    kth = order.values[:, k - 1:k]
    matters = raw >= kth - MARGIN
    thr_gap = (raw - thr64[None, :]).abs()
    clear &= ~(torch.isfinite(thr_gap) & (thr_gap < MARGIN) & matters).any(1)
    return ids, w, clear


def act64(name, t):
    if name == "silu":
        return t * torch.sigmoid(t)
    if name == "gelu":
        return 0.5 * t * (1.0 + torch.erf(t / math.sqrt(2.0)))
    return t.clamp_min(0.0)


def ffn_delta_ref64(x, ids, weights, w_up, w_gate, w_down, activation, scale):
    """float64 ``scale * sum_j weights[n, j] * FFN_{ids[n, j]}(x[n])``; x is first cast to the
    weights' dtype (as the contract's reference does)."""
    xc = x.to(w_up.dtype).double().cpu()
    ids, weights = ids.long().cpu(), weights.double().cpu()
    wu, wd = w_up.double().cpu(), w_down.double().cpu()
    wg = w_gate.double().cpu() if w_gate is not None else None
    E = wu.shape[0]
    delta = torch.zeros(xc.shape, dtype=torch.float64)
    for j in range(ids.shape[1]):
        for e in torch.unique(ids[:, j]).tolist():
            if not 0 <= e < E:
                continue   # gated (-1) or out of range: contributes nothing
            rows = (ids[:, j] == e).nonzero(as_tuple=True)[0]
            up = xc[rows] @ wu[e]
            h = act64(activation, xc[rows] @ wg[e]) * up if wg is not None else act64(activation, up)
            delta[rows] += (h @ wd[e]) * weights[rows, j, None]
    return scale * delta


def make_experts(E, d, H, gated, g, dtype=torch.float32):
    w_up = (torch.randn(E, d, H, generator=g) / d ** 0.5).to(dtype).to(DEV)
    w_gate = (torch.randn(E, d, H, generator=g) / d ** 0.5).to(dtype).to(DEV) if gated else None
    w_down = (torch.randn(E, H, d, generator=g) / H ** 0.5).to(dtype).to(DEV)
    return w_up, w_gate, w_down


def random_ids(N, k, E, g, p_gated=0.0):
    """Distinct expert ids per row where possible (like a router), some slots gated (-1)."""
    ids = torch.stack([torch.randperm(max(E, k), generator=g)[:k] for _ in range(N)]).to(torch.int32)
    ids = torch.where(ids < E, ids, torch.full_like(ids, -1))
    if p_gated > 0:
        off = torch.rand(N, k, generator=g) < p_gated
        ids = torch.where(off, torch.full_like(ids, -1), ids)
    return ids.to(DEV)


def check_ffn(x, ids, weights, w_up, w_gate, w_down, activation, out, scale=1.0, tol=None):
    """Runs the kernel on ``out`` in place; checks delta vs float64 and untouched rows."""
    before = out.clone()
    ret = grouped_expert_ffn(x, ids, weights, w_up, w_gate, w_down, activation, out, scale)
    assert ret is out
    ref = ffn_delta_ref64(x, ids, weights, w_up, w_gate, w_down, activation, scale)
    E = w_up.shape[0]
    routed = ((ids >= 0) & (ids < E)).any(1).cpu()
    got = out.double().cpu() - before.double().cpu()
    tol = FFN_TOL[w_up.dtype] if tol is None else max(tol, FFN_TOL[w_up.dtype])
    if routed.any():
        assert (ref[routed].abs().sum(1) > 0).all(), "degenerate case: a routed row has a zero delta"
        err = rel_err(got[routed], ref[routed])
        assert err < tol, f"relative error {err:.3g} >= {tol}"
        # element-wise too, so a single unwritten element cannot hide in the norm
        rms = ref[routed].pow(2).mean().sqrt()
        worst = (got[routed] - ref[routed]).abs().max() / rms
        assert worst < 30 * tol, f"max element error {worst:.3g} x rms(delta)"
    # rows with no expert are never written: bit-identical (also NaN / -0.0 payloads)
    unrouted = ~routed
    if unrouted.any():
        a = out.cpu()[unrouted].contiguous().view(torch.uint8)
        b = before.cpu()[unrouted].contiguous().view(torch.uint8)
        assert torch.equal(a, b), "a row with no expert was modified"
    return got, ref


# --------------------------------------------------------------------------- routing
@pytest.mark.parametrize("S,E,D,top_k", [
    (1, 5, 7, 1), (1, 5, 7, 4), (7, 37, 50, 2), (100, 37, 50, 3), (130, 96, 300, 4),
])
def test_route_matches_float64(S, E, D, top_k):
    g = gen(1000 + S * 7 + E * 13 + D + top_k)
    q, a = unit(S, D, g), unit(E, D, g)
    thr = torch.full((E,), -math.inf, device=DEV)
    temperature = float(torch.empty(1).uniform_(0.05, 2.0, generator=g))
    ids, w = anchor_route(q, a, thr, top_k, temperature)
    assert ids.dtype == torch.int32 and w.dtype == torch.float32
    assert ids.shape == (S, top_k) and w.shape == (S, top_k)
    rid, rw, clear = route_ref64(q, a, thr, top_k, temperature)
    assert clear.float().mean() > 0.9
    assert torch.equal(ids.cpu().long()[clear], rid[clear])
    assert rel_err(w[clear], rw[clear]) < 1e-5
    valid = ids.cpu() >= 0
    assert valid.all()  # no gate: every slot routed when E >= top_k
    torch.testing.assert_close(w.double().cpu().sum(1), torch.ones(S, dtype=torch.float64), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("E,top_k", [(1, 1), (1, 4), (2, 3), (3, 4)])
def test_route_top_k_larger_than_experts(E, top_k):
    g = gen(2000 + E * 10 + top_k)
    S, D = 9, 24
    q, a = unit(S, D, g), unit(E, D, g)
    thr = torch.full((E,), -math.inf, device=DEV)
    ids, w = anchor_route(q, a, thr, top_k, 0.7)
    rid, rw, clear = route_ref64(q, a, thr, top_k, 0.7)
    assert clear.all()
    assert torch.equal(ids.cpu().long(), rid)
    assert rel_err(w, rw) < 1e-5
    assert (ids[:, E:] == -1).all() and (w[:, E:] == 0).all()
    assert (ids[:, :E] >= 0).all()


def test_route_gate_mix_and_poisoned_outputs():
    g = gen(3001)
    S, E, D, top_k = 64, 23, 40, 3
    q, a = unit(S, D, g), unit(E, D, g)
    # thresholds between score quantiles; a few experts never gated
    thr = (torch.rand(E, generator=g) * 0.4 + 0.05).to(DEV)
    thr[::12] = -math.inf          # two experts always pass: a third slot needs a real pass
    out_ids = torch.full((S, top_k), 12345, dtype=torch.int32, device=DEV)
    out_w = torch.full((S, top_k), float("nan"), device=DEV)
    ids, w = anchor_route(q, a, thr, top_k, 0.3, out_ids=out_ids, out_weights=out_w)
    assert ids is out_ids and w is out_w
    assert not torch.isnan(w).any() and ((ids >= -1) & (ids < E)).all()
    rid, rw, clear = route_ref64(q, a, thr, top_k, 0.3)
    assert clear.float().mean() > 0.9
    assert torch.equal(ids.cpu().long()[clear], rid[clear])
    assert rel_err(w[clear], rw[clear]) < 1e-5
    gated = (rid == -1)
    assert gated.any() and (~gated).any(), "the case must mix routed and gated slots"
    # the gate acts before the top-k: a row with some empty slots still has weights summing to 1
    partial = gated.any(1) & (~gated).any(1) & clear
    assert partial.any()
    assert torch.allclose(w.double().cpu()[partial].sum(1), torch.ones(int(partial.sum()), dtype=torch.float64))


def test_route_gate_applies_before_top_k():
    """The best anchor is under its threshold, the second is not: the second is chosen."""
    g = gen(3002)
    S, E, D = 6, 5, 32
    q, a = unit(S, D, g), unit(E, D, g)
    a[0] = q[0]                                   # query 0's best anchor ...
    thr = torch.full((E,), -math.inf, device=DEV)
    thr[0] = 1.5                                  # ... can never pass its gate
    ids, w = anchor_route(q, a, thr, 1, 0.5)
    expected = int(torch.argmax((q[0:1].double() @ a.double().T)[0, 1:])) + 1
    assert int(ids[0, 0]) == expected and float(w[0, 0]) == 1.0
    assert not (ids == 0).any()


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_route_nan_inf_queries():
    g = gen(4001)
    S, E, D, top_k = 12, 19, 16, 4
    q, a = unit(S, D, g), unit(E, D, g)
    q[0, 3] = float("nan")
    q[1, :] = float("nan")
    q[2, 5] = float("inf")
    q[3, 0] = float("-inf")
    q[4, 1] = float("inf")
    q[4, 2] = float("-inf")
    a[7, 2] = float("nan")       # expert 7 scores NaN for every query
    a[11, 4] = float("inf")      # expert 11 scores +-inf (or NaN) for every query
    thr = torch.full((E,), -math.inf, device=DEV)
    ids = torch.full((S, top_k), 12345, dtype=torch.int32, device=DEV)
    w = torch.full((S, top_k), float("nan"), device=DEV)
    anchor_route(q, a, thr, top_k, 0.5, out_ids=ids, out_weights=w)
    assert ((ids >= -1) & (ids < E)).all()
    assert torch.isfinite(w).all() and (w >= 0).all()
    assert (ids[:5] == -1).all() and (w[:5] == 0).all(), "non-finite scores must never route"
    assert not ((ids == 7) | (ids == 11)).any()
    rid, rw, clear = route_ref64(q, a, thr, top_k, 0.5)
    assert torch.equal(ids.cpu().long()[clear], rid[clear])
    assert rel_err(w[clear], rw[clear]) < 1e-5
    assert clear[5:].float().mean() > 0.8


def test_route_many_experts_running_top_k():
    """E spans several anchor blocks: the running top-k must merge across blocks."""
    g = gen(5001)
    S, E, D, top_k = 5, 1531, 48, 4
    q, a = unit(S, D, g), unit(E, D, g)
    # plant each query's best experts in different blocks, far apart
    for s, e in enumerate([3, 700, 1100, 1530, 1200]):
        a[e] = q[s]
    thr = torch.full((E,), -math.inf, device=DEV)
    ids, w = anchor_route(q, a, thr, top_k, 0.1)
    rid, rw, clear = route_ref64(q, a, thr, top_k, 0.1)
    assert clear.float().mean() >= 0.8
    assert torch.equal(ids.cpu().long()[clear], rid[clear])
    assert rel_err(w[clear], rw[clear]) < 1e-5
    assert ids[:, 0].tolist() == [3, 700, 1100, 1530, 1200]


def test_route_ties_go_to_lower_id():
    """Exactly tied scores go to the lower id, also across anchor blocks (the interpreter's
    BLOCK_E is 512, a GPU's 64). Ties are exact by construction: queries and anchors hold small
    integers, so every dot product is an integer below 2^24, exact in fp32 in any summation
    order, on any CPU or GPU. Duplicated *random* anchors are no tie: their fp32 scores depend
    on the block and the machine's reduction order."""
    g = gen(6001)
    S, E, D, top_k = 6, 1200, 32, 3
    q = torch.randint(-3, 4, (S, D), generator=g).float()
    a = torch.randint(-1, 2, (E, D), generator=g).float()   # |a . q_s| <= sum|q_s| < ||q_s||^2
    q[:, 0] = 4.0                                             # no zero query, ||q_s||^2 > sum|q_s|
    for e in (1100, 900, 5):
        a[e] = q[0]                                           # a three-way tie at the top
    for e in (60, 17):
        a[e] = q[1]
    a[1000] = q[2]
    a[250] = q[2]
    a[700] = q[2]
    a[3] = q[2]                                               # four-way: only the 3 lowest ids
    q, a = q.to(DEV), a.to(DEV)
    thr = torch.full((E,), -math.inf, device=DEV)
    ids = torch.full((S, top_k), 12345, dtype=torch.int32, device=DEV)
    w = torch.full((S, top_k), float("nan"), device=DEV)
    anchor_route(q, a, thr, top_k, 4.0, out_ids=ids, out_weights=w)
    scores = q.double().cpu() @ a.double().cpu().T
    assert torch.equal(scores, scores.round()) and scores.abs().max() < 2 ** 24
    assert ids[0].tolist() == [5, 900, 1100]
    assert ids[1, :2].tolist() == [17, 60]
    assert ids[2].tolist() == [3, 250, 700]
    # every row, ties included, against float64 with a stable sort (exact: integer scores)
    rid, rw, _ = route_ref64(q, a, thr, top_k, 4.0)
    assert torch.equal(ids.cpu().long(), rid)
    assert rel_err(w, rw) < 1e-5
    assert torch.allclose(w[0].double().cpu(), torch.full((3,), 1 / 3, dtype=torch.float64), atol=1e-6)


def test_route_large_s_small_d():
    g = gen(7001)
    S, E, D, top_k = 3000, 21, 6, 2
    q, a = unit(S, D, g), unit(E, D, g)
    thr = (torch.rand(E, generator=g) * 0.4).to(DEV)
    ids, w = anchor_route(q, a, thr, top_k, 0.25)
    rid, rw, clear = route_ref64(q, a, thr, top_k, 0.25)
    assert clear.float().mean() > 0.97
    assert torch.equal(ids.cpu().long()[clear], rid[clear])
    assert rel_err(w[clear], rw[clear]) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_route_half_inputs(dtype):
    g = gen(8001 + (dtype == torch.bfloat16))
    S, E, D, top_k = 40, 45, 72, 2
    q, a = unit(S, D, g, dtype), unit(E, D, g, dtype)
    thr = torch.full((E,), -0.05, device=DEV)
    ids, w = anchor_route(q, a, thr, top_k, 0.4)
    rid, rw, clear = route_ref64(q, a, thr, top_k, 0.4)  # float64 on the rounded inputs
    assert clear.float().mean() > 0.9
    assert torch.equal(ids.cpu().long()[clear], rid[clear])
    assert rel_err(w[clear], rw[clear]) < 1e-5


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_route_mixed_dtypes_and_empty():
    g = gen(9001)
    q, a = unit(10, 20, g), unit(6, 20, g, torch.float16)
    thr = torch.full((6,), -math.inf, device=DEV)
    ids, w = anchor_route(q, a, thr, 2, 1.0)
    rid, rw, clear = route_ref64(q, a, thr, 2, 1.0)
    assert torch.equal(ids.cpu().long()[clear], rid[clear])
    # no experts yet: every slot -1 / 0
    ids0, w0 = anchor_route(q, torch.empty(0, 20, device=DEV), torch.empty(0, device=DEV), 2, 1.0)
    assert (ids0 == -1).all() and (w0 == 0).all()
    ids1, w1 = anchor_route(torch.empty(0, 20, device=DEV), unit(6, 20, g), thr, 3, 1.0)
    assert ids1.shape == (0, 3) and w1.shape == (0, 3)


def test_route_errors():
    g = gen(9101)
    q, a = unit(4, 8, g), unit(3, 8, g)
    thr = torch.zeros(3, device=DEV)
    with pytest.raises(ValueError, match="anchors must be"):
        anchor_route(q, unit(3, 9, g), thr, 1, 1.0)
    with pytest.raises(TypeError, match="queries has dtype int64"):
        anchor_route(q.long(), a, thr, 1, 1.0)
    with pytest.raises(TypeError, match="thresholds has dtype float64"):
        anchor_route(q, a, thr.double(), 1, 1.0)
    with pytest.raises(ValueError, match="thresholds must have one entry"):
        anchor_route(q, a, torch.zeros(4, device=DEV), 1, 1.0)
    with pytest.raises(ValueError, match="top_k must be in 1..4"):
        anchor_route(q, a, thr, 5, 1.0)
    with pytest.raises(ValueError, match="top_k must be in 1..4"):
        anchor_route(q, a, thr, 0, 1.0)
    with pytest.raises(TypeError, match="top_k must be an int"):
        anchor_route(q, a, thr, 1.0, 1.0)
    with pytest.raises(ValueError, match="temperature"):
        anchor_route(q, a, thr, 1, 0.0)
    with pytest.raises(ValueError, match="temperature"):
        anchor_route(q, a, thr, 1, float("nan"))
    with pytest.raises(ValueError, match="contiguous"):
        anchor_route(unit(8, 4, g).T, a, thr, 1, 1.0)
    with pytest.raises(ValueError, match="2-D"):
        anchor_route(q[0], a, thr, 1, 1.0)
    with pytest.raises(ValueError, match=r"out_ids must be \[4, 2\]"):
        anchor_route(q, a, thr, 2, 1.0, out_ids=torch.empty(4, 1, dtype=torch.int32, device=DEV))
    with pytest.raises(TypeError, match="out_ids has dtype int64"):
        anchor_route(q, a, thr, 2, 1.0, out_ids=torch.empty(4, 2, dtype=torch.int64, device=DEV))
    with pytest.raises(TypeError, match="out_weights has dtype float16"):
        anchor_route(q, a, thr, 2, 1.0, out_weights=torch.empty(4, 2, dtype=torch.float16, device=DEV))


# --------------------------------------------------------------------------- pooled routing
def experts_of(counts):
    """anchor_expert (int32 [M], expert order) and expert_start (int32 [E+1]) for anchor counts."""
    counts = torch.as_tensor(counts)
    owner = torch.repeat_interleave(torch.arange(len(counts)), counts).to(torch.int32)
    start = torch.zeros(len(counts) + 1, dtype=torch.int32)
    start[1:] = torch.cumsum(counts, 0)
    return owner.to(DEV), start.to(DEV)


def pooled_ref64(q3, mask, a, owner, thr, E, top_k, temperature, window=None):
    """float64 default routing: masked max over tokens, gate per anchor, per-expert max over
    its anchors, top-k (ties to the lower id), softmax. Returns ids, weights, clear rows.
    ``window`` [M] (1..W): queries are [W, B, T, D] and anchor m meets ``q3[window[m] - 1]``."""
    if window is None:
        s = torch.einsum("btd,md->btm", q3.double().cpu(), a.double().cpu())
    else:
        every = torch.einsum("wbtd,md->wbtm", q3.double().cpu(), a.double().cpu())
        pick = (window.long().cpu() - 1)[None, None, None, :].expand(1, *every.shape[1:])
        s = every.gather(0, pick)[0]
    if mask is not None:
        s = s.masked_fill(mask.cpu()[:, :, None] == 0, -math.inf)
    nan = torch.isnan(s).any(1)
    pooled = s.max(1).values
    pooled = torch.where(nan, torch.full_like(pooled, math.nan), pooled)
    thr64 = thr.double().cpu()
    near_thr = (torch.isfinite(pooled) & ((pooled - thr64).abs() < MARGIN)).any(1)
    passed = torch.isfinite(pooled) & (pooled >= thr64)
    pooled = torch.where(passed, pooled, torch.full_like(pooled, -math.inf))
    per = torch.full((s.shape[0], E), -math.inf, dtype=torch.float64)
    per = per.scatter_reduce(1, owner.long().cpu()[None].expand(s.shape[0], -1), pooled, "amax")
    order = torch.sort(per, dim=1, descending=True, stable=True)
    k = min(top_k, E)
    top_s, top_i = order.values[:, :k], order.indices[:, :k]
    chosen = torch.isfinite(top_s)
    logits = torch.where(chosen, top_s / temperature, torch.full_like(top_s, -1e300))
    probs = torch.where(chosen, torch.softmax(logits, 1), torch.zeros_like(logits))
    ids = torch.full((s.shape[0], top_k), -1, dtype=torch.int64)
    weights = torch.zeros((s.shape[0], top_k), dtype=torch.float64)
    ids[:, :k] = torch.where(chosen, top_i, torch.full_like(top_i, -1))
    weights[:, :k] = probs
    decide = order.values[:, :min(k + 1, E)]
    fin = torch.isfinite(decide[:, :-1]) & torch.isfinite(decide[:, 1:])
    clear = ~(fin & ((decide[:, :-1] - decide[:, 1:]).abs() < MARGIN)).any(1) & ~near_thr
    return ids, weights, clear


def check_pooled(q3, mask, a, counts, thr, top_k, temperature, min_clear=0.8):
    """pooled_route (poisoned outputs) against float64 and against the eager layer path."""
    from lemoe_engine.kernels import pooled_route
    from lemoe_engine.routing import route_scores
    owner, start = experts_of(counts)
    E = len(counts)
    B = q3.shape[0]
    ids = torch.full((B, top_k), 12345, dtype=torch.int32, device=DEV)
    w = torch.full((B, top_k), float("nan"), device=DEV)
    got_ids, got_w = pooled_route(q3, mask, a, start, thr, top_k, temperature, out_ids=ids, out_weights=w)
    assert got_ids is ids and got_w is w
    assert ((ids >= -1) & (ids < E)).all() and torch.isfinite(w).all()
    rid, rw, clear = pooled_ref64(q3, mask, a, owner, thr, E, top_k, temperature)
    assert clear.float().mean() >= min_clear, "too many near-ties: the case checks too little"
    assert torch.equal(ids.cpu().long()[clear], rid[clear])
    if clear.any() and rw[clear].abs().sum() > 0:
        assert (w.double().cpu()[clear] - rw[clear]).abs().max() < 1e-5
    # the eager path the layer uses on CPU (fp32, masked max, route_scores)
    scores = q3.float() @ a.float().T
    if mask is not None:
        scores = scores.masked_fill(mask[:, :, None] == 0, float("-inf"))
    eid, ew = route_scores(scores.max(1).values, thr, owner, E, top_k, temperature)
    assert torch.equal(ids[clear.to(ids.device)], eid[clear.to(ids.device)])
    assert (w[clear.to(w.device)] - ew[clear.to(w.device)]).abs().max() < 1e-5 if clear.any() else True
    return ids, w, rid, clear


def _unit3(B, T, D, g):
    v = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    return (v / v.norm(dim=-1, keepdim=True)).float().to(DEV)


@pytest.mark.parametrize("B,T,D,E,top_k", [(3, 11, 40, 7, 2), (2, 150, 72, 30, 3), (4, 5, 300, 600, 1)])
def test_pooled_route_per_anchor_key_windows(B, T, D, E, top_k):
    """Queries [W, B, T, D] and ``anchor_window``: each anchor scored only against its own
    window's queries (poisoned outputs; float64 reference and the eager layer path)."""
    from lemoe_engine.kernels import pooled_route
    from lemoe_engine.routing import route_scores, window_scores
    seed = int(torch.randint(0, 2**31 - 1, (1,)))
    g = gen(seed)
    # fresh inputs until most rows are clear of near-ties (with 1,800 anchors about 3% of draws
    # have two of four rows within 1e-5 of a threshold): the draws follow from the seed
    for _ in range(10):
        counts = torch.randint(1, 4, (E,), generator=g)
        M = int(counts.sum())
        owner, start = experts_of(counts)
        q4 = torch.stack([_unit3(B, T, D, g) for _ in range(3)])
        a = unit(M, D, g)
        window = torch.randint(1, 4, (M,), generator=g).to(torch.int32).to(DEV)
        mask = (torch.rand(B, T, generator=g) < 0.8).long().to(DEV)
        mask[:, 0] = 1
        pooled64 = torch.einsum("wbtd,md->wbtm", q4.double().cpu(), a.double().cpu()).amax(2)   # [W, B, M]
        own = pooled64.gather(0, (window.long().cpu() - 1)[None, None, :].expand(1, B, M))[0]
        thr = (own.median(dim=0).values - 0.01).float().to(DEV)       # about half the anchors gated
        temperature = float(torch.empty(1).uniform_(0.05, 1.0, generator=g))
        rid, rw, clear = pooled_ref64(q4, mask, a, owner, thr, E, top_k, temperature, window=window)
        if clear.float().mean() >= 0.6:
            break
    assert clear.float().mean() >= 0.6, f"seed {seed}: too many near-ties in 10 draws"
    ids = torch.full((B, top_k), 12345, dtype=torch.int32, device=DEV)
    w = torch.full((B, top_k), float("nan"), device=DEV)
    pooled_route(q4.contiguous(), mask, a, start, thr, top_k, temperature, out_ids=ids, out_weights=w,
                 anchor_window=window)
    assert ((ids >= -1) & (ids < E)).all() and torch.isfinite(w).all(), f"seed {seed}"
    assert torch.equal(ids.cpu().long()[clear], rid[clear]), f"seed {seed}"
    if clear.any():
        assert (w.double().cpu()[clear] - rw[clear]).abs().max() < 1e-5, f"seed {seed}"
    # any visiting order of the anchors gives the same routes (the default groups equal windows,
    # so a block scores only the windows it holds; the identity order mixes them in every block)
    for order in (torch.arange(M, dtype=torch.int32, device=DEV), torch.randperm(M, generator=g).to(torch.int32).to(DEV)):
        ids2 = torch.full((B, top_k), 12345, dtype=torch.int32, device=DEV)
        w2 = torch.full((B, top_k), float("nan"), device=DEV)
        pooled_route(q4.contiguous(), mask, a, start, thr, top_k, temperature, out_ids=ids2, out_weights=w2,
                     anchor_window=window, anchor_order=order)
        assert torch.equal(ids2.cpu().long()[clear], rid[clear]), f"seed {seed}"
        if clear.any():
            assert (w2.double().cpu()[clear] - rw[clear]).abs().max() < 1e-5, f"seed {seed}"
    # the reference is not the windowless routing: the windows decide some routes
    plain, _, _ = pooled_ref64(q4[0], mask, a, owner, thr, E, top_k, temperature)
    assert not torch.equal(plain, rid), f"seed {seed}: the windows changed nothing; the case checks too little"
    scores = window_scores(q4.float(), a.float(), window)
    scores = scores.masked_fill(mask[:, :, None] == 0, float("-inf")).max(1).values
    eid, _ = route_scores(scores, thr, owner, E, top_k, temperature)
    assert torch.equal(ids[clear.to(DEV)], eid[clear.to(DEV)]), f"seed {seed}"


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("B,T,D,E,max_anchors,top_k", [
    (3, 11, 40, 7, 3, 2),          # several anchors per expert, a few tokens
    (2, 150, 72, 30, 4, 4),        # more tokens than one token block (interpreter: 128)
    (4, 5, 24, 600, 2, 3),         # anchors and experts span several blocks (interpreter: 512)
    (2, 9, 16, 1, 3, 1),           # one expert
    (3, 6, 32, 3, 1, 4),           # top_k > E, one anchor each
    (2, 7, 300, 5, 2, 2),          # D spans several blocks (interpreter: 256): the D loop
])
def test_pooled_route_matches_float64_and_eager(B, T, D, E, max_anchors, top_k):
    g = gen(23_001 + B * 100 + T + E)
    counts = torch.randint(1, max_anchors + 1, (E,), generator=g)
    M = int(counts.sum())
    q3, a = _unit3(B, T, D, g), unit(M, D, g)
    mask = (torch.rand(B, T, generator=g) < 0.7).long().to(DEV)
    mask[:, 0] = 1
    thr = torch.full((M,), -math.inf, device=DEV)
    temperature = float(torch.empty(1).uniform_(0.05, 1.0, generator=g))
    ids, w, rid, clear = check_pooled(q3, mask, a, counts, thr, top_k, temperature)
    assert (ids[:, :min(top_k, E)] >= 0).all()       # no gate: every slot up to E routed
    assert (ids[:, E:] == -1).all() and (w[:, E:] == 0).all()
    torch.testing.assert_close(w.double().cpu().sum(1), torch.ones(B, dtype=torch.float64), rtol=1e-6, atol=1e-6)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_pooled_route_gate_empty_prompts_and_strided_masks():
    """Gated anchors, a sequence with an empty prompt mask (no expert), a mask that is a
    strided slice of a wider attention mask, and a bool mask give the same routes."""
    g = gen(23_101)
    B, T, D, E = 6, 13, 48, 9
    counts = torch.randint(1, 4, (E,), generator=g)
    M = int(counts.sum())
    q3, a = _unit3(B, T, D, g), unit(M, D, g)
    owner, _ = experts_of(counts)
    for e, s in ((2, 0), (5, 1)):                    # plant strong matches so some rows pass
        a[int((owner == e).nonzero()[0])] = q3[s, 3]
    wide = (torch.rand(B, T + 4, generator=g) < 0.8).long().to(DEV)
    wide[1, 4:] = 0                                   # an empty prompt
    mask = wide[:, 4:]                                # strided rows
    assert not mask.is_contiguous()
    thr = (torch.rand(M, generator=g) * 0.5).to(DEV)
    ids, w, rid, clear = check_pooled(q3, mask, a, counts, thr, 3, 0.2)
    assert (ids[1] == -1).all() and (w[1] == 0).all(), "an empty prompt routes nowhere"
    assert (rid == -1).any() and (rid[:, 0] >= 0).any(), "the case must mix gated and routed slots"
    ids_b, w_b, _, _ = check_pooled(q3, mask.bool(), a, counts, thr, 3, 0.2)
    # another mask dtype is another compiled kernel: equal routes on the clear rows, weights
    # within rounding (tf32x3 score tiles need not round alike in two compilations)
    rows = clear.to(ids.device)
    assert torch.equal(ids_b[rows], ids[rows])
    assert (w_b[rows] - w[rows]).abs().max() < 1e-6


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_pooled_route_nan_tokens():
    """A NaN score among a prompt's tokens gates that anchor (as the eager max does); a NaN in
    a masked-out token is ignored."""
    g = gen(23_201)
    B, T, D, E = 3, 7, 16, 5
    counts = [2, 1, 3, 1, 2]
    M = sum(counts)
    q3, a = _unit3(B, T, D, g), unit(M, D, g)
    q3[0, 2, 5] = float("nan")                 # every anchor scores NaN for token 2 of row 0
    q3[1, 6, :] = float("nan")                 # ... row 1, token 6: masked out
    mask = torch.ones(B, T, dtype=torch.long, device=DEV)
    mask[1, 6] = 0
    thr = torch.full((M,), -math.inf, device=DEV)
    ids, w, rid, clear = check_pooled(q3, mask, a, counts, thr, 2, 0.5, min_clear=0.6)
    assert (ids[0] == -1).all() and (w[0] == 0).all()
    assert (ids[1] >= 0).all()


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_pooled_route_token_splits():
    """A long prompt is pooled in token splits (several programs per sequence and anchor block,
    reduced by the select launch): the best token of a later split wins, a NaN in one split
    gates the anchor even though the other splits are finite, and every scratch slot is
    written (the scratch is poisoned with NaN, which would gate anchors it was left in)."""
    from lemoe_engine.kernels import pooled_route, pooled_route_scratch_shape
    seed = int(torch.randint(0, 2**31 - 1, (1,)))
    g = gen(seed)
    B, T, D, E = 3, 300, 24, 20
    for _ in range(10):  # fresh inputs until no row has a near-tie (about 1 draw in 300 has one)
        counts = torch.randint(1, 4, (E,), generator=g)
        M = int(counts.sum())
        owner, start = experts_of(counts)
        q3, a = _unit3(B, T, D, g), unit(M, D, g)
        q3[0, T - 10, 3] = float("nan")              # row 0: a NaN in the last split only
        a[int((owner == 4).nonzero()[0])] = q3[1, T - 40]   # row 1: its best match late in the prompt
        mask = (torch.rand(B, T, generator=g) < 0.9).long().to(DEV)
        mask[:, 0] = 1
        mask[0, T - 10] = 1
        mask[1, T - 40] = 1
        thr = (torch.rand(M, generator=g) * 0.3).to(DEV)
        rid, rw, clear = pooled_ref64(q3, mask, a, owner, thr, E, 2, 0.3)
        if clear.all():
            break
    shape = pooled_route_scratch_shape(q3, mask, a, start)
    assert shape[0] == B and shape[2] == M and shape[1] > 1, f"no token splits at T={T}: {shape}"
    scratch = torch.full(shape, float("nan"), device=DEV)
    ids = torch.full((B, 2), 12345, dtype=torch.int32, device=DEV)
    w = torch.full((B, 2), float("nan"), device=DEV)
    pooled_route(q3, mask, a, start, thr, 2, 0.3, out_ids=ids, out_weights=w, scratch=scratch)
    assert clear.all(), f"seed {seed}: a near-tie, the case checks too little"
    assert torch.equal(ids.cpu().long(), rid), f"seed {seed}"
    assert (w.double().cpu() - rw).abs().max() < 1e-5
    assert (ids[0] == -1).all(), "a NaN score in one split must gate every anchor of row 0"
    assert int(ids[1, 0]) == 4, "the late best match must win"
    with pytest.raises(ValueError, match="pooled_route_scratch_shape"):
        pooled_route(q3, mask, a, start, thr, 2, 0.3, scratch=torch.empty(B, M, 1, device=DEV))


def test_pooled_route_errors():
    from lemoe_engine.kernels import pooled_route
    g = gen(23_301)
    q3, a = _unit3(2, 3, 8, g), unit(4, 8, g)
    _, start = experts_of([2, 2])
    thr = torch.zeros(4, device=DEV)
    with pytest.raises(ValueError, match="pass anchor_window too"):
        pooled_route(q3, None, a, start, thr, 1, 1.0, anchor_order=torch.arange(4, dtype=torch.int32, device=DEV))
    with pytest.raises(ValueError, match="mask must be"):
        pooled_route(q3, torch.ones(2, 4, device=DEV), a, start, thr, 1, 1.0)
    with pytest.raises(TypeError, match="expert_start has dtype int64"):
        pooled_route(q3, None, a, start.long(), thr, 1, 1.0)
    with pytest.raises(ValueError, match="top_k"):
        pooled_route(q3, None, a, start, thr, 5, 1.0)
    with pytest.raises(ValueError, match="thresholds"):
        pooled_route(q3, None, a, start, thr[:3].contiguous(), 1, 1.0)
    with pytest.raises(ValueError, match="3-D"):
        pooled_route(q3[0], None, a, start, thr, 1, 1.0)


# --------------------------------------------------------------------------- grouped FFN
@pytest.mark.parametrize("gated,activation,top_k", [
    (True, "silu", 1), (False, "gelu", 1), (True, "gelu", 2), (False, "relu", 3), (True, "relu", 4),
])
def test_ffn_matches_float64(gated, activation, top_k):
    g = gen(10_000 + top_k * 3 + gated + len(activation))
    N, d, H, E = 45, 100, 136, 5   # non-powers of two, tokens fewer than one tile
    x = torch.randn(N, d, generator=g).to(DEV)
    ids = random_ids(N, top_k, E, g, p_gated=0.2)
    weights = torch.rand(N, top_k, generator=g).to(DEV)
    w_up, w_gate, w_down = make_experts(E, d, H, gated, g)
    out = torch.randn(N, d, generator=g).to(DEV)
    check_ffn(x, ids, weights, w_up, w_gate, w_down, activation, out, scale=0.8)


@pytest.mark.parametrize("gated,activation,top_k,split", [(True, "silu", 1, 3), (False, "gelu", 2, 2),
                                                         (True, "relu", 3, 4)])
def test_ffn_split_k_matches_float64(monkeypatch, gated, activation, top_k, split):
    """The decode path that splits the up projection over K (fp32 partial sums, added in a fixed
    order by the down kernel, then the activation) gives the float64 result, and the same
    result twice (deterministic: no atomics)."""
    import importlib
    ffn_module = importlib.import_module("lemoe_engine.kernels.grouped_ffn")
    monkeypatch.setattr(ffn_module, "_SPLIT_K_OVERRIDE", split)
    g = gen(24_001 + split * 10 + top_k)
    N, d, H, E = 9, 600, 72, 4          # interpreter BLOCK_K 256: 3 K steps, split into `split`
    x = torch.randn(N, d, generator=g).to(DEV)
    ids = random_ids(N, top_k, E, g, p_gated=0.2)
    weights = torch.rand(N, top_k, generator=g).to(DEV)
    w_up, w_gate, w_down = make_experts(E, d, H, gated, g)
    assert ffn_module.ffn_config(N * top_k, d, H, torch.float32, x.device, True)["SPLIT_K"] == min(split, 3)
    out = torch.randn(N, d, generator=g).to(DEV)
    again = out.clone()
    check_ffn(x, ids, weights, w_up, w_gate, w_down, activation, out, scale=0.9)
    grouped_expert_ffn(x, ids, weights, w_up, w_gate, w_down, activation, again, 0.9)
    assert torch.equal(out, again)


def test_ffn_one_token():
    g = gen(11_001)
    d, H, E = 48, 80, 3
    x = torch.randn(1, d, generator=g).to(DEV)
    w_up, w_gate, w_down = make_experts(E, d, H, True, g)
    for ids_row in ([[2]], [[1, 0]], [[-1, 2]]):
        ids = torch.tensor(ids_row, dtype=torch.int32, device=DEV)
        weights = torch.rand(ids.shape, generator=g).to(DEV)
        out = torch.randn(1, d, generator=g).to(DEV)
        check_ffn(x, ids, weights, w_up, w_gate, w_down, "silu", out)


def test_ffn_all_tokens_one_expert_many_blocks():
    """150 rows of one expert span several row blocks (the interpreter's BLOCK_M is 64)."""
    g = gen(12_001)
    N, d, H, E = 150, 40, 72, 4
    x = torch.randn(N, d, generator=g).to(DEV)
    ids = torch.full((N, 1), 2, dtype=torch.int32, device=DEV)
    weights = torch.rand(N, 1, generator=g).to(DEV)
    w_up, w_gate, w_down = make_experts(E, d, H, False, g)
    out = torch.randn(N, d, generator=g).to(DEV)
    check_ffn(x, ids, weights, w_up, w_gate, w_down, "gelu", out, scale=1.3)


def test_ffn_single_expert():
    g = gen(13_001)
    N, d, H = 70, 24, 40
    x = torch.randn(N, d, generator=g).to(DEV)
    ids = torch.randint(-1, 1, (N, 1), generator=g, dtype=torch.int32).to(DEV)
    ids[0, 0], ids[1, 0] = 0, -1
    weights = torch.rand(N, 1, generator=g).to(DEV)
    w_up, w_gate, w_down = make_experts(1, d, H, True, g)
    out = torch.randn(N, d, generator=g).to(DEV)
    check_ffn(x, ids, weights, w_up, w_gate, w_down, "silu", out)


def test_ffn_every_token_gated_leaves_out_bit_identical():
    g = gen(14_001)
    N, d, H, E, k = 33, 20, 36, 3, 2
    x = torch.randn(N, d, generator=g).to(DEV)
    w_up, w_gate, w_down = make_experts(E, d, H, True, g)
    for bad in (-1, E, 1000, -7):   # -1 = gated; out-of-range ids route nowhere too
        ids = torch.full((N, k), bad, dtype=torch.int32, device=DEV)
        weights = torch.rand(N, k, generator=g).to(DEV)
        out = torch.randn(N, d, generator=g).to(DEV)
        out[0, 0], out[1, 1], out[2, 2] = -0.0, float("nan"), float("-inf")
        before = out.clone()
        grouped_expert_ffn(x, ids, weights, w_up, w_gate, w_down, "silu", out)
        assert torch.equal(out.view(torch.int32), before.view(torch.int32))


def test_ffn_mixed_routed_gated_and_duplicate_slots():
    """top_k=2 with some rows fully gated, some half gated, some with the same expert twice
    (both slots must count), NaN/-0.0 payloads in rows that get no expert."""
    g = gen(15_001)
    N, d, H, E, k = 60, 56, 88, 6, 2
    x = torch.randn(N, d, generator=g).to(DEV)
    ids = random_ids(N, k, E, g, p_gated=0.3)
    ids[:5] = -1
    ids[5:10, 0] = 3
    ids[5:10, 1] = 3
    ids[10:13, 1] = -1
    weights = torch.rand(N, k, generator=g).to(DEV)
    w_up, w_gate, w_down = make_experts(E, d, H, True, g)
    out = torch.randn(N, d, generator=g).to(DEV)
    out[0, :3] = torch.tensor([float("nan"), -0.0, float("inf")])
    check_ffn(x, ids, weights, w_up, w_gate, w_down, "gelu", out, scale=0.5)


def test_ffn_many_experts_few_tokens():
    g = gen(16_001)
    N, d, H, E, k = 6, 32, 48, 1000, 2
    x = torch.randn(N, d, generator=g).to(DEV)
    ids = random_ids(N, k, E, g)
    weights = torch.rand(N, k, generator=g).to(DEV)
    w_up, w_gate, w_down = make_experts(E, d, H, False, g)
    out = torch.randn(N, d, generator=g).to(DEV)
    check_ffn(x, ids, weights, w_up, w_gate, w_down, "relu", out)


@pytest.mark.parametrize("wdtype,xdtype,odtype,top_k", [
    (torch.float16, torch.float16, torch.float16, 1),
    (torch.float16, torch.float32, torch.float32, 2),
    (torch.bfloat16, torch.bfloat16, torch.bfloat16, 2),
    (torch.float32, torch.bfloat16, torch.float16, 1),
])
def test_ffn_dtypes(wdtype, xdtype, odtype, top_k):
    g = gen(17_001 + top_k + 7 * FLOAT_CODES[wdtype] + 3 * FLOAT_CODES[odtype])
    N, d, H, E = 50, 72, 120, 4
    x = torch.randn(N, d, generator=g).to(xdtype).to(DEV)
    ids = random_ids(N, top_k, E, g, p_gated=0.2)
    weights = torch.rand(N, top_k, generator=g).to(DEV)
    w_up, w_gate, w_down = make_experts(E, d, H, True, g, wdtype)
    out = torch.randn(N, d, generator=g).to(odtype).to(DEV)
    check_ffn(x, ids, weights, w_up, w_gate, w_down, "silu", out, tol=FFN_TOL[odtype])


def test_route_then_ffn_end_to_end():
    g = gen(18_001)
    N, d, H, E, D, k = 40, 64, 96, 7, 24, 2
    q, a = unit(N, D, g), unit(E, D, g)
    thr = (torch.rand(E, generator=g) * 0.3).to(DEV)
    ids, weights = anchor_route(q, a, thr, k, 0.5)
    assert (ids == -1).any() and (ids >= 0).any()
    x = torch.randn(N, d, generator=g).to(DEV)
    w_up, w_gate, w_down = make_experts(E, d, H, True, g)
    out = torch.randn(N, d, generator=g).to(DEV)
    check_ffn(x, ids, weights, w_up, w_gate, w_down, "silu", out)


def test_ffn_errors():
    g = gen(19_001)
    N, d, H, E, k = 4, 8, 16, 2, 1
    x = torch.randn(N, d, generator=g).to(DEV)
    ids = torch.zeros(N, k, dtype=torch.int32, device=DEV)
    w = torch.rand(N, k, generator=g).to(DEV)
    wu, wg, wd = make_experts(E, d, H, True, g)
    out = torch.randn(N, d, generator=g).to(DEV)

    def call(**kw):
        args = dict(x=x, ids=ids, weights=w, w_up=wu, w_gate=wg, w_down=wd, activation="silu", out=out)
        args.update(kw)
        return grouped_expert_ffn(**args)

    with pytest.raises(TypeError, match="ids has dtype int64"):
        call(ids=ids.long())
    with pytest.raises(TypeError, match="weights has dtype float16"):
        call(weights=w.half())
    with pytest.raises(TypeError, match="x has dtype float64"):
        call(x=x.double())
    with pytest.raises(TypeError, match="w_down dtype"):
        call(w_down=wd.half())
    with pytest.raises(ValueError, match="w_up must be"):
        call(w_up=wu[:, :-1].contiguous(), w_gate=None)
    with pytest.raises(ValueError, match="w_gate must have the shape"):
        call(w_gate=wg[:, :, :-1].contiguous())
    with pytest.raises(ValueError, match="w_down must be"):
        call(w_down=wd.transpose(1, 2).contiguous())
    with pytest.raises(ValueError, match="ids must have one row per token"):
        call(ids=ids[:-1].contiguous())
    with pytest.raises(ValueError, match="weights must have the shape of ids"):
        call(weights=torch.rand(N, 2, generator=g).to(DEV))
    with pytest.raises(ValueError, match="out must be"):
        call(out=out[:, :-1].contiguous())
    with pytest.raises(ValueError, match="contiguous"):
        call(out=torch.randn(d, N, generator=g).to(DEV).T)
    with pytest.raises(ValueError, match="contiguous"):
        call(x=torch.randn(d, N, generator=g).to(DEV).T)
    with pytest.raises(ValueError, match="activation"):
        call(activation="tanh")
    with pytest.raises(ValueError, match="3-D"):
        call(w_up=wu[0])
    with pytest.raises(ValueError, match="scale"):
        call(scale=float("inf"))
    before = out.clone()
    with pytest.raises(ValueError):
        call(out=out.clone()[:, :-1].contiguous())
    assert torch.equal(out, before), "a rejected call must not launch anything"


@pytest.mark.skipif(CUDA, reason="checks the CPU-without-interpreter message")
def test_cpu_tensors_need_interpreter(monkeypatch):
    import importlib

    import lemoe_engine.kernels._common as common
    route_module = importlib.import_module("lemoe_engine.kernels.anchor_route")
    monkeypatch.setattr(route_module, "is_interpreted", lambda kernel: False)
    g = gen(19_101)
    with pytest.raises(ValueError, match="need CUDA tensors"):
        anchor_route(unit(2, 4, g), unit(3, 4, g), torch.zeros(3), 1, 1.0)
    assert common.is_interpreted(route_module._anchor_route_kernel)


def test_align_rows_layout_and_grid_bound():
    """The sorted layout covers every valid slot exactly once, blocks never straddle experts,
    and the used blocks never exceed the shape-only grid bound."""
    from lemoe_engine.kernels.grouped_ffn import align_rows, max_row_blocks
    g = gen(19_201)
    cases = [(1, 1, 1, 16), (5, 3, 2, 16), (200, 2, 7, 64), (37, 4, 1000, 16), (64, 1, 1, 64), (300, 1, 3, 64)]
    for N, k, E, bm in cases:
        ids = torch.randint(-1, E + 1, (N, k), generator=g, dtype=torch.int32)  # incl. -1 and E
        if E == 1000:
            ids = torch.randperm(N * k, generator=g).reshape(N, k).to(torch.int32)   # one row per expert
        nb = max_row_blocks(N * k, E, bm)
        sorted_slot, start, blk_end, block_expert = align_rows(ids, E, bm, nb)
        flat = ids.reshape(-1).long()
        valid = (flat >= 0) & (flat < E)
        used = int(blk_end[-1])
        assert used <= nb
        counts = torch.bincount(flat[valid], minlength=E)
        assert torch.equal((start[1:] - start[:-1]).long(), counts)
        assert used == int(((counts + bm - 1) // bm).sum())
        assert (block_expert[used:] == E).all() and (block_expert[:used] < E).all()
        seen = []
        for b in range(used):
            e = int(block_expert[b])
            first = int(blk_end[e]) - (int(start[e + 1] - start[e]) + bm - 1) // bm
            rows = range(int(start[e]) + (b - first) * bm, min(int(start[e]) + (b - first + 1) * bm, int(start[e + 1])))
            assert len(rows) > 0
            for r in rows:
                slot = int(sorted_slot[r])
                assert int(flat[slot]) == e
                seen.append(slot)
        assert sorted(seen) == valid.nonzero().flatten().tolist()


@pytest.mark.parametrize("gated,activation,H", [(True, "silu", 24), (False, "gelu", 20), (True, "relu", 33)])
def test_padded_expert_hidden_is_exact(gated, activation, H):
    """H not a multiple of 16 is zero-padded for the kernels: same result as the float64
    reference of the unpadded experts (zero columns/rows are exact for silu, gelu, relu)."""
    from lemoe_engine.kernels import pad_expert_hidden
    g = gen(19_401 + H)
    N, d, E, k = 30, 40, 4, 2
    x = torch.randn(N, d, generator=g).to(DEV)
    ids = random_ids(N, k, E, g, p_gated=0.2)
    weights = torch.rand(N, k, generator=g).to(DEV)
    w_up, w_gate, w_down = make_experts(E, d, H, gated, g)
    pu, pg, pd = pad_expert_hidden(w_up, w_gate, w_down)
    assert pu.shape[2] % 16 == 0 and pu.shape[2] >= H and pd.shape[1] == pu.shape[2]
    assert torch.equal(pu[:, :, :H], w_up) and (pu[:, :, H:] == 0).all() and (pd[:, H:] == 0).all()
    assert pad_expert_hidden(pu, pg, pd)[0] is pu      # already padded: no copy
    out = torch.randn(N, d, generator=g).to(DEV)
    before = out.clone()
    grouped_expert_ffn(x, ids, weights, pu, pg, pd, activation, out, 0.7)
    ref = ffn_delta_ref64(x, ids, weights, w_up, w_gate, w_down, activation, 0.7)
    assert rel_err(out.double().cpu() - before.double().cpu(), ref) < 1e-5


def test_every_launch_runs_under_the_tensors_device_guard(monkeypatch):
    """Launches go to the tensors' device (not the current CUDA device): each wrapper enters
    ``device_guard(device)`` around all its launches."""
    import contextlib
    import importlib

    from launch_count import count_launches
    from lemoe_engine.kernels._common import device_guard
    guard = device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(device_guard(torch.device("cpu")), contextlib.nullcontext)

    active = []

    @contextlib.contextmanager
    def recording(device):
        active.append(device)
        try:
            yield
        finally:
            active.pop()

    for name in ("anchor_route", "grouped_ffn"):
        monkeypatch.setattr(importlib.import_module(f"lemoe_engine.kernels.{name}"), "device_guard", recording)
    outside = []
    g = gen(19_501)
    q, a = unit(5, 16, g), unit(7, 16, g)
    x = torch.randn(5, 24, generator=g).to(DEV)
    w_up, w_gate, w_down = make_experts(7, 24, 32, True, g)
    with count_launches(lambda name: outside.append(name) if not active or active[-1] != q.device else None) as log:
        ids, w = anchor_route(q, a, torch.full((7,), -math.inf, device=DEV), 2, 0.5)
        grouped_expert_ffn(x, ids, w, w_up, w_gate, w_down, "silu", torch.randn(5, 24, generator=g).to(DEV))
    launched = [n for n in log if n.startswith("triton.")]
    assert len(launched) == 4, launched   # route, up, down, combine
    assert outside == [], f"launched outside the device guard: {outside}"


# --------------------------------------------------------------------------- GPU only
@gpu
@needs_cuda
def test_gpu_rejects_cpu_and_mixed_devices():
    g = gen(19_301)
    q, a = unit(3, 8, g), unit(2, 8, g)
    thr = torch.zeros(2, device=DEV)
    with pytest.raises(ValueError, match="need CUDA tensors"):
        anchor_route(q.cpu(), a.cpu(), thr.cpu(), 1, 1.0)
    with pytest.raises(ValueError, match="one device"):
        anchor_route(q, a.cpu(), thr, 1, 1.0)
    w_up, w_gate, w_down = make_experts(2, 8, 16, True, g)
    ids = torch.zeros(3, 1, dtype=torch.int32, device=DEV)
    with pytest.raises(ValueError, match="one device"):
        grouped_expert_ffn(q.cpu(), ids, torch.ones(3, 1, device=DEV), w_up, w_gate, w_down, "silu",
                           torch.zeros(3, 8, device=DEV))


@gpu
@pytest.mark.skipif(not CUDA or torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_gpu_second_device_while_current_is_first():
    """Tensors on cuda:1 while cuda:0 is current (device_map="auto"): correct results."""
    g = gen(19_601)
    dev = torch.device("cuda", 1)
    torch.cuda.set_device(0)
    q = unit(9, 32, g).to(dev)
    a = unit(6, 32, g).to(dev)
    thr = torch.full((6,), -math.inf, device=dev)
    ids, w = anchor_route(q, a, thr, 2, 0.5)
    rid, rw, clear = route_ref64(q, a, thr, 2, 0.5)
    assert torch.equal(ids.cpu().long()[clear], rid[clear])
    x = torch.randn(9, 64, generator=g).to(dev)
    w_up, w_gate, w_down = (t.to(dev) for t in make_experts(6, 64, 64, True, g))
    out = torch.randn(9, 64, generator=g).to(dev)
    before = out.clone()
    grouped_expert_ffn(x, ids, w, w_up, w_gate, w_down, "silu", out)
    ref = ffn_delta_ref64(x, ids, w, w_up, w_gate, w_down, "silu", 1.0)
    assert rel_err(out.double().cpu() - before.double().cpu(), ref) < 1e-5


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_route_large(dtype):
    g = gen(20_001)
    for S, E, D, k in [(8192, 64, 128, 2), (3, 4099, 576, 4), (1000, 700, 1000, 3)]:
        q, a = unit(S, D, g, dtype), unit(E, D, g, dtype)
        thr = (torch.rand(E, generator=g) * 0.1 - 0.05).to(DEV)
        ids, w = anchor_route(q, a, thr, k, 0.2)
        rid, rw, clear = route_ref64(q, a, thr, k, 0.2)
        assert clear.float().mean() > 0.9
        assert torch.equal(ids.cpu().long()[clear], rid[clear])
        assert rel_err(w[clear], rw[clear]) < 1e-5


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("N,top_k", [(1, 1), (7, 2), (300, 1), (3000, 2)])
def test_gpu_ffn_large(dtype, N, top_k):
    g = gen(21_001 + N + top_k)
    d, H, E = 576, 1536, 9
    x = torch.randn(N, d, generator=g).to(dtype).to(DEV)
    ids = random_ids(N, top_k, E, g, p_gated=0.1)
    weights = torch.rand(N, top_k, generator=g).to(DEV)
    w_up, w_gate, w_down = make_experts(E, d, H, True, g, dtype)
    out = torch.randn(N, d, generator=g).to(dtype).to(DEV)
    check_ffn(x, ids, weights, w_up, w_gate, w_down, "silu", out)


@gpu
@needs_cuda
@pytest.mark.parametrize("top_k", [1, 2])
def test_gpu_cuda_graph_capture_and_replay(top_k):
    """route + FFN captured once (preallocated buffers), replayed on new inputs: results equal
    fresh eager kernel calls bit for bit (both kernels are deterministic)."""
    g = gen(22_001 + top_k)
    N, D, d, H, E, dtype = 4, 64, 256, 512, 6, torch.bfloat16
    a = unit(E, D, g)
    thr = torch.full((E,), -0.2, device=DEV)
    w_up, w_gate, w_down = make_experts(E, d, H, True, g, dtype)
    q = unit(N, D, g)
    x = torch.randn(N, d, generator=g).to(dtype).to(DEV)
    out = torch.randn(N, d, generator=g).to(dtype).to(DEV)
    ids = torch.empty(N, top_k, dtype=torch.int32, device=DEV)
    w = torch.empty(N, top_k, dtype=torch.float32, device=DEV)

    def step():
        anchor_route(q, a, thr, top_k, 0.5, out_ids=ids, out_weights=w)
        grouped_expert_ffn(x, ids, w, w_up, w_gate, w_down, "silu", out, 0.9)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            step()   # warm-up compiles the kernels outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for _ in range(3):
        q.copy_(unit(N, D, g))
        x.copy_(torch.randn(N, d, generator=g).to(dtype))
        start = torch.randn(N, d, generator=g).to(dtype).to(DEV)
        out.copy_(start)
        graph.replay()
        torch.cuda.synchronize()
        ids_e, w_e = anchor_route(q, a, thr, top_k, 0.5)
        out_e = start.clone()
        grouped_expert_ffn(x, ids_e, w_e, w_up, w_gate, w_down, "silu", out_e, 0.9)
        assert torch.equal(ids, ids_e) and torch.equal(w, w_e)
        assert torch.equal(out, out_e)


def test_pooled_route_token_split_plan_for_empty_and_long_inputs():
    """The compiled-path split plan (the interpreter always takes a few splits): no division by
    zero for an empty batch or anchor table, whole tiles per split, none empty, enough programs."""
    from lemoe_engine.kernels.pooled_route import MAX_SPLITS, _token_splits, pooled_route_config
    for B, T, M in ((0, 10, 8), (3, 10, 0), (1, 2048, 4), (64, 512, 4096), (1, 1, 1)):
        cfg = pooled_route_config(B, T, M, max(M, 1), 256, torch.float32, interpreted=False)
        splits, chunk = _token_splits(B, T, M, cfg, interpreted=False)
        assert 1 <= splits <= MAX_SPLITS and chunk % cfg["BLOCK_T"] == 0
        assert (splits - 1) * chunk < max(T, 1) <= splits * chunk          # every split holds a token
    cfg = pooled_route_config(1, 2048, 4, 1, 256, torch.float32, interpreted=False)
    assert _token_splits(1, 2048, 4, cfg, interpreted=False)[0] >= 32  # one long prompt spreads out
