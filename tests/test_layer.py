"""The eager LEMoE layer against independent float64 computations."""

import math

import pytest
import torch
import torch.nn.functional as F

from lemoe_engine import ConfigError, LEMoEConfig, LEMoELayer, attach
from tiny_models import FAMILIES, add_random_experts, tiny_model


def standalone_layer(config, seed=0):
    model = tiny_model("llama", seed=seed)
    mlp = model.model.layers[1].mlp
    return LEMoELayer(mlp, model.config.hidden_size, config), mlp


def f64_expert(layer, e, x):
    w_up = layer.w_up[e].double()
    w_down = layer.w_down[e].double()
    act = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}[layer.config.expert_activation]
    h = act(x @ layer.w_gate[e].double()) * (x @ w_up) if layer.config.expert_gated else act(x @ w_up)
    return h @ w_down


def f64_query(layer, x):
    v = x.double().mean(dim=1) - layer.query_encoder.center.double()
    if layer.query_encoder.has_projection:
        v = F.silu(v @ layer.query_encoder.down.double()) @ layer.query_encoder.up.double()
    return v / v.norm(dim=-1, keepdim=True)


@pytest.mark.parametrize("top_k,gated,activation,query_hidden", [
    (1, True, "silu", 32), (2, True, "gelu", 0), (3, False, "relu", 16), (2, False, "silu", 32)])
def test_routed_output_is_base_plus_weighted_experts_float64(top_k, gated, activation, query_hidden):
    config = LEMoEConfig(query_source="hidden", query_pooling="mean", top_k=top_k, expert_gated=gated, expert_hidden=40,
                         expert_activation=activation, query_hidden=query_hidden, key_dim=24,
                         temperature=0.3, scale=0.7)
    layer, mlp = standalone_layer(config)
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    add_random_experts(layer, 5, g)
    x = torch.randn(3, 7, layer.hidden_size, generator=g)
    with torch.no_grad():
        out = layer(x)
        base = mlp(x).double()
    q = f64_query(layer, x)
    scores = q @ layer.anchors.double().T
    expected = base.clone()
    for b in range(x.shape[0]):
        top = torch.argsort(scores[b], descending=True)[:top_k]
        w = torch.softmax(scores[b, top] / config.temperature, dim=0)
        for weight, e in zip(w, top):
            expected[b] += config.scale * weight * f64_expert(layer, int(e), x[b].double())
    err = (out.double() - expected).norm() / expected.norm()
    assert err < 1e-5, err
    assert (out.double() - base).abs().max() > 1e-3  # the experts really contributed


def test_gated_off_rows_are_bit_identical_to_base_and_routed_rows_are_not():
    config = LEMoEConfig(query_source="hidden", query_pooling="mean", expert_hidden=32, query_hidden=0)
    layer, mlp = standalone_layer(config)
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    add_random_experts(layer, 3, g)
    x = torch.randn(4, 5, layer.hidden_size, generator=g)
    queries = f64_query(layer, x).float()
    layer.set_anchor(1, queries[0])          # row 0 matches expert 1 exactly (score 1)
    for e in range(3):
        layer.set_threshold(e, 0.999)        # everything else is gated off
    with torch.no_grad():
        out, base = layer(x), mlp(x)
    assert not torch.equal(out[0], base[0])
    assert torch.equal(out[1:], base[1:])
    layer.config.gate = False                # gate off: every row gets an expert
    with torch.no_grad():
        assert not torch.equal(layer(x)[1], base[1])


@pytest.mark.parametrize("span", ["key", "prompt"])
def test_max_pooling_routes_by_the_best_matching_token_with_several_anchors_per_expert(span):
    config = LEMoEConfig(query_source="hidden", query_pooling="max", expert_hidden=24, top_k=2,
                         temperature=0.25, query_hidden=0, expert_span=span)
    layer, mlp = standalone_layer(config)
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    d = layer.hidden_size
    x = torch.randn(3, 6, d, generator=g)
    with torch.no_grad():
        layer.query_encoder.center.normal_(generator=g)
    for count in (2, 3, 1):                       # experts own 2, 3 and 1 anchors
        index = layer.add_expert(anchors=torch.randn(count, d, generator=g), trainable=False)
        for name in layer.weight_names:
            getattr(layer, name).data[index] = torch.randn(getattr(layer, name).shape[1:], generator=g) * 0.5
    layer.thresholds.copy_(torch.rand(layer.num_anchors, generator=g) * 0.3 - 0.1)
    with torch.no_grad():
        out = layer(x)
        base = mlp(x).double()
    q = x.double() - layer.query_encoder.center.double()
    q = q / q.norm(dim=-1, keepdim=True)
    anchors = layer.anchors.double()
    token_scores = torch.einsum("btd,md->btm", q, anchors)
    scores = token_scores.max(dim=1).values                          # best token per anchor
    passed = scores >= layer.thresholds.double()
    expected = base.clone()
    routed_rows, starts = 0, []
    for b in range(3):
        per_expert = torch.full((3,), float("-inf"), dtype=torch.float64)
        for m in range(layer.num_anchors):
            e = int(layer.anchor_expert[m])
            if passed[b, m]:
                per_expert[e] = max(per_expert[e], scores[b, m])
        order = [e for e in torch.argsort(per_expert, descending=True).tolist()[:2] if per_expert[e] > -1e9]
        if not order:
            continue
        routed_rows += 1
        w = torch.softmax(per_expert[order] / config.temperature, dim=0)
        for weight, e in zip(w, order):
            # 'key': the expert acts from the token that best matches any of its anchors on
            own = (layer.anchor_expert == e).nonzero(as_tuple=True)[0]
            start = int(token_scores[b][:, own].max(dim=1).values.argmax()) if span == "key" else 0
            starts.append(start)
            expected[b, start:] += weight * f64_expert(layer, e, x[b, start:].double())
    err = (out.double() - expected).norm() / expected.norm()
    assert err < 1e-5, err
    assert routed_rows >= 1
    if span == "key":  # the test means something only when some expert starts past the first token
        assert max(starts) > 0, starts


