"""Where the time goes on a CUDA machine: host (CPU) and device time per op for the LLaMA-7B-
shaped bf16 model, unedited and edited (5 random experts, hidden 1024, gate off), at prefill
(1 x 512) and at a greedy decode step (batch 8, after a 32-token prompt; every timed step
appends one token to the cache, so later steps see a slightly longer one), per backend; and a cProfile of one editing
run (T edits) on the same model. Appends the tables to ``profile.txt`` in ``$OUT`` (or the folder given).

    python scripts/profile_gpu.py [OUT_DIR] [--edits 100]

A development tool (the benchmarks hold the figures); it needs CUDA.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "tests")]


DEV = "cuda" if torch.cuda.is_available() else "cpu"
TINY = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=8, num_attention_heads=4,
            num_key_value_heads=4)  # --tiny: a CPU smoke run of this script (under TRITON_INTERPRET=1)


def _sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def _model(tiny: bool = False):
    from transformers import AutoModelForCausalLM, LlamaConfig
    shape = TINY if tiny else dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                   num_attention_heads=32, num_key_value_heads=32)
    config = LlamaConfig(**shape, vocab_size=32000, max_position_embeddings=4096, pad_token_id=0)
    torch.manual_seed(0)
    with torch.device(DEV):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return model.eval().requires_grad_(False)


def _table(prof, sort: str, rows: int = 25) -> str:
    return prof.key_averages().table(sort_by=sort, row_limit=rows, max_name_column_width=60)


def _append(out: Path, text: str) -> None:
    """Everything goes to one file (the device tool returns at most 8)."""
    with open(out / "profile.txt", "a") as f:
        f.write(text + "\n")


def _wall(fn, repeats=5) -> float:
    times = []
    for _ in range(repeats):
        _sync()
        t = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def serving(out: Path, model) -> None:
    import benchlib
    from torch.profiler import ProfilerActivity, profile
    from lemoe_engine import LEMoEConfig, attach, detach

    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(10, 31990, (1, 512), generator=g).to(DEV)
    batch = torch.randint(10, 31990, (8, 32), generator=g).to(DEV)
    lines = []
    for variant in ("unedited", "triton", "eager"):
        layer = None
        if variant != "unedited":
            layer = attach(model, LEMoEConfig(expert_hidden=1024, gate=False, backend=variant))
            benchlib.fill_random_experts(layer, 5, seed=4242)
        with torch.inference_mode():
            prefill = lambda: model(input_ids=prompt, attention_mask=torch.ones_like(prompt))
            prefill()
            # one decode step: prefill batch 8, then time the step that feeds one new token
            first = model(input_ids=batch, attention_mask=torch.ones_like(batch), use_cache=True)
            cache = first.past_key_values
            nxt = first.logits[:, -1].argmax(-1, keepdim=True)

            def step_fixed():
                n = cache.get_seq_length()
                return model(input_ids=nxt, attention_mask=torch.ones(8, n + 1, dtype=torch.long, device=DEV),
                             past_key_values=cache, use_cache=True)

            step_fixed()
            pre_s, dec_s = _wall(prefill), _wall(step_fixed, 9)
            lines.append(f"{variant}: prefill 1x512 {pre_s * 1e3:.2f} ms, decode step B=8 {dec_s * 1e3:.2f} ms")
            print(lines[-1], flush=True)
            for name, fn in (("prefill", prefill), ("decode", step_fixed)):
                with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEV == "cuda" else [])) as prof:
                    fn()
                    _sync()
                _append(out, f"# {variant} {name}: {lines[-1]}\n## by self CPU time\n"
                        f"{_table(prof, 'self_cpu_time_total')}\n## by CUDA time\n"
                        f"{_table(prof, 'self_cuda_time_total', 15)}\n")
        if layer is not None:
            detach(model)
    _append(out, "# summary\n" + "\n".join(lines) + "\n")


def editing(out: Path, model, count: int) -> None:
    from test_bench_editing import _synthetic_edits
    from tiny_models import tiny_tokenizer
    from lemoe_engine import LEMoEConfig
    from lemoe_engine.editor import EditorConfig, LifelongEditor
    from lemoe_engine.patching import detach

    tok = tiny_tokenizer(False)
    model.config.pad_token_id = tok.pad_token_id
    edits = _synthetic_edits(count, seed=7)
    unrelated = [f"What is {a} times {b}?" for a in range(3, 12) for b in range(2, 8)]
    editor = LifelongEditor(model, tok, LEMoEConfig(), EditorConfig(learning_rate=0.05, max_steps=60, stop_loss=5.5),
                            unrelated_prompts=unrelated)
    prof = cProfile.Profile()
    _sync()
    t = time.perf_counter()
    prof.enable()
    reports = editor.edit(edits, progress=False)
    _sync()
    prof.disable()
    seconds = time.perf_counter() - t
    buf = io.StringIO()
    stats = pstats.Stats(prof, stream=buf).sort_stats("cumulative")
    stats.print_stats(45)
    _append(out, 
        f"# T={count}: {seconds:.2f} s, {sum(r.steps for r in reports)} steps, {editor.last_run}\n{buf.getvalue()}")
    print(f"editing T={count}: {seconds:.2f} s", flush=True)
    detach(model)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", nargs="?", default=os.environ.get("OUT", "/tmp/lemoe-profile"))
    parser.add_argument("--edits", type=int, default=100)
    parser.add_argument("--only", choices=("serving", "editing"))
    parser.add_argument("--tiny", action="store_true", help="a small model on the CPU (smoke run)")
    args = parser.parse_args()
    if DEV != "cuda" and not args.tiny:
        sys.exit("profile_gpu.py needs a CUDA GPU (--tiny: a CPU smoke run)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = _model(args.tiny)
    if args.only != "editing":
        serving(out, model)
    if args.only != "serving":
        editing(out, model, args.edits)


if __name__ == "__main__":
    main()
