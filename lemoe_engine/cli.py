"""The ``lemoe`` command: demo, edit, eval, generate, list, remove, compare (and serve, with the vllm extra)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

DEMO_EDITS = 30


GATE_OFF = "off"


def _load(model_name: str, adaptor: Optional[str] = None, backend: str = "auto",
          question_gate: "Optional[float | str]" = None):
    """The model, with ``adaptor`` loaded; ``question_gate``: None = as the adaptor says, a
    cosine, or GATE_OFF (``question_gate_choice``)."""
    from .models import load_model
    from .storage import load, read_adaptor

    if question_gate is not None and not adaptor:
        raise SystemExit("--question-gate / --no-question-gate need --adaptor (the gate belongs to the adaptor)")
    if adaptor:
        read_adaptor(adaptor)  # a missing or damaged adaptor fails before the model loads
    model, tokenizer = load_model(model_name)
    if adaptor:
        load(model, adaptor, backend=backend, tokenizer=tokenizer)
    if question_gate is not None:
        from . import question_gate as gate
        if question_gate == GATE_OFF:
            gate.disable(model)
        else:
            gate.enable(model, tokenizer, question_gate)
    return model, tokenizer


def question_gate_choice(args) -> "Optional[float | str]":
    """--question-gate [COSINE] / --no-question-gate: a cosine, GATE_OFF, or None (unchanged)."""
    if getattr(args, "no_question_gate", False):
        return GATE_OFF
    return getattr(args, "question_gate", None)


def load_edit_file(path, limit: Optional[int] = None, skip_invalid: bool = False):
    """``load_edits`` for the commands: skipped invalid records are reported on stderr."""
    from .data import load_edits

    edits = load_edits(path, limit=limit, skip_invalid=skip_invalid)
    if edits.skipped:
        print(f"{path}: {edits.skipped_summary()}", file=sys.stderr)
    return edits


def _editor_config(args) -> tuple:
    from .config import LEMoEConfig
    from .editor import EditorConfig

    overrides = {}
    if getattr(args, "layer", None) is not None:
        overrides["layer"] = args.layer
    if getattr(args, "expert_hidden", None) is not None:
        overrides["expert_hidden"] = args.expert_hidden
    if getattr(args, "expert_span", None) is not None:
        overrides["expert_span"] = args.expert_span
    if getattr(args, "query_window", None) is not None:
        overrides["query_window"] = args.query_window
    gate = question_gate_choice(args)
    if gate is not None:
        overrides["question_gate"] = None if gate == GATE_OFF else gate
    return LEMoEConfig(seed=args.seed, **overrides), EditorConfig(train_eos=not args.no_train_eos,
                                                                  block_size=getattr(args, "block_size", None),
                                                                  negatives=args.negatives,
                                                                  augment=args.augment,
                                                                  train_dtype=train_dtype_option(
                                                                      getattr(args, "train_dtype", "auto")),
                                                                  train_chat=not args.no_train_chat)


def train_dtype_option(value: str) -> Optional[str]:
    """``EditorConfig.train_dtype`` for a ``--train-dtype`` value: "model" (the model's own
    dtype) is None there, every other value is itself."""
    return None if value == "model" else value


def generate_text(model, tokenizer, prompt: str, max_new_tokens: int = 12, chat: bool = False) -> str:
    """Greedy continuation of ``prompt``; ``chat``: asked as the user turn of the tokenizer's chat
    template with the generation prompt (as ``evaluate(..., chat=True)`` asks)."""
    import torch

    if chat:
        from .evaluation import chat_text
        encoded = tokenizer(chat_text(tokenizer, prompt), return_tensors="pt", add_special_tokens=False)
    else:
        encoded = tokenizer(prompt, return_tensors="pt")
    encoded = encoded.to(next(model.parameters()).device)
    with torch.no_grad():
        output = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(output[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def _metrics_table(rows: Sequence[tuple[str, object]]) -> str:
    lines = [f"{'':10s} {'reliability':>11s} {'generality':>10s} {'locality':>8s}"]
    for name, m in rows:
        lines.append(f"{name:10s} {m.reliability:11.3f} {m.generality:10.3f} {m.locality:8.3f}")
    return "\n".join(lines)


def _demo_questions(edit, tokenizer) -> list[tuple[str, str, bool]]:
    """What the demo asks about an edit: the edited question, one question about the same
    subject's other relation (its answer should not change), and the edited question through
    the chat template (when the tokenizer has one)."""
    out = [("edited question", edit.prompt, False)]
    out += [("same subject, other relation", q, False) for q in edit.specificity[:1]]
    if getattr(tokenizer, "chat_template", None):
        out.append(("edited question, as a chat", edit.prompt, True))
    return out


def _demo_answers(model, tokenizer, edit) -> list[str]:
    return [generate_text(model, tokenizer, q, chat=chat) for _, q, chat in _demo_questions(edit, tokenizer)]


def cmd_demo(args) -> int:
    from .data import BUNDLED_EDITS, load_edits
    from .editor import DEFAULT_BATCH_SIZE, LifelongEditor
    from .evaluation import evaluate, locality_reference

    started = time.perf_counter()
    grouping = (f"batches of {args.batch_size or DEFAULT_BATCH_SIZE}" if args.plan != "keys"
                else "one expert per edit, one per routing key without the question gate")
    print(f"lemoe demo: bundled model smollm2-135m, the first {args.limit} bundled edits, "
          f"plan {args.plan} ({grouping})")
    from .storage import check_save_target
    check_save_target(args.out)  # a folder that is not an adaptor folder fails before the work
    model, tokenizer = _load("smollm2-135m")
    edits = load_edits(BUNDLED_EDITS, limit=args.limit)
    shown = edits[:3]
    before_text = [_demo_answers(model, tokenizer, e) for e in shown]
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
    gate = editor.layer.config.question_gate if editor.layer.route_filter is not None else None
    print("question gate: " + (f"on (cosine {gate}): other questions about an edited subject keep their answers"
                               if gate is not None else "off: every question about an edited subject reaches its expert"))
    print("\nwhat an edit changes and what it should not (greedy answers, before -> after):")
    for edit, old in zip(shown, before_text):
        print(f"  edit: {edit.prompt!r} -> {edit.target!r}")
        for (label, question, chat), was in zip(_demo_questions(edit, tokenizer), old):
            now = generate_text(model, tokenizer, question, chat=chat)
            print(f"    {label:<28} {question!r}\n      {was!r} -> {now!r}")
    print(f"\nadaptor written to {path} (load it with lemoe_engine.load(model, {str(path)!r}, tokenizer=tokenizer))")
    print(f"total {time.perf_counter() - started:.0f} s")
    return 0


def cmd_edit(args) -> int:
    from .data import bundled_unrelated_prompts
    from .editor import LifelongEditor
    from .errors import ConfigError
    from .storage import adaptor_lock, check_save_target

    if args.adaptor and any(value is not None for value in (args.layer, args.expert_hidden, args.expert_span,
                                                            args.query_window)):
        raise ConfigError("--layer, --expert-hidden, --expert-span and --query-window cannot change an "
                          "existing adaptor (--adaptor): its new experts keep its config")
    edits = load_edit_file(args.edits, limit=args.limit, skip_invalid=args.skip_invalid)
    check_save_target(args.out)  # before the model loads: never edit for minutes, then refuse to save
    if args.unrelated:
        unrelated = [line.strip() for line in Path(args.unrelated).read_text().splitlines() if line.strip()]
    else:
        unrelated = bundled_unrelated_prompts()
    # the writer lock on --out is held from reading --adaptor until the new adaptor is in place,
    # so two `lemoe edit --adaptor A --out A` cannot lose each other's edits
    with adaptor_lock(args.out):
        model, tokenizer = _load(args.model, args.adaptor, backend="eager",
                                 question_gate=question_gate_choice(args) if args.adaptor else None)
        config, editor_config = (None, _editor_config(args)[1]) if args.adaptor else _editor_config(args)
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
    if shared and not editor.layer.config.selects_by_question:  # (with it the gate picks among them)
        print(f"note: {shared} edit(s) share a routing key with an expert of an earlier run (same subject): "
              "their own prompts route to the new expert, their paraphrases may reach the older one; "
              "edit all facts about a subject in one run to give them one expert")
    print(f"adaptor written to {args.out}")
    return 0


def cmd_eval(args) -> int:
    from .evaluation import evaluate

    edits = load_edit_file(args.edits, limit=args.limit, skip_invalid=args.skip_invalid)
    model, tokenizer = _load(args.model, args.adaptor, backend=args.backend, question_gate=question_gate_choice(args))
    metrics = evaluate(model, tokenizer, edits, progress=not args.json, chat=args.chat,
                       mode="generate" if args.generate or args.chat else "teacher_forced")
    if args.json:
        print(json.dumps({"reliability": metrics.reliability, "generality": metrics.generality,
                          "locality": metrics.locality, "n_edits": metrics.n_edits,
                          "specificity": metrics.specificity, "n_specificity": metrics.n_specificity,
                          "leak_rate": metrics.leak_rate, "mode": metrics.mode, "chat": metrics.chat}))
    else:
        print(_metrics_table([("edited", metrics)]))
        style = "chat template, greedy" if metrics.chat else metrics.mode.replace("_", "-")
        spec = ("no specificity prompts" if metrics.specificity is None else
                f"specificity {metrics.specificity:.3f} over {metrics.n_specificity} same-subject prompts")
        leak = "" if metrics.leak_rate is None else f"; {metrics.leak_rate:.1%} of locality prompts reach an expert"
        print(f"{spec}{leak}")
        print(f"over {metrics.n_edits} edits, {style} (locality and specificity against the same model "
              "with the adaptor off)")
        from .patching import find_layer
        layer = find_layer(model)
        print("question gate: " + (f"on (cosine {layer.config.question_gate})" if layer.route_filter is not None
                                   else "off"))
    return 0


def cmd_generate(args) -> int:
    model, tokenizer = _load(args.model, args.adaptor, backend=args.backend, question_gate=question_gate_choice(args))
    print(generate_text(model, tokenizer, args.prompt, args.max_new_tokens, chat=args.chat))
    return 0


def cmd_list(args) -> int:
    from .ledger import entries_from_manifest
    from .storage import read_adaptor

    manifest, _ = read_adaptor(args.adaptor)
    entries = entries_from_manifest(manifest.get("edits"), manifest.get("num_experts", 0), f"adaptor {args.adaptor}")
    shown = [e for e in entries if args.all or e.active]
    if args.json:
        print(json.dumps({"adaptor": str(args.adaptor), "revision": manifest.get("revision", 0),
                          "num_experts": manifest.get("num_experts"),
                          "edits": [e.to_dict() for e in shown]}, ensure_ascii=False))
        return 0
    if not entries:
        print(f"{args.adaptor}: no edit ledger (written by lemoe-engine before format 2, or no edits)")
        return 0
    print(f"{'id':>5s} {'status':10s} {'expert':>6s}  {'subject':20s} edit")
    for e in shown:
        note = f"  (superseded by {e.superseded_by})" if e.superseded_by is not None else ""
        print(f"{e.id:5d} {e.status:10s} {e.expert if e.expert is not None else '-':>6}  "
              f"{(e.subject or '-')[:20]:20s} {e.prompt} -> {e.target}{note}")
    hidden = len(entries) - len(shown)
    print(f"{sum(e.active for e in entries)} active edit(s) in {manifest.get('num_experts')} experts"
          + (f"; {hidden} superseded/removed not shown (--all)" if hidden else ""))
    return 0


def cmd_remove(args) -> int:
    from .editor import LifelongEditor
    from .errors import ConfigError
    from .storage import adaptor_lock, check_save_target

    if not args.edit and args.subject is None:
        raise ConfigError("say what to remove: --edit ID (repeatable) or --subject S")
    check_save_target(args.out)
    with adaptor_lock(args.out):
        model, tokenizer = _load(args.model, args.adaptor, backend="eager")
        editor = LifelongEditor(model, tokenizer)
        report = editor.remove(ids=args.edit or (), subject=args.subject, save_to=args.out,
                               progress=not args.no_progress)
    print(f"removed {len(report.removed)} edit(s) ({', '.join(str(i) for i in report.removed)}); "
          f"{report.rebuilt} other edit(s) of their experts retrained; "
          f"{editor.layer.num_experts} experts remain; adaptor written to {args.out}")
    return 0


def cmd_compare(args) -> int:
    from .compare import run_compare_command
    return run_compare_command(args)


def cmd_serve(args) -> int:
    from .serving import serve
    gate = question_gate_choice(args)
    return serve(args.model, args.adaptor, port=args.port, host=args.host, backend=args.backend,
                 extra=args.vllm_args, question_gate=False if gate == GATE_OFF else gate)


def skip_invalid_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--skip-invalid", action="store_true",
                        help="skip invalid edit records (reported on stderr) instead of refusing the file")


def question_gate_arg(parser: argparse.ArgumentParser, serving: bool = True) -> None:
    from .config import DEFAULT_QUESTION_GATE
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--question-gate", type=float, nargs="?", const=DEFAULT_QUESTION_GATE, default=None,
                       metavar="COSINE",
                       help="the question gate (on by default): serve a route only when the prompt asks one "
                            "of its expert's edited questions (sentence-embedding cosine >= COSINE, default "
                            f"{DEFAULT_QUESTION_GATE}), so other questions about an edited subject keep their "
                            "answers; costs some paraphrases, see README"
                            + ("" if serving else "; saved with the adaptor"))
    group.add_argument("--no-question-gate", action="store_true",
                       help="route every prompt as the anchors decide (more paraphrases reach their edit, "
                            "other questions about an edited subject too)"
                            + (" for this command" if serving else "; saved with the adaptor"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lemoe", description="LEMoE lifelong model editing.")
    sub = parser.add_subparsers(dest="command", required=True)

    def model_arg(p, required=True):
        p.add_argument("--model", required=required, default=None if required else "smollm2-135m",
                       help="'smollm2-135m' (bundled) or a local Hugging Face causal-LM folder")

    def editing_args(p, limit_default=None):
        p.add_argument("--layer", type=int, default=None, help="decoder layer to edit (default: 3/4 of the depth)")
        p.add_argument("--expert-hidden", type=int, default=None, help="expert FFN width")
        p.add_argument("--expert-span", choices=("key", "prompt"), default=None,
                       help="tokens an expert acts on: from its matched key token on (default), or "
                            "every prompt token (the paper)")
        p.add_argument("--query-window", type=int, default=None,
                       help="prompt tokens each routing query pools, the token and those before it "
                            "(default 3; 1 = each token alone)")
        from .editor import DEFAULT_BATCH_SIZE, DEFAULT_PLAN
        from .planner import PLANS
        p.add_argument("--plan", choices=PLANS, default=DEFAULT_PLAN,
                       help="how edits are grouped into experts: keys = one expert per edit, or per "
                            "routing key when the question gate is off (default), kmeans = the paper's "
                            "clustered batches, none = arrival order")
        p.add_argument("--batch-size", type=int, default=None,
                       help=f"edits per expert with --plan kmeans|none (default {DEFAULT_BATCH_SIZE})")
        p.add_argument("--no-train-eos", action="store_true",
                       help="do not train the end-of-sequence token after each target (higher "
                            "paraphrase accuracy on long edit streams; generations may repeat the answer)")
        p.add_argument("--negatives", type=int, default=0, metavar="N",
                       help="same-subject negative prompts per edited subject, trained to keep the "
                            "unedited answers (other facts about the subject); default 0: costs "
                            "generality and time, see README")
        p.add_argument("--augment", type=int, default=0, metavar="N",
                       help="rewordings of each edit's prompt (its statement form, lead-in forms) "
                            "trained as positives beside it; meant for use with --negatives")
        p.add_argument("--no-train-chat", action="store_true",
                       help="do not also train each edit asked through the tokenizer's chat template")
        p.add_argument("--train-dtype", choices=("auto", "model", "float32", "float16", "bfloat16"), default="auto",
                       help="run the frozen layers above the target in this dtype while training; "
                            "auto (default): bfloat16 where the device computes it natively and the "
                            "model is fp32 (1.5x faster on an AVX512-BF16 CPU, approximate gradients, "
                            "README), else the model's dtype; model: always the model's dtype")
        p.add_argument("--block-size", type=int, default=None,
                       help="edits trained at the same time (new experts train together, each as if "
                            "alone); default: chosen from free memory; 1 = one expert at a time")
        p.add_argument("--limit", type=int, default=limit_default, help="use the first N edits")
        p.add_argument("--seed", type=int, default=0)
        question_gate_arg(p, serving=False)

    demo = sub.add_parser("demo", help="edit the bundled model with bundled edits, on CPU")
    editing_args(demo, limit_default=DEMO_EDITS)
    demo.add_argument("--out", default="runs/demo-adaptor", help="adaptor folder to write")
    demo.set_defaults(func=cmd_demo)

    edit = sub.add_parser("edit", help="edit a model with an edit file; writes an adaptor folder")
    model_arg(edit)
    edit.add_argument("--edits", required=True, help="ZsRE or EasyEdit JSON/JSONL file")
    edit.add_argument("--out", required=True, help="adaptor folder to write")
    edit.add_argument("--adaptor", default=None, help="continue editing this adaptor (new experts are added)")
    skip_invalid_arg(edit)
    edit.add_argument("--unrelated", default=None,
                      help="text file of unrelated prompts (one per line) for the gate; default: bundled")
    editing_args(edit)
    edit.set_defaults(func=cmd_edit)

    evaluate = sub.add_parser("eval", help="reliability / generality / locality of an adaptor")
    model_arg(evaluate)
    evaluate.add_argument("--adaptor", required=True)
    evaluate.add_argument("--edits", required=True)
    evaluate.add_argument("--limit", type=int, default=None)
    skip_invalid_arg(evaluate)
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")
    evaluate.add_argument("--generate", action="store_true",
                          help="score greedy generations (the continuation must start with the target; "
                               "locality: the first 8 tokens unchanged) instead of teacher-forced tokens")
    evaluate.add_argument("--chat", action="store_true",
                          help="ask every prompt through the tokenizer's chat template and score greedy "
                               "generations (the first 32 tokens must contain the target; implies --generate)")
    evaluate.add_argument("--backend", choices=("auto", "eager", "triton"), default="auto")
    question_gate_arg(evaluate)
    evaluate.set_defaults(func=cmd_eval)

    generate = sub.add_parser("generate", help="greedy generation, with or without an adaptor")
    model_arg(generate)
    generate.add_argument("--adaptor", default=None)
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--max-new-tokens", type=int, default=20)
    generate.add_argument("--chat", action="store_true",
                          help="ask through the tokenizer's chat template (user turn + generation prompt)")
    generate.add_argument("--backend", choices=("auto", "eager", "triton"), default="auto")
    question_gate_arg(generate)
    generate.set_defaults(func=cmd_generate)

    listing = sub.add_parser("list", help="the edit ledger of an adaptor: every edit, its expert and status")
    listing.add_argument("adaptor", help="adaptor folder")
    listing.add_argument("--json", action="store_true", help="print one JSON object with an 'edits' list")
    listing.add_argument("--all", action="store_true", help="also superseded and removed edits")
    listing.set_defaults(func=cmd_list)

    remove = sub.add_parser("remove", help="remove edits from an adaptor (their experts' other edits are kept)")
    remove.add_argument("adaptor", help="adaptor folder")
    model_arg(remove)
    remove.add_argument("--edit", type=int, action="append", metavar="ID", help="ledger id (repeatable; see lemoe list)")
    remove.add_argument("--subject", default=None, help="remove every active edit about this subject")
    remove.add_argument("--out", required=True, help="adaptor folder to write (may be the same folder)")
    remove.add_argument("--no-progress", action="store_true")
    remove.set_defaults(func=cmd_remove)

    compare = sub.add_parser("compare", help="LEMoE vs baselines and ablations, side by side")
    try:
        from .compare import add_compare_arguments
        add_compare_arguments(compare)
    except ImportError as error:  # pragma: no cover - compare module missing
        compare.set_defaults(unavailable=str(error))
    compare.set_defaults(func=cmd_compare)

    serve = sub.add_parser("serve", help="serve the edited model with vLLM's OpenAI-compatible server "
                                         "(needs the vllm extra); other options go to vLLM",
                           epilog="Options lemoe does not know (e.g. --max-model-len 2048, "
                                  "--tensor-parallel-size 2) are passed to `vllm serve`.")
    model_arg(serve)
    serve.add_argument("--adaptor", required=True, help="adaptor folder")
    serve.add_argument("--port", type=int, default=None, help="HTTP port (vLLM's default: 8000)")
    serve.add_argument("--host", default=None, help="interface to listen on (vLLM's default: all)")
    serve.add_argument("--backend", choices=("auto", "eager", "triton"), default="auto")
    question_gate_arg(serve)
    serve.set_defaults(func=cmd_serve)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .errors import LEMoEError

    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and args.command != "serve":  # only `serve` passes options on (to vLLM)
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.vllm_args = unknown
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
