"""Compare gate-threshold rules on routing alone (no training): how many scored locality prompts
reach some expert (``leak``) against how many paraphrases still reach their edit's expert
(``para``) and own prompts theirs (``own``), as the number of anchors grows.

Routing does not depend on training: the query centre, the anchors and the unrelated pool's
scores are fixed before any expert trains. So one pass computes, for every anchor of a run
planned exactly as ``LifelongEditor.edit`` plans it, the pool's scores on it (prompts naming the
edit's subject left out, as ``Calibration.unrelated_best`` does), its own edit's score, and the
paraphrase and locality prompts' scores; each rule is then a formula over those numbers.

Rules:
* ``max+m``: today's (``gate_margin`` m above the best pool score);
* ``tail p``: the pool's upper tail fitted as exponential (peaks over the ``TAIL``-th best score):
  the threshold where an unrelated prompt passes with probability ``p`` (``max+0.02`` floor).

    OMP_NUM_THREADS=1 python scripts/measure_gate_rules.py \
        --edits ../shared/data/zsre_mend_train-1k.json --limit 1000 --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time

import torch

from lemoe_engine import LEMoEConfig
from lemoe_engine.calibration import _inside_longer_name, _max_sim, _pad
from lemoe_engine.data import BUNDLED_EDITS, bundled_unrelated_prompts, load_edits
from lemoe_engine.editor import EditorConfig, LifelongEditor
from lemoe_engine.models import load_model
from lemoe_engine.planner import plan_order


def pool_scores(calibration, edits, anchors: torch.Tensor) -> torch.Tensor:
    """[P, M] pool scores, -inf where the prompt names the edit's subject (as the editor does)."""
    scores = calibration.unrelated().best(anchors)
    for column, edit in enumerate(edits):
        if not edit.subject:
            continue
        pattern = re.compile(r"(?<![\w-])" + re.escape(edit.subject) + r"(?![\w-])")
        rows = [i for i, text in enumerate(calibration.unrelated_prompts)
                if any(not _inside_longer_name(text, m.start(), m.end()) for m in pattern.finditer(text))]
        if rows and len(rows) < scores.shape[0]:
            scores[rows, column] = float("-inf")
    return scores


def subject_tokens(tokenizer, prompt: str, subject) -> int:
    """How many prompt tokens the subject's last mention spans (0 when not found)."""
    if not subject:
        return 0
    start = prompt.rfind(subject)
    if start < 0:
        return 0
    end = start + len(subject)
    offsets = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return sum(1 for a, b in offsets if a < end and b > start and b > a)


def window(vectors, w: int):
    out = []
    for v in vectors:
        c = torch.cat([torch.zeros_like(v[:1]), v.cumsum(0)])
        t = torch.arange(1, v.shape[0] + 1)
        lo = (t - w).clamp_min(0)
        out.append((c[t] - c[lo]) / (t - lo).unsqueeze(1))
    return out


