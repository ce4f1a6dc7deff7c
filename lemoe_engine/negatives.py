"""Negative prompts: same-subject questions an expert must leave alone.

Routing keys on the subject, so every question about an edited subject reaches its expert; an
expert trained only on its edits answers them all with its edit's target ("What is the capital
of France?" -> "Yen" after editing France's currency). The editor therefore also trains each
expert on a few *negative* prompts, the same subject asked about other relations, on which the
edited model's next-token distribution must equal the unedited model's (``training.BaseKL``).

They come from a generic template bank (people, places, organisations, works, species), written
for this purpose and disjoint from every template of the bundled edit set (edit, paraphrase and
scored specificity prompts alike: a test checks it), as the gate's unrelated pool is disjoint
from the scored locality prompts. A template that shares a content word with any edit of the
expert (its prompt or paraphrase) is skipped, and so is one tagged with the relation an edit
names (its ``relation`` field), so a negative does not ask the edited relation in other words.
"""

from __future__ import annotations

import random
import re
import zlib
from typing import Iterable, Optional, Sequence

# template -> words of the relations it asks (matched against an edit's ``relation``)
TEMPLATE_RELATIONS = {
    # any subject
    "Tell me about {s}.": (),
    "Give a short description of {s}.": (),
    "What is {s} best known for?": (),
    "What kind of thing is {s}?": ("instance", "type", "class"),
    "Why is {s} famous?": (),
    "What should everyone know about {s}?": (),
    # places
    "Where exactly is {s}?": ("location", "located", "continent", "region", "country"),
    "How many people live in {s}?": ("population",),
    "Which city hosts the government of {s}?": ("capital", "seat"),
    "What money do shoppers in {s} spend?": ("currency", "money"),
    "What tongue do most residents of {s} use?": ("language", "languages", "tongue"),
    "Which part of the world contains {s}?": ("continent", "region", "location"),
    "How are citizens of {s} described?": ("demonym", "nationality", "citizens"),
    "What number must you dial before calling {s}?": ("calling", "dialling", "dialing", "phone"),
    "Which suffix ends web addresses in {s}?": ("tld", "domain", "internet"),
    "What is the weather usually like in {s}?": ("climate", "weather"),
    "Who governs {s} today?": ("head", "leader", "government", "governor", "president"),
    # places, more wordings: one wording per relation let a question worded unlike it (and like
    # an edit of another relation) pass the question gate's margin. None is closer to a bundled
    # template than the first wordings are (MiniLM cosine <= 0.87: tests/test_negatives.py)
    "From which city is {s} run?": ("capital", "seat"),
    "What is the main administrative city of {s}?": ("capital", "seat"),
    "Which coins and notes are legal in {s}?": ("currency", "money"),
    "Which banknotes are used in {s}?": ("currency", "money"),
    "Which language do road signs in {s} use?": ("language", "languages", "tongue"),
    "What language is taught in the schools of {s}?": ("language", "languages", "tongue"),
    "Which continent would you travel to in order to visit {s}?": ("continent", "region", "location"),
    "{s} lies on what landmass?": ("continent", "region", "location"),
    "How do you refer to a citizen of {s}?": ("demonym", "nationality", "citizens"),
    "What is the adjective form of {s}?": ("demonym", "nationality", "citizens"),
    "Which digits does an overseas caller add to reach {s}?": ("calling", "dialling", "dialing", "phone"),
    "What digits start a phone number in {s} when called from abroad?": ("calling", "dialling", "dialing",
                                                                         "phone"),
    "What is the internet extension of {s}?": ("tld", "domain", "internet"),
    "Which letters end the names of websites registered in {s}?": ("tld", "domain", "internet"),
    # people
    "In which year was {s} born?": ("birth", "born", "birthdate"),
    "What did {s} do for a living?": ("occupation", "profession", "job", "employment"),
    "Which country did {s} come from?": ("country", "citizenship", "nationality", "origin"),
    "Where did {s} grow up?": ("birthplace", "residence", "birth", "origin"),
    "Who were the parents of {s}?": ("parent", "parents", "father", "mother"),
    "When did {s} die?": ("death", "died", "deathdate"),
    "When is the birthday of {s}?": ("birth", "born", "birthdate"),
    "What was the profession of {s}?": ("occupation", "profession", "job", "employment"),
    # organisations, works, species
    "Who started {s}?": ("founder", "founded", "founders"),
    "Who founded {s}?": ("founder", "founded", "founders"),
    "Which company makes {s}?": ("manufacturer", "developer", "producer", "company"),
    "Where are the offices of {s}?": ("headquarters", "headquartered", "offices", "location"),
    "Who created {s}?": ("creator", "author", "developer", "designer", "founder"),
    "When did {s} first appear?": ("inception", "release", "publication", "founded"),
    "Which genre does {s} belong to?": ("genre",),
    "What habitat does {s} live in?": ("habitat",),
    "Which taxonomic order includes {s}?": ("taxon", "order", "taxonomy", "parent"),
}
TEMPLATES = tuple(TEMPLATE_RELATIONS)

_STOP = frozenset("""a an the of in on at to by for from with about and or is are was were be been do does did
what which who whom whose when where why how name tell give me you your it its this that there their
has have had use used called call most one some any into as""".split())


def _stems(text: str, skip: Iterable[str] = ()) -> set[str]:
    skipped = {w.lower() for part in skip for w in re.findall(r"\w+", part)}
    words = [w.lower() for w in re.findall(r"[^\W\d_]+", text)]
    return {w[:5] for w in words if w not in _STOP and w not in skipped and len(w) > 2}


def negative_prompts(subject: str, edit_texts: Sequence[str], count: int,
                     extra: Sequence[str] = (), relations: Iterable[Optional[str]] = ()) -> list[str]:
    """``count`` bank prompts about ``subject`` that share no content word with ``edit_texts``
    (the prompts and paraphrases the expert is trained to change) and do not ask any of
    ``relations`` (the edits' ``relation`` fields, when the data names them: "What tongue do most
    residents of X use?" shares no word with "Which language is official in X?" yet asks it),
    chosen deterministically per subject; then ``extra`` prompts (e.g. removed edits' prompts),
    always kept."""
    taken = set().union(*(_stems(t, skip=[subject]) for t in edit_texts)) if edit_texts else set()
    asked = {w for r in relations if r for w in re.findall(r"[a-z]+", r.lower())}
    usable = [t for t, tags in TEMPLATE_RELATIONS.items()
              if not (_stems(t) & taken) and not (asked & set(tags))]
    if count <= 0 or not usable:
        return list(extra)
    picked = random.Random(zlib.crc32(subject.lower().encode())).sample(usable, min(count, len(usable)))
    seen: list[str] = []
    for prompt in [t.format(s=subject) for t in picked] + list(extra):
        if prompt not in seen:
            seen.append(prompt)
    return seen


def subject_of(edit) -> Optional[str]:
    """The edit's subject: its record's ``subject``, else the guess from its prompt."""
    from .keys import guess_subject
    return getattr(edit, "subject", None) or guess_subject(edit.prompt)
