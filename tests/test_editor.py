"""LifelongEditor on tiny random models: real edits, freeze semantics, save/reload/continue."""

import dataclasses
import random

import pytest
import torch

from lemoe_engine import ConfigError, LEMoEConfig, find_layer, load
from lemoe_engine.data import EditRecord
from lemoe_engine.editor import EditorConfig, LifelongEditor
from lemoe_engine.evaluation import evaluate, locality_reference
from lemoe_engine.tokens import encode_pairs
from tiny_models import CITIES, COUNTRIES, tiny_model, tiny_tokenizer

UNRELATED = ["What is 3 plus 4?", "Which letter comes after B?", "How many days are in a week?",
             "What is 10 minus 7?", "Which month follows May?", "What is 6 times 2?"]


def tiny_edits(n, seed=0):
    rng = random.Random(seed)
    countries = rng.sample(COUNTRIES, n)
    return [EditRecord(prompt=f"What is the capital city of {c}?", target=rng.choice(CITIES),
                       rephrase=f"The capital of {c} is", loc_prompt=f"What is {i} plus {i + 2}?",
                       loc_answer=str(2 * i + 2), subject=c) for i, c in enumerate(countries)]


def llama_for(tok, seed=0, layers=4):
    model = tiny_model("llama", seed=seed, vocab=len(tok), layers=layers, hidden=64)
    model.config.pad_token_id = tok.pad_token_id
    return model


CONFIG = LEMoEConfig(layer=2, query_source="layer1", expert_hidden=64, gate_margin=0.02)
# a tiny random model cannot push its near-uniform logits to a low loss: stop on argmax alone
FAST = EditorConfig(learning_rate=0.1, max_steps=80, stop_loss=5.5, negatives=0, train_dtype=None)


def target_argmax_hits(model, tok, edit):
    (row,) = encode_pairs(tok, [edit.prompt], [edit.target])
    ids = torch.tensor([row.ids])
    mask = torch.zeros_like(ids)
    mask[0, :row.prompt_len] = 1
    from lemoe_engine import query_mask
    with torch.no_grad(), query_mask(model, mask):
        logits = model(input_ids=ids).logits[0]
    predicted = logits[row.prompt_len - 1:len(row.ids) - 1].argmax(-1)
    return predicted.tolist() == row.ids[row.prompt_len:]


def test_one_edit_changes_the_argmax_of_its_target():
    tok = tiny_tokenizer(False)
    model = llama_for(tok)
    edit = tiny_edits(1)[0]
    assert not target_argmax_hits(model, tok, edit)
    editor = LifelongEditor(model, tok, CONFIG, FAST, unrelated_prompts=UNRELATED)
    report = editor.edit_batch([edit])
    assert report.expert == 0 and report.misrouted == 0 and report.steps < FAST.max_steps
    assert target_argmax_hits(model, tok, edit)
    # an unrelated prompt is gated off: the output is the unedited model's, bit for bit
    ids = tok(UNRELATED[0], return_tensors="pt").input_ids
    with torch.no_grad():
        edited = model(input_ids=ids).logits
        layer = find_layer(model)
        layer.disabled = True
        base = model(input_ids=ids).logits
        layer.disabled = False
    assert torch.equal(edited, base)


def test_the_expert_acts_from_the_subject_on_and_the_words_before_it_keep_their_states():
    """expert_span='key' (the default): an edited prompt's positions before its key token (the
    subject's last) give the unedited model's logits exactly; from the key on they change."""
    tok = tiny_tokenizer(False)
    model = llama_for(tok, seed=4)
    edit = tiny_edits(1, seed=4)[0]
    editor = LifelongEditor(model, tok, CONFIG, FAST, unrelated_prompts=UNRELATED)
    editor.edit_batch([edit])
    assert target_argmax_hits(model, tok, edit)
    ids = tok(edit.prompt, return_tensors="pt").input_ids
    subject_end = len(tok(edit.prompt[:edit.prompt.index(edit.subject) + len(edit.subject)])["input_ids"])
    layer = find_layer(model)
    with torch.no_grad():
        edited = model(input_ids=ids).logits[0]
        layer.disabled = True
        base = model(input_ids=ids).logits[0]
        layer.disabled = False
        start = int(layer.key_positions(*_query_batch(model, layer, ids))[0, 0])
    assert start == subject_end - 1  # the key: the subject's last token
    assert torch.equal(edited[:start], base[:start])
    assert not torch.allclose(edited[start:], base[start:])