def test_zero_experts_is_the_base_mlp_exactly():
    layer, mlp = standalone_layer(LEMoEConfig(query_source="hidden"))
    x = torch.randn(2, 6, layer.hidden_size)
    assert torch.equal(layer(x), mlp(x))


@pytest.mark.parametrize("family", FAMILIES)
def test_attached_with_zero_experts_logits_are_exact(family):
    model = tiny_model(family)
    ids = torch.randint(1, 150, (2, 9))
    with torch.no_grad():
        before = model(ids).logits
        attach(model, LEMoEConfig(query_source="embedding", layer=1, expert_hidden=16))
        after = model(ids).logits
    assert torch.equal(before, after)


def test_new_expert_is_a_noop_and_add_remove_keep_frozen_experts_frozen():
    model = tiny_model("llama")
    ids = torch.randint(1, 150, (2, 9))
    with torch.no_grad():
        unpatched = model(ids).logits
    layer = attach(model, LEMoEConfig(query_source="embedding", layer=1, expert_hidden=16, gate=False))
    g = torch.Generator().manual_seed(1)
    index = layer.add_expert(anchors=torch.randn(layer.anchors.shape[1], generator=g), n_edits=4)
    assert index == 0 and layer.expert_info[-1]["n_edits"] == 4
    assert all(p.requires_grad for p in layer.trainable.values())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and "mlp" in n}
    assert trainable >= {f"model.layers.1.mlp.trainable.{n}" for n in layer.weight_names}
    with torch.no_grad():
        # every row routes to the new expert (gate off) and it adds exactly nothing
        assert torch.equal(model(ids).logits, unpatched)
        layer.trainable["w_down"].normal_()
        one = model(ids).logits
    assert not torch.equal(one, unpatched)
    with pytest.raises(ConfigError, match="freeze_expert"):
        layer.add_expert()
    layer.freeze_expert()
    assert layer.num_frozen == 1 and not len(layer.trainable)
    assert not any(getattr(layer, n).requires_grad for n in layer.weight_names)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, one)
    add_random_experts(layer, 2, g)
    assert layer.num_experts == 3
    layer.remove_expert()
    layer.remove_expert()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, one)
    assert layer.num_experts == 1 and len(layer.expert_info) == 1
    layer.remove_expert()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, unpatched)
    with pytest.raises(ConfigError, match="no expert"):
        layer.remove_expert()


def test_training_reaches_only_the_new_expert():
    model = tiny_model("llama")
    for p in model.parameters():
        p.requires_grad_(False)
    layer = attach(model, LEMoEConfig(query_source="embedding", layer=1, expert_hidden=16, gate=False, top_k=3))
    g = torch.Generator().manual_seed(2)
    add_random_experts(layer, 2, g)
    layer.add_expert(anchors=torch.randn(layer.anchors.shape[1], generator=g))
    layer.trainable["w_down"].data.normal_()
    frozen = {n: getattr(layer, n).clone() for n in layer.weight_names}
    ids = torch.randint(1, 150, (2, 9))
    model(ids).logits.square().mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.trainable.values())
    for n in layer.weight_names:
        assert getattr(layer, n).grad is None and torch.equal(getattr(layer, n), frozen[n])


def test_token_routing_routes_each_token():
    config = LEMoEConfig(query_source="hidden", routing="token", expert_hidden=16, query_hidden=0)
    layer, mlp = standalone_layer(config)
    g = torch.Generator().manual_seed(3)
    add_random_experts(layer, 2, g)
    x = torch.randn(1, 4, layer.hidden_size, generator=g)
    layer.set_anchor(0, x[0, 0])
    layer.set_anchor(1, x[0, 2])
    ids, _ = layer.route(x)
    assert ids[0, 0] == 0 and ids[2, 0] == 1


def test_embedding_query_needs_an_attached_layer():
    layer, _ = standalone_layer(LEMoEConfig(query_source="embedding"))
    add_random_experts(layer, 1, torch.Generator().manual_seed(0))
    with pytest.raises(ConfigError, match="attach"):
        layer(torch.randn(1, 3, layer.hidden_size))


def test_nonfinite_scores_never_route():
    from lemoe_engine.routing import route_reference
    q = torch.tensor([[float("nan"), 1.0], [1.0, 0.0]])
    anchors = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    ids, w = route_reference(q, anchors, torch.full((3,), -math.inf), 4, 1.0)
    assert (ids[0] == -1).all() and (w[0] == 0).all()
    assert ids[1].tolist() == [0, 2, 1, -1] and abs(float(w[1].sum()) - 1) < 1e-6
