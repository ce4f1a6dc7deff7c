"""Blocked training (lemoe_engine.training) gives the experts one-at-a-time training gives.

Tiny random Llama, CPU. The same edits are trained with ``block_size=1`` (one expert at a
time) and with every new expert in one block; routing, steps, losses and weights must agree,
older experts must stay bit-identical, and an expert that stops early must not move while
the rest of its block trains on.
"""

import copy

import pytest
import torch

from lemoe_engine import ConfigError, find_layer, load
from lemoe_engine.editor import EditorConfig, LifelongEditor
from lemoe_engine.training import BaseKL, BlockTrainer, TargetNLL, TrainRow, auto_block_size
from test_editor import CONFIG, FAST, UNRELATED, llama_for, target_argmax_hits, tiny_edits
from tiny_models import tiny_tokenizer

SEQUENTIAL = EditorConfig(**{**FAST.__dict__, "block_size": 1})
BLOCKED = EditorConfig(**{**FAST.__dict__, "block_size": 64, "micro_batch": 4})


def _run(editor_config, edits, first, seed=7, config=CONFIG):
    tok = tiny_tokenizer(False)
    model = llama_for(tok, seed=seed)
    editor = LifelongEditor(model, tok, config, editor_config, unrelated_prompts=UNRELATED)
    editor.edit_batch(first)  # an older expert, before the run
    before = {n: getattr(editor.layer, n)[0].detach().clone() for n in editor.layer.weight_names}
    reports = editor.edit(edits, progress=False)
    return editor, reports, before


def test_blocked_training_matches_one_expert_at_a_time():
    edits = tiny_edits(9, seed=7)
    first, run = edits[:1], edits[1:]
    seq, seq_reports, seq_before = _run(SEQUENTIAL, run, first)
    blk, blk_reports, blk_before = _run(BLOCKED, run, first)
    assert len(blk_reports) == len(seq_reports) >= 4
    # same plan, anchors, thresholds, routing of prompts and paraphrases
    assert [r.n_edits for r in blk_reports] == [r.n_edits for r in seq_reports]
    assert torch.equal(blk.layer.anchors, seq.layer.anchors)
    assert torch.equal(blk.layer.thresholds, seq.layer.thresholds)
    prompts = [e.prompt for e in edits] + [e.rephrase for e in edits] + UNRELATED
    assert blk.routes(prompts).tolist() == seq.routes(prompts).tolist()
    # per expert: the same steps, losses within tolerance, weights close
    assert [r.steps for r in blk_reports] == [r.steps for r in seq_reports]
    assert len({r.steps for r in blk_reports}) > 1  # experts stopped at different steps in the block
    for b, s in zip(blk_reports, seq_reports):
        assert b.misrouted == s.misrouted and b.expert == s.expert
        assert b.loss == pytest.approx(s.loss, rel=1e-3, abs=1e-4)
    for name in blk.layer.weight_names:
        torch.testing.assert_close(getattr(blk.layer, name), getattr(seq.layer, name), rtol=1e-3, atol=1e-4)
    # the expert that existed before the run is bit-identical in both
    for name, before in blk_before.items():
        assert torch.equal(getattr(blk.layer, name)[0], before)
        assert torch.equal(getattr(seq.layer, name)[0], seq_before[name])
    assert all(target_argmax_hits(blk.model, blk.tokenizer, e) for e in edits)


def test_an_expert_that_stops_does_not_move_while_its_block_trains_on(monkeypatch):
    snapshots, steps = {}, {}
    original = BlockTrainer.run

    def recording_run(self, jobs, on_done, on_step=None):
        def record(job, result):
            snapshots[job] = {n: w.clone() for n, w in result.weights.items()}
            steps[job] = result.steps
            on_done(job, result)
        return original(self, jobs, record, on_step)

    monkeypatch.setattr(BlockTrainer, "run", recording_run)
    editor, reports, _ = _run(BLOCKED, tiny_edits(9, seed=7)[1:], tiny_edits(9, seed=7)[:1])
    early = min(steps, key=steps.get)
    assert steps[early] < max(steps.values())  # it stopped while others still trained
    layer = editor.layer
    for job, weights in snapshots.items():
        expert = 1 + job
        for name in layer.weight_names:
            assert torch.equal(getattr(layer, name)[expert], weights[name].to(getattr(layer, name).dtype))