def _query_batch(model, layer, ids):
    """(x, route ids) of ``ids`` as the layer saw them in its last forward call."""
    captured = {}
    handle = layer.register_forward_hook(lambda module, args, out: captured.setdefault("x", args[0]))
    try:
        model(input_ids=ids)
    finally:
        handle.remove()
    return captured["x"], layer._route(captured["x"])[0]


def test_older_experts_stay_bit_identical_and_edits_survive_later_batches():
    tok = tiny_tokenizer(False)
    model = llama_for(tok, seed=1)
    edits = tiny_edits(6, seed=1)
    editor = LifelongEditor(model, tok, CONFIG, FAST, unrelated_prompts=UNRELATED)
    editor.edit_batch(edits[:3])
    layer = editor.layer
    frozen = {n: getattr(layer, n).detach().clone() for n in layer.weight_names}
    anchors = layer.anchors.clone()
    editor.edit_batch(edits[3:])
    for name, before in frozen.items():
        assert torch.equal(getattr(layer, name)[0], before[0]), name
        assert not getattr(layer, name).requires_grad
    assert torch.equal(layer.anchors[:3], anchors) and layer.num_experts == 2
    reference = locality_reference(model, tok, edits, progress=False)
    metrics = evaluate(model, tok, edits, locality_ref=reference, progress=False)
    assert metrics.reliability == 1.0
    editor.remove_last_batch()
    assert layer.num_experts == 1 and layer.num_anchors == 3


def test_save_reload_and_continue_editing(tmp_path):
    tok = tiny_tokenizer(False)
    edits = tiny_edits(6, seed=2)
    model = llama_for(tok, seed=2)
    LifelongEditor(model, tok, CONFIG, FAST, unrelated_prompts=UNRELATED).edit(
        edits[:3], plan="kmeans", batch_size=3, save_to=tmp_path / "a", progress=False)
    fresh = llama_for(tok, seed=2)
    load(fresh, tmp_path / "a", backend="eager", tokenizer=tok)
    editor = LifelongEditor(fresh, tok, None, FAST, unrelated_prompts=UNRELATED)
    assert editor.layer.num_experts == 1
    editor.edit(edits[3:], plan="kmeans", batch_size=3, save_to=tmp_path / "b", progress=False)
    again = llama_for(tok, seed=2)
    layer = load(again, tmp_path / "b", backend="eager", tokenizer=tok)
    assert layer.num_experts == 2 and [e["n_edits"] for e in layer.expert_info] == [3, 3]
    assert all(target_argmax_hits(again, tok, e) for e in edits)


# the KeyboardInterrupt semantics are tested in test_blocked_training.py


def test_mean_pooling_editor_and_argument_errors():
    tok = tiny_tokenizer(False)
    model = llama_for(tok, seed=4)
    config = CONFIG.replace(query_pooling="mean")
    editor = LifelongEditor(model, tok, config, FAST, unrelated_prompts=UNRELATED)
    report = editor.edit_batch(tiny_edits(2, seed=4))
    assert editor.layer.num_anchors == 1 and report.n_edits == 2
    with pytest.raises(ConfigError, match="another config"):
        LifelongEditor(model, tok, CONFIG, FAST)
    # the question gate's fields are serving choices (an older adaptor loads with some off): a config
    # differing only in them continues the adaptor
    LifelongEditor(model, tok, config.replace(question_gate=None, question_gate_margin=None,
                                              question_gate_selects=not config.question_gate_selects,
                                              question_gate_by_name=not config.question_gate_by_name,
                                              question_gate_name_floor=None),
                   FAST, unrelated_prompts=UNRELATED)
    with pytest.raises(ConfigError, match="at least one"):
        editor.edit_batch([])
    with pytest.raises(ConfigError, match="learning_rate"):
        EditorConfig(learning_rate=0)
    with pytest.raises(ConfigError, match="unrelated_prompts"):
        LifelongEditor(llama_for(tok), tok, CONFIG, FAST, unrelated_prompts=[])


