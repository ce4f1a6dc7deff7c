"""The ``lemoe`` command: demo, edit, eval, generate, compare."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

DEMO_EDITS = 30


def _load(model_name: str, adaptor: Optional[str] = None, backend: str = "auto"):
    from .models import load_model
    from .storage import load, read_adaptor

    if adaptor:
        read_adaptor(adaptor)  # a missing or damaged adaptor fails before the model loads
    model, tokenizer = load_model(model_name)
    if adaptor:
        load(model, adaptor, backend=backend)
    return model, tokenizer


def _editor_config(args) -> tuple:
    from .config import LEMoEConfig
    from .editor import EditorConfig

    overrides = {}
    if getattr(args, "layer", None) is not None:
        overrides["layer"] = args.layer
    if getattr(args, "expert_hidden", None) is not None:
        overrides["expert_hidden"] = args.expert_hidden
    return LEMoEConfig(seed=args.seed, **overrides), EditorConfig(train_eos=not args.no_train_eos)


def generate_text(model, tokenizer, prompt: str, max_new_tokens: int = 12) -> str:
    import torch

    encoded = tokenizer(prompt, return_tensors="pt").to(next(model.parameters()).device)
    with torch.no_grad():
        output = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(output[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def _metrics_table(rows: Sequence[tuple[str, object]]) -> str:
    lines = [f"{'':10s} {'reliability':>11s} {'generality':>10s} {'locality':>8s}"]
    for name, m in rows:
        lines.append(f"{name:10s} {m.reliability:11.3f} {m.generality:10.3f} {m.locality:8.3f}")
    return "\n".join(lines)


def cmd_demo(args) -> int:
    from .data import BUNDLED_EDITS, load_edits
    from .editor import DEFAULT_BATCH_SIZE, LifelongEditor
    from .evaluation import evaluate, locality_reference

    started = time.perf_counter()
    grouping = (f"batches of {args.batch_size or DEFAULT_BATCH_SIZE}" if args.plan != "keys"
                else "one expert per routing key")
    print(f"lemoe demo: bundled model smollm2-135m, the first {args.limit} bundled edits, "
          f"plan {args.plan} ({grouping})")
    model, tokenizer = _load("smollm2-135m")
    edits = load_edits(BUNDLED_EDITS, limit=args.limit)
    shown = edits[:3]
    before_text = [generate_text(model, tokenizer, e.prompt) for e in shown]
    reference = locality_reference(model, tokenizer, edits)
    before = evaluate(model, tokenizer, edits, locality_ref=reference)
    config, editor_config = _editor_config(args)
    editor = LifelongEditor(model, tokenizer, config, editor_config)
    edit_started = time.perf_counter()
    reports = editor.edit(edits, plan=args.plan, batch_size=args.batch_size, seed=args.seed)
    edit_seconds = time.perf_counter() - edit_started
    after = evaluate(model, tokenizer, edits, locality_ref=reference)
    from .storage import save
    path = save(model, args.out)
    print()
    print(_metrics_table([("before", before), ("after", after)]))
    print(f"\n{len(edits)} edits in {len(reports)} experts, edited in {edit_seconds:.0f} s")
    print("\ngenerations (greedy):")
    for edit, old in zip(shown, before_text):
        print(f"  {edit.prompt}\n    before: {old!r}\n    after:  {generate_text(model, tokenizer, edit.prompt)!r}"
              f"   (edit target: {edit.target!r})")
    print(f"\nadaptor written to {path} (load it with lemoe_engine.load(model, {str(path)!r}))")
    print(f"total {time.perf_counter() - started:.0f} s")
    return 0


def cmd_edit(args) -> int:
    from .data import bundled_unrelated_prompts, load_edits
    from .editor import LifelongEditor
    from .errors import ConfigError

    if args.adaptor and (args.layer is not None or args.expert_hidden is not None):
        raise ConfigError("--layer and --expert-hidden cannot change an existing adaptor "
                          "(--adaptor): its new experts keep its shape")
    edits = load_edits(args.edits, limit=args.limit)
    model, tokenizer = _load(args.model, args.adaptor, backend="eager")
    config, editor_config = (None, _editor_config(args)[1]) if args.adaptor else _editor_config(args)
    unrelated = None
    if args.unrelated:
        unrelated = [line.strip() for line in Path(args.unrelated).read_text().splitlines() if line.strip()]
    else:
        unrelated = bundled_unrelated_prompts()
    editor = LifelongEditor(model, tokenizer, config, editor_config, unrelated_prompts=unrelated)
    started = time.perf_counter()
    try:
        reports = editor.edit(edits, batch_size=args.batch_size, plan=args.plan, seed=args.seed,
                              save_to=args.out)
    except KeyboardInterrupt:
        print(f"\ninterrupted: {editor.layer.num_experts} completed experts saved to {args.out}",
              file=sys.stderr)
        return 130
    print(f"{len(edits)} edits -> {len(reports)} new experts ({editor.layer.num_experts} in total) "
          f"in {time.perf_counter() - started:.0f} s; "
          f"{sum(r.misrouted for r in reports)} edits route to an older expert")
    shared = sum(r.shared_keys for r in reports)
    if shared:
        print(f"note: {shared} edit(s) share a routing key with an expert of an earlier run (same subject): "
              "their own prompts route to the new expert, their paraphrases may reach the older one; "
              "edit all facts about a subject in one run to give them one expert")
    print(f"adaptor written to {args.out}")
    return 0


def cmd_eval(args) -> int:
    from .data import load_edits
    from .evaluation import evaluate

    edits = load_edits(args.edits, limit=args.limit)
    model, tokenizer = _load(args.model, args.adaptor, backend=args.backend)
    metrics = evaluate(model, tokenizer, edits, progress=not args.json)
    if args.json:
        print(json.dumps({"reliability": metrics.reliability, "generality": metrics.generality,
                          "locality": metrics.locality, "n_edits": metrics.n_edits}))
    else:
        print(_metrics_table([("edited", metrics)]))
        print(f"over {metrics.n_edits} edits (locality against the same model with the adaptor off)")
    return 0


def cmd_generate(args) -> int:
    model, tokenizer = _load(args.model, args.adaptor, backend=args.backend)
    print(generate_text(model, tokenizer, args.prompt, args.max_new_tokens))
    return 0


def cmd_compare(args) -> int:
    from .compare import run_compare_command
    return run_compare_command(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lemoe", description="LEMoE lifelong model editing.")
    sub = parser.add_subparsers(dest="command", required=True)

    def model_arg(p, required=True):
        p.add_argument("--model", required=required, default=None if required else "smollm2-135m",
                       help="'smollm2-135m' (bundled) or a local Hugging Face causal-LM folder")

    def editing_args(p, limit_default=None):
        p.add_argument("--layer", type=int, default=None, help="decoder layer to edit (default: 18/32 of depth)")
        p.add_argument("--expert-hidden", type=int, default=None, help="expert FFN width")
        from .editor import DEFAULT_BATCH_SIZE, DEFAULT_PLAN
        from .planner import PLANS
        p.add_argument("--plan", choices=PLANS, default=DEFAULT_PLAN,
                       help="how edits are grouped into experts: keys = one expert per routing key "
                            "(default), kmeans = the paper's clustered batches, none = arrival order")
        p.add_argument("--batch-size", type=int, default=None,
                       help=f"edits per expert with --plan kmeans|none (default {DEFAULT_BATCH_SIZE})")
        p.add_argument("--no-train-eos", action="store_true",
                       help="do not train the end-of-sequence token after each target (higher "
                            "paraphrase accuracy on long edit streams; generations may repeat the answer)")
        p.add_argument("--limit", type=int, default=limit_default, help="use the first N edits")
        p.add_argument("--seed", type=int, default=0)

    demo = sub.add_parser("demo", help="edit the bundled model with bundled edits, on CPU")
    editing_args(demo, limit_default=DEMO_EDITS)
    demo.add_argument("--out", default="runs/demo-adaptor", help="adaptor folder to write")
    demo.set_defaults(func=cmd_demo)

    edit = sub.add_parser("edit", help="edit a model with an edit file; writes an adaptor folder")
    model_arg(edit)
    edit.add_argument("--edits", required=True, help="ZsRE or EasyEdit JSON/JSONL file")
    edit.add_argument("--out", required=True, help="adaptor folder to write")
    edit.add_argument("--adaptor", default=None, help="continue editing this adaptor (new experts are added)")
    edit.add_argument("--unrelated", default=None,
                      help="text file of unrelated prompts (one per line) for the gate; default: bundled")
    editing_args(edit)
    edit.set_defaults(func=cmd_edit)

    evaluate = sub.add_parser("eval", help="reliability / generality / locality of an adaptor")
    model_arg(evaluate)
    evaluate.add_argument("--adaptor", required=True)
    evaluate.add_argument("--edits", required=True)
    evaluate.add_argument("--limit", type=int, default=None)
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")
    evaluate.add_argument("--backend", choices=("auto", "eager", "triton"), default="auto")
    evaluate.set_defaults(func=cmd_eval)

    generate = sub.add_parser("generate", help="greedy generation, with or without an adaptor")
    model_arg(generate)
    generate.add_argument("--adaptor", default=None)
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--max-new-tokens", type=int, default=20)
    generate.add_argument("--backend", choices=("auto", "eager", "triton"), default="auto")
    generate.set_defaults(func=cmd_generate)

    compare = sub.add_parser("compare", help="LEMoE vs baselines and ablations, side by side")
    try:
        from .compare import add_compare_arguments
        add_compare_arguments(compare)
    except ImportError as error:  # pragma: no cover - compare module missing
        compare.set_defaults(unavailable=str(error))
    compare.set_defaults(func=cmd_compare)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .errors import LEMoEError

    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("limit", "batch_size", "expert_hidden", "max_new_tokens"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            parser.exit(2, f"lemoe {args.command}: error: --{name.replace('_', '-')} must be >= 1\n")
    try:
        if hasattr(args, "plan") and args.command in ("demo", "edit"):
            from .planner import check_plan
            check_plan(args.plan, batch_size=args.batch_size)  # before any model is loaded
        return args.func(args)
    except LEMoEError as error:
        print(f"lemoe {args.command}: error: {error}", file=sys.stderr)
        return 2
    except FileNotFoundError as error:
        print(f"lemoe {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lemoe {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
