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
