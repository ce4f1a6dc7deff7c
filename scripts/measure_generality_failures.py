"""Where generality is lost: every paraphrase's greedy answer, classified by what served it.

Edits the first T records with the default editor (one run), then for each record's paraphrase:

* ``ok``: the greedy answer (12 tokens) starts with the target;
* ``anchor:none``: served by no expert, the anchors routing it nowhere;
* ``gate:dropped``: served by no expert, the question gate dropping the anchors' route;
* ``gate:other-expert``: served by another expert than its edit's;
* ``expert:wrong-answer``: served by its own expert, which answers something else.

Also splits the counts by whether the prompt or the paraphrase begins with the subject (the
subject's first token is then the sequence's first, whose hidden state carries no context).

    python scripts/measure_generality_failures.py --edits FILE --limit T [--adaptor DIR] [--no-name]
        [--threads 2] [--list]
"""
from __future__ import annotations

import argparse
import collections
import time
import warnings

import torch

from lemoe_engine import find_layer, load, question_gate
from lemoe_engine.data import BUNDLED_EDITS, load_edits
from lemoe_engine.editor import LifelongEditor
from lemoe_engine.evaluation import greedy_continuations, starts_with_target
from lemoe_engine.models import load_model


def _subject_first(edit, text: str) -> bool:
    subject = (edit.subject or "").lower()
    return bool(subject) and text.lower().lstrip().removeprefix("the ").startswith(subject)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--edits", default=str(BUNDLED_EDITS))
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--list", action="store_true", help="print every failure")
    parser.add_argument("--adaptor", default=None, help="classify with this saved adaptor instead of editing")
    parser.add_argument("--no-name", action="store_true",
                        help="LEMoEConfig.question_gate_by_name=False: only the anchors route")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    edits = load_edits(args.edits, limit=args.limit, skip_invalid=True)
    model, tokenizer = load_model("smollm2-135m")
    if args.adaptor:
        load(model, args.adaptor, tokenizer=tokenizer)
        editor = LifelongEditor(model, tokenizer)
    else:
        editor = LifelongEditor(model, tokenizer)
        start = time.time()
        editor.edit(edits, progress=False)
        print(f"edited {len(edits)} in {time.time() - start:.1f} s", flush=True)
    layer = find_layer(model)
    # the gate as new adaptors serve it (an older adaptor loads with what it was made with)
    layer.config = layer.config.replace(question_gate_by_name=not args.no_name)
    own = {e.prompt: e.expert for e in layer.ledger if e.active}
    paraphrases = [e.rephrase for e in edits]
    question_gate.disable(model)
    anchored = editor.routes(paraphrases).tolist()
    question_gate.enable(model, tokenizer)
    served = []
    for text in paraphrases:
        with torch.no_grad():
            model(input_ids=tokenizer([text], return_tensors="pt").input_ids)
        served.append(int(layer._sequence_route[0][0, 0]))
    answers = greedy_continuations(model, tokenizer, paraphrases, max_new_tokens=12)
    counts: collections.Counter = collections.Counter()
    for edit, anchor, expert, answer in zip(edits, anchored, served, answers):
        if starts_with_target(answer, edit.target):
            kind = "ok"
        elif expert < 0:
            kind = "anchor:none" if anchor < 0 else "gate:dropped"
        elif expert != own.get(edit.prompt):
            kind = "gate:other-expert"
        else:
            kind = "expert:wrong-answer"
        first = _subject_first(edit, edit.prompt) or _subject_first(edit, edit.rephrase)
        counts[(first, kind)] += 1
        if args.list and kind != "ok":
            print(f"{kind:20} subject-first={first!s:5} {edit.prompt!r} | {edit.rephrase!r} -> {answer[:40]!r}"
                  f" (target {edit.target!r})")
    for first in (False, True):
        row = {kind: n for (f, kind), n in sorted(counts.items()) if f == first}
        total = sum(row.values())
        if total:
            print(f"{'subject first' if first else 'subject inside'}: {total} paraphrases, "
                  f"{row.get('ok', 0) / total:.3f} ok; {row}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
