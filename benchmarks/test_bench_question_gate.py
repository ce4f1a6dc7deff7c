"""What the question gate (on by default) adds to a prefill, as a ledger grows.

The bundled SmolLM2-135M (fp32, CPU) with an adaptor whose ledger holds the first T bundled
edits, one expert per subject (random weights and anchors), prefill of a batch of B prompts
(padded to the longest). Two kinds of prompts (``asking``):

* ``edited``: B edited questions of distinct subjects (questions the gate serves whatever its
  cosine and margin, so every prompt takes the same path), anchor gates open so every prompt is
  routed, at random (checked: at least one, counted in ``served_by_name``, is not its question's
  expert). The gate takes its by-name path: one sentence-encoder call (MiniLM-L6, 22M
  parameters) over the prompts and their subject-masked forms (``question_gate.PromptBatch``),
  the ledger check (one scan: did it change?), the anchors' routes dropped (their experts hold no
  such question), then each prompt served by the expert of the subject it names
  (``question_gate_by_name``), after the negatives margin and the name-masked floor.
* ``unrelated``: B real questions (the records' locality prompts) that name no edited subject,
  anchor gates shut so the anchors route none, as calibrated anchors route most such prompts:
  the gate has nothing to check and makes no encoder call.

Variants: ``gate-on`` and ``gate-off`` (the same adaptor and gate object, the gate switched off in
the config: the anchors' route is served). The gate is enabled once per test, so its caches
(edit-prompt embeddings, negatives) are warm, as in serving. Rows carry ``paired_ratio_on_vs_off``
(gate-on time over gate-off time, measured in alternating pairs on the shared CPU),
``encoder_us`` (one encoder call over the prompts alone) and ``encoder_calls_per_prefill`` (with
the gate on). Checks: with the gate on, each edited question is served by its subject's expert
(its output differs from the unedited model's), and each unrelated prompt by none (its output
equals the unedited model's, bit for bit).
"""

from __future__ import annotations

import time

import pytest
import torch

import benchlib
from benchlib import CUDA
from lemoe_engine import LEMoEConfig, attach, detach, find_layer, question_gate
from lemoe_engine.data import BUNDLED_EDITS, load_edits
from lemoe_engine.keys import named_subjects
from lemoe_engine.ledger import entry_for
from lemoe_engine.patching import adaptors_disabled

PAIRS = 5
UNRELATED = "How many legs does a spider have?"

pytestmark = [pytest.mark.slow, pytest.mark.skipif(CUDA, reason="CPU figure (the gate's encoder runs on the CPU)"),
              pytest.mark.skipif(not question_gate.encoder_available(),
                                 reason=f"the gate's sentence encoder is not installed ({question_gate.ENCODER_INSTALL})")]

_MODEL: dict = {}


def _model():
    if not _MODEL:
        from lemoe_engine.models import load_model

        model, tokenizer = load_model("smollm2-135m")
        _MODEL["pair"] = (model.eval().requires_grad_(False), tokenizer)
    return _MODEL["pair"]


def _edited(model, edits, anchors_open: bool):
    """An adaptor of one random expert per subject of ``edits``, its ledger holding them all; its
    anchor gates open (every prompt routed) or shut (none routed)."""
    subjects = list(dict.fromkeys(e.subject for e in edits))
    layer = attach(model, LEMoEConfig(gate=not anchors_open))
    benchlib.fill_random_experts(layer, len(subjects), seed=4242,
                                 thresholds=None if anchors_open else torch.full((len(subjects),), 2.0))
    expert_of = {s: i for i, s in enumerate(subjects)}
    layer.ledger = [entry_for(edit, i + 1) for i, edit in enumerate(edits)]
    for entry in layer.ledger:
        entry.expert = expert_of[entry.subject]
    return layer, expert_of


def _prefill(model, batch):
    with torch.inference_mode():
        return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits


def _served(model, tokenizer, prompts):
    """(the expert serving each of ``prompts``, -1 for none; their logits; the unedited model's)."""
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    logits = _prefill(model, batch)
    experts = find_layer(model)._sequence_route[0][:, 0].tolist()
    with adaptors_disabled(model):
        unedited = _prefill(model, batch)
    return experts, logits, unedited


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


CASES = [(100, 1, "edited"), (100, 8, "edited"), (1000, 1, "edited"), (1000, 8, "edited"), (1000, 8, "unrelated")]


