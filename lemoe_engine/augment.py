"""Other wordings of an edit's prompt, trained as positives beside the prompt itself.

An expert trained on one wording learns that wording; with same-subject negatives beside it
(``negatives``) it learns to tell that wording from everything else, and a paraphrase of the
edited relation then looks like a negative (bundled T=20: generality 1.00 -> 0.50 with 4
negatives). Training a few generic rewordings of the prompt as positives widens what counts as
"the edited question":

* the question turned into a sentence to complete ("What is the capital of X?" -> "The capital
  of X is"), when it has that common form;
* the question after a short lead-in that changes nothing ("Quick question: ...").

They are made from the prompt alone (never from the scored paraphrase) by fixed rules, chosen
deterministically per prompt.
"""

from __future__ import annotations

import random
import re
import zlib

LEAD_INS = (
    "Quick question: ",
    "I have a question. ",
    "Answer briefly. ",
    "Here is something I would like to know. ",
    "Please help me with this. ",
    "Tell me the answer. ",
)

# "What is the R of X?", "Which city is the R of X?" (one noun between wh-word and verb)
_WH_OF = re.compile(r"^\s*(?:what|which)(?:\s+[a-z]+)?\s+(is|was|are|were)\s+the\s+(.+?)\s*\?\s*$",
                    re.IGNORECASE)


def as_statement(prompt: str) -> str | None:
    """"What is the R of X?" / "Which city is the R of X?" -> "The R of X is" (also was, are,
    were); else None."""
    match = _WH_OF.match(prompt)
    if not match or " " not in match.group(2):
        return None
    return f"The {match.group(2)} {match.group(1).lower()}"


def prompt_variants(prompt: str, count: int) -> list[str]:
    """Up to ``count`` rewordings of ``prompt``: its statement form when it has one, then
    lead-in forms (a deterministic choice per prompt)."""
    if count <= 0:
        return []
    out = []
    statement = as_statement(prompt)
    if statement:
        out.append(statement)
    rng = random.Random(zlib.crc32(prompt.encode()))
    out += [lead + prompt for lead in rng.sample(LEAD_INS, len(LEAD_INS))]
    return [v for v in dict.fromkeys(out) if v != prompt][:count]
