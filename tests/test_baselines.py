"""Baseline editors (FT-L, GRACE, no edit) and the comparison harness, on tiny random models."""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import random

import numpy as np
import pytest
import torch
from torch import nn

from lemoe_engine.baselines import (target_layer_index, FTLConfig, FTLEditor, GraceAdaptor, GraceConfig, GraceEditor,
                                    NoEditEditor)
from lemoe_engine.compare import (METHODS, add_compare_arguments, merge_rows, run_compare_command,
                                  run_comparison)
from lemoe_engine.data import EditRecord
from lemoe_engine.evaluation import evaluate, locality_reference
from tiny_models import tiny_model, tiny_tokenizer

COUNTRIES = ["France", "Germany", "Japan", "Brazil", "Canada", "Kenya", "Norway", "Peru",
             "Egypt", "India", "Chile", "Spain"]
CITIES = ["Paris", "Berlin", "Tokyo", "Lima", "Ottawa", "Nairobi", "Oslo", "Cairo", "Madrid", "Rome"]
LANGS = ["French", "German", "Japanese", "Portuguese", "English", "Swahili", "Spanish", "Hindi"]


def _corpus() -> list[str]:
    rng = random.Random(1)
    out = []
    for _ in range(300):
        c, city, lang = rng.choice(COUNTRIES), rng.choice(CITIES), rng.choice(LANGS)
        out.append(rng.choice([f"The capital of {c} is {city}.", f"People in {c} speak {lang}.",
                               f"What is the capital city of {c}? {city}",
                               f"Which language is spoken in {c}? {lang}"]))
    return out


@pytest.fixture(scope="module")
def tok():
    """A byte-level BPE without BOS (the SmolLM2 setting), trained on this file's own corpus
    (the GRACE radius cases below are tuned to its token vectors)."""
    return tiny_tokenizer(False, vocab_size=600, corpus=tuple(_corpus()))


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(tok, family="llama", seed=0):
    """A tiny random model whose LM head is scaled up: with the default init its logits span
    about one nat after the final norm, so no edit could reach a confident prediction."""
    model = tiny_model(family, seed=seed, vocab=len(tok))
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(25.0)
    return model


def _edit(i: int, target: str | None = None) -> EditRecord:
    c = COUNTRIES[i % len(COUNTRIES)]
    return EditRecord(prompt=f"The capital of {c} is", target=target or CITIES[(i * 3 + 1) % len(CITIES)],
                      rephrase=f"What is the capital city of {c}?",
                      loc_prompt=f"Which language is spoken in {COUNTRIES[(i + 5) % len(COUNTRIES)]}?",
                      loc_answer=LANGS[i % len(LANGS)])


def _joint(tok, prompt: str, answer: str) -> tuple[torch.Tensor, int]:
    """Joint ids and prompt length, from the tokenizer directly (not lemoe_engine.tokens)."""
    p = tok(prompt)["input_ids"]
    j = tok(prompt + " " + answer)["input_ids"]
    assert j[:len(p)] == p and len(j) > len(p)
    return torch.tensor([j]), len(p)


def _answer_argmax(model, ids: torch.Tensor, p: int, adaptor=None) -> list[int]:
    """Teacher-forced argmax at the answer positions (a GRACE ``adaptor`` keys on the prompt)."""
    mask = torch.zeros_like(ids)
    mask[:, :p] = 1
    with torch.no_grad(), adaptor.query_mask(mask) if adaptor is not None else contextlib.nullcontext():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
    return logits[0, p - 1:ids.shape[1] - 1].argmax(-1).tolist()


# ------------------------------------------------------------------------------------- FT-L
@pytest.mark.parametrize("family,weight", [("llama", "model.layers.2.mlp.down_proj.weight"),
                                           ("gpt2", "transformer.h.2.mlp.c_proj.weight")])
def test_ftl_learns_the_edit_and_touches_only_the_down_projection(tok, family, weight):
    model = _model(tok, family, seed=3)
    edit = _edit(4)
    ids, p = _joint(tok, edit.prompt, edit.target)
    target = ids[0, p:].tolist()
    assert _answer_argmax(model, ids, p) != target  # the random model does not know it yet
    before = {k: v.clone() for k, v in model.state_dict().items()}
    editor = FTLEditor(model, tok, FTLConfig(learning_rate=1e-2, max_steps=150))
    assert editor.param_name == weight and editor.layer_index == 2  # int(3 layers * 3/4)
    report = editor.edit_batch([edit])
    assert report.n_edits == 1 and 1 <= report.steps < 150 and report.loss < 0.02 and report.seconds > 0
    assert _answer_argmax(model, ids, p) == target
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed == [weight]
    edited = {k: v.clone() for k, v in model.state_dict().items()}
    with editor.unedited():  # the original weight, for the overhead timing
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(v, edited[k]) for k, v in model.state_dict().items())
    assert not any(p.requires_grad for p in model.parameters())


