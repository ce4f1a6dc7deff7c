"""Layer latency: the LEMoE layer (base LLaMA MLP + routed experts) with the Triton backend,
with the eager backend, and the bare base MLP.

Shape sets:

* ``llama7b`` (GPU only, marked ``gpu``): LLaMA-2-7B's MLP (d = 4096, intermediate 11008),
  bf16, experts of hidden 1024 and 11008, E in {5, 64}, top_k in {1, 2}; decode steps of
  1, 8, 64 sequences (x = [B, 1, d]) and prefill of 512 and 4096 tokens (8 sequences of
  64 / 512 tokens).
* ``small`` (everywhere; what CI exercises): d = 576, intermediate 1536 (SmolLM2-135M's MLP),
  fp32, experts of hidden 1024, E = 5, top_k in {1, 2}, 1 / 8 / 64 decode tokens. Its triton
  rows need a GPU too.

The base MLP is a transformers ``LlamaMLP`` from a ``LlamaConfig`` (random weights); the
layer routes on its own input (``query_source='hidden'``, sequence routing) with the gate
off, so every token gets top_k experts. Experts are random and non-zero.

Checks: the base row checks that the layer with its adaptor disabled is bit-identical to the
bare MLP and that the MLP matches an explicit down(silu(gate x) * up x); every layer row
checks sampled tokens against an fp32 recomputation written here (routing from
``route_reference``, expert FFNs by hand); triton rows also check the whole output against
the eager backend.
"""

from __future__ import annotations

import gc

import pytest
import torch
import torch.nn.functional as F

import benchlib
from benchlib import CUDA, DEV, free_memory
from lemoe_engine import LEMoELayer
from lemoe_engine.layer import RouteContext

SHAPES = {
    "llama7b": dict(d=4096, mlp=11008, dtype=torch.bfloat16, tokens=(1, 8, 64, 512, 4096),
                    experts=(5, 64), hidden=(1024, 11008), top_k=(1, 2), gpu=True),
    "small": dict(d=576, mlp=1536, dtype=torch.float32, tokens=(1, 8, 64),
                  experts=(5,), hidden=(1024,), top_k=(1, 2), gpu=False),
}
DECODE_MAX = 64          # up to this many tokens: a decode step of that many sequences
PREFILL_SEQUENCES = 8    # prefill: this many sequences of tokens / 8 each
SAMPLE_ROWS = 6

gpu = pytest.mark.gpu


def _batch_shape(tokens: int) -> tuple[int, int]:
    if tokens <= DECODE_MAX:
        return tokens, 1
    return PREFILL_SEQUENCES, tokens // PREFILL_SEQUENCES


def _phase(tokens: int) -> str:
    return "decode" if tokens <= DECODE_MAX else "prefill"


# one base MLP per shape set and one expert stack at a time (64 x 3 x 4096 x 11008 bf16 is
# 17 GB): the cases below are ordered so that consecutive cases share them
_CACHE: dict = {}


@pytest.fixture(scope="module", autouse=True)
def _free_cache():
    yield
    free_memory(_CACHE)


def _base(shape: str):
    if _CACHE.get("base_key") != shape:
        free_memory(_CACHE)
        s = SHAPES[shape]
        _CACHE["base_key"] = shape
        _CACHE["base"] = benchlib.llama_mlp(s["d"], s["mlp"], s["dtype"], seed=1)
    return _CACHE["base"]


def _layer(shape: str, experts: int, hidden: int) -> LEMoELayer:
    mlp = _base(shape)
    key = (shape, experts, hidden)
    if _CACHE.get("layer_key") != key:
        _CACHE.pop("layer", None)
        gc.collect()
        if CUDA:
            torch.cuda.empty_cache()
        config = benchlib.lemoe_config(query_source="hidden", expert_hidden=hidden, gate=False,
                                       backend="eager")
        layer = LEMoELayer(mlp, SHAPES[shape]["d"], config).eval()
        benchlib.fill_random_experts(layer, experts, seed=experts * 7919 + hidden)
        _CACHE["layer_key"], _CACHE["layer"] = key, layer
    return _CACHE["layer"]


def _inputs(shape: str, tokens: int) -> torch.Tensor:
    s = SHAPES[shape]
    g = torch.Generator(device=DEV).manual_seed(tokens * 31 + s["d"])
    return torch.randn(*_batch_shape(tokens), s["d"], generator=g, device=DEV, dtype=s["dtype"])


def _base_cases():
    for shape, s in SHAPES.items():
        for tokens in s["tokens"]:
            marks = [gpu] if s["gpu"] else []
            yield pytest.param(shape, tokens, marks=marks, id=f"{shape}-base-T{tokens}")


