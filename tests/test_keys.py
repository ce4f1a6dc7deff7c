"""Guessing an edit's subject when the record names none (the token its routing key sits on)."""

import pytest

from lemoe_engine.keys import guess_subject


@pytest.mark.parametrize("prompt,subject", [
    ("What university did Watts Humphrey attend?", "Watts Humphrey"),
    ("Which family does Ramalinaceae belong to?", "Ramalinaceae"),
    ("What was the date of Friedrich Martin Berwerth's death?", "Friedrich Martin Berwerth"),
    ("What was the date of birth of Raffaele di Paco?", "Raffaele di Paco"),
    ("Which lady Princess Margaretha of Liechtenstein was born to?", "Princess Margaretha of Liechtenstein"),
    ("What type of submarine was USS Metcalf (DD-595) classified as?", "USS Metcalf (DD-595)"),
    ("What is the capital of France?", "France"),
    ("The official language of Peru is", "Peru"),
    ("Who founded Apple Inc.", "Apple Inc"),
])
def test_guessed_subjects(prompt, subject):
    assert guess_subject(prompt) == subject


def test_nothing_to_guess():
    assert guess_subject("what is two plus two?") is None
    assert guess_subject("What is it?") is None
    assert guess_subject("") is None