def test_ftl_norm_constraint_boxes_the_weights(tok):
    model = _model(tok, seed=5)
    editor = FTLEditor(model, tok, FTLConfig(learning_rate=1e-2, max_steps=4, stop_loss=0.0,
                                             norm_constraint=1e-3))
    original = editor.weight.detach().clone()
    editor.edit_batch([_edit(2)])
    delta = (editor.weight - original).abs().max().item()
    assert 0 < delta <= 1e-3 + 1e-7


def test_no_edit_editor_changes_nothing(tok):
    model = _model(tok)
    before = copy.deepcopy(model.state_dict())
    report = NoEditEditor(model, tok).edit_batch([_edit(0), _edit(1)])
    assert report.n_edits == 2 and report.steps == 0
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# ------------------------------------------------------------------------------------ GRACE
def _mlp_input_at_last_token(model, prompt_ids: torch.Tensor) -> torch.Tensor:
    """Independent key: the target MLP's input at the last token of the prompt alone."""
    seen = []
    handle = model.model.layers[target_layer_index(model)].mlp.register_forward_hook(lambda m, a, o: seen.append(a[0][0, -1].clone()))
    try:
        with torch.no_grad():
            model(input_ids=prompt_ids, use_cache=False)
    finally:
        handle.remove()
    return seen[0].float()


def test_grace_replaces_inside_the_radius_and_leaves_far_inputs_bit_identical(tok):
    model = _model(tok, seed=1)
    reference = copy.deepcopy(model)
    edit = _edit(3)
    others = [f"People in {c} speak" for c in COUNTRIES] + ["What is the capital city of Egypt?",
                                                             "The capital of Egypt is really"]
    key = _mlp_input_at_last_token(reference, torch.tensor([tok(edit.prompt)["input_ids"]]))
    dist = sorted(((float((_mlp_input_at_last_token(reference, torch.tensor([tok(o)["input_ids"]])) - key).norm()), o)
                   for o in others))
    (d_in, inside), (d_next, _) = dist[0], dist[1]
    assert d_in < d_next
    editor = GraceEditor(model, tok, GraceConfig(init_eps=(d_in + d_next) / 2, learning_rate=0.5, max_steps=200))
    report = editor.edit_batch([edit])
    assert report.details["add"] == 1 and report.details["unreachable"] == 0 and report.loss < 0.02
    adaptor = editor.adaptor
    assert torch.allclose(adaptor.keys[0], key, atol=1e-5)  # the key is the MLP input at the prompt's end

    ids, p = _joint(tok, edit.prompt, edit.target)
    assert _answer_argmax(model, ids, p, adaptor) == ids[0, p:].tolist() != _answer_argmax(reference, ids, p)
    # evaluate() must see the prompt mask (else the key would be the answer's last token)
    metrics = evaluate(model, tok, [edit], locality_ref=locality_reference(reference, tok, [edit], progress=False),
                       progress=False)
    assert metrics.reliability == 1.0

    with editor.unedited():
        assert _answer_argmax(model, ids, p, adaptor) == _answer_argmax(reference, ids, p)
    # far inputs: the logits are the unedited model's, bit for bit (also with an answer appended)
    for _, text in dist[1:]:
        for full in (text, text + " Paris"):
            x = torch.tensor([tok(full)["input_ids"]])
            with torch.no_grad():
                assert torch.equal(model(input_ids=x).logits, reference(input_ids=x).logits), full
    # the nearest other prompt is inside the radius: its last position gets the edit's value
    outputs = []
    handle = adaptor.register_forward_hook(lambda m, a, o: outputs.append(o[0].clone()))
    x = torch.tensor([tok(inside)["input_ids"]])
    with torch.no_grad():
        edited, unedited = model(input_ids=x).logits, reference(input_ids=x).logits
    handle.remove()
    assert torch.equal(outputs[0][-1], adaptor.values[0])
    assert torch.equal(edited[0, :-1], unedited[0, :-1]) and not torch.equal(edited[0, -1], unedited[0, -1])


