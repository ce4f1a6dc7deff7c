"""Which prompt token keys an edit when its record names no ``subject``.

The routing key of an edit is its subject's last token (where a transformer recalls facts about
the subject). Users' edit files rarely annotate the subject, so it is guessed from the prompt:
the longest run of capitalised words (a name), allowing lower-case connectors inside names
("Princess Margaretha of Liechtenstein", "Raffaele di Paco"), a parenthesised part right after
it ("USS Metcalf (DD-595)"), and a possessive "'s" cut off. Questions' opening words never count.
Measured on the subject-annotated records (README): the guess ends on the annotated subject's
last word for 95% of 998 real ZsRE records and 99% of the 1,628 bundled edits (97% while a
prompt's first word could not start a name); the rest are mostly
subjects ending in lower-case words ("Coahuilan box turtle" -> "Coahuilan"), whose guessed key
is still a token of the subject.
"""

from __future__ import annotations

import re
from typing import Optional

_OPENERS = frozenset("""what which who whom whose when where why how is are was were did does do
can could would should will has have had in the a an of on at to by for from with as about after
before since during if please name tell give list describe explain""".split())
"""Words that open a question or sentence and are never the first word of a name."""
_CONNECTORS = frozenset("""of de di da del der den von van la le du and & y al bin el dos das do upon
on the""".split())
_WORDS = re.compile(r"[\w'’\-.&]+|\([^)]*\)")


def guess_subject(prompt: str) -> Optional[str]:
    """The likely subject of ``prompt`` (a substring of it), or None when it names nothing."""
    words = [(m.start(), m.end(), m.group()) for m in _WORDS.finditer(prompt)]

    def capitalised(i: int) -> bool:
        word = words[i][2]
        # a prompt's first word is capitalised anyway: it counts unless it is a question or
        # function word (a prompt may open with its subject: "Peru's capital is")
        return (word[0].isupper() or word[0].isdigit()) and word.lower() not in _OPENERS

    runs: list[list[int]] = []
    current: list[int] = []
    for i, (_, _, word) in enumerate(words):
        joins = current and (word.startswith("(") or (word.lower() in _CONNECTORS
                                                      and i + 1 < len(words) and capitalised(i + 1)))
        if capitalised(i) or joins:
            current.append(i)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    if not runs:
        return None
    best = max(runs, key=lambda run: (len(run), words[run[0]][0]))  # longest; the later on ties
    start, end, last = words[best[0]][0], words[best[-1]][1], words[best[-1]][2]
    for possessive in ("'s", "’s", "'", "’"):
        if last.endswith(possessive) and len(last) > len(possessive):
            end -= len(possessive)
            break
    else:
        if last.endswith(".") and len(last) > 3:  # a sentence's full stop, not "Jr." or "U.S."
            end -= 1
    return prompt[start:end] or None


def names_subject(text: str, subject: str) -> bool:
    """Whether ``text`` names ``subject`` as a whole name, case-sensitively: not inside a longer
    word or hyphenated name, nor inside a longer capitalised name ("Guinea" is not named by
    "Papua New Guinea" or by a prompt opening "Equatorial Guinea", "Ford" not by "Ford Motor
    Company")."""
    return bool(_name_spans(text, subject))


def named_subjects(text: str, subjects) -> list[str]:
    """The ``subjects`` that ``text`` names (``names_subject``), less those it names only inside
    another of them ("Congo" when it asks about "the Republic of the Congo" and both are given)."""
    spans = {s: _name_spans(text, s) for s in dict.fromkeys(subjects)}
    spans = {s: found for s, found in spans.items() if found}
    every = [span for found in spans.values() for span in found]

    def inside_another(span: tuple[int, int]) -> bool:
        return any(o[0] <= span[0] and span[1] <= o[1] and o[1] - o[0] > span[1] - span[0] for o in every)

    return [s for s, found in spans.items() if not all(map(inside_another, found))]


def _name_spans(text: str, subject: str) -> list[tuple[int, int]]:
    """The (start, end) of each place where ``text`` names ``subject`` (``names_subject``)."""
    if not subject or subject not in text:
        return []
    pattern = re.compile(r"(?<![\w-])" + re.escape(subject) + r"(?![\w-])")
    return [m.span() for m in pattern.finditer(text) if not _inside_longer_name(text, m.start(), m.end())]


def _inside_longer_name(text: str, start: int, end: int) -> bool:
    """Whether the match ``text[start:end]`` is part of a longer capitalised name: the next word
    is capitalised, or the previous one is, unless that one opens the sentence as a question or
    function word (``_OPENERS``: "What Peru ...", not "South Sudan ...")."""
    after = re.match(r" (\w+)", text[end:])
    if after and after.group(1)[0].isupper():
        return True
    before = re.search(r"(\w+) $", text[:start])
    if not before or not before.group(1)[0].isupper():
        return False
    head = text[:before.start(1)].rstrip()
    opens_sentence = not head or head.endswith((".", "?", "!", ":", '"'))
    return not (opens_sentence and before.group(1).lower() in _OPENERS)
