"""Adaptor save/load: bit-exact round trip, and every bad input leaves the model unchanged."""

import json

import pytest
import torch

import lemoe_engine.storage as storage
from lemoe_engine import AdaptorError, LEMoEConfig, attach, detach, find_layer, load, save
from tiny_models import add_random_experts, tiny_model


def edited_model(seed=0, family="llama", hidden=48):
    model = tiny_model(family, seed=seed, hidden=hidden)
    layer = attach(model, LEMoEConfig(query_source="embedding", layer=1, expert_hidden=24, top_k=2, gate=True))
    add_random_experts(layer, 3, torch.Generator().manual_seed(seed + 1))
    for e in range(3):
        layer.set_threshold(e, -0.5 + 0.1 * e)
        layer.expert_info[e]["n_edits"] = 10 + e
    with torch.no_grad():
        layer.query_encoder.center.normal_()
    return model, layer


@pytest.fixture
def saved(tmp_path):
    model, layer = edited_model()
    path = save(model, tmp_path / "adaptor")
    return model, layer, path


def test_round_trip_is_bit_exact(saved):
    model, layer, path = saved
    assert sorted(p.name for p in path.iterdir()) == ["adaptor.json", "adaptor.safetensors"]
    manifest = json.loads((path / "adaptor.json").read_text())
    assert manifest["format_version"] == 9 and manifest["base_model"]["architecture"] == "llama"
    assert manifest["config"]["expert_span"] == "key" and manifest["config"]["query_window"] == 3
    assert manifest["revision"] == 1
    assert [e["n_edits"] for e in manifest["experts"]] == [10, 11, 12]
    fresh = tiny_model("llama", seed=0)
    loaded = load(fresh, path, backend="eager")
    for name in ("anchors", "thresholds", *layer.weight_names):
        assert torch.equal(getattr(loaded, name), getattr(layer, name)), name
    assert torch.equal(loaded.query_encoder.center, layer.query_encoder.center)
    assert loaded.expert_info == layer.expert_info and loaded.config.backend == "eager"
    ids = torch.randint(1, 150, (3, 8))
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, model(ids).logits)


def test_save_replaces_an_existing_adaptor_atomically(saved, monkeypatch):
    model, layer, path = saved
    before = (path / "adaptor.safetensors").read_bytes()
    layer.remove_expert()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(storage, "_swap_into_place", crash)
    with pytest.raises(KeyboardInterrupt):
        save(model, path)
    assert (path / "adaptor.safetensors").read_bytes() == before      # old adaptor intact
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no debris
    monkeypatch.undo()
    save(model, path)
    assert json.loads((path / "adaptor.json").read_text())["num_experts"] == 2


def _assert_unchanged(model):
    assert find_layer(model) is None


def test_mismatched_model_is_refused(saved):
    _, _, path = saved
    other = tiny_model("llama", hidden=64)
    with pytest.raises(AdaptorError, match="hidden_size=48.*hidden_size=64"):
        load(other, path)
    _assert_unchanged(other)
    gpt2 = tiny_model("gpt2")
    with pytest.raises(AdaptorError, match="architecture"):
        load(gpt2, path)
    _assert_unchanged(gpt2)


def test_truncated_and_corrupted_files_are_refused(saved):
    _, _, path = saved
    tensors = path / "adaptor.safetensors"
    data = tensors.read_bytes()
    tensors.write_bytes(data[: len(data) // 2])
    model = tiny_model("llama")
    with pytest.raises(AdaptorError, match="corrupt or truncated"):
        load(model, path)
    _assert_unchanged(model)
    flipped = bytearray(data)
    flipped[-5] ^= 0xFF
    tensors.write_bytes(bytes(flipped))
    with pytest.raises(AdaptorError, match="corrupt"):
        load(model, path)
    tensors.write_bytes(data)
    (path / "adaptor.json").write_text("{ not json")
    with pytest.raises(AdaptorError, match="adaptor.json is corrupt"):
        load(model, path)
    _assert_unchanged(model)


def test_unknown_version_missing_files_and_double_attach(saved, tmp_path):
    model, _, path = saved
    manifest = json.loads((path / "adaptor.json").read_text())
    manifest["format_version"] = 99
    (path / "adaptor.json").write_text(json.dumps(manifest))
    fresh = tiny_model("llama")
    with pytest.raises(AdaptorError, match="version 99.*reads versions 1, 2, 3, 4, 5, 6, 7, 8, 9"):
        load(fresh, path)
    _assert_unchanged(fresh)
    with pytest.raises(AdaptorError, match="does not exist"):
        load(fresh, tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdaptorError, match="adaptor.json is missing"):
        load(fresh, tmp_path / "empty")
    manifest["format_version"] = 9
    (path / "adaptor.json").write_text(json.dumps(manifest))
    with pytest.raises(AdaptorError, match="already"):
        load(model, path)


def test_saving_needs_a_frozen_adaptor(tmp_path):
    model, layer = edited_model()
    layer.add_expert()
    with pytest.raises(AdaptorError, match="freeze_expert"):
        save(model, tmp_path / "a")
    detach(model)
    with pytest.raises(AdaptorError, match="no LEMoE adaptor"):
        save(model, tmp_path / "a")
