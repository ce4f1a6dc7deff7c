"""The layer's kernel path (backend='triton'; Triton's interpreter on CPU): what the kernels
need from the layer and what a GPU run cannot be trusted to show.

* a non-contiguous base MLP output still receives the experts' contribution;
* the sequence route lives in persistent buffers (a captured CUDA graph keeps reading the
  current route) and the cached grouped order follows every new route;
* an ``expert_hidden`` that is not a multiple of 16 is padded for the kernels, exactly;
* a decode step launches at most 3 kernels (counted: torch ops and Triton launches).
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from lemoe_engine import LEMoEConfig, LEMoELayer
from lemoe_engine.layer import RouteContext

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs CUDA or TRITON_INTERPRET=1")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


class TransposedMLP(nn.Module):
    """A base MLP whose output is a non-contiguous (transposed) view."""

    def __init__(self, d: int, g: torch.Generator):
        super().__init__()
        self.w = nn.Parameter(torch.randn(d, d, generator=g) / d ** 0.5, requires_grad=False)

    def forward(self, x):
        return (self.w @ x.transpose(-1, -2)).transpose(-1, -2)   # [B, T, d], strides of [B, d, T]


def _layer(base, d, g, experts=4, **config):
    fields = dict(query_source="hidden", query_pooling="mean", expert_hidden=32, top_k=2,
                  temperature=0.5, backend="triton")
    fields.update(config)
    layer = LEMoELayer(base, d, LEMoEConfig(**fields)).to(DEV)
    for _ in range(experts):
        index = layer.add_expert(anchors=torch.randn(d, generator=g), trainable=False)
        with torch.no_grad():
            for name in layer.weight_names:
                stack = getattr(layer, name)
                stack[index] = (torch.randn(stack.shape[1:], generator=g) * 0.5).to(DEV)
    return layer.eval()


def _delta64(layer, x, ids, weights):
    """float64 expert contribution for given routes ([B*T, k])."""
    flat = x.reshape(-1, x.shape[-1]).double().cpu()
    act = {"silu": torch.nn.functional.silu, "gelu": torch.nn.functional.gelu,
           "relu": torch.nn.functional.relu}[layer.config.expert_activation]
    out = torch.zeros_like(flat)
    for n in range(flat.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[n, j])
            if e < 0:
                continue
            up = flat[n] @ layer.w_up[e].double().cpu()
            h = act(flat[n] @ layer.w_gate[e].double().cpu()) * up if layer.config.expert_gated else act(up)
            out[n] += float(weights[n, j]) * (h @ layer.w_down[e].double().cpu())
    return layer.config.scale * out


def test_non_contiguous_base_output_gets_the_expert_contribution():
    g = torch.Generator().manual_seed(int(torch.seed() % 2**31))
    d = 48
    layer = _layer(TransposedMLP(d, g).to(DEV), d, g, gate=False)
    x = torch.randn(3, 5, d, generator=g).to(DEV)
    with torch.no_grad():
        base = layer.base_layer(x)
        assert not base.is_contiguous()
        out = layer(x)
        ids, weights = layer.route(x)
    assert (ids >= 0).all()
    got = (out.double() - base.double()).reshape(-1, d).cpu()
    ref = _delta64(layer, x, ids, weights)
    assert ref.norm() > 0
    assert ((got - ref).norm() / ref.norm()) < 1e-5


@pytest.mark.parametrize("gate_open", [True, False])
def test_one_sequence_prompt_runs_the_kernels(gate_open):
    """One sequence of several tokens (a chat turn, a single-user prefill): the sequence route
    expanded over its tokens is a stride-0 view, which the kernels refuse; the layer passes
    them contiguous ids and weights, with an open gate and with every gate shut (ids all -1).
    Found on the first GPU run (the 7B prefill at batch 1 raised)."""
    g = torch.Generator().manual_seed(int(torch.seed() % 2**31))
    d = 24
    layer = _layer(nn.Linear(d, d).to(DEV), d, g, gate=True)
    layer.thresholds.fill_(-2.0 if gate_open else 2.0)
    x = torch.randn(1, 7, d, generator=g).to(DEV)
    with torch.no_grad():
        base = layer.base_layer(x)
        out = layer(x)
        ids, weights = layer.route(x)
    assert (ids >= 0).any() == gate_open
    delta = (out - base).reshape(-1, d).double().cpu()
    ref = _delta64(layer, x, ids.cpu(), weights.cpu())
    if gate_open:
        assert float((delta - ref).norm() / ref.norm()) < 1e-5
    else:
        assert torch.equal(out, base)


def test_sequence_route_buffers_are_persistent_and_the_grouped_order_follows():
    from lemoe_engine.kernels import grouped_layout
    g = torch.Generator().manual_seed(int(torch.seed() % 2**31))
    d = 40
    layer = _layer(nn.Linear(d, d).to(DEV), d, g, experts=6, top_k=2, gate=False)
    x1 = torch.randn(4, 7, d, generator=g).to(DEV)
    with torch.no_grad():
        layer(x1)
    ids_buf, w_buf = layer._sequence_route
    layout = layer._route_layout[1]
    pointers = [t.data_ptr() for t in (ids_buf, w_buf, *layout.tensors())]
    x2 = torch.randn(4, 9, d, generator=g).to(DEV)          # a new prompt, the same batch size
    with torch.no_grad():
        layer(x2)
        fresh_ids, fresh_w = layer._route(x2)
    assert layer._sequence_route[0] is ids_buf and layer._sequence_route[1] is w_buf
    assert [t.data_ptr() for t in (ids_buf, w_buf, *layer._route_layout[1].tensors())] == pointers
    assert torch.equal(ids_buf, fresh_ids) and torch.equal(w_buf, fresh_w)
    want = grouped_layout(fresh_ids, layer.w_up)
    for have, expected in zip(layer._route_layout[1].tensors(), want.tensors()):
        assert torch.equal(have, expected)
    # a decode step reuses the route and its grouped order: the result is the float64 one
    layer.set_route_context(RouteContext(continuing=True))
    step = torch.randn(4, 1, d, generator=g).to(DEV)
    with torch.no_grad():
        out = layer(step)
        base = layer.base_layer(step)
    layer.set_route_context(RouteContext())
    got = (out.double() - base.double()).reshape(-1, d).cpu()
    ref = _delta64(layer, step, fresh_ids, fresh_w)
    assert ((got - ref).norm() / ref.norm()) < 1e-5


@pytest.mark.parametrize("gated,activation", [(True, "silu"), (False, "gelu")])
def test_expert_hidden_not_a_multiple_of_16_is_padded_exactly(gated, activation):
    g = torch.Generator().manual_seed(int(torch.seed() % 2**31))
    d = 32
    layer = _layer(nn.Linear(d, d).to(DEV), d, g, expert_hidden=24, expert_gated=gated,
                   expert_activation=activation, gate=False)
    assert layer._kernel_experts()["w_up"].shape[2] == 32 and layer.w_up.shape[2] == 24
    x = torch.randn(2, 6, d, generator=g).to(DEV)
    with torch.no_grad():
        out = layer(x)
        base = layer.base_layer(x)
        ids, weights = layer.route(x)
    got = (out.double() - base.double()).reshape(-1, d).cpu()
    ref = _delta64(layer, x, ids, weights)
    assert ((got - ref).norm() / ref.norm()) < 1e-5


def _several_anchor_layer(g, d=32, experts=6, **config):
    """A standalone layer of the default routing (max pooling), experts with 1-3 anchors."""
    fields = dict(query_source="hidden", expert_hidden=32, top_k=2, temperature=0.3, backend="triton")
    fields.update(config)
    layer = LEMoELayer(nn.Linear(d, d).to(DEV), d, LEMoEConfig(**fields)).to(DEV).eval()
    for _ in range(experts):
        count = int(torch.randint(1, 4, (1,), generator=g))
        index = layer.add_expert(anchors=torch.randn(count, d, generator=g), trainable=False)
        with torch.no_grad():
            for name in layer.weight_names:
                stack = getattr(layer, name)
                stack[index] = (torch.randn(stack.shape[1:], generator=g) * 0.5).to(DEV)
    layer.thresholds.copy_((torch.rand(layer.num_anchors, generator=g) * 0.2 - 0.1).to(DEV))
    return layer


def _clear_rows(layer, x, margin=1e-5):
    """Sequences whose float64 per-expert scores have no near-tie deciding the top-k."""
    enc, mask = layer.query_encoder, layer.prompt_mask(x)
    x, mask = x.cpu(), None if mask is None else mask.cpu()  # float64 on the CPU, whatever DEV is

    def encode(v):
        v = v.double() - enc.center.double().cpu()
        if enc.has_projection:
            v = torch.nn.functional.silu(v @ enc.down.double().cpu()) @ enc.up.double().cpu()
        return v / v.norm(dim=-1, keepdim=True)

    anchors = layer.anchors.double().cpu()
    if layer.config.query_pooling == "mean":
        m = torch.ones(x.shape[:2], dtype=torch.float64) if mask is None else mask.double()
        scores = encode((x.double() * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp_min(1)) @ anchors.T
    else:
        scores = encode(x) @ anchors.T
        if mask is not None:
            scores = scores.masked_fill(mask[:, :, None] == 0, float("-inf"))
        scores = scores.max(1).values
    thr = layer.gate_thresholds().double().cpu()
    near = ((scores - thr).abs() < margin).any(1)
    scores = torch.where(scores >= thr, scores, torch.full_like(scores, float("-inf")))
    per = torch.full((scores.shape[0], layer.num_experts), float("-inf"), dtype=torch.float64)
    per = per.scatter_reduce(1, layer.anchor_expert.long().cpu()[None].expand(scores.shape[0], -1), scores, "amax")
    top = per.sort(1, descending=True).values[:, :layer.config.top_k + 1]
    fin = torch.isfinite(top[:, :-1]) & torch.isfinite(top[:, 1:])
    return ~(fin & ((top[:, :-1] - top[:, 1:]).abs() < margin)).any(1) & ~near


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("pooling", ["max", "mean"])
def test_default_routing_runs_the_fused_kernel_and_matches_eager(pooling):
    """The default config (max pooling, several anchors per expert) and mean pooling with
    several anchors route through ``pooled_route`` (2 launches, no eager scoring) on the
    triton backend, with the eager backend's ids and weights."""
    from launch_count import count_launches
    g = torch.Generator().manual_seed(int(torch.seed() % 2**31))
    layer = _several_anchor_layer(g, query_pooling=pooling)
    assert layer.num_anchors > layer.num_experts
    x = torch.randn(5, 8, layer.hidden_size, generator=g).to(DEV)
    with torch.no_grad(), count_launches() as log:
        ids, w = layer._route(x)
    assert [n for n in log if n.startswith("triton.")] == ["triton.pooled_route._pool_kernel",
                                                           "triton.pooled_route._select_kernel"]
    layer.config.backend = "eager"
    with torch.no_grad():
        ref_ids, ref_w = layer._route(x)
    clear = _clear_rows(layer, x).to(ids.device)
    assert clear.float().mean() >= 0.6
    assert torch.equal(ids[clear], ref_ids[clear])
    assert (w[clear] - ref_w[clear]).abs().max() < 1e-5
    assert (ref_ids >= 0).any()