def subject_window_setup(editor, edits, most: int):
    from lemoe_engine.calibration import _FlatQueries
    from lemoe_engine.keys import guess_subject
    cal = editor.calibration
    tokenizer = cal.tokenizer
    prompts = [e.prompt for e in edits]
    cal.fit_center(prompts)
    raw = cal.token_vectors(prompts)
    per_window = {w: cal.encode(window(raw, w)) for w in range(1, most + 1)}
    positions = cal.key_positions(edits, per_window[1])
    sizes = []
    for e in edits:
        n = subject_tokens(tokenizer, e.prompt, e.subject) or subject_tokens(tokenizer, e.prompt, guess_subject(e.prompt))
        sizes.append(min(most, max(1, n)))
    anchors = torch.stack([per_window[w][i][p] for i, (w, p) in enumerate(zip(sizes, positions))])
    batches = plan_order(edits, batch_size=None, plan="keys", seed=0, features=anchors.numpy())
    order = [i for batch in batches for i in batch]
    ordered = [edits[i] for i in order]
    owner = torch.tensor([n for n, batch in enumerate(batches) for _ in batch])
    anchors = anchors[order]
    sizes = torch.tensor([sizes[i] for i in order])
    positions = [positions[i] for i in order]
    print("anchor windows:", {w: int((sizes == w).sum()) for w in range(1, most + 1)})

    def pick(score_of_window):
        out = None
        for w in range(1, most + 1):
            scores = score_of_window(w)
            out = scores if out is None else torch.where(sizes == w, scores, out)
        return out
    pool_raw = cal.unrelated_vectors()
    pool = pick(lambda w: _FlatQueries.of(cal.encode(window(pool_raw, w))).best(anchors))
    for column, edit in enumerate(ordered):   # as pool_scores: prompts naming the subject left out
        if not edit.subject:
            continue
        pattern = re.compile(r"(?<![\w-])" + re.escape(edit.subject) + r"(?![\w-])")
        rows = [i for i, text in enumerate(cal.unrelated_prompts)
                if any(not _inside_longer_name(text, m.start(), m.end()) for m in pattern.finditer(text))]
        if rows and len(rows) < pool.shape[0]:
            pool[rows, column] = float("-inf")

    def scores_of(texts):
        vectors = cal.token_vectors(texts)
        out = []
        for s in range(0, len(texts), 256):
            chunk = vectors[s:s + 256]

            def one(w):
                padded, mask = _pad(cal.encode(window(chunk, w)))
                return _max_sim(padded, mask, anchors)
            out.append(pick(one))
        return torch.cat(out)
    return ordered, owner, anchors, pool, scores_of, positions


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--edits", default=str(BUNDLED_EDITS))
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--limit", type=int, default=1000)
    parser.add_argument("--json", default=None)
    parser.add_argument("--decay", type=float, default=1.0, help="experiment: weight decay**k for the k-th token back")
    parser.add_argument("--window", type=int, default=1,
                        help="LEMoEConfig.query_window")
    parser.add_argument("--subject-window", type=int, default=0,
                        help="experiment: each anchor pools min(N, its subject's tokens) tokens, and is "
                             "scored against queries pooled the same way (the layer's window off)")
    parser.add_argument("--query-source", default=None, help="LEMoEConfig.query_source (default: the config's)")
    parser.add_argument("--show", type=int, default=0, help="print up to N leaking locality prompts (max+0.10)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    edits = list(load_edits(args.edits, limit=args.start + args.limit, skip_invalid=True))[args.start:]
    model, tokenizer = load_model("smollm2-135m")
    # --decay != 1: the window is applied here (weights decay**k), the layer's own is off
    config = LEMoEConfig(query_window=args.window if args.decay == 1 and not args.subject_window else 1,
                         **({} if args.query_source is None else {"query_source": args.query_source}))
    editor = LifelongEditor(model, tokenizer, config, EditorConfig(), unrelated_prompts=bundled_unrelated_prompts())
    cal = editor.calibration
    cal.vector_cache = {}
    if args.window > 1 and args.decay != 1:
        raw_vectors = cal.token_vectors

        def windowed(prompts):
            out = []
            for v in raw_vectors(prompts):
                acc = v.clone()
                norm = torch.ones(v.shape[0], 1)
                for k in range(1, args.window):
                    acc[k:] += args.decay ** k * v[:-k]
                    norm[k:] += args.decay ** k
                out.append(acc / norm)
            return out
        cal.token_vectors = windowed
    if args.subject_window:
        ordered, owner, anchors, pool, scores_of, positions = subject_window_setup(editor, edits, args.subject_window)
    else:
        features = editor.plan_features(edits)
        batches = plan_order(edits, batch_size=None, plan="keys", seed=0, features=features)
        ordered = [edits[i] for batch in batches for i in batch]
        owner = torch.tensor([n for n, batch in enumerate(batches) for _ in batch])
        queries = cal.token_queries([e.prompt for e in ordered])
        positions = cal.key_positions(ordered, queries)
        anchors = torch.stack([q[p] for q, p in zip(queries, positions)])             # [M, k]
        pool = pool_scores(cal, ordered, anchors)                                     # [P, M]

        def scores_of(prompts):
            out = []
            for s in range(0, len(prompts), 256):
                padded, mask = _pad(cal.token_queries(prompts[s:s + 256]))
                out.append(_max_sim(padded, mask, anchors))
            return torch.cat(out)                                                      # [N, M]
    batches = range(int(owner.max()) + 1)

    own = scores_of([e.prompt for e in ordered])
    para = scores_of([e.rephrase for e in ordered])
    loc = scores_of([e.loc_prompt for e in ordered])
    print(f"{len(ordered)} edits, {len(batches)} experts, pool {pool.shape[0]}: {time.perf_counter() - started:.0f} s")

    finite = torch.where(torch.isfinite(pool), pool, torch.full_like(pool, float("nan")))
    best = pool.max(dim=0).values
    sorted_pool = torch.sort(torch.nan_to_num(finite, nan=-2.0), dim=0, descending=True).values
    n_pool = torch.isfinite(pool).sum(dim=0).float()
    own_diag = own.diagonal()

    def tail_threshold(p: float, tail: int = 50) -> torch.Tensor:
        u = sorted_pool[tail]
        beta = (sorted_pool[:tail] - u).mean(dim=0).clamp_min(1e-4)
        return u + beta * torch.log(tail / (n_pool * p))

    def evaluate(thresholds: torch.Tensor, sizes) -> dict:
        thresholds = torch.minimum(thresholds, own_diag - 1e-6)
        row = {}
        for m in sizes:
            keep = slice(0, m)
            n_experts = int(owner[m - 1]) + 1

            def top1(scores):
                s = scores[:m, keep]
                s = torch.where(s >= thresholds[keep], s, torch.full_like(s, float("-inf")))
                per_expert = torch.full((m, n_experts), float("-inf")).scatter_reduce(
                    1, owner[keep].expand(m, -1), s, reduce="amax")
                value, index = per_expert.max(dim=1)
                return torch.where(torch.isfinite(value), index, torch.full_like(index, -1))
            para_routes = top1(para)
            row[m] = {"para_none": round(float((para_routes < 0).float().mean()), 3),
                      "leak": round(float((top1(loc) >= 0).float().mean()), 3),
                      "para": round(float((top1(para) == owner[:m]).float().mean()), 3),
                      "own": round(float((top1(own) == owner[:m]).float().mean()), 3)}
        return row

    # decoys: the subject's last word out of the subject, in generic sentences
    templates = ["What does the word {w} mean?", "Tell me something about the {w}.", "Where is the {w}?",
                 "Who wrote a song about the {w}?"]
    decoy_prompts, decoy_owner = [], []
    for m, edit in enumerate(ordered):
        words = (edit.subject or "").split()
        if len(words) < 2:
            continue
        for form in dict.fromkeys((words[-1], words[-1].lower())):
            for t in templates:
                decoy_prompts.append(t.format(w=form))
                decoy_owner.append(m)
    decoy_best = torch.full((len(ordered),), float("-inf"))
    if decoy_prompts:
        unique = list(dict.fromkeys(decoy_prompts))
        index = {p: i for i, p in enumerate(unique)}
        padded, mask = _pad(cal.token_queries(unique))
        for p, m in zip(decoy_prompts, decoy_owner):
            i = index[p]
            score = float((padded[i][mask[i]] @ anchors[m]).max())
            decoy_best[m] = max(float(decoy_best[m]), score)
    print(f"decoys: {len(decoy_prompts)} prompts for {int(torch.isfinite(decoy_best).sum())} anchors")
    with_decoys = torch.maximum(best, decoy_best)

    sizes = sorted({min(len(ordered), s) for s in (100, 300, len(ordered))})
    results = {}
    for margin in (0.0, 0.02, 0.04, 0.06, 0.08, 0.10):
        results[f"max+{margin:.2f}"] = evaluate(best + margin, sizes)
    for margin in (0.0, 0.02, 0.04, 0.06):
        results[f"decoy+{margin:.2f}"] = evaluate(with_decoys + margin, sizes)
    for name, row in results.items():
        print(f"{name:12s} " + "  ".join(f"T={m}: leak {r['leak']:.3f} para {r['para']:.3f} (none {r['para_none']:.3f}) own {r['own']:.3f}"
                                       for m, r in row.items()))
    if args.show:
        thresholds = torch.minimum(best + 0.10, own_diag - 1e-6)
        margin = loc - thresholds                                                  # [N, M]
        value, column = margin.max(dim=1)
        for row in torch.nonzero(value >= 0).flatten()[:args.show].tolist():
            m = int(column[row])
            tokens = tokenizer.tokenize(ordered[m].prompt)
            print(f"leak: {ordered[row].loc_prompt!r} -> anchor of {ordered[m].prompt!r} "
                  f"(subject {ordered[m].subject!r}, key token {positions[m]}: {tokens[min(positions[m], len(tokens) - 1)]!r}), "
                  f"score {float(loc[row, m]):.3f}, threshold {float(thresholds[m]):.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"edits": args.edits, "start": args.start, "n": len(ordered), "rules": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
