"""Prompt rewordings trained as positives (``lemoe_engine.augment``)."""

import pytest

from lemoe_engine.augment import LEAD_INS, as_statement, prompt_variants
from lemoe_engine.editor import EditorConfig
from lemoe_engine.errors import ConfigError


@pytest.mark.parametrize("prompt,statement", [
    ("What is the international calling code of Egypt?", "The international calling code of Egypt is"),
    ("Which city is the capital of Argentina?", "The capital of Argentina is"),
    ("What was the name of the ship?", "The name of the ship was"),
    ("Which language is official in Syria?", None),     # no "the R of X" to complete
    ("When was WEFS established?", None),
    ("What is Paris?", None),
])
def test_statement_form(prompt, statement):
    assert as_statement(prompt) == statement


def test_variants_are_deterministic_distinct_and_never_the_prompt():
    prompt = "What is the official currency of Peru?"
    first = prompt_variants(prompt, 3)
    assert first == prompt_variants(prompt, 3)
    assert len(first) == 3 == len(set(first)) and prompt not in first
    assert first[0] == "The official currency of Peru is"
    assert all(v.endswith(prompt) and v[:-len(prompt)] in LEAD_INS for v in first[1:])
    assert prompt_variants(prompt, 0) == []
    # a prompt without a statement form gets lead-ins only; never more than exist
    assert len(prompt_variants("Who is X?", 100)) == len(LEAD_INS)
    # another prompt gets another (seeded) choice of lead-ins somewhere in a small sample
    picks = {tuple(prompt_variants(f"Who founded company {i}?", 2)[0][:10] for _ in range(1)) for i in range(12)}
    assert len(picks) > 1


def test_augment_must_be_a_count():
    for bad in (-1, 1.5, True):
        with pytest.raises(ConfigError, match="augment"):
            EditorConfig(augment=bad)


def test_augment_adds_its_rewordings_as_rows_of_the_edits_expert():
    """With augment=M each edit trains M more rows: its rewordings followed by the target, with
    the prompt's route and weight; the prompt rows themselves are unchanged."""
    import dataclasses

    from test_editor import CONFIG, FAST, UNRELATED, llama_for, tiny_edits
    from tiny_models import tiny_tokenizer
    from lemoe_engine.editor import LifelongEditor
    from lemoe_engine.tokens import encode_pairs

    tok = tiny_tokenizer(False)
    edit = tiny_edits(1, seed=3)[0]                      # "What is the capital city of X?"
    rows = {}
    for m in (0, 2):
        editor = LifelongEditor(llama_for(tok, seed=3), tok, CONFIG, dataclasses.replace(FAST, augment=m),
                                unrelated_prompts=UNRELATED)
        rows[m] = editor._job(editor.calibration.calibrate([[edit]])[0]).rows
    assert len(rows[2]) == len(rows[0]) + 2
    assert [r.ids for r in rows[2][:1]] == [r.ids for r in rows[0][:1]]
    variants = prompt_variants(edit.prompt, 2)
    assert variants[0] == "The capital city of " + edit.subject + " is"
    expected = encode_pairs(tok, variants, [edit.target] * 2)
    extra = [r for r in rows[2] if r.ids not in [q.ids for q in rows[0]]]
    assert [r.ids[:len(p.ids)] for r, p in zip(extra, expected)] == [p.ids for p in expected]
    for r, p in zip(extra, expected):
        assert r.labels[:p.prompt_len] == [-100] * p.prompt_len       # only the answer is scored
        assert r.weight == rows[0][0].weight and r.frozen_route == rows[0][0].frozen_route