@pytest.mark.parametrize("top_k", [1, 2])
def test_decode_step_launches_at_most_3_kernels(top_k):
    """With the route unchanged, one decode step of the layer launches only the expert FFN
    kernels (up, down, + combine for top_k > 1): no torch op, no sort/align step. Counted on
    the CPU (torch ops via a dispatch mode, Triton launches via a wrapper), so it cannot
    regress unnoticed."""
    from launch_count import count_launches
    g = torch.Generator().manual_seed(int(torch.seed() % 2**31))
    layer = _several_anchor_layer(g, top_k=top_k, d=64, experts=5, expert_hidden=64)
    batch = 3
    with torch.no_grad(), count_launches() as prefill:
        layer(torch.randn(batch, 7, 64, generator=g).to(DEV))
    assert len(prefill) > 3                         # the counter sees the prefill's work
    layer.set_route_context(RouteContext(continuing=True))
    try:
        for _ in range(2):
            step = torch.randn(batch, 1, 64, generator=g).to(DEV)
            with torch.no_grad(), count_launches() as base_log:
                layer.base_layer(step)
            with torch.no_grad(), count_launches() as log:
                out = layer(step)
            added = list(log)
            for name in base_log:
                added.remove(name)
            want = ["triton.grouped_ffn._up_kernel", "triton.grouped_ffn._down_kernel"]
            if top_k > 1:
                want.append("triton.grouped_ffn._combine_kernel")
            assert added == want, added
            assert len(added) <= 3
            # and the result is the float64 one for the kept route
            ids, weights = layer._sequence_route
            with torch.no_grad():
                base = layer.base_layer(step)
            got = (out.double() - base.double()).reshape(-1, 64).cpu()
            ref = _delta64(layer, step, ids, weights)
            if ref.norm() > 0:
                assert ((got - ref).norm() / ref.norm()) < 1e-5
    finally:
        layer.set_route_context(RouteContext())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CUDA graphs)")
def test_gpu_captured_decode_step_follows_a_new_prefill():
    """Capture one decode step of the layer in a CUDA graph, run a new prefill (a new route,
    copied into the same buffers), replay: the replay uses the new route."""
    g = torch.Generator().manual_seed(5)
    layer = _several_anchor_layer(g, top_k=2, d=64, experts=5, expert_hidden=64)
    with torch.no_grad():
        layer(torch.randn(3, 7, 64, generator=g).to(DEV))
        layer.set_route_context(RouteContext(continuing=True))
        step = torch.randn(3, 1, 64, generator=g).to(DEV)
        out = layer(step)                                  # warm-up: compiles outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = layer(step)
        layer.set_route_context(RouteContext())
        layer(torch.randn(3, 9, 64, generator=g).to(DEV))  # a new prompt: a new route
        layer.set_route_context(RouteContext(continuing=True))
        step.copy_(torch.randn(3, 1, 64, generator=g).to(DEV))
        graph.replay()
        torch.cuda.synchronize()
        fresh = layer(step)
        layer.set_route_context(RouteContext())
    assert torch.equal(out, fresh)
