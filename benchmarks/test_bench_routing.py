"""Routing latency: the fused ``anchor_route`` Triton kernel vs the eager ``route_reference``.

Grid: S (queries) in {1, 8, 64, 512, 4096} x E (anchors) in {1, 5, 64, 1024}, d = 4096,
top_k = 2, temperature 0.1, fp32 unit-norm queries and anchors (as the layer passes them),
random thresholds so that some slots are gated.

* triton rows: GPU only (the CPU interpreter is no speed figure); skipped with a reason on CPU.
* eager rows: everywhere; on CPU the S = 4096 rows are left to the GPU run to keep CPU time short.

Every case checks its result against a float64 recomputation written in benchlib (ids
exactly, weights to 1e-5, on rows without near-ties), and triton rows also against the eager
reference on the same inputs.
"""

from __future__ import annotations

import pytest
import torch

import benchlib
from benchlib import CUDA, DEV
from lemoe_engine.routing import route_reference

D = 4096
TOP_K = 2
TEMPERATURE = 0.1
S_GRID = (1, 8, 64, 512, 4096)
E_GRID = (1, 5, 64, 1024)
CPU_MAX_S = 512

gpu_only = [pytest.mark.gpu]
gpu_size = [pytest.mark.gpu, pytest.mark.skipif(
    not CUDA, reason="full-size eager case: measured in the GPU run (the CPU run uses S <= 512)")]


def _cases():
    for S in S_GRID:
        for E in E_GRID:
            yield pytest.param(S, E, "triton", marks=gpu_only, id=f"triton-S{S}-E{E}")
            marks = gpu_size if S > CPU_MAX_S else []
            yield pytest.param(S, E, "eager", marks=marks, id=f"eager-S{S}-E{E}")


def _inputs(S: int, E: int):
    g = torch.Generator().manual_seed(1000 * S + E)
    queries = benchlib.unit_rows(S, D, g)
    anchors = benchlib.unit_rows(E, D, g)
    # cosine scores of random 4096-d unit vectors are ~N(0, 1/64): thresholds in this band
    # gate some of the chosen slots and let others through
    thresholds = ((torch.rand(E, generator=g) * 0.06) - 0.02).to(DEV)
    return queries, anchors, thresholds


@pytest.mark.parametrize("S,E,backend", list(_cases()))
def test_routing_latency(benchmark, bench_rows, request, S, E, backend):
    queries, anchors, thresholds = _inputs(S, E)
    if backend == "triton":
        from lemoe_engine.kernels import anchor_route

        ids = torch.empty((S, TOP_K), dtype=torch.int32, device=DEV)
        weights = torch.empty((S, TOP_K), dtype=torch.float32, device=DEV)

        def op():
            return anchor_route(queries, anchors, thresholds, TOP_K, TEMPERATURE,
                                out_ids=ids, out_weights=weights)
    else:
        def op():
            return route_reference(queries, anchors, thresholds, TOP_K, TEMPERATURE)

    def timed():
        result = op()
        benchlib.sync()
        return result

    benchmark.group = f"routing S={S}"
    benchmark.extra_info.update(S=S, E=E, d=D, top_k=TOP_K, backend=backend)
    if backend == "triton":
        ids.fill_(-7)  # poison: every element must be written
        weights.fill_(float("nan"))
    got_ids, got_weights = benchmark(timed)

    checks = benchlib.check_route_float64(queries, anchors, thresholds, TOP_K, TEMPERATURE,
                                          got_ids, got_weights)
    assert got_ids.dtype == torch.int32 and got_weights.dtype == torch.float32
    assert bool(((got_ids >= -1) & (got_ids < E)).all())
    assert not bool(torch.isnan(got_weights).any())
    if backend == "triton":
        ref_ids, ref_weights = route_reference(queries, anchors, thresholds, TOP_K, TEMPERATURE)
        agree = (got_ids == ref_ids).all(dim=1).float().mean().item()
        assert agree >= 0.99, f"triton and eager ids agree on only {agree:.3f} of rows"
        same = (got_ids == ref_ids).all(dim=1)
        checks["max_weight_diff_vs_eager"] = float((got_weights[same] - ref_weights[same]).abs().max())
        assert checks["max_weight_diff_vs_eager"] < 1e-5

    device_us = benchlib.device_time_us(op) if (CUDA and benchmark.enabled) else None
    nbytes = (S * D + E * D) * 4 + E * 4 + S * TOP_K * 8
    flops = 2 * S * E * D
    bench_rows.add(benchmark, section="routing", case=f"S{S}-E{E}", backend=backend,
                   dtype=torch.float32, shapes={"S": S, "E": E, "d": D, "top_k": TOP_K},
                   checks=checks, device_us=device_us, request=request,
                   extra=benchlib.roofline_fields(nbytes, flops, torch.float32, device_us))


# --------------------------------------------------------------------------- default routing
# The default configuration: max pooling over the prompt's tokens, several anchors per expert
# (``pooled_route``: 2 launches) vs the eager path the layer runs without kernels. One sequence
# (B = 1) of T prompt tokens, E experts with ANCHORS_PER_EXPERT anchors each, d = 4096.
T_GRID = (8, 64, 512, 2048)
EXPERT_GRID = (1, 64, 1024, 4096)
ANCHORS_PER_EXPERT = 4
CPU_MAX_WORK = 64 * 64 * ANCHORS_PER_EXPERT  # T x M on the CPU (the rest is the GPU run's)


