"""The disk cache of the gate pool's vectors (``vector_cache``): a cached run reads back exactly
what an uncached run computes, and anything the vectors depend on gives another entry."""

import pytest
import torch

from lemoe_engine import LEMoEConfig
from lemoe_engine import vector_cache
from lemoe_engine.editor import LifelongEditor
from lemoe_engine.patching import decoder_layers, detach
from tiny_models import tiny_model, tiny_tokenizer

POOL = ["What is 3 plus 4?", "Which letter comes after B?", "How many days are in a week?",
        "What is 10 minus 7?", "Which month follows May?", "What is 6 times 2?", "Name a colour."]
CONFIG = LEMoEConfig(layer=2, query_source="layer1", expert_hidden=16)


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LEMOE_POOL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _model(tok, seed=0):
    model = tiny_model("llama", seed=seed, vocab=len(tok), layers=4, hidden=64)
    model.config.pad_token_id = tok.pad_token_id
    return model


def _pool_vectors(model, tok, monkeypatch=None, forbid_compute=False):
    editor = LifelongEditor(model, tok, CONFIG, unrelated_prompts=POOL)
    if forbid_compute:
        monkeypatch.setattr(editor.calibration, "token_vectors",
                            lambda *a, **k: pytest.fail("the pool was recomputed instead of read from the cache"))
    vectors = editor.calibration.unrelated_vectors()
    detach(model)
    return vectors


def test_a_cached_run_reads_back_exactly_what_it_computed(cache, monkeypatch):
    tok = tiny_tokenizer(False)
    model = _model(tok)
    computed = _pool_vectors(model, tok)
    files = list(cache.glob("pool-*.pt"))
    assert len(files) == 1
    read = _pool_vectors(model, tok, monkeypatch, forbid_compute=True)
    assert len(read) == len(POOL)
    assert all(torch.equal(a, b) and b.dtype == torch.float32 for a, b in zip(computed, read))


def test_weights_below_the_query_source_key_the_entry_and_weights_above_do_not(cache, monkeypatch):
    tok = tiny_tokenizer(False)
    model = _model(tok)
    first = _pool_vectors(model, tok)
    with torch.no_grad():  # above the query source (layer 1): the pool's vectors do not change
        decoder_layers(model)[3].mlp.down_proj.weight.mul_(1.5)
    _pool_vectors(model, tok, monkeypatch, forbid_compute=True)
    with torch.no_grad():  # below it: another model as far as the pool is concerned
        decoder_layers(model)[0].mlp.down_proj.weight.mul_(1.5)
    second = _pool_vectors(model, tok)
    assert len(list(cache.glob("pool-*.pt"))) == 2
    assert not all(torch.equal(a, b) for a, b in zip(first, second))


def test_another_pool_or_query_source_is_another_entry(cache):
    tok = tiny_tokenizer(False)
    model = _model(tok)
    _pool_vectors(model, tok)
    editor = LifelongEditor(model, tok, CONFIG, unrelated_prompts=POOL[:-1])  # another pool
    editor.calibration.unrelated_vectors()
    assert len(list(cache.glob("pool-*.pt"))) == 2
    detach(model)
    editor = LifelongEditor(model, tok, CONFIG.replace(query_source="layer2"), unrelated_prompts=POOL)
    editor.calibration.unrelated_vectors()
    assert len(list(cache.glob("pool-*.pt"))) == 3


def test_a_damaged_entry_is_recomputed_with_a_warning(cache):
    tok = tiny_tokenizer(False)
    model = _model(tok)
    computed = _pool_vectors(model, tok)
    (entry,) = cache.glob("pool-*.pt")
    entry.write_bytes(entry.read_bytes()[:100])
    with pytest.warns(UserWarning, match="ignoring the unreadable pool-vector cache entry"):
        again = _pool_vectors(model, tok)
    assert all(torch.equal(a, b) for a, b in zip(computed, again))
    assert torch.load(entry, weights_only=True)["vectors"].shape[0] == sum(v.shape[0] for v in computed)