def _layer_cases():
    for shape, s in SHAPES.items():
        for hidden in s["hidden"]:
            for experts in s["experts"]:
                for top_k in s["top_k"]:
                    for tokens in s["tokens"]:
                        for backend in ("triton", "eager"):
                            marks = [gpu] if (s["gpu"] or backend == "triton") else []
                            yield pytest.param(shape, hidden, experts, top_k, tokens, backend, marks=marks,
                                               id=f"{shape}-{backend}-H{hidden}-E{experts}-k{top_k}-T{tokens}")


GRAPH = "triton-graph"  # the triton decode step captured in a CUDA graph and replayed


def _step_cases():
    """Decode steps that reuse the route kept at prefill (the serving path): hidden 1024 only."""
    for shape, s in SHAPES.items():
        for experts in s["experts"]:
            for top_k in s["top_k"]:
                for tokens in (t for t in s["tokens"] if t <= DECODE_MAX):
                    for backend in ("triton", "eager", GRAPH):
                        marks = [gpu] if (s["gpu"] or backend != "eager") else []
                        yield pytest.param(shape, s["hidden"][0], experts, top_k, tokens, backend, marks=marks,
                                           id=f"{shape}-step-{backend}-H{s['hidden'][0]}-E{experts}-k{top_k}-B{tokens}")


def _shapes(shape: str, tokens: int, **more) -> dict:
    s = SHAPES[shape]
    batch, length = _batch_shape(tokens)
    return {"set": shape, "phase": _phase(tokens), "tokens": tokens, "batch": batch, "seq": length,
            "d": s["d"], "mlp": s["mlp"], **more}


def _timed(fn):
    def run():
        out = fn()
        benchlib.sync()
        return out
    return run


@pytest.mark.parametrize("shape,tokens", list(_base_cases()))
def test_base_mlp_latency(benchmark, bench_rows, request, shape, tokens):
    s = SHAPES[shape]
    mlp = _base(shape)
    x = _inputs(shape, tokens)

    def op():
        with torch.inference_mode():
            return mlp(x)

    benchmark.group = f"layer {shape} T={tokens}"
    out = benchmark(_timed(op))

    # the layer with its adaptor disabled is the bare MLP, bit for bit
    wrapper = LEMoELayer(mlp, s["d"], benchlib.lemoe_config(query_source="hidden", expert_hidden=16))
    wrapper.add_expert(torch.ones(wrapper.anchors.shape[1], device=DEV), trainable=False)
    wrapper.disabled = True
    with torch.inference_mode():
        assert torch.equal(wrapper(x), out)
        ref = mlp.down_proj(F.silu(mlp.gate_proj(x).float()).to(x.dtype) * mlp.up_proj(x))
    err = benchlib.rel_err(out.float(), ref.float())
    assert err < benchlib.DELTA_TOL[s["dtype"]], err

    device_us = benchlib.device_time_us(op) if (CUDA and benchmark.enabled) else None
    esize = torch.finfo(s["dtype"]).bits // 8
    nbytes = benchlib.module_bytes(mlp) + 2 * x.numel() * esize
    flops = 2 * tokens * s["d"] * s["mlp"] * 3
    bench_rows.add(benchmark, section="layer", case=f"{shape}-base-T{tokens}", backend="base",
                   dtype=s["dtype"], shapes=_shapes(shape, tokens), checks={"rel_err_vs_formula": err},
                   device_us=device_us, request=request,
                   extra=benchlib.roofline_fields(nbytes, flops, s["dtype"], device_us))


def _route_by_hand(layer: LEMoELayer, x: torch.Tensor):
    """float64 routing of a standalone layer (query = its input, mean-pooled per sequence, gate
    off), written here: ids [B, k], weights [B, k], and which sequences have no near-tie."""
    config, enc = layer.config, layer.query_encoder
    v = x.double().mean(dim=1) - enc.center.double()
    if enc.has_projection:
        v = F.silu(v @ enc.down.double()) @ enc.up.double()
    q = v / v.norm(dim=-1, keepdim=True)
    scores = q @ layer.anchors.double().T
    k = min(config.top_k, scores.shape[1])
    ordered, order = torch.sort(scores, dim=1, descending=True)
    weights = torch.softmax(ordered[:, :k] / config.temperature, dim=1)
    robust = torch.ones(scores.shape[0], dtype=torch.bool, device=x.device)
    if scores.shape[1] > k:
        robust &= (ordered[:, :k + 1][:, :-1] - ordered[:, :k + 1][:, 1:]).min(dim=1).values > 1e-5
    elif k > 1:
        robust &= (ordered[:, :-1] - ordered[:, 1:]).min(dim=1).values > 1e-5
    return order[:, :k], weights, robust


