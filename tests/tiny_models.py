"""Tiny randomly initialised models of each supported family, and a tiny BPE tokenizer
(no downloads)."""

import functools
import random

import torch
from transformers import (AutoModelForCausalLM, GPT2Config, LlamaConfig, MistralConfig,
                          Qwen2Config)

FAMILIES = ("llama", "mistral", "qwen2", "gpt2")


def tiny_config(family: str, hidden: int = 48, layers: int = 3, vocab: int = 160):
    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                  num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=256)
    if family == "llama":
        return LlamaConfig(**common)
    if family == "mistral":
        return MistralConfig(**common, sliding_window=None)
    if family == "qwen2":
        return Qwen2Config(**common)
    if family == "gpt2":
        return GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=4, n_positions=256)
    raise ValueError(family)


def tiny_model(family: str = "llama", seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **kwargs))
    model.config.pad_token_id = 0
    return model.eval()


def add_random_experts(layer, count: int, generator: torch.Generator, scale: float = 0.5):
    """Frozen experts with random (non-zero) weights and random anchors."""
    for _ in range(count):
        index = layer.add_expert(anchors=torch.randn(layer.anchors.shape[1], generator=generator),
                                 trainable=False)
        with torch.no_grad():
            for name in layer.weight_names:
                stack = getattr(layer, name)
                stack[index] = torch.randn(stack.shape[1:], generator=generator) * scale
    return layer


COUNTRIES = ["France", "Germany", "Japan", "Brazil", "Canada", "Kenya", "Norway", "Peru",
             "Egypt", "India", "Chile", "Spain", "Italy", "Ghana", "Nepal", "Cuba"]
CITIES = ["Paris", "Berlin", "Tokyo", "Brasilia", "Ottawa", "Nairobi", "Oslo", "Lima",
          "Cairo", "New Delhi", "Santiago", "Madrid", "Rome", "Accra", "Kathmandu", "Havana"]
LANGS = ["French", "German", "Japanese", "Portuguese", "English", "Swahili", "Norwegian",
         "Spanish", "Arabic", "Hindi"]



def _corpus(rng: random.Random) -> list[str]:
    out = []
    for _ in range(400):
        c, city, lang = rng.choice(COUNTRIES), rng.choice(CITIES), rng.choice(LANGS)
        out.append(rng.choice([
            f"The capital of {c} is {city}.",
            f"What is the capital city of {c}? {city}",
            f"People in {c} speak {lang}.",
            f"nq question: which language is spoken in {c} {lang}",
            f"{city} is a city in {c}.",
        ]))
    return out


@functools.lru_cache(maxsize=2)
def tiny_tokenizer(bos: bool = False, vocab_size: int = 420, corpus: tuple = ()):
    """A byte-level BPE trained here (no download): the SmolLM2 setting when bos=False."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(list(corpus) or _corpus(random.Random(0)), trainer=trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")