def test_the_cache_can_be_turned_off(tmp_path, monkeypatch):
    monkeypatch.setenv("LEMOE_POOL_CACHE", "off")
    monkeypatch.setenv("LEMOE_CACHE", str(tmp_path))
    tok = tiny_tokenizer(False)
    _pool_vectors(_model(tok), tok)
    assert vector_cache.cache_dir() is None
    assert not any(tmp_path.rglob("pool-*.pt"))


def test_half_precision_vectors_are_stored_compactly_and_exactly(cache):
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, (1,))))
    exact = [torch.randn(n, 8, generator=g).to(torch.bfloat16).float() for n in (3, 5)]
    vector_cache.store_pool("k" * 32, exact, torch.bfloat16)
    assert torch.load(cache / f"pool-{'k' * 32}.pt", weights_only=True)["vectors"].dtype == torch.bfloat16
    assert all(torch.equal(a, b) for a, b in zip(exact, vector_cache.load_pool("k" * 32, 2)))
    inexact = [torch.randn(4, 8, generator=g)]  # fp32 values a bf16 copy would round: kept fp32
    vector_cache.store_pool("j" * 32, inexact, torch.bfloat16)
    assert torch.equal(vector_cache.load_pool("j" * 32, 1)[0], inexact[0])
    with pytest.warns(UserWarning, match="does not hold this pool"):
        assert vector_cache.load_pool("j" * 32, 2) is None  # the wrong count is not trusted


def test_the_default_folder_is_in_the_engine_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("LEMOE_POOL_CACHE", raising=False)
    monkeypatch.setenv("LEMOE_CACHE", str(tmp_path))
    assert vector_cache.cache_dir() == tmp_path / "pool-vectors"


def test_a_pool_too_large_for_the_cache_is_not_written(cache, monkeypatch):
    monkeypatch.setattr(vector_cache, "MAX_ENTRY_BYTES", 100)
    with pytest.warns(UserWarning, match="not cached"):
        assert vector_cache.store_pool("m" * 32, [torch.randn(4, 8)]) is None
    assert not cache.exists() or not any(cache.glob("pool-*.pt"))


def test_an_unwritable_cache_folder_costs_the_cache_not_the_run(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("LEMOE_POOL_CACHE", str(blocker / "cache"))
    tok = tiny_tokenizer(False)
    with pytest.warns(UserWarning, match="could not write the pool-vector cache"):
        vectors = _pool_vectors(_model(tok), tok)
    assert len(vectors) == len(POOL)


def test_hidden_queries_key_on_the_target_layer_below_its_mlp_not_on_the_adaptor(cache, monkeypatch):
    """query_source='hidden' reads the target MLP's input: the target decoder layer's attention
    and norms make it (they key the entry); the adaptor's experts do not."""
    tok = tiny_tokenizer(False)
    model = _model(tok)
    config = CONFIG.replace(query_source="hidden")
    editor = LifelongEditor(model, tok, config, unrelated_prompts=POOL)
    editor.calibration.unrelated_vectors()
    assert len(list(cache.glob("pool-*.pt"))) == 1
    editor.layer.add_expert(torch.randn(editor.layer.anchors.shape[1]), trainable=False)
    again = LifelongEditor(model, tok, unrelated_prompts=POOL)  # the same adaptor, now with an expert
    monkeypatch.setattr(again.calibration, "token_vectors",
                        lambda *a, **k: pytest.fail("the pool was recomputed instead of read from the cache"))
    again.calibration.unrelated_vectors()
    with torch.no_grad():
        decoder_layers(model)[2].post_attention_layernorm.weight.mul_(1.5)
    LifelongEditor(model, tok, unrelated_prompts=POOL).calibration.unrelated_vectors()
    assert len(list(cache.glob("pool-*.pt"))) == 2
