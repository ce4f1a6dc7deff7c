"""Tiny randomly initialised models of each supported family (no downloads)."""

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
        index = layer.add_expert(anchor=torch.randn(layer.anchors.shape[1], generator=generator),
                                 trainable=False)
        with torch.no_grad():
            for name in layer.weight_names:
                stack = getattr(layer, name)
                stack[index] = torch.randn(stack.shape[1:], generator=generator) * scale
    return layer
