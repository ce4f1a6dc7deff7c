"""Can the base model's own vectors tell a paraphrase from a same-subject question about another
relation? (issue 12, specificity: the design question behind a relation-dependent gate).

Routing keys on the subject, so a paraphrase of an edit and a question about another relation
of the same subject both reach the edit's expert (subject-token scores ~0.99 for both). A second,
relation gate would keep a route only when the prompt also asks the edit's relation. This script
measures whether any cheap vector the model already computes could drive such a gate: for each
record, the cosine between its edit prompt and

* its paraphrase (``para``: a relation gate must pass it),
* its scored same-subject other-relation prompts (``spec``: max over them; it must block them),
* ``--negatives`` same-subject prompts of the negative template bank (``neg``: what a per-edit
  threshold could be calibrated on, since the scored ones are never used),

for three relation vectors at several decoder layers, each from the layer's input (residual
stream) standardised per dimension with the statistics of bundled unrelated prompts' tokens:
``last`` (the last prompt token), ``mean`` (mean over the prompt tokens), ``nonsubject`` (mean
over the tokens outside the subject's span). Reported per variant: mean scores, the fraction of
records whose paraphrase outscores their spec prompts (``p>s``), the AUC of para against spec
scores over all records, and, for a global threshold, the fraction of paraphrases kept (``gen``)
and spec prompts blocked (``spec``).

Default records: bundled 1000-1149, outside the T=100 and T=1000 sets that are scored.

    python scripts/measure_relation_separation.py [--start 1000 --count 150] [--layers 4,8,16]
"""
from __future__ import annotations

import argparse
import json
import random

import torch
import torch.nn.functional as F

from lemoe_engine.data import BUNDLED_EDITS, bundled_unrelated_prompts, load_edits
from lemoe_engine.models import load_model
from lemoe_engine.negatives import negative_prompts
from lemoe_engine.patching import decoder_layers

VARIANTS = ("last", "mean", "nonsubject")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--edits", default=str(BUNDLED_EDITS))
    parser.add_argument("--start", type=int, default=1000)
    parser.add_argument("--count", type=int, default=150)
    parser.add_argument("--layers", default="4,8,16")
    parser.add_argument("--negatives", type=int, default=6)
    parser.add_argument("--pool", type=int, default=300, help="unrelated prompts for the statistics")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    records = [e for e in load_edits(args.edits) if e.specificity][args.start:args.start + args.count]
    model, tokenizer = load_model("smollm2-135m")
    layers = [int(i) for i in args.layers.split(",")]
    captured: dict[int, torch.Tensor] = {}
    blocks = decoder_layers(model)
    for i in layers:
        blocks[i].register_forward_pre_hook(
            lambda module, a, kw, i=i: captured.__setitem__(i, (a[0] if a else kw["hidden_states"])[0].detach()),
            with_kwargs=True)

    def tokens(prompt: str, subject) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token vectors [T, L, d] and the subject-span mask [T] of ``prompt``."""
        encoded = tokenizer(prompt, return_tensors="pt", return_offsets_mapping=True)
        with torch.no_grad():
            model(encoded.input_ids)
        offsets = encoded.offset_mapping[0]
        start = prompt.find(subject) if subject else -1
        in_subject = torch.zeros(len(offsets), dtype=torch.bool)
        if start >= 0:
            in_subject = (offsets[:, 0] < start + len(subject)) & (offsets[:, 1] > start)
        return torch.stack([captured[i] for i in layers], 1).float(), in_subject

    pool = [tokens(p, None)[0] for p in random.Random(0).sample(bundled_unrelated_prompts(), args.pool)]
    pool_tokens = torch.cat(pool)
    centre, spread = pool_tokens.mean(0), pool_tokens.std(0) + 1e-3

    def relation_vectors(prompt: str, subject) -> torch.Tensor:
        """[len(VARIANTS), L, d], each unit length."""
        vectors, in_subject = tokens(prompt, subject)
        z = (vectors - centre) / spread
        outside = ~in_subject if bool((~in_subject).any()) else torch.ones_like(in_subject)
        return F.normalize(torch.stack([z[-1], z.mean(0), z[outside].mean(0)]), dim=-1)

    scores = {"para": [], "spec": [], "neg": []}  # each [records, variants, layers]
    for edit in records:
        src = relation_vectors(edit.prompt, edit.subject)
        sims = lambda prompts: torch.stack([(relation_vectors(p, edit.subject) * src).sum(-1) for p in prompts])
        scores["para"].append(sims([edit.rephrase])[0])
        scores["spec"].append(sims(edit.specificity).max(0).values)
        negatives = negative_prompts(edit.subject, [edit.prompt, edit.rephrase], args.negatives,
                                     relations=[edit.relation])
        scores["neg"].append(sims(negatives).max(0).values)
    para, spec, neg = (torch.stack(scores[k]) for k in ("para", "spec", "neg"))

    rows = []
    for v, variant in enumerate(VARIANTS):
        for l, layer in enumerate(layers):
            p, s, n = para[:, v, l], spec[:, v, l], neg[:, v, l]
            row = {"variant": variant, "layer": layer, "para": p.mean().item(), "spec": s.mean().item(),
                   "neg": n.mean().item(), "p>s": (p > s).float().mean().item(),
                   "auc": (p[:, None] > s[None, :]).float().mean().item(),
                   "thresholds": {f"{t:.1f}": {"gen": (p >= t).float().mean().item(),
                                               "spec": (s < t).float().mean().item()}
                                  for t in (0.3, 0.4, 0.5, 0.6, 0.7)}}
            # the best a per-edit threshold calibrated on the bank negatives could do
            row["neg+0.02"] = {"gen": (p >= n + 0.02).float().mean().item(),
                               "spec": (s < n + 0.02).float().mean().item()}
            rows.append(row)
            best = max(row["thresholds"].items(), key=lambda kv: kv[1]["gen"] + kv[1]["spec"])
            print(f"{variant:10s} layer {layer:2d}: para {row['para']:.2f} spec {row['spec']:.2f} "
                  f"neg {row['neg']:.2f} | p>s {row['p>s']:.2f} auc {row['auc']:.3f} | "
                  f"best global threshold {best[0]}: gen {best[1]['gen']:.2f} spec {best[1]['spec']:.2f} | "
                  f"per-edit neg+0.02: gen {row['neg+0.02']['gen']:.2f} spec {row['neg+0.02']['spec']:.2f}",
                  flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"records": len(records), "start": args.start, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