def _expected_rows(layer: LEMoELayer, x: torch.Tensor, generator: torch.Generator,
                   prompt: torch.Tensor | None = None):
    """fp32 expert deltas of up to SAMPLE_ROWS flattened rows (of sequences routed without a
    near-tie), with routing and expert FFNs computed here by hand; sequences are routed by
    ``prompt`` when given (a decode step reusing its prefill's route), else by ``x``."""
    assert layer.config.expert_gated and layer.config.expert_activation == "silu"
    ids, weights, robust = _route_by_hand(layer, x if prompt is None else prompt)
    length = x.shape[1]
    candidates = torch.nonzero(robust.repeat_interleave(length)).flatten().cpu()
    assert len(candidates) > 0, "every sequence has a near-tie: nothing to check"
    rows = candidates[torch.randperm(len(candidates), generator=generator)[:SAMPLE_ROWS]].sort().values
    flat = x.reshape(-1, x.shape[-1]).float()
    deltas = []
    for n in rows.tolist():
        seq = n // length
        xi = flat[n]
        delta = torch.zeros(x.shape[-1], device=x.device, dtype=torch.float32)
        for j in range(ids.shape[1]):
            e = int(ids[seq, j])
            h = F.silu(xi @ layer.w_gate[e].float()) * (xi @ layer.w_up[e].float())
            delta += float(weights[seq, j]) * (h @ layer.w_down[e].float())
        deltas.append(layer.config.scale * delta)
    return rows.to(x.device), torch.stack(deltas), ids


def _check_output(layer: LEMoELayer, x: torch.Tensor, out: torch.Tensor, backend: str,
                  generator: torch.Generator, prompt: torch.Tensor | None = None):
    """The layer's output for ``x`` against an fp32 recomputation of sampled rows (routed by
    ``prompt`` when given: a decode step on a kept route) and, for triton, against the eager
    backend on the whole output. Returns the checks and the route's expert ids."""
    with torch.inference_mode():
        assert layer._use_kernels(x) == (backend == "triton")  # the backend under test really ran
        base = layer.base_layer(x)
        n_rows = x.shape[0] * x.shape[1]
        rows, expected, ids = _expected_rows(layer, x, generator, prompt)
        got = (out.reshape(n_rows, -1)[rows] - base.reshape(n_rows, -1)[rows]).float()
        tol = benchlib.DELTA_TOL[x.dtype]
        checks = {"rel_err_sampled_rows_vs_fp32": benchlib.rel_err(got, expected)}
        assert float(expected.norm()) > 0, "the experts added nothing: nothing was checked"
        assert checks["rel_err_sampled_rows_vs_fp32"] < tol, checks
        if backend == "triton":
            layer.config.backend = "eager"
            eager = layer(x)  # the same route (kept or fresh), the eager expert FFN
            layer.config.backend = backend
            checks["rel_err_delta_vs_eager"] = benchlib.rel_err((out - base).float(), (eager - base).float())
            assert checks["rel_err_delta_vs_eager"] < tol, checks
        assert torch.isfinite(out).all()
    return checks, ids


@pytest.mark.parametrize("shape,hidden,experts,top_k,tokens,backend", list(_layer_cases()))
def test_layer_latency(benchmark, bench_rows, request, shape, hidden, experts, top_k, tokens, backend):
    s = SHAPES[shape]
    layer = _layer(shape, experts, hidden)
    layer.config.top_k = top_k
    layer.config.backend = backend
    layer._sequence_route = None
    x = _inputs(shape, tokens)

    def op():
        with torch.inference_mode():
            return layer(x)

    benchmark.group = f"layer {shape} T={tokens}"
    benchmark.extra_info.update(hidden=hidden, experts=experts, top_k=top_k, backend=backend)
    out = benchmark(_timed(op))
    checks, ids = _check_output(layer, x, out, backend, torch.Generator().manual_seed(tokens + 17 * experts + top_k))

    device_us = benchlib.device_time_us(op) if (CUDA and benchmark.enabled) else None
    esize = torch.finfo(s["dtype"]).bits // 8
    routed_slots = int((ids >= 0).sum()) * x.shape[1]  # sequence routing: one route per sequence
    per_slot = len(layer.weight_names) * s["d"] * hidden
    nbytes = (benchlib.module_bytes(layer.base_layer) + benchlib.expert_bytes(layer, ids)
              + benchlib.query_bytes(layer) + 2 * x.numel() * esize)
    flops = 2 * tokens * s["d"] * s["mlp"] * 3 + 2 * routed_slots * per_slot
    checks["experts_touched"] = int(torch.unique(ids[ids >= 0]).numel())
    bench_rows.add(benchmark, section="layer", case=f"{shape}-H{hidden}-E{experts}-k{top_k}-T{tokens}",
                   backend=backend, dtype=s["dtype"],
                   shapes=_shapes(shape, tokens, experts=experts, expert_hidden=hidden, top_k=top_k,
                                  **benchlib.config_summary(layer.config)),
                   checks=checks, device_us=device_us, request=request,
                   extra=benchlib.roofline_fields(nbytes, flops, s["dtype"], device_us))


