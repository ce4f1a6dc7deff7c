"""Prompts that name an edited subject but ask none of its edited facts: how many does the adaptor
serve an expert (a leak), with and without ``LEMoEConfig.question_gate_by_name``.

The scored locality prompts (bundled and ZsRE) never name an edited subject, so they cannot show
whether serving by name leaks; the specificity prompts ask the subject's other relations in the
bundled templates' wordings. This probe asks about each edited subject in wordings of its own
(chat-like requests, statements with a question after the subject, tourist and history
questions), none asking a relation the bundled set edits, and counts the prompts served by some
expert with serving by name off, then on, then on with the name-masked floor (``--floor``). Every such route is a leak: the expert then answers
with its edit's target.

    python scripts/measure_subject_leak.py --adaptor DIR [--edits FILE] --limit T [--threads 2]
"""
from __future__ import annotations

import argparse
import json

import torch

from lemoe_engine import load
from lemoe_engine.data import BUNDLED_EDITS, load_edits
from lemoe_engine.models import load_model
from lemoe_engine.negatives import subject_of

TEMPLATES = (
    "Tell me something interesting about {s}.",
    "Write a short poem about {s}.",
    "{s} is a place I would like to visit one day. Any tips?",
    "How many tourists visited {s} last year?",
    "What is the weather like in {s} in spring?",
    "{s} has a long history. Summarise it in one sentence.",
    "{s}: what are three things everyone should know?",
    "Is {s} mentioned often in the news?",
)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adaptor", required=True)
    parser.add_argument("--edits", default=str(BUNDLED_EDITS))
    parser.add_argument("--limit", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--floor", type=float, default=0.55, help="question_gate_name_floor of the last pass")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    edits = load_edits(args.edits, limit=args.limit, skip_invalid=True)
    subjects = sorted({s for s in (subject_of(e) for e in edits) if s})
    prompts = [t.format(s=s) for s in subjects for t in TEMPLATES]
    model, tokenizer = load_model("smollm2-135m")
    layer = load(model, args.adaptor, tokenizer=tokenizer)
    out = {"adaptor": args.adaptor, "subjects": len(subjects), "prompts": len(prompts)}
    for by_name, floor in ((False, None), (True, None), (True, args.floor)):
        layer.config = layer.config.replace(question_gate_by_name=by_name, question_gate_name_floor=floor)
        per_template = [0] * len(TEMPLATES)
        for n, prompt in enumerate(prompts):
            with torch.no_grad():
                model(input_ids=tokenizer([prompt], return_tensors="pt").input_ids)
            per_template[n % len(TEMPLATES)] += int(layer._sequence_route[0][0, 0]) >= 0
        served = sum(per_template)
        out[f"by_name, floor {floor}" if by_name else "anchors_only"] = {
            "served": served, "rate": round(served / len(prompts), 4),
            "per_template": dict(zip(TEMPLATES, per_template))}
        print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