WINDOW_GRID = (1, 3)  # 1: one-token keys (adaptor formats 1-3); 3: the default key windows (format 4)


def _default_cases():
    for W in WINDOW_GRID:
        for T in T_GRID:
            for E in EXPERT_GRID:
                yield pytest.param(T, E, W, "triton", marks=gpu_only, id=f"triton-T{T}-E{E}-W{W}")
                marks = gpu_size if T * E * ANCHORS_PER_EXPERT * W > CPU_MAX_WORK else []
                yield pytest.param(T, E, W, "eager", marks=marks, id=f"eager-T{T}-E{E}-W{W}")


def _default_inputs(T: int, E: int, W: int):
    """Queries [W, 1, T, d] (``W == 1``: [1, T, d]): unit token vectors and, for each window w,
    their unit means over the token and the w - 1 prompt tokens before it (``window_mean``), as
    ``routing.token_queries`` makes them; anchor windows drawn from 1..W."""
    from lemoe_engine.routing import l2_normalize, window_mean
    g = torch.Generator().manual_seed(7000 + 10 * T + E + 100000 * W)
    M = E * ANCHORS_PER_EXPERT
    tokens = benchlib.unit_rows(T, D, g).reshape(1, T, D)
    mask = torch.ones(1, T, dtype=torch.int64, device=DEV)
    mask[0, : T // 8] = 0                         # left padding: not part of the prompt
    anchors = benchlib.unit_rows(M, D, g)
    owner = torch.arange(E, device=DEV, dtype=torch.int32).repeat_interleave(ANCHORS_PER_EXPERT)
    thresholds = ((torch.rand(M, generator=g) * 0.06) + 0.02).to(DEV)
    if W == 1:
        return tokens, mask, anchors, owner, thresholds, None
    queries = torch.stack([l2_normalize(window_mean(tokens, mask, w)) for w in range(1, W + 1)])
    window = torch.randint(1, W + 1, (M,), generator=g, dtype=torch.int32).to(DEV)
    return queries, mask, anchors, owner, thresholds, window


@pytest.mark.parametrize("T,E,W,backend", list(_default_cases()))
def test_default_routing_latency(benchmark, bench_rows, request, T, E, W, backend):
    from lemoe_engine.routing import expert_starts, route_scores, window_order, window_scores
    queries, mask, anchors, owner, thresholds, window = _default_inputs(T, E, W)
    M = anchors.shape[0]

    def eager_scores():
        scores = queries @ anchors.T if window is None else window_scores(queries, anchors, window)
        return scores.masked_fill(mask.unsqueeze(-1) == 0, float("-inf")).max(dim=1).values
    if backend == "triton":
        from lemoe_engine.kernels import pooled_route, pooled_route_scratch_shape

        start = expert_starts(owner, E)
        ids = torch.empty((1, TOP_K), dtype=torch.int32, device=DEV)
        weights = torch.empty((1, TOP_K), dtype=torch.float32, device=DEV)
        scratch = torch.empty(pooled_route_scratch_shape(queries, mask, anchors, start, window), dtype=torch.float32,
                              device=DEV)
        order = window_order(window) if window is not None else None  # kept by the layer between prompts

        def op():
            return pooled_route(queries, mask, anchors, start, thresholds, TOP_K, TEMPERATURE,
                                out_ids=ids, out_weights=weights, scratch=scratch, anchor_window=window,
                                anchor_order=order)
    else:
        def op():
            return route_scores(eager_scores(), thresholds, owner, E, TOP_K, TEMPERATURE)

    def timed():
        result = op()
        benchlib.sync()
        return result

    benchmark.group = f"default routing T={T} W={W}"
    benchmark.extra_info.update(T=T, E=E, M=M, W=W, d=D, top_k=TOP_K, backend=backend)
    if backend == "triton":
        ids.fill_(-7)
        weights.fill_(float("nan"))
    got_ids, got_weights = benchmark(timed)
    checks = benchlib.check_pooled_route_float64(queries, mask, anchors, owner, E, thresholds, TOP_K,
                                                 TEMPERATURE, got_ids, got_weights, anchor_window=window)
    if backend == "triton":
        ref_ids, ref_weights = route_scores(eager_scores(), thresholds, owner, E, TOP_K, TEMPERATURE)
        assert torch.equal(got_ids, ref_ids) or not checks["rows_checked"]
    device_us = benchlib.device_time_us(op) if (CUDA and benchmark.enabled) else None
    # each anchor reads the queries of its own window: W x T x d read at most once per anchor tile
    nbytes = (W * T * D + M * D) * 4 + M * 4 * (3 if W > 1 else 2) + M * 4 + TOP_K * 8
    flops = 2 * T * M * D
    bench_rows.add(benchmark, section="routing_default", case=f"T{T}-E{E}x{ANCHORS_PER_EXPERT}-W{W}",
                   backend=backend, dtype=torch.float32,
                   shapes={"B": 1, "T": T, "E": E, "M": M, "W": W, "d": D, "top_k": TOP_K, "pooling": "max"},
                   checks=checks, device_us=device_us, request=request,
                   extra=benchlib.roofline_fields(nbytes, flops, torch.float32, device_us))