def test_grace_generation_uses_the_prompt_key_for_every_new_token(tok):
    model = _model(tok, seed=2)
    reference = copy.deepcopy(model)
    edit = _edit(6)
    editor = GraceEditor(model, tok, GraceConfig(init_eps=0.5, learning_rate=0.5, max_steps=200))
    assert editor.edit_batch([edit]).loss < 0.02
    ids, p = _joint(tok, edit.prompt, edit.target)
    prompt = ids[:, :p]
    with torch.no_grad():
        out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4,
                             do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    generated = out.sequences
    assert generated[0, p:p + ids.shape[1] - p].tolist() == ids[0, p:].tolist()  # the edit, generated
    # every decode step got the value the prompt's key chose: the KV-cache logits equal the
    # teacher-forced logits of the whole sequence routed by its prompt
    step_logits = torch.stack(out.logits, dim=1)[0]
    mask = torch.zeros_like(generated)
    mask[:, :p] = 1
    with torch.no_grad(), editor.adaptor.query_mask(mask):
        forced = model(input_ids=generated, use_cache=False).logits[0, p - 1:-1]
        unedited = reference(input_ids=generated, use_cache=False).logits[0, p - 1:-1]
    assert torch.allclose(step_logits, forced, atol=1e-4, rtol=1e-4)
    assert all(not torch.allclose(step_logits[k], unedited[k], atol=1e-2) for k in range(4))


def test_grace_codebook_rules():
    adaptor = GraceAdaptor(nn.Linear(4, 4), 4)

    def at(*coords):
        return torch.tensor(coords, dtype=torch.float32)

    assert adaptor.insert(at(0, 0, 0, 0), "A", 1.0) == (0, "add")
    assert adaptor.insert(at(3, 0, 0, 0), "B", 1.0) == (1, "add")        # 3 > 1 + 1: new entry
    assert adaptor.insert(at(0, 0.8, 0, 0), "B", 1.0) == (2, "split")    # other label inside: halve both
    assert adaptor.epsilons.tolist() == pytest.approx([0.4 - 1e-5, 1.0, 0.4])
    assert adaptor.insert(at(-1.3, 0, 0, 0), "A", 1.0) == (0, "expand")  # same label, 1.3 <= 1 + 0.4
    assert adaptor.epsilons[0].item() == pytest.approx(1.3)
    assert adaptor.insert(at(-0.5, 0, 0, 0), "A", 1.0) == (0, "reuse")
    assert adaptor.insert(at(3, 0.5, 0, 0), "C", 1.0) == (3, "split")
    assert adaptor.insert(at(3, -1.0, 0, 0), "D", 1.0) == (4, "split")   # a split never grows a radius
    assert adaptor.epsilons.tolist() == pytest.approx([1.3, 0.25 - 1e-5, 0.4, 0.25, 0.5])
    assert adaptor.num_entries == 5 and adaptor.labels == ["A", "B", "B", "C", "D"]

    g = torch.Generator().manual_seed(0)
    adaptor.values = torch.randn(5, 4, generator=g)
    x = torch.stack([at(-1.2, 0, 0, 0), at(0, 0.75, 0, 0), at(10, 10, 10, 10), at(1.5, 0, 0, 0)])[:, None, :]
    with torch.no_grad():
        out, base = adaptor(x), adaptor.base_layer(x)
    assert torch.equal(out[0, 0], adaptor.values[0]) and torch.equal(out[1, 0], adaptor.values[2])
    assert torch.equal(out[2:], base[2:])  # beyond every radius (1.5 from key 0 > 1.3): untouched


def test_grace_key_is_the_last_prompt_position_and_replaces_from_there():
    torch.manual_seed(0)
    adaptor = GraceAdaptor(nn.Linear(6, 6), 6)
    x = torch.randn(2, 5, 6)
    adaptor.insert(x[0, 2], "A", 1e-3, value=torch.full((6,), 7.0))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    with torch.no_grad(), adaptor.query_mask(mask):
        out = adaptor(x)
    base = adaptor.base_layer(x)
    assert torch.equal(out[0, :2], base[0, :2]) and (out[0, 2:] == 7.0).all()
    assert torch.equal(out[1], base[1])  # its key (position 3) is far from every entry


# ---------------------------------------------------------------------------------- harness
def _char_features(prompts):
    feats = np.zeros((len(prompts), 64))
    for i, p in enumerate(prompts):
        for ch in p.lower():
            feats[i, ord(ch) % 64] += 1.0
    return feats


