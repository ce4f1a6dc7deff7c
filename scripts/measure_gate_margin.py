"""Choose the question gate's cosine and margin without training (issue 12: specificity).

Simulates the gate as it serves format-7 adaptors (one expert per edit, a subject's experts
sharing its key): a question about a subject is given to the edit of that subject whose prompt
is most like it (``LEMoEConfig.question_gate_selects``), then kept when its cosine to that prompt
is at least the threshold and at most ``-margin`` below its cosine to that edit's negatives
(``question_gate.subject_negatives``, the gate's own rule). Subject routing is taken as exact
(the anchors' part is measured by ``measure_gate_rules.py``). For each (cosine, margin) pair it
prints the fraction of paraphrases kept *by their own edit* and of same-subject other-relation
prompts (those about a relation no edit of the set changes, as ``evaluation`` scores them)
blocked, and their sum. Only the sentence encoder runs (about a minute on one thread).

Default records: bundled 1000-1627, outside every scored set (the defaults were chosen there:
``config.DEFAULT_QUESTION_GATE``).

    python scripts/measure_gate_margin.py [--edits FILE] [--start 1000] [--limit N]
        [--cosines 0.66,0.68,0.70] [--margins none,-0.08]
"""
from __future__ import annotations

import argparse
import itertools

import numpy as np
import torch

from lemoe_engine.data import BUNDLED_EDITS, load_edits
from lemoe_engine.negatives import subject_of
from lemoe_engine.planner import sentence_features
from lemoe_engine.question_gate import subject_negatives

COSINES = "0.64,0.66,0.68,0.70,0.72,0.74"
MARGINS = "none,-0.10,-0.09,-0.08,-0.07,-0.06,-0.04,0"


def _embed(texts, cache: dict) -> np.ndarray:
    missing = [t for t in dict.fromkeys(texts) if t not in cache]
    if missing:
        cache.update(zip(missing, sentence_features(missing)))
    return np.stack([cache[t] for t in texts])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--edits", default=str(BUNDLED_EDITS))
    parser.add_argument("--start", type=int, default=1000)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--cosines", default=COSINES)
    parser.add_argument("--margins", default=MARGINS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cosines = [float(c) for c in args.cosines.split(",")]
    margins = [None if m == "none" else float(m) for m in args.margins.split(",")]
    edits = load_edits(args.edits, skip_invalid=True)[args.start:]
    edits = edits[:args.limit] if args.limit else edits
    groups: dict = {}
    for edit in edits:  # an edit with no subject (none annotated, none guessed) stands alone, without negatives
        groups.setdefault(subject_of(edit) or ("", edit.prompt), []).append(edit)
    cache: dict = {}
    # per cosine (the no-relation rule of subject_negatives uses it): rows of
    # (picked its own edit, cosine to the picked edit, that cosine minus the best negative's)
    paraphrases = {cut: [] for cut in cosines}
    others = {cut: [] for cut in cosines}
    for subject, group in groups.items():
        asked = _embed([e.prompt for e in group], cache)
        edited = {e.relation for e in group}
        questions = [(k, e.rephrase, paraphrases) for k, e in enumerate(group)]
        questions += [(None, p, others) for e in group
                      for p, r in zip(e.specificity, e.specificity_relation or (None,) * len(e.specificity))
                      if r is None or r not in edited]
        vectors = _embed([q for _, q, _ in questions], cache)
        made: dict = {}  # (edit, the cosine if it names no relation): its negatives, made once

        def negatives_of(k, edit, cut):
            key = (k, None if edit.relation else cut)
            if key not in made:
                made[key] = (subject_negatives(subject, [edit], cut).numpy() if isinstance(subject, str)
                             else np.zeros((0, 1)))
            return made[key]

        for cut in cosines:
            negatives = [negatives_of(k, e, cut) for k, e in enumerate(group)]
            for (own, _, out), v in zip(questions, vectors):
                scores = asked @ v
                picked = int(scores.argmax())
                worst = (negatives[picked] @ v).max() if len(negatives[picked]) else -np.inf
                out[cut].append((own is None or picked == own, scores[picked], scores[picked] - worst))
    print(f"{len(groups)} subjects, {len(paraphrases[cosines[0]])} paraphrases, "
          f"{len(others[cosines[0]])} other-relation prompts")
    print("cosine margin kept blocked sum")
    for cut, margin in itertools.product(cosines, margins):
        def served(rows):
            rows = np.array(rows, dtype=np.float64).reshape(-1, 3)
            ok = (rows[:, 0] > 0) & (rows[:, 1] >= cut)
            return ok if margin is None else ok & (rows[:, 2] >= margin)
        kept = served(paraphrases[cut]).mean()
        blocked = 1 - served(others[cut]).mean() if others[cut] else float("nan")
        print(f"{cut:.2f} {margin if margin is not None else 'none':>5} {kept:.3f} {blocked:.3f} {kept + blocked:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
