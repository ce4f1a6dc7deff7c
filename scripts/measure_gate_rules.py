"""Compare routing keys and gate margins on routing alone (no training): how many scored
locality prompts reach some expert (``leak``) against how many paraphrases still reach their
edit's expert (``para``) and own prompts theirs (``own``), as the number of edits grows.

Routing does not depend on training: the query centre, the anchors and the unrelated pool's
scores are fixed before any expert trains. So one pass plans a run exactly as
``LifelongEditor.edit`` does and computes, with the editor's own ``Calibration``, every anchor's
best unrelated score, its own edit's score and the paraphrase and locality prompts' scores; each
margin is then a formula over those numbers (the threshold ``min(best + margin, own - 1e-6)``).

Keys (``--keys``):
* ``subject`` (today's default): the subject's tokens up to its last, at most 3 (key windows);
* ``last``: the subject's last token alone (``query_window=1``, the keys before format 4);
* ``every3``: every key pools its last 3 prompt tokens, whatever the subject;
* ``decay``: every key pools 3 tokens weighted 1, 0.5, 0.25.

    OMP_NUM_THREADS=1 python scripts/measure_gate_rules.py \\
        --edits ../shared/data/zsre_mend_train-1k.json --limit 1000 --keys subject [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from lemoe_engine import LEMoEConfig
from lemoe_engine.data import BUNDLED_EDITS, bundled_unrelated_prompts, load_edits
from lemoe_engine.editor import EditorConfig, LifelongEditor
from lemoe_engine.models import load_model
from lemoe_engine.planner import plan_order

KEYS = ("subject", "last", "every3", "decay")
MARGINS = (0.0, 0.02, 0.04, 0.06, 0.08, 0.10)


def decayed(raw_vectors, weights=(1.0, 0.5, 0.25)):
    """``Calibration.token_vectors`` replaced: token t pools t, t-1, t-2 with ``weights``."""
    def vectors(prompts):
        out = []
        for v in raw_vectors(prompts):
            total, norm = v.clone(), torch.ones(v.shape[0], 1)
            for k, w in enumerate(weights[1:], start=1):
                total[k:] += w * v[:-k]
                norm[k:] += w
            out.append(total / norm)
        return out
    return vectors


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--edits", default=str(BUNDLED_EDITS))
    parser.add_argument("--limit", type=int, default=1000)
    parser.add_argument("--keys", choices=KEYS, default="subject")
    parser.add_argument("--json", default=None)
    parser.add_argument("--show", type=int, default=0, help="print up to N leaking locality prompts (margin 0.02)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    edits = list(load_edits(args.edits, limit=args.limit, skip_invalid=True))
    model, tokenizer = load_model("smollm2-135m")
    config = LEMoEConfig(query_window=1 if args.keys in ("last", "decay") else 3)
    editor = LifelongEditor(model, tokenizer, config, EditorConfig(), unrelated_prompts=bundled_unrelated_prompts())
    cal = editor.calibration
    cal.vector_cache = {}
    if args.keys == "every3":
        cal.key_windows = lambda spans: torch.full((len(spans),), 3, dtype=torch.int32)
    if args.keys == "decay":
        cal.token_vectors = decayed(cal.token_vectors)
    batches = plan_order(edits, batch_size=None, plan="keys", seed=0, features=editor.plan_features(edits))
    ordered = [edits[i] for batch in batches for i in batch]
    owner = torch.tensor([n for n, batch in enumerate(batches) for _ in batch])
    anchors, windows = cal.keys(ordered)
    best = cal.unrelated_best(ordered, anchors, windows)
    own = cal.scores([e.prompt for e in ordered], anchors, windows)
    para = cal.scores([e.rephrase for e in ordered], anchors, windows)
    loc = cal.scores([e.loc_prompt for e in ordered], anchors, windows)
    own_diag = own.diagonal()
    print(f"{len(ordered)} edits, {len(batches)} experts, key windows "
          f"{dict(sorted((w, int((windows == w).sum())) for w in set(windows.tolist())))}: "
          f"{time.perf_counter() - started:.0f} s")

    def evaluate(margin: float, m: int) -> dict:
        """Routes of the first ``m`` planned edits' prompts among their experts (as served)."""
        thresholds = torch.minimum(best + margin, own_diag - 1e-6)[:m]
        experts = int(owner[m - 1]) + 1

        def top1(scores):
            s = scores[:m, :m]
            s = torch.where(s >= thresholds, s, torch.full_like(s, float("-inf")))
            per_expert = torch.full((m, experts), float("-inf")).scatter_reduce(
                1, owner[:m].expand(m, -1), s, reduce="amax")
            value, index = per_expert.max(dim=1)
            return torch.where(torch.isfinite(value), index, torch.full_like(index, -1))
        return {"leak": round(float((top1(loc) >= 0).float().mean()), 3),
                "para": round(float((top1(para) == owner[:m]).float().mean()), 3),
                "own": round(float((top1(own) == owner[:m]).float().mean()), 3)}

    sizes = sorted({min(len(ordered), s) for s in (100, 300, len(ordered))})
    results = {f"{margin:.2f}": {m: evaluate(margin, m) for m in sizes} for margin in MARGINS}
    for margin, row in results.items():
        print(f"margin {margin}  " + "  ".join(f"T={m}: leak {r['leak']:.3f} para {r['para']:.3f} own {r['own']:.3f}"
                                            for m, r in row.items()))
    if args.show:
        thresholds = torch.minimum(best + 0.02, own_diag - 1e-6)
        value, column = (loc - thresholds).max(dim=1)
        for row in torch.nonzero(value >= 0).flatten()[:args.show].tolist():
            m = int(column[row])
            print(f"leak: {ordered[row].loc_prompt!r} -> anchor of {ordered[m].prompt!r} (subject "
                  f"{ordered[m].subject!r}, window {int(windows[m])}), score {float(loc[row, m]):.3f}, "
                  f"threshold {float(thresholds[m]):.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"edits": args.edits, "keys": args.keys, "n": len(ordered), "experts": len(batches),
                       "margins": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
