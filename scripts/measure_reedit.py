"""Facts that change again, measured on the bundled model (issue 12's re-edit target).

The first N bundled edits are edited with their targets A, saved, reloaded, and edited again
(`edit` on the loaded adaptor: a second run, as `lemoe edit --adaptor` does) with new targets B
(another edit's target of the same relation, never A nor what the unedited model answers;
an edit with no such target is left out). Reported, teacher-forced
(``evaluate``): B's reliability / generality / locality after A-then-B, the same for a fresh
edit of B on the unedited model, and A's reliability after A-then-B (A should be gone); each
teacher-forced and greedy.

    python scripts/measure_reedit.py --limit 20 [--question-gate 0.74 | --no-question-gate]
"""
import argparse
import dataclasses
import json
import tempfile
import time

import torch

from lemoe_engine import load, save
from lemoe_engine.data import BUNDLED_EDITS, load_edits
from lemoe_engine.editor import LifelongEditor
from lemoe_engine.evaluation import evaluate, greedy_token_ids, locality_reference, unedited_reference
from lemoe_engine.models import load_model
from lemoe_engine.patching import detach

torch.set_num_threads(int(__import__("os").environ.get("OMP_NUM_THREADS", "2")))
parser = argparse.ArgumentParser()
parser.add_argument("--limit", type=int, default=20)
parser.add_argument("--question-gate", type=float, default=None,
                    help="serve with the question gate at this cosine (default: the config's, on)")
parser.add_argument("--no-question-gate", action="store_true", help="serve without the question gate")
args = parser.parse_args()

model, tok = load_model("smollm2-135m")
pool = load_edits(BUNDLED_EDITS)
first = pool[:args.limit]
by_relation: dict = {}
for e in pool:  # B comes from the targets of the same relation (records without one: skipped)
    if e.relation:
        by_relation.setdefault(e.relation, []).append(e.target)
# the unedited model's own answers: B is never what the model already says (nor A)
said = [tok.decode(ids).strip().lower()
        for ids in greedy_token_ids(model, tok, [e.prompt for e in first], 6, batch_size=32)]
edits_a, edits_b = [], []
for i, (e, answer) in enumerate(zip(first, said)):
    options = [t for t in dict.fromkeys(by_relation.get(e.relation, []))
               if t != e.target and not answer.startswith(t.lower())]
    if not options:
        continue
    edits_a.append(e)
    edits_b.append(dataclasses.replace(e, target=options[(7 * i + 3) % len(options)]))
first = edits_a
reference = locality_reference(model, tok, first, progress=False)
greedy_reference = unedited_reference(model, tok, first, mode="generate")


def metrics(edits):
    """Teacher-forced (token accuracy: an old and a new value sharing tokens, "North America" /
    "South America", score partly) and greedy (the answer starts with the value); with
    ``--question-gate``, served through the question gate."""
    from lemoe_engine import question_gate
    if args.no_question_gate:
        question_gate.disable(model)
    elif args.question_gate is not None:
        question_gate.enable(model, tok, args.question_gate)
    out = {}
    for style, ref, mode in (("tf", reference, None), ("greedy", greedy_reference, "generate")):
        m = evaluate(model, tok, edits, locality_ref=ref, progress=False, mode=mode)
        out[style] = {k: round(getattr(m, k), 3) for k in ("reliability", "generality", "locality")}
    return out


out = {"T": len(first), "question_gate": None if args.no_question_gate else args.question_gate or "default"}
t0 = time.time()
LifelongEditor(model, tok).edit(edits_a, progress=False)
with tempfile.TemporaryDirectory() as folder:
    save(model, f"{folder}/a")
    detach(model)
    load(model, f"{folder}/a", tokenizer=tok)
    LifelongEditor(model, tok).edit(edits_b, progress=False)
out["a_then_b_s"] = round(time.time() - t0, 1)
out["b_after_a"] = metrics(edits_b)
out["a_after_b"] = metrics(edits_a)
detach(model)
t0 = time.time()
LifelongEditor(model, tok).edit(edits_b, progress=False)
out["fresh_b_s"] = round(time.time() - t0, 1)
out["b_fresh"] = metrics(edits_b)
print(json.dumps(out), flush=True)