def served_experts(model, tok, prompts):
    """The expert each prompt is served by (top-1, -1 = none), through the question gate."""
    layer = find_layer(model)
    served = []
    for prompt in prompts:
        with torch.no_grad():
            model(input_ids=tok([prompt], return_tensors="pt").input_ids)
        served.append(int(layer._sequence_route[0][0, 0]))
    return served


@pytest.mark.parametrize("selects", [False, True])
def test_default_plan_gives_edits_with_one_key_one_expert(selects):
    """Token-embedding queries: an edit's key is its subject's last-token embedding, so edits
    about the same country have identical keys. Without ``question_gate_selects`` they must share
    an expert (the anchors cannot tell them apart); with it every edit gets its own expert and the
    question gate serves each prompt the expert holding it. The other edits get their own."""
    tok = tiny_tokenizer(False)
    model = llama_for(tok, seed=5)
    config = LEMoEConfig(layer=2, query_source="embedding", expert_hidden=64, gate_margin=0.02,
                         question_gate_selects=selects)
    countries = random.Random(5).sample(COUNTRIES, 3)
    relations = [("What is the capital city of {}?", CITIES[0]), ("Which city is the capital of {}?", CITIES[1]),
                 ("Which language is spoken in {}?", CITIES[2]), ("Name the capital of {}.", CITIES[3])]
    subjects = [countries[0], countries[1], countries[0], countries[2]]
    edits = [EditRecord(prompt=template.format(c), target=target, rephrase=template.format(c),
                        loc_prompt="What is 1 plus 1?", loc_answer="2", subject=c)
             for (template, target), c in zip(relations, subjects)]
    editor = LifelongEditor(model, tok, config, FAST, unrelated_prompts=UNRELATED)
    with pytest.raises(ConfigError, match="sizes experts by itself"):
        editor.edit(edits, batch_size=2, progress=False)
    reports = editor.edit(edits, progress=False)
    assert editor.routes([e.prompt for e in edits]).tolist() == [0, 1, 0, 2 + selects]  # the anchors' choice
    if selects:
        assert [r.n_edits for r in reports] == [1, 1, 1, 1]
        assert served_experts(model, tok, [e.prompt for e in edits]) == [0, 1, 2, 3]
    else:
        assert [r.n_edits for r in reports] == [2, 1, 1]
        assert served_experts(model, tok, [e.prompt for e in edits]) == [0, 1, 0, 2]
    assert all(target_argmax_hits(model, tok, e) for e in edits)
    assert [r.shared_keys for r in reports] == [0, 0, int(selects)] + [0] * selects
    # a later call about an already edited subject is told so; a new subject is not
    later = [EditRecord(prompt=f"Which currency is used in {c}?", target=CITIES[4], rephrase=f"Currency of {c}?",
                        loc_prompt="What is 1 plus 1?", loc_answer="2", subject=c)
             for c in (countries[0], next(c for c in COUNTRIES if c not in countries))]
    assert [r.shared_keys for r in editor.edit(later, progress=False)] == [1, 0]