@pytest.mark.parametrize("span", ["key", "prompt"])
def test_cached_paths_train_the_same_experts_as_full_forwards(monkeypatch, span):
    """The default (expert_span='key'): positions before each row's key keep the unedited
    states, so a step computes only the positions after them, against the prefix keys and values
    recorded once ("prefix" mode); with experts on every token ('prompt') the whole row above the
    target ("tail" mode). Either gives the steps and losses of full forwards with the same
    expert spans (the fallback when the self-check fails)."""
    edits = tiny_edits(6, seed=15)
    config = CONFIG.replace(expert_span=span)
    prefixes = []
    original = BlockTrainer._prefix_tail

    def recording(self, rows, hidden, calls, *rest):
        prefixes.extend(r.prefix for r in rows)
        return original(self, rows, hidden, calls, *rest)

    monkeypatch.setattr(BlockTrainer, "_prefix_tail", recording)
    cached, cached_reports, _ = _run(BLOCKED, edits[1:], edits[:1], seed=15, config=config)
    assert cached.last_run["mode"] == ("prefix" if span == "key" else "tail")
    if span == "key":  # rows with different prefixes, packed into the same passes
        assert max(prefixes) > 0 and min(prefixes) < max(prefixes)
    monkeypatch.setattr(BlockTrainer, "_self_check",
                        lambda self, rows, reference, active: setattr(self, "mode", "full"))
    fallback, full_reports, _ = _run(BLOCKED, edits[1:], edits[:1], seed=15, config=config)
    assert [r.steps for r in full_reports] == [r.steps for r in cached_reports]
    for a, b in zip(full_reports, cached_reports):
        assert a.loss == pytest.approx(b.loss, rel=1e-3, abs=1e-4)
    for editor in (cached, fallback):
        assert all(target_argmax_hits(editor.model, editor.tokenizer, e) for e in edits)


