"""Measure how well the locality gate separates unrelated prompts from edits.

Edits the first ``--limit`` records of an edit file with the default configuration, then reports

* ``leak_rate``: fraction of the records' scored locality prompts (``loc``) routed to any expert
  (``LifelongEditor.routes``, -1 = none);
* ``paraphrase_routed``: fraction of paraphrases routed to the same expert as their edit's prompt
  (what generality needs from the gate);
* without ``--routing-only``: teacher-forced reliability / generality / locality
  (``lemoe_engine.evaluation.evaluate``, locality against the unedited model);
* ``pool_seconds`` (token vectors of the unrelated pool, computed once per run) and
  ``edit_seconds`` (the pool's vectors plus the whole ``LifelongEditor.edit`` call).

``--routing-only`` trains each expert for one step: routing does not depend on training (anchors,
thresholds and the query centre are fixed before an expert trains), so leak_rate and
paraphrase_routed are exact and the run takes about a minute instead of several.

    flock /tmp/heavy.lock python scripts/measure_gate.py \
        --edits ../shared/data/zsre_mend_train-1k.json --limit 100 [--unrelated FILE] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from lemoe_engine import LEMoEConfig
from lemoe_engine.data import BUNDLED_EDITS, bundled_unrelated_prompts, load_edits
from lemoe_engine.editor import EditorConfig, LifelongEditor
from lemoe_engine.evaluation import evaluate, locality_reference
from lemoe_engine.models import load_model


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--edits", default=str(BUNDLED_EDITS))
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--unrelated", default=None,
                        help="one prompt per line (default: bundled_unrelated_prompts())")
    parser.add_argument("--routing-only", action="store_true",
                        help="one training step per expert; report routing figures only")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--show", type=int, default=0, help="print up to N leaking loc prompts")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    parser.add_argument("--gate-margin", type=float, default=None, help="LEMoEConfig.gate_margin (default: the config's)")
    parser.add_argument("--query-window", type=int, default=None, help="LEMoEConfig.query_window (default: the config's)")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    edits = list(load_edits(args.edits, limit=args.limit, skip_invalid=True))
    if args.unrelated:
        pool = [l.strip() for l in Path(args.unrelated).read_text(encoding="utf-8").splitlines() if l.strip()]
    else:
        pool = bundled_unrelated_prompts()
    model, tokenizer = load_model(args.model)
    reference = None if args.routing_only else locality_reference(model, tokenizer, edits)
    editor_config = EditorConfig(max_steps=1) if args.routing_only else EditorConfig()
    overrides = {name: value for name, value in (("gate_margin", args.gate_margin), ("query_window", args.query_window))
                 if value is not None}
    config = LEMoEConfig(**overrides)
    editor = LifelongEditor(model, tokenizer, config, editor_config, unrelated_prompts=pool)

    editor.token_vectors(pool[:8])  # warm-up, not timed
    started = time.perf_counter()
    pool_seconds = None
    if hasattr(editor, "calibration"):  # the pool's token vectors, cached for the edit below
        editor.calibration.unrelated_vectors()
        pool_seconds = round(time.perf_counter() - started, 1)
    reports = editor.edit(edits, progress=False)
    edit_seconds = time.perf_counter() - started

    own = editor.routes([e.prompt for e in edits])
    para = editor.routes([e.rephrase for e in edits])
    loc = editor.routes([e.loc_prompt for e in edits])
    out = {
        "edits": args.edits, "n_edits": len(edits), "n_unrelated": len(pool),
        "unrelated": args.unrelated or "bundled_unrelated_prompts()",
        "experts": len(reports), "routing_only": args.routing_only, "gate_margin": config.gate_margin,
        "leak_rate": float((loc >= 0).float().mean()),
        "paraphrase_routed": float(((para == own) & (own >= 0)).float().mean()),
        "own_routed_elsewhere": int(sum(r.misrouted for r in reports)),
        "pool_seconds": pool_seconds, "edit_seconds": round(edit_seconds, 1),
        "torch_threads": torch.get_num_threads(),
    }
    if not args.routing_only:
        metrics = evaluate(model, tokenizer, edits, locality_ref=reference, progress=False)
        out.update({k: v for k, v in metrics.as_dict().items() if isinstance(v, (int, float))})
    shown = 0
    for e, expert in zip(edits, loc.tolist()):
        if expert >= 0 and shown < args.show:
            subjects = sorted({x.subject or x.prompt for x, o in zip(edits, own.tolist()) if o == expert})
            print(f"leak: {e.loc_prompt!r} -> expert {expert} ({'; '.join(subjects)})", file=sys.stderr)
            shown += 1
    text = json.dumps(out, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
