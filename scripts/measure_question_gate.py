"""The question gate (``lemoe_engine.question_gate``) side by side with today's serving, on one
edited model (issue 12: same-subject specificity).

Subject routing sends every question about an edited subject to its expert. A second gate could
keep a route only when the prompt asks the same question as one of the expert's edits: the cosine
of their sentence embeddings (the MiniLM-L6 encoder the planner already uses) at least ``t``.
This script edits the first T records with the default editor, then evaluates teacher-forced and
greedy metrics twice on the same edited model: as served by default, and with
``question_gate.enable(model, tokenizer, t)`` (a route whose expert holds no edit prompt within
cosine ``t`` of the prompt is dropped; the sequence then gets the base MLP's output), counting
the routes the gate drops.

``t`` must not be tuned on the scored records: the default 0.74 is the best global threshold on
bundled records 1000-1149 (outside every scored set; paraphrases kept 0.95, same-subject other-
relation prompts blocked 0.91), where real ZsRE paraphrases of records 0-399 score >= 0.74 for 0.97.

    python scripts/measure_question_gate.py --limit 100 [--threshold 0.74] [--edits FILE]
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from lemoe_engine import question_gate
from lemoe_engine.data import BUNDLED_EDITS, load_edits
from lemoe_engine.editor import LifelongEditor
from lemoe_engine.evaluation import evaluate, unedited_reference
from lemoe_engine.models import load_model


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--edits", default=str(BUNDLED_EDITS))
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--threshold", type=float, default=0.74)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    edits = load_edits(args.edits, limit=args.limit, skip_invalid=True)
    model, tokenizer = load_model("smollm2-135m")
    styles = {"tf": "teacher_forced", "gen": "generate"}
    refs = {s: unedited_reference(model, tokenizer, edits, mode=m) for s, m in styles.items()}
    editor = LifelongEditor(model, tokenizer)
    start = time.time()
    editor.edit(edits, progress=False)
    out = {"T": len(edits), "threshold": args.threshold, "experts": editor.layer.num_experts,
           "edit_s": round(time.time() - start, 1)}

    def measure(tag: str) -> None:
        for s, m in styles.items():
            metrics = evaluate(model, tokenizer, edits, locality_ref=refs[s], mode=m, progress=False).as_dict()
            out[f"{tag}_{s}"] = {k: round(v, 3) for k, v in metrics.items()
                                 if k in ("reliability", "generality", "locality", "specificity") and v is not None}
            print(tag, s, out[f"{tag}_{s}"], flush=True)

    question_gate.disable(model)  # the default since format 5: measured without it first
    measure("served")
    gate = question_gate.enable(model, tokenizer, args.threshold)
    counts = {"routes": 0, "dropped": 0}

    def counting(layer, x, ids, weights):
        kept_ids, kept = gate(layer, x, ids, weights)
        counts["routes"] += int((ids >= 0).sum())
        counts["dropped"] += int(((ids >= 0) & (kept_ids < 0)).sum())
        return kept_ids, kept

    editor.layer.route_filter = counting
    measure("question_gate")
    out["gate_counts"] = counts
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