def test_training_ends_the_answer_with_eos_so_generation_stops():
    tok = tiny_tokenizer(False)
    model = llama_for(tok, seed=6)
    edit = tiny_edits(1, seed=6)[0]
    (row,) = encode_pairs(tok, [edit.prompt], [edit.target])
    LifelongEditor(model, tok, CONFIG, FAST, unrelated_prompts=UNRELATED).edit_batch([edit])
    assert target_argmax_hits(model, tok, edit)
    prompt_ids = torch.tensor([row.ids[:row.prompt_len]])
    with torch.no_grad():
        out = model.generate(prompt_ids, max_new_tokens=len(row.ids) - row.prompt_len + 3, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    generated = out[0, row.prompt_len:].tolist()
    assert generated == row.ids[row.prompt_len:] + [tok.eos_token_id]


def test_token_vectors_stop_at_the_query_source_and_equal_the_full_forward():
    """Gate calibration embeds thousands of prompts: their query vectors are taken where they are
    made (decoder layer N, or the embeddings), and equal those seen at the target layer."""
    from lemoe_engine.patching import decoder_layers
    tok = tiny_tokenizer(False)
    prompts = ["What is the capital city of Peru?", "Which language is spoken in Chile?", "Hi"]
    for source, above in (("layer1", 1), ("embedding", 0)):
        model = llama_for(tok, seed=9)
        editor = LifelongEditor(model, tok, CONFIG.replace(query_source=source), FAST,
                                unrelated_prompts=UNRELATED)
        calls = []
        handle = decoder_layers(model)[above].register_forward_hook(lambda *a: calls.append(1))
        try:
            fast = editor.token_vectors(prompts)
        finally:
            handle.remove()
        assert calls == [], f"{source}: decoder layer {above} ran"

        def capture(layer, x):
            mask = layer.prompt_mask(x).bool()
            return [v[m].float().cpu() for v, m in zip(layer.token_vectors(x), mask)]
        full = [v for batch in editor.calibration.run_prompts(prompts, capture) for v in batch]
        assert len(fast) == len(full) == len(prompts)
        for a, b in zip(fast, full):
            assert a.shape == b.shape and torch.equal(a, b)


def test_gate_calibration_leaves_out_unrelated_prompts_naming_the_subject():
    """An 'unrelated' prompt that names the edit's subject is not unrelated to it: counting it
    would put the threshold at that prompt's score and shut the gate on the edit's paraphrases."""
    tok = tiny_tokenizer(False)
    model = llama_for(tok, seed=10)
    naming = "Tell me about Kenya and its people."
    editor = LifelongEditor(model, tok, CONFIG, FAST, unrelated_prompts=UNRELATED + [naming])
    by_subject = {e.subject: e for e in tiny_edits(16, seed=0)}
    anchor = editor.token_queries([naming])[0][-1:]               # a token of the naming prompt
    scores = editor.calibration.unrelated().best(anchor)[:, 0]                # every unrelated prompt
    assert int(scores.argmax()) == len(UNRELATED), "the naming prompt must be the best match"
    best = editor.calibration.unrelated_best([by_subject["Kenya"]], anchor)
    assert float(best[0]) == float(scores[:len(UNRELATED)].max()) < float(scores[-1])
    assert float(editor.calibration.unrelated_best([by_subject["Peru"]], anchor)[0]) == float(scores.max())
    # a subject guessed from the prompt (no record field) leaves nothing out: guesses can be
    # common words
    guessed = dataclasses.replace(by_subject["Kenya"], subject=None)
    assert float(editor.calibration.unrelated_best([guessed], anchor)[0]) == float(scores.max())
    # a pool that names the subject everywhere keeps every prompt: an empty pool would open the gate
    only_naming = LifelongEditor(model, tok, unrelated_prompts=[naming, "Where is Kenya?"])
    every = only_naming.calibration.unrelated().best(anchor)[:, 0]
    assert float(only_naming.calibration.unrelated_best([by_subject["Kenya"]], anchor)[0]) == float(every.max())
    # inside a longer capitalised name it is another name
    longer = LifelongEditor(model, tok, unrelated_prompts=UNRELATED + ["Who flies Kenya Airways?"])
    assert float(longer.calibration.unrelated_best([by_subject["Kenya"]], anchor)[0]) == float(
        longer.calibration.unrelated().best(anchor)[:, 0].max())


def test_a_runs_anchors_computed_together_equal_each_batchs_own():
    """Calibration computes a run's anchors, windows and thresholds in one go (max pooling);
    each must be what its batch alone gives (an anchor depends on its own edit only)."""
    tok = tiny_tokenizer(False)
    model = llama_for(tok, seed=4)
    editor = LifelongEditor(model, tok, CONFIG, FAST, unrelated_prompts=UNRELATED)
    edits = tiny_edits(7, seed=2)
    batches = [edits[:1], edits[1:4], edits[4:5], edits[5:]]  # batches of several sizes
    calibration = editor.calibration
    calibration.fit_center([e.prompt for e in edits])
    alone = [calibration.new_anchors(batch) for batch in batches]
    calibration.vector_cache = {}
    try:
        together = calibration._run_anchors(batches)
    finally:
        calibration.vector_cache = None
    assert len(together) == len(batches)
    for (a_anchors, a_gates, a_windows), (anchors, gates, windows) in zip(alone, together):
        assert anchors.shape == a_anchors.shape and torch.equal(windows, a_windows)
        torch.testing.assert_close(anchors, a_anchors, rtol=0, atol=1e-5)
        torch.testing.assert_close(gates, a_gates, rtol=0, atol=1e-5)
