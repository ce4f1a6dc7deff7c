"""Guessing an edit's subject when the record names none (the token its routing key sits on)."""

import pytest

from lemoe_engine.keys import guess_subject, named_subjects, names_subject


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
    ("Bulgaria is located on which continent?", "Bulgaria"),        # a prompt opening with its subject
    ("Peru's capital is which city?", "Peru"),
    ("Sir Walter Raleigh was born in which country?", "Sir Walter Raleigh"),
    ("Identify the capital of France.", "France"),                  # on a tie the later name wins
])
def test_guessed_subjects(prompt, subject):
    assert guess_subject(prompt) == subject


def test_nothing_to_guess():
    assert guess_subject("what is two plus two?") is None
    assert guess_subject("What is it?") is None
    assert guess_subject("") is None


@pytest.mark.parametrize("text,subject,named", [
    ("Peru's capital is which city?", "Peru", True),
    ("What is the capital of Peru?", "Peru", True),
    ("Bulgaria is located on which continent?", "Bulgaria", True),
    ("What is the capital of Papua New Guinea?", "Guinea", False),   # inside a longer name
    ("Who founded Ford Motor Company?", "Ford", False),
    ("What is the capital of Guinea-Bissau?", "Guinea", False),       # hyphenated name
    ("Is Peruvian food spicy?", "Peru", False),                      # inside a word
    ("what is the capital of peru?", "Peru", False),                 # case-sensitive
    ("Where is Guinea? Papua New Guinea is elsewhere.", "Guinea", True),
    ("New. Guinea borders Mali.", "Guinea", True),                   # a sentence's first word
    ("", "Peru", False),
    ("South Sudan is located on which continent?", "Sudan", False),  # a longer name opening the prompt
    ("Equatorial Guinea's capital is which city?", "Guinea", False),
    ("American Samoa uses which calling code?", "Samoa", False),
    ("Democratic Republic of the Congo's calling code is what?", "Republic of the Congo", False),
    ("What Peru exports most is copper.", "Peru", True),             # an opener before it is no name
])
def test_a_subject_is_named_as_a_whole_name(text, subject, named):
    """``names_subject``: the rule that leaves a subject's own questions out of the gate pool and
    lets the question gate serve a prompt by the edited subject it names."""
    assert names_subject(text, subject) is named


def test_a_subject_named_only_inside_another_named_subject_is_not_named():
    subjects = ["Congo", "Republic of the Congo", "Peru"]
    assert named_subjects("What is the capital of the Republic of the Congo?", subjects) == ["Republic of the Congo"]
    assert named_subjects("Is the Congo larger than the Republic of the Congo?", subjects) == \
        ["Congo", "Republic of the Congo"]
    assert named_subjects("Peru's capital is which city?", subjects) == ["Peru"]
    assert named_subjects("What is 3 plus 4?", subjects) == []
    # by where each is named, not by how often its letters occur ("Niger" twice, named once, inside)
    assert named_subjects("Is Nigeria bigger than the Republic of the Niger?", ["Niger", "Republic of the Niger"]) \
        == ["Republic of the Niger"]
