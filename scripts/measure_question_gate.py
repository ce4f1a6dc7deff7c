"""The question gate (``lemoe_engine.question_gate``) under several settings, on one edited model
(issue 12: same-subject specificity).

Subject routing sends every question about an edited subject to its expert. The question gate
keeps a route only when the prompt asks one of the expert's edited questions (the cosine of
their MiniLM-L6 sentence embeddings at least ``t``) and, with a margin ``m``, is not more than
``-m`` closer to one of the expert's same-subject negatives (``negatives`` bank) than to its edits.
This script edits the first T records with the default editor (or loads ``--adaptor``, and can
``--save`` what it edited), then evaluates teacher-forced and greedy metrics on the same edited
model under each ``--settings`` entry: ``off``, ``T`` (cosine alone) or ``T:M`` (cosine and
margin), each with ``+name`` for ``question_gate_by_name`` (a prompt the anchors miss served by the
edited subject it names) and ``+floorF`` for ``question_gate_name_floor=F`` (the name-masked
cosine floor; without it, off). Counted per evaluated prompt, summed over the styles: anchored routes,
those the gate drops, and prompts served by name that the anchors routed nowhere or to a dropped
route.

Neither ``t`` nor ``m`` may be tuned on the scored records: the defaults (0.72, -0.07) were chosen
on bundled records 1000-1627, outside every scored set (``scripts/measure_gate_margin.py``;
README, *Question gate*).

    python scripts/measure_question_gate.py --limit 100 [--edits FILE] [--save DIR | --adaptor DIR]
        [--settings off,0.72:-0.07+name,0.72:-0.07+name+floor0.55] [--styles tf,gen] [--no-select]
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from lemoe_engine import LEMoEConfig, load, question_gate, save
from lemoe_engine.data import BUNDLED_EDITS, load_edits
from lemoe_engine.editor import EditorConfig, LifelongEditor
from lemoe_engine.evaluation import evaluate, unedited_reference
from lemoe_engine.cli import train_dtype_option
from lemoe_engine.models import load_model


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--edits", default=str(BUNDLED_EDITS))
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--settings", default="off,0.72:-0.07+name,0.72:-0.07+name+floor0.55")
    parser.add_argument("--styles", default="tf,gen")
    parser.add_argument("--adaptor", default=None, help="evaluate this saved adaptor instead of editing")
    parser.add_argument("--save", default=None, help="save the edited adaptor here")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-select", action="store_true",
                        help="LEMoEConfig.question_gate_selects=False: one expert per subject, the gate "
                             "checks the anchors' choice")
    parser.add_argument("--layer", type=int, default=None, help="LEMoEConfig.layer (default: the config's)")
    parser.add_argument("--lr", type=float, default=None, help="EditorConfig.learning_rate (default: the config's)")
    parser.add_argument("--train-dtype", default=None,
                        help="EditorConfig.train_dtype, or 'model' for None (default: the config's)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    edits = load_edits(args.edits, limit=args.limit, skip_invalid=True)
    model, tokenizer = load_model("smollm2-135m")
    modes = {"tf": "teacher_forced", "gen": "generate", "chat": "generate"}
    styles = args.styles.split(",")
    refs = {s: unedited_reference(model, tokenizer, edits, mode=modes[s], chat=s == "chat") for s in styles}
    out: dict = {"T": len(edits)}
    if args.adaptor:
        layer = load(model, args.adaptor, tokenizer=tokenizer)
        if args.no_select:
            layer.config = layer.config.replace(question_gate_selects=False)
        out["adaptor"] = args.adaptor
    else:
        layer_config = {**({"question_gate_selects": False} if args.no_select else {}),
                        **({} if args.layer is None else {"layer": args.layer})}
        editor = LifelongEditor(model, tokenizer, LEMoEConfig(**layer_config) if layer_config else None,
                                editor_config=EditorConfig(**({} if args.lr is None else {"learning_rate": args.lr}),
                                                           **({} if args.train_dtype is None
                                                              else {"train_dtype": train_dtype_option(args.train_dtype)})))
        start = time.time()
        editor.edit(edits, progress=False)
        out["edit_s"] = round(time.time() - start, 1)
        layer = editor.layer
        if args.save:
            save(model, args.save)
    out["experts"] = layer.num_experts
    out["layer"] = layer.base_info["layer"]
    out["selects"] = layer.config.question_gate_selects

    for setting in args.settings.split(","):
        if setting == "off":
            question_gate.disable(model)
        else:
            gate_setting, *extras = setting.split("+")
            cosine, _, margin = gate_setting.partition(":")
            gate = question_gate.enable(model, tokenizer, float(cosine), margin=float(margin) if margin else None)
            floors = [float(x[len("floor"):]) for x in extras if x.startswith("floor")]
            layer.config = layer.config.replace(question_gate_by_name="name" in extras,
                                                question_gate_name_floor=floors[0] if floors else None)
            counts = {"routes": 0, "dropped": 0, "by_name_missed": 0, "by_name_dropped": 0}

            def counting(layer, x, ids, weights, gate=gate, counts=counts):
                # first the gate without serving by name (what it drops), then as configured
                by_name = layer.config.question_gate_by_name
                layer.config = layer.config.replace(question_gate_by_name=False)
                plain_ids, _ = gate(layer, x, ids, weights)
                layer.config = layer.config.replace(question_gate_by_name=by_name)
                kept_ids, kept = gate(layer, x, ids, weights)
                anchored, plain, served = ids[:, 0] >= 0, plain_ids[:, 0] >= 0, kept_ids[:, 0] >= 0
                counts["routes"] += int(anchored.sum())
                counts["dropped"] += int((anchored & ~plain).sum())
                counts["by_name_missed"] += int((~anchored & served).sum())
                counts["by_name_dropped"] += int((anchored & ~plain & served).sum())
                return kept_ids, kept

            layer.route_filter = counting
        row = {}
        for s in styles:
            metrics = evaluate(model, tokenizer, edits, locality_ref=refs[s], mode=modes[s], chat=s == "chat",
                               progress=False).as_dict()
            row[s] = {k: round(v, 3) for k, v in metrics.items()
                      if k in ("reliability", "generality", "locality", "specificity") and v is not None}
        if setting != "off":
            row["gate_counts"] = counts
        out[setting] = row
        print(setting, json.dumps(row), flush=True)
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