def test_run_comparison_end_to_end(tok, tmp_path):
    from lemoe_engine.editor import EditorConfig
    edits = [_edit(i) for i in range(5)]
    unrelated = [f"People in {c} speak" for c in COUNTRIES] + ["Which language is spoken in Peru?"]
    common = dict(batch_size=2, seed=0, out_dir=tmp_path, progress=False,
                  model_loader=lambda name: (_model(tok), tok), unrelated_prompts=unrelated,
                  lemoe_config={"query_source": "embedding", "query_pooling": "mean", "expert_hidden": 32},
                  editor_config=EditorConfig(max_steps=4), ftl_config=FTLConfig(max_steps=4, learning_rate=1e-2),
                  grace_config=GraceConfig(max_steps=4), plan_features=_char_features, timing_repeats=1)
    methods = ["none", "ft-l", "grace", "lemoe", "lemoe-kmeans", "lemoe-token"]
    rows = run_comparison("tiny-llama", edits, methods, limit_values=(4, 2), command="first", **common)
    assert [(r["method"], r["T"]) for r in rows] == [(m, t) for t in (2, 4) for m in methods]
    saved = json.loads((tmp_path / "editing_results.json").read_text())
    assert len(saved) == 12
    for row in saved:
        assert {"method", "T", "model", "status", "reliability", "generality", "locality", "average",
                "pre_edit", "device", "date", "command", "batch_size", "seed"} <= set(row)
        if row["status"] == "ok":
            assert {"edit_seconds", "seconds_per_edit", "steps", "batches", "inference"} <= set(row)
            assert row["inference"]["overhead"] > 0
            if row["method"] == "lemoe":  # one expert per edit (per routing-key group without the gate)
                assert 1 <= row["batches"] <= row["T"] and row["plan"].startswith("one expert per edit")
            else:  # batches of batch_size
                assert row["batches"] == -(-row["T"] // 2)
            assert 0 <= row["reliability"] <= 1 and row["average"] == pytest.approx(
                (row["reliability"] + row["generality"] + row["locality"]) / 3)
        else:  # a method the editor refuses is recorded with its reason, never with a number
            assert row["method"] == "lemoe-token" and row["status"] == "unsupported"
            assert row["reason"] and row["reliability"] is None
    none = [r for r in saved if r["method"] == "none"]
    assert all(r["locality"] == 1.0 and r["steps"] == 0 and r["reliability"] == r["pre_edit"]["reliability"]
               for r in none)
    ftl = next(r for r in saved if r["method"] == "ft-l" and r["T"] == 4)
    assert ftl["steps"] > 0 and ftl["method_config"]["learning_rate"] == 1e-2
    table = (tmp_path / "EDITING.md").read_text()
    for m in methods:
        assert f"| {m} | 2 |" in table and f"| {m} | 4 |" in table
    assert (tmp_path / "editing_vs_T.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # piecewise runs merge by (model, method, T)
    run_comparison("tiny-llama", edits, ["none"], limit_values=(2,), command="second", **common)
    saved = json.loads((tmp_path / "editing_results.json").read_text())
    assert len(saved) == 12
    assert [r["command"] for r in saved if r["method"] == "none"] == ["second", "first"]


def test_merge_rows_replaces_by_key_and_keeps_the_rest():
    old = [{"model": "m", "method": "grace", "T": 10, "x": 1}, {"model": "m", "method": "lemoe", "T": 10, "x": 2}]
    merged = merge_rows(old, [{"model": "m", "method": "grace", "T": 10, "x": 3},
                              {"model": "m", "method": "none", "T": 100, "x": 4}])
    assert [(r["method"], r["T"], r["x"]) for r in merged] == [("lemoe", 10, 2), ("grace", 10, 3), ("none", 100, 4)]


def test_cli_arguments_and_unknown_method(capsys):
    parser = add_compare_arguments(argparse.ArgumentParser())
    ns = parser.parse_args(["--limit", "10", "--limit", "100", "--methods", "grace,none", "--batch-size", "5"])
    assert ns.limits == [10, 100] and ns.methods == "grace,none" and ns.batch_size == 5 and ns.seed == 0
    assert set(METHODS) >= {"lemoe", "ft-l", "grace", "none", "lemoe-noplan", "lemoe-nogate", "lemoe-token",
                            "lemoe-hidden", "lemoe-top2", "lemoe-h256", "lemoe-h1024", "lemoe-kmeans"}
    ns = parser.parse_args(["--methods", "grace,magic"])
    assert run_compare_command(ns) == 2
    assert "magic" in capsys.readouterr().err