def test_interrupt_keeps_experts_completed_in_plan_order(tmp_path, monkeypatch):
    tok = tiny_tokenizer(False)
    model = llama_for(tok, seed=3)
    editor = LifelongEditor(model, tok, CONFIG, EditorConfig(**{**FAST.__dict__, "block_size": 3}),
                            unrelated_prompts=UNRELATED)
    original = BlockTrainer._step

    def step_then_interrupt(self, active, on_done):
        if 1 in active:  # the second expert has started
            raise KeyboardInterrupt
        return original(self, active, on_done)

    monkeypatch.setattr(BlockTrainer, "_step", step_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        editor.edit(tiny_edits(6, seed=3), batch_size=3, plan="none", save_to=tmp_path / "a", progress=False)
    assert editor.layer.num_experts == 1 and not len(editor.layer.trainable)
    assert load(llama_for(tok, seed=3), tmp_path / "a", tokenizer=tok).num_experts == 1


def test_misrouted_edit_is_left_out_and_reported():
    tok = tiny_tokenizer(False)
    model = llama_for(tok, seed=9)
    editor = LifelongEditor(model, tok, CONFIG, FAST, unrelated_prompts=UNRELATED)
    edit = tiny_edits(1, seed=9)[0]
    editor.edit_batch([edit])
    again = editor.edit_batch([edit])  # the same prompt: its key ties with expert 0, which wins
    assert again.misrouted == 1 and again.steps == 0
    layer = editor.layer
    assert not layer.w_down[1].any()  # the new expert never trained: still an exact no-op


def test_extra_loss_term_trains_beside_the_target_term():
    """A job can carry rows of another LossTerm (here: KL to the unedited model on a negative
    prompt); the trainer batches them with the edit rows of every job."""
    tok = tiny_tokenizer(False)
    model = llama_for(tok, seed=10)
    editor = LifelongEditor(model, tok, CONFIG, FAST, unrelated_prompts=UNRELATED)
    layer = editor.layer
    edits = tiny_edits(2, seed=10)
    jobs = []
    for k, edit in enumerate(edits):
        job = editor._job(editor.calibration.calibrate([[edit]])[0])
        negative = tok(f"Which language is spoken in {edit.subject}?", add_special_tokens=False)["input_ids"]
        job.rows.append(TrainRow(ids=negative, labels=[-100] * (len(negative) - 3) + negative[-3:], term="kl"))
        jobs.append(job)
    results = {}
    trainer = BlockTrainer(model, layer, learning_rate=FAST.learning_rate, weight_decay=0.0, max_steps=20,
                           block_size=8, micro_batch=8,
                           terms={"target": TargetNLL(FAST.stop_loss), "kl": BaseKL(stop=1e-3)})
    trainer.run(jobs, lambda job, result: results.setdefault(job, result))
    assert sorted(results) == [0, 1] and all(r.steps >= 1 for r in results.values())
    assert all(r.loss == r.loss for r in results.values())  # finite


def test_block_size_config_and_automatic_choice():
    with pytest.raises(ConfigError, match="block_size"):
        EditorConfig(block_size=0)
    tok = tiny_tokenizer(False)
    model = llama_for(tok, seed=11)
    editor = LifelongEditor(model, tok, CONFIG, FAST, unrelated_prompts=UNRELATED)
    size = auto_block_size(model, editor.layer, mean_tokens=16, micro_batch=32)
    assert 32 <= size <= 128
    assert editor.block_size() == size
    assert LifelongEditor(model, tok, None, EditorConfig(block_size=5), unrelated_prompts=UNRELATED).block_size() == 5
    assert find_layer(model) is editor.layer


def test_bfloat16_tail_option_still_learns_the_edits():
    edits = tiny_edits(5, seed=13)
    config = EditorConfig(**{**BLOCKED.__dict__, "train_dtype": "bfloat16"})
    tok = tiny_tokenizer(False)
    untouched = {n: p.detach().clone() for n, p in llama_for(tok, seed=13).named_parameters()}
    editor, reports, _ = _run(config, edits[1:], edits[:1], seed=13)
    assert editor.last_run["train_dtype"] == "bfloat16"
    assert all(r.steps < FAST.max_steps for r in reports)
    assert all(target_argmax_hits(editor.model, editor.tokenizer, e) for e in edits)
    # the bf16 copies are the trainer's own: the model keeps its fp32 weights
    for name, p in editor.model.named_parameters():
        if name in untouched:
            assert p.dtype == torch.float32 and torch.equal(p, untouched[name]), name
    with pytest.raises(ConfigError, match="train_dtype"):
        EditorConfig(train_dtype="int8")


def test_low_precision_copies_compute_what_autocast_computes():
    """The trainer casts the frozen matrices above the target once; a call with them gives
    autocast's bf16 result (not the fp32 one)."""
    tok = tiny_tokenizer(False)
    model = llama_for(tok, seed=5)
    editor = LifelongEditor(model, tok, CONFIG, FAST, unrelated_prompts=UNRELATED)
    trainer = BlockTrainer(model, editor.layer, learning_rate=0.1, weight_decay=0.0, max_steps=1, block_size=1,
                           micro_batch=1, terms={"target": TargetNLL(5.5)}, compute_dtype=torch.bfloat16)
    for module in [*trainer.upper, trainer.head]:
        copies = trainer.low_weights[module]
        assert copies and all(w.dtype == torch.bfloat16 for w in copies.values())
    head = trainer.head
    x = torch.randn(6, 5, head.weight.shape[1])
    exact = x.double() @ head.weight.double().T
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = head(x).double()
        copied = trainer._call(head, True, x).double()
    relative = lambda a, b: float((a - b).norm() / b.norm())
    assert relative(copied, autocast) < 1e-6
    assert 1e-5 < relative(copied, exact) < 3e-2  # bf16 products: not the fp32 path
    assert relative(trainer._call(head, False, x).double(), exact) < 1e-6


def test_auto_train_dtype_is_bfloat16_only_where_the_device_has_it(monkeypatch):
    from lemoe_engine import training
    tok = tiny_tokenizer(False)
    model = llama_for(tok, seed=3)
    monkeypatch.setattr(training, "native_bfloat16", lambda device: True)
    assert training.training_dtype("auto", model) == torch.bfloat16
    assert training.training_dtype(None, model) is None
    assert training.training_dtype("float32", model) is None  # the model's own dtype: no autocast
    assert training.training_dtype("bfloat16", model) == torch.bfloat16
    monkeypatch.setattr(training, "native_bfloat16", lambda device: False)
    assert training.training_dtype("auto", model) is None
    assert training.training_dtype("bfloat16", model) == torch.bfloat16  # asked for explicitly
    monkeypatch.setattr(training, "native_bfloat16", lambda device: True)
    assert training.training_dtype("auto", model.to(torch.bfloat16)) is None  # already bf16
    assert EditorConfig().train_dtype == "auto"


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gpt2"])
def test_cached_tail_path_holds_for_every_supported_family(family):
    from tiny_models import tiny_model
    tok = tiny_tokenizer(False)
    model = tiny_model(family, seed=0, vocab=len(tok), layers=4, hidden=64)
    model.config.pad_token_id = tok.pad_token_id
    editor = LifelongEditor(model, tok, CONFIG, BLOCKED, unrelated_prompts=UNRELATED)
    edits = tiny_edits(3, seed=14)
    editor.edit(edits, progress=False)
    assert editor.last_run["tail_path"]  # the self-check accepted the cached-tail shortcut
    # experts act from their key (the default): the attention of these families takes the
    # prefix's keys and values, so only the positions after each row's prefix are computed
    assert editor.last_run["mode"] == ("tail" if family == "gpt2" else "prefix")
    assert all(target_argmax_hits(model, tok, e) for e in edits)


def test_rows_longer_than_a_sliding_window_train_on_the_models_own_masks():
    """The prefix path builds its own attention mask, which knows no sliding window: a Mistral
    whose window is shorter than the rows trains in "tail" mode (the model's own masks)."""
    from tiny_models import tiny_model
    tok = tiny_tokenizer(False)
    model = tiny_model("mistral", seed=0, vocab=len(tok), layers=4, hidden=64)
    model.config.pad_token_id = tok.pad_token_id
    model.config.sliding_window = 4
    editor = LifelongEditor(model, tok, CONFIG, BLOCKED, unrelated_prompts=UNRELATED)
    edits = tiny_edits(3, seed=14)
    editor.edit(edits, progress=False)
    assert editor.last_run["mode"] == "tail"
    assert all(target_argmax_hits(model, tok, e) for e in edits)


SYSTEM_TEMPLATE = ("<s>system: You answer questions about the capital cities of the countries of the world.</s>"
                   "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
                   "{% if add_generation_prompt %}<s>assistant:{% endif %}")


def _chat_run(monkeypatch, share: bool):
    """Edits trained with their chat form, whose rows all begin with the template's system turn."""
    import lemoe_engine.training as training
    if not share:
        monkeypatch.setattr(training, "MIN_SHARED_LEAD", 10 ** 6)
    tok = copy.deepcopy(tiny_tokenizer(False))  # the cached tokenizer stays without a template
    tok.chat_template = SYSTEM_TEMPLATE
    model = llama_for(tok, seed=3)
    editor = LifelongEditor(model, tok, CONFIG, EditorConfig(**{**BLOCKED.__dict__, "train_chat": True}),
                            unrelated_prompts=UNRELATED)
    reports = editor.edit(tiny_edits(8, seed=5), progress=False)
    monkeypatch.undo()
    return editor, reports


def test_rows_sharing_a_lead_run_it_once_with_the_same_result(monkeypatch):
    """The chat rows' common system turn runs once as a key/value cache; it is used only after
    giving the same states as running every row whole, and then trains the same experts."""
    shared, shared_reports = _chat_run(monkeypatch, share=True)
    plain, plain_reports = _chat_run(monkeypatch, share=False)
    assert shared.last_run["shared_lead"] is True
    assert plain.last_run["shared_lead"] is None  # never tried: no lead long enough
    assert [r.steps for r in shared_reports] == [r.steps for r in plain_reports]
    for name in shared.layer.weight_names:
        torch.testing.assert_close(getattr(shared.layer, name), getattr(plain.layer, name), rtol=1e-3, atol=1e-4)


def test_a_lead_that_gives_other_states_is_not_used(monkeypatch):
    import lemoe_engine.training as training
    monkeypatch.setattr(training, "_same_states", lambda *args, **kwargs: False)
    editor, _ = _chat_run(monkeypatch, share=True)
    assert editor.last_run["shared_lead"] is False
