"""Negative prompts: disjoint from every prompt the bundled set scores, never asking the edited
relation, deterministic."""

import re

from lemoe_engine.data import BUNDLED_EDITS, load_edits
from lemoe_engine.negatives import TEMPLATES, negative_prompts, subject_of


def _template(prompt: str, subject: str) -> str:
    return prompt.replace(subject, "{s}")


def test_bank_is_disjoint_from_every_scored_bundled_template():
    edits = load_edits(BUNDLED_EDITS)
    scored = set()
    for e in edits:
        for text in (e.prompt, e.rephrase, *e.specificity):
            scored.add(_template(text, e.subject))
    scored.update(e.loc_prompt for e in edits)
    assert len(scored) > 40  # the bundled set's 7 relations x several templates, and loc prompts
    assert not scored & set(TEMPLATES)
    for e in edits[:200]:  # and no generated negative equals a scored prompt of the set
        for prompt in negative_prompts(e.subject, [e.prompt, e.rephrase], 6):
            assert _template(prompt, e.subject) not in scored


def test_negatives_avoid_the_edited_relation_and_are_deterministic():
    texts = ["What money do shoppers in Peru spend today?", "Which currency is used in Peru?"]
    picked = negative_prompts("Peru", texts, len(TEMPLATES))
    assert picked and all("Peru" in p for p in picked)
    assert not any(re.search(r"\b(money|shoppers|spend|currency)\b", p) for p in picked)
    assert len(picked) < len(TEMPLATES)
    assert negative_prompts("Peru", texts, 4) == negative_prompts("Peru", texts, 4)
    assert negative_prompts("Peru", texts, 0, extra=["x?"]) == ["x?"]


def test_subject_falls_back_to_the_guess():
    class Edit:
        prompt = "What university did Watts Humphrey attend?"
        subject = None
    assert subject_of(Edit()) == "Watts Humphrey"


def test_negatives_skip_templates_asking_the_named_relation_in_other_words():
    # "tongue" shares no word with the language edit, so only the relation tag can keep it out
    texts = ["Which language is official in Peru?", "What is the official language of Peru?"]
    tongue = "What tongue do most residents of Peru use?"
    assert tongue in negative_prompts("Peru", texts, len(TEMPLATES))
    assert tongue not in negative_prompts("Peru", texts, len(TEMPLATES), relations=["language"])
    # every relation of the bundled set is known to the bank: some template is tagged with it
    edits = load_edits(BUNDLED_EDITS)
    for relation in {e.relation for e in edits}:
        everything = negative_prompts("X", [], len(TEMPLATES))
        kept = negative_prompts("X", [], len(TEMPLATES), relations=[relation])
        assert len(kept) < len(everything), relation
    # None relations (records without the field) change nothing
    assert negative_prompts("Peru", texts, 5, relations=[None]) == negative_prompts("Peru", texts, 5)


def test_no_bank_question_is_a_near_copy_of_a_scored_template():
    """Exact-string disjointness is not enough: a bank question worded almost like a scored one
    ("Which language is spoken in X?" beside "What language is officially spoken in X?", MiniLM
    cosine 0.97) would let the gate's margin learn the scored wording. With "Peru" as the subject
    none may be closer to a scored bundled template than 0.87 (the first bank's closest: 0.866;
    cosines grow with the subject's share of the sentence, hence one fixed short subject)."""
    from lemoe_engine.planner import sentence_features
    edits = load_edits(BUNDLED_EDITS)
    scored = sorted({_template(text, e.subject) for e in edits for text in (e.prompt, e.rephrase, *e.specificity)})
    scored = [t for t in scored if "{s}" in t]
    cosines = (sentence_features([t.format(s="Peru") for t in TEMPLATES])
               @ sentence_features([t.replace("{s}", "Peru") for t in scored]).T)
    worst = cosines.max(axis=1)
    assert worst.max() <= 0.87, (TEMPLATES[int(worst.argmax())], float(worst.max()))
