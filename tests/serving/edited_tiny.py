"""A tiny random Llama saved to a folder with an adaptor whose experts route different prompts
differently (and one prompt to no expert), plus the Hugging Face path's greedy tokens."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import lemoe_engine
from lemoe_engine import LEMoEConfig
from lemoe_engine.routing import token_queries
from tiny_models import tiny_tokenizer

# name -> (prompt, expert it must route to or None)
PROMPTS = {
    "france": ("The capital of France is", 0),
    "japan": ("People in Japan speak", 1),
    "peru": ("nq question: which language is spoken in Peru", 2),
    "france_long": ("The capital of France is Paris. People in Kenya speak", 0),  # shares france's prefix
    "unrelated": ("Oslo is a city in Norway.", None),
}
ANCHORED = ("france", "japan", "peru")  # expert i's anchor: the query vector of the last token of prompt i
MAX_NEW_TOKENS = 10


def tiny_llama(vocab: int, seed: int = 0, layers: int = 6, architecture: str = "llama"):
    torch.manual_seed(seed)
    # head_dim 32: vLLM's CPU attention supports head sizes 32, 64, 80, ...
    if architecture == "qwen2":
        from transformers import Qwen2Config as Config
    else:
        Config = LlamaConfig
    config = Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                    num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=256,
                    tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(config).eval()
    # random init gives tiny logits spreads; sharpen them so greedy choices are far from ties
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model


def query_vectors(model, ids: torch.Tensor, config: LEMoEConfig) -> torch.Tensor:
    """The per-token query source vectors the HF path uses, [T, d]."""
    with torch.no_grad():
        out = model(input_ids=ids[None], output_hidden_states=True)
    if config.query_source == "embedding":
        return out.hidden_states[0][0]
    return out.hidden_states[config.query_layer][0]


def build(root, config: LEMoEConfig = None, seed: int = 0, architecture: str = "llama",
          threshold: float = None, ledger: bool = False) -> dict:
    """Save model + tokenizer to root/model and an adaptor to root/adaptor. Gate thresholds sit
    halfway between an expert's own prompt (cosine 1) and the best other prompt, or at
    ``threshold``. ``ledger``: record each anchored prompt as its expert's edit, so the question
    gate (on by default) serves an expert only the prompts asking its edit's question."""
    config = config or LEMoEConfig(layer=4, query_source="layer4", expert_hidden=32, top_k=1)
    tok = tiny_tokenizer(False)
    model = tiny_llama(len(tok), seed=seed, architecture=architecture)
    model.config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = tok.pad_token_id
    ids = {name: torch.tensor(tok(text)["input_ids"]) for name, (text, _) in PROMPTS.items()}
    layer = lemoe_engine.attach(model, config)
    encoder = layer.query_encoder

    def queries(name, window=1):  # max pooling: one query per prompt token; mean pooling: one per prompt
        vectors = query_vectors(model, ids[name], config)
        if config.query_pooling != "max":
            return encoder(vectors.mean(0, keepdim=True))
        return token_queries(encoder, vectors[None], None, window)[window - 1][0]

    # sequence routing with max pooling: every other key pools its prompt's last two tokens, as
    # the editor's keys pool a subject's tokens
    pooled_keys = config.routing == "sequence" and config.query_pooling == "max" and config.query_window >= 2
    windows = [1 + i % 2 if pooled_keys else 1 for i in range(len(ANCHORED))]
    anchors = [queries(name, w)[-1] for name, w in zip(ANCHORED, windows)]
    # every prompt's best score against every anchor
    scores = {name: [float((queries(name, w) @ a).max()) for a, w in zip(anchors, windows)] for name in PROMPTS}
    generator = torch.Generator().manual_seed(seed + 1)
    for i, name in enumerate(ANCHORED):
        others = [scores[p][i] for p, (_, expert) in PROMPTS.items() if expert != i and scores[p][i] < 0.9999]
        gate = threshold if threshold is not None else (1.0 + max(others)) / 2  # own prompts score 1.0
        index = layer.add_expert(anchors=anchors[i], thresholds=gate, trainable=False, windows=windows[i])
        with torch.no_grad():
            for weight in layer.weight_names:
                stack = getattr(layer, weight)
                stack[index] = torch.randn(stack.shape[1:], generator=generator) * 0.6
    if ledger:
        from lemoe_engine.ledger import LedgerEntry
        layer.ledger = [LedgerEntry(id=i + 1, prompt=PROMPTS[name][0], target="x", expert=i)
                        for i, name in enumerate(ANCHORED)]
    adaptor = lemoe_engine.save(model, root / "adaptor")
    lemoe_engine.detach(model)
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    return {"model": root / "model", "adaptor": adaptor, "ids": {k: v.tolist() for k, v in ids.items()},
            "scores": scores}


def hf_greedy(model_folder, adaptor=None, prompts=None, max_new_tokens: int = MAX_NEW_TOKENS,
              question_gate: bool = True) -> dict:
    """Greedy new tokens of each prompt (token ids) on the Hugging Face path (``question_gate``
    False: the adaptor's gate turned off)."""
    model = AutoModelForCausalLM.from_pretrained(model_folder, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    routes = {}
    if adaptor is not None:
        layer = lemoe_engine.load(model, adaptor, backend="eager")
        if not question_gate:
            from lemoe_engine import question_gate as gate
            gate.disable(model)
    out = {}
    for name, ids in prompts.items():
        x = torch.tensor([ids])
        with torch.no_grad():
            gen = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                                 min_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None,
                                 pad_token_id=0)
        out[name] = gen[0, x.shape[1]:].tolist()
        if adaptor is not None and layer._sequence_route is not None:
            routes[name] = layer._sequence_route[0][0].tolist()
    return out, routes
