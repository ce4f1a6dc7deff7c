"""``LEMoEConfig.query_window``: a token's routing query pools it and the tokens in front of it, so
a key carries its subject's words and an unrelated prompt sharing only the key's word stays out."""

import random

import pytest
import torch

from lemoe_engine import LEMoEConfig, attach
from lemoe_engine.data import EditRecord
from lemoe_engine.editor import EditorConfig, LifelongEditor
from lemoe_engine.routing import window_mean
from tiny_models import tiny_model, tiny_tokenizer


def window_reference(vectors: torch.Tensor, mask: torch.Tensor, window: int) -> torch.Tensor:
    """float64, one position at a time: the mean over the last ``window`` masked-in positions."""
    out = vectors.double().clone()
    for b in range(vectors.shape[0]):
        for t in range(vectors.shape[1]):
            if mask[b, t]:
                rows = [s for s in range(max(0, t - window + 1), t + 1) if mask[b, s]]
                out[b, t] = vectors[b, rows].double().mean(dim=0)
    return out


@pytest.mark.parametrize("window", [1, 2, 3, 5])
def test_window_mean_matches_a_float64_loop_with_padding_on_either_side(window):
    generator = torch.Generator().manual_seed(random.randrange(1 << 30))
    vectors = torch.randn(4, 9, 16, generator=generator) + 0.5
    mask = torch.ones(4, 9, dtype=torch.long)
    mask[0, :3] = 0          # left padding
    mask[1, 6:] = 0          # right padding (or a target after its prompt)
    mask[2, :1] = 0
    out = window_mean(vectors, mask, window)
    reference = window_reference(vectors, mask, window)
    error = (out.double() - reference).norm() / reference.norm()
    assert error < 1e-6, f"relative error {error:.2e}"


def test_layer_queries_ignore_padding():
    """A left-padded batch gives each prompt the windowed queries it gets alone (a window never
    reaches into the padding)."""
    tok = tiny_tokenizer(False)
    model = tiny_model("llama", seed=3, vocab=len(tok))
    layer = attach(model, LEMoEConfig(layer=2, query_source="layer1", expert_hidden=16))
    captured = []
    hook = layer.register_forward_hook(lambda module, args, output: captured.append(layer.token_queries(args[0], 3)))
    prompts = ["What is the capital city of Kenya?", "Name it."]
    alone = []
    for prompt in prompts:
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            model(input_ids=ids)
        alone.append(captured.pop())
    tok.padding_side = "left"
    try:
        batch = tok(prompts, return_tensors="pt", padding=True)
    finally:
        tok.padding_side = "right"
    with torch.no_grad():
        model(**batch)
    padded = captured.pop()
    hook.remove()
    assert padded.shape[0] == 3  # windows 1, 2, 3
    for row, queries in enumerate(alone):
        n = queries.shape[2]
        error = (padded[:, row, -n:] - queries[:, 0]).norm() / queries.norm()
        assert error < 1e-5, f"prompt {row}: relative error {error:.2e}"


def test_a_prompt_sharing_only_the_keys_word_no_longer_reaches_the_expert():
    """The leak the window closes: a key at the embeddings is the subject's last token alone, so
    with ``query_window=1`` any prompt holding that token scores 1.0 on the anchor and reaches
    the expert. With the window the key is that token in its subject, and only prompts naming the
    subject reach it, even when the gate's unrelated pool holds the word in another context."""
    tok = tiny_tokenizer(False)
    # "France" is one token of the tiny tokenizer, and it ends the subject
    edit = EditRecord(prompt="Which city is Old France in?", target="Paris",
                      rephrase="Where is Old France located?", loc_prompt="What is 1 plus 1?",
                      loc_answer="2", subject="Old France")
    shared_word = "Which language is spoken in France?"
    # the pool holds the key's word in another context: with single-token keys that raises the
    # gate to the edit's own score (anything holding "France" still passes); with the window it
    # raises the gate over that context only
    unrelated = [f"The capital of {c} is far away." for c in ("Kenya", "Peru", "Chile", "Spain")] + [
        "What is the weather like today?", "Name a famous painter.", "The language spoken in France is old."]
    routes = {}
    for window in (1, 3):
        model = tiny_model("llama", seed=4, vocab=len(tok))
        config = LEMoEConfig(layer=2, query_source="embedding", expert_hidden=16, query_window=window)
        editor = LifelongEditor(model, tok, config, EditorConfig(max_steps=1), unrelated_prompts=unrelated)
        editor.edit([edit], progress=False)
        routes[window] = editor.routes([edit.prompt, edit.rephrase, shared_word]).tolist()
    assert routes[1] == [0, 0, 0]          # the leak: "France" alone is the key
    assert routes[3] == [0, 0, -1]         # the subject's prompts still route; the other does not