def _counting_encoder_calls(fn) -> int:
    """How many sentence-encoder calls ``fn()`` makes."""
    calls, real = [], question_gate._embed
    question_gate._embed = lambda texts: calls.append(len(texts)) or real(texts)
    try:
        fn()
    finally:
        question_gate._embed = real
    return len(calls)


@pytest.mark.parametrize("edits,batch,asking", CASES, ids=[f"T{t}-B{b}-{a}" for t, b, a in CASES])
@pytest.mark.parametrize("variant", ["gate-on", "gate-off"])
def test_prefill_with_the_question_gate(benchmark, bench_rows, request, edits, variant, batch, asking):
    model, tokenizer = _model()
    records = [e for e in load_edits(BUNDLED_EDITS, skip_invalid=True)[:edits] if e.subject]
    subjects = {e.subject for e in records}
    if asking == "edited":
        asked = list({e.subject: e for e in records if e.subject in e.prompt}.values())[:batch]
        prompts = [e.prompt for e in asked]
    else:  # real questions (the records' locality prompts) that name no edited subject
        prompts = [e.loc_prompt for e in records if not named_subjects(e.loc_prompt, subjects)][:batch]
    try:
        layer, expert_of = _edited(model, records, anchors_open=asking == "edited")
        own = [expert_of[e.subject] for e in asked] if asking == "edited" else [-1] * batch
        inputs = tokenizer(prompts, return_tensors="pt", padding=True)
        gated = layer.config  # the gate on (the default)
        ungated = gated.replace(question_gate=None)
        layer.config = ungated
        anchored, _, _ = _served(model, tokenizer, prompts)
        by_name = sum(a != o for a, o in zip(anchored, own))
        if asking == "edited":
            assert by_name, "the path timed is the gate's by-name one"
        else:
            assert anchored == own, "shut anchor gates route nothing"
        layer.config = gated
        question_gate.enable(model, tokenizer)  # one gate for the whole test: its caches stay warm
        experts, logits, unedited = _served(model, tokenizer, prompts)
        assert experts == own, f"{prompts} served by {experts}, not {own}"  # the edits' own experts, or none
        for got, base, expert in zip(logits, unedited, own):
            assert torch.equal(got, base) == (expert < 0), "a served prompt must change, an unserved one not"
        experts, logits, unedited = _served(model, tokenizer, [UNRELATED])
        assert experts == [-1] and torch.equal(logits, unedited), f"{UNRELATED!r} served by {experts}"
        encoder_us = 1e6 * sorted(_seconds(lambda: question_gate._embed(prompts)) for _ in range(5))[2]
        encoder_calls = _counting_encoder_calls(lambda: _prefill(model, inputs))

        on_times, off_times = [], []
        if benchmark.enabled:
            for _ in range(PAIRS):  # alternating pairs: both see the same machine load
                for config, times in ((gated, on_times), (ungated, off_times)):
                    layer.config = config  # the config is the gate's switch (the filter stays installed)
                    times.append(_seconds(lambda: _prefill(model, inputs)))
        layer.config = gated if variant == "gate-on" else ungated
        benchmark.group = f"question gate prefill B={batch}"
        out = benchmark.pedantic(lambda: _prefill(model, inputs), rounds=5, warmup_rounds=1)
        assert torch.isfinite(out).all()
        tokens = int(inputs.input_ids.shape[1])
        extra = {"encoder_us": encoder_us, "encoder_calls_per_prefill": encoder_calls, "asking": asking,
                 "ledger_entries": len(layer.ledger), "experts": layer.num_experts, "prompt_tokens": tokens,
                 "prompts": prompts, "served_by_name": by_name}
        if on_times:
            on_s, off_s = sorted(on_times)[PAIRS // 2], sorted(off_times)[PAIRS // 2]
            extra.update(paired_ratio_on_vs_off=on_s / off_s, paired_on_us=on_s * 1e6, paired_off_us=off_s * 1e6)
        bench_rows.add(benchmark, section="question_gate", case=f"T{edits}-B{batch}-{asking}-{variant}", backend="eager",
                       dtype=torch.float32, shapes={"T": edits, "batch": batch, "experts": layer.num_experts,
                                                    "prompt_tokens": tokens},
                       checks={"served_as_expected": True, "unserved_bit_identical": True},
                       extra=extra, request=request)
    finally:
        if find_layer(model) is not None:
            detach(model)
