"""Choose the question gate's cosine and margin without training (issue 12: specificity).

For every subject of an edit file (grouped as the editor groups them: one expert per subject),
embed its edit prompts, its paraphrases, its scored same-subject other-relation prompts and the
negatives the gate builds for it (``question_gate.subject_negatives``). Then, for each (cosine, margin) pair, print the fraction of
paraphrases the gate keeps and of other-relation prompts it blocks. Only the sentence encoder
runs (about a minute on one thread).

Default records: bundled 1000-1627, outside every scored set (the defaults were chosen there).

    python scripts/measure_gate_margin.py [--edits FILE] [--start 1000] [--limit N]
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

COSINES = (0.70, 0.72, 0.74)
MARGINS = (None, -0.10, -0.08, -0.07, -0.06, -0.05)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--edits", default=str(BUNDLED_EDITS))
    parser.add_argument("--start", type=int, default=1000)
    parser.add_argument("--limit", type=int, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    edits = load_edits(args.edits, skip_invalid=True)[args.start:]
    edits = edits[:args.limit] if args.limit else edits
    groups: dict[str, list] = {}
    for edit in edits:
        groups.setdefault(subject_of(edit) or edit.prompt, []).append(edit)
    rows = {cut: ([], []) for cut in COSINES}  # per cosine (the no-relation rule uses it): kept, blocked
    for subject, group in groups.items():
        asked = sentence_features([e.prompt for e in group])
        paraphrases = sentence_features([e.rephrase for e in group])
        edited = {e.relation for e in group}
        others = [p for e in group for p, r in zip(e.specificity, e.specificity_relation or (None,) * len(e.specificity))
                  if r is None or r not in edited]
        other_vectors = sentence_features(others) if others else np.zeros((0, asked.shape[1]), np.float32)
        for cut in COSINES:
            negatives = subject_negatives(subject, group, cut).numpy()  # the gate's own rule
            for vectors, out in ((paraphrases, rows[cut][0]), (other_vectors, rows[cut][1])):
                for v in vectors:
                    out.append(((asked @ v).max(), (negatives @ v).max() if len(negatives) else -np.inf))
    print(f"{len(groups)} subjects, {len(rows[COSINES[0]][0])} paraphrases, "
          f"{len(rows[COSINES[0]][1])} other-relation prompts")
    print("cosine margin kept blocked")
    for cut, margin in itertools.product(COSINES, MARGINS):
        kept, blocked = (np.array(r).reshape(-1, 2) for r in rows[cut])

        def served(pairs):
            ok = pairs[:, 0] >= cut
            return ok if margin is None else ok & (pairs[:, 0] - pairs[:, 1] >= margin)
        blocked_rate = f"{1 - served(blocked).mean():.3f}" if len(blocked) else "-"
        print(f"{cut:.2f} {margin if margin is not None else 'none':>5} {served(kept).mean():.3f} {blocked_rate}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