STEP_PROMPT = 16  # prompt tokens per sequence routed at the prefill before the timed decode step


@pytest.mark.parametrize("shape,hidden,experts,top_k,tokens,backend", list(_step_cases()))
def test_layer_decode_step_latency(benchmark, bench_rows, request, shape, hidden, experts, top_k, tokens, backend):
    """One decode step of B sequences (x = [B, 1, d]) that reuses the route kept from their
    prefill, as a model's forward does after the prompt (``RouteContext(continuing=True)``):
    no routing work, only the expert FFN on top of the base MLP. ``triton-graph``: the same
    step captured once in a CUDA graph and replayed (no host work per step: what a serving
    engine with CUDA graphs pays), beside the bare base MLP captured the same way."""
    s = SHAPES[shape]
    graphed = backend == GRAPH
    backend = "triton" if graphed else backend
    layer = _layer(shape, experts, hidden)
    layer.config.top_k = top_k
    layer.config.backend = backend
    layer._sequence_route = None
    g = torch.Generator(device=DEV).manual_seed(tokens * 131 + s["d"] + top_k)
    prompt = torch.randn(tokens, STEP_PROMPT, s["d"], generator=g, device=DEV, dtype=s["dtype"])
    x = torch.randn(tokens, 1, s["d"], generator=g, device=DEV, dtype=s["dtype"])

    def op():
        with torch.inference_mode():
            return layer(x)

    with torch.inference_mode():
        layer(prompt)  # prefill: routes the sequences and keeps the route
    layer.set_route_context(RouteContext(continuing=True))
    extra = {}
    try:
        if graphed:
            with torch.inference_mode():
                op()  # warm-up: kernels compile outside the capture
                graph, out_buffer = torch.cuda.CUDAGraph(), None
                with torch.cuda.graph(graph):
                    out_buffer = layer(x)
                base_graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(base_graph):
                    layer.base_layer(x)

            def op():
                graph.replay()
                return out_buffer
        benchmark.group = f"layer {shape} decode step B={tokens}"
        benchmark.extra_info.update(hidden=hidden, experts=experts, top_k=top_k,
                                    backend=GRAPH if graphed else backend)
        out = benchmark(_timed(op))
        checks, ids = _check_output(layer, x, out.clone(), backend, torch.Generator().manual_seed(tokens + top_k),
                                    prompt)
        device_us = benchlib.device_time_us(op) if (CUDA and benchmark.enabled) else None
        if graphed and device_us is not None:
            extra["base_mlp_graph_us"] = benchlib.device_time_us(base_graph.replay)
            extra["graph_vs_base_mlp"] = device_us / extra["base_mlp_graph_us"]
    finally:
        layer.set_route_context(RouteContext())
        layer._sequence_route = None
    esize = torch.finfo(s["dtype"]).bits // 8
    per_slot = len(layer.weight_names) * s["d"] * hidden
    nbytes = (benchlib.module_bytes(layer.base_layer) + benchlib.expert_bytes(layer, ids) + 2 * x.numel() * esize)
    flops = 2 * tokens * s["d"] * s["mlp"] * 3 + 2 * int((ids >= 0).sum()) * per_slot
    checks["experts_touched"] = int(torch.unique(ids[ids >= 0]).numel())
    shapes = _shapes(shape, tokens, experts=experts, expert_hidden=hidden, top_k=top_k,
                     **benchlib.config_summary(layer.config))
    shapes["phase"] = "decode step"
    bench_rows.add(benchmark, section="layer", case=f"{shape}-step-H{hidden}-E{experts}-k{top_k}-B{tokens}",
                   backend=GRAPH if graphed else backend, dtype=s["dtype"], shapes=shapes, checks=checks,
                   device_us=device_us, request=request,
                   extra={**benchlib.roofline_fields(nbytes, flops, s["dtype"], device_us), **extra})
