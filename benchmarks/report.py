"""Turn ``benchmarks/results.json`` into ``benchmarks/RESULTS.md``.

    python benchmarks/report.py [results.json] [RESULTS.md]

One table per section (routing, layer, end to end) and per run; every table names its
device, date, dtypes, shapes and the command that produced it. GPU rows also show the
achieved fraction of the ceilings measured in the same run (device-to-device copy bandwidth,
bf16 / fp32 matmul rate). When the file holds no GPU rows, the report says so plainly in
"GPU figures: owed".
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
SECTIONS = (
    ("routing", "Routing latency: `anchor_route` (Triton) vs eager `route_reference`"),
    ("routing_default", "Routing latency of the default configuration: `pooled_route` (Triton) vs eager"),
    ("layer", "Layer latency: LEMoE layer (base LLaMA MLP + experts) vs the bare base MLP"),
    ("end_to_end", "End to end: edited vs unedited model"),
    ("editing", "Editing throughput: blocked training vs one expert at a time"),
    ("question_gate", "Prefill with the question gate on vs off"),
)
GPU_COMMAND = "bash benchmarks/gpu_run.sh"


def _us(v) -> str:
    if v is None:
        return "-"
    if v >= 1e5:
        return f"{v / 1e3:,.0f} ms" if v >= 1e6 else f"{v / 1e3:,.1f} ms"
    if v >= 100:
        return f"{v:,.0f}"
    return f"{v:.1f}" if v >= 10 else f"{v:.2f}"


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _num(v, digits=1) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def _err(v) -> str:
    return "-" if v is None else f"{v:.1e}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def _caption(meta: dict, rows: list[dict], shapes: str) -> list[str]:
    dtypes = ", ".join(sorted({r["dtype"] for r in rows}))
    v = meta.get("versions", {})
    lines = [f"- **Device**: {meta['device']}",
             f"- **Date**: {meta['date']}",
             f"- **Command**: `{meta['command']}`",
             f"- **dtype**: {dtypes}; **shapes**: {shapes}",
             f"- **Software**: torch {v.get('torch')}, triton {v.get('triton')}, "
             f"transformers {v.get('transformers')}, pytest-benchmark {v.get('pytest_benchmark')}"]
    if meta.get("device_kind") == "cpu":
        load = meta.get("loadavg_at_end")
        lines.append(f"- **CPU threads**: {meta.get('torch_threads')} torch threads"
                     + (f"; load average at the end of the run {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}"
                        if load else ""))
    c = meta.get("ceilings")
    if c:
        lines.append(f"- **Measured ceilings (same run)**: copy {c['copy_bytes_per_s'] / 1e12:.2f} TB/s, "
                     f"bf16 matmul {c['bf16_matmul_flops_per_s'] / 1e12:.0f} TFLOP/s, "
                     f"fp32 matmul {c['fp32_matmul_flops_per_s'] / 1e12:.1f} TFLOP/s ({c['how']})")
    lines.append("- Times: median of the pytest-benchmark rounds (host clock, each call synchronised)"
                 + ("; device µs: median CUDA-event time from `triton.testing.do_bench` with L2 flushed, "
                    "used for the achieved fractions" if meta.get("device_kind") == "cuda" else ""))
    return lines + [""]


def _by_run(rows: list[dict]) -> dict:
    groups: dict = defaultdict(list)
    for r in rows:
        groups[r["run"]].append(r)
    return groups


def _gpu_cols(r: dict) -> list[str]:
    return [_us(r.get("device_us")), _pct(r.get("hbm_fraction")), _pct(r.get("compute_fraction"))]


def _routing_rows(rows: list[dict], gpu: bool, size: str, columns: list[tuple[str, str]],
                  checked_of) -> list[str]:
    """One routing table: a row per case, sorted by (``size``, E, triton first); ``columns``
    are (header, shapes key) pairs; GPU tables add device time, fractions and the speed-up over
    the eager row of the same (``size``, E); ``checked_of(shapes)`` is the rows-checked total."""
    def case(s):  # rows from before key windows have no W: one-token keys
        return (s[size], s["E"], s.get("W", 1))

    eager = {case(r["shapes"]): r for r in rows if r["backend"] == "eager"}
    header = [h for h, _ in columns] + ["backend", "median µs"]
    if gpu:
        header += ["device µs", "% copy BW", "% fp32 matmul", "vs eager"]
    header += ["rows checked", "max weight err"]
    out = []
    for r in sorted(rows, key=lambda r: (r["shapes"].get("W", 1), case(r["shapes"]), r["backend"] != "triton")):
        s, c = r["shapes"], r["checks"]
        line = [str(s.get(key, 1 if key == "W" else "-")) for _, key in columns] + [r["backend"], _us(r["median_us"])]
        if gpu:
            ref = eager.get(case(s))
            ratio = (f"{ref['median_us'] / r['median_us']:.1f}x faster"
                     if r["backend"] == "triton" and ref else "-")
            line += _gpu_cols(r) + [ratio]
        line += [f"{c.get('rows_checked', '-')}/{checked_of(s)}", _err(c.get("max_weight_err"))]
        out.append(line)
    return _table(header, out)


def routing_table(rows: list[dict], gpu: bool) -> list[str]:
    return _routing_rows(rows, gpu, "S", [("S", "S"), ("E", "E"), ("d", "d"), ("top_k", "top_k")],
                         lambda s: s["S"])


def routing_default_table(rows: list[dict], gpu: bool) -> list[str]:
    return _routing_rows(rows, gpu, "T", [("key window W", "W"), ("prompt tokens T", "T"), ("experts E", "E"),
                                          ("anchors M", "M"),
                                          ("d", "d"), ("top_k", "top_k")], lambda s: s.get("B", 1))


def layer_table(rows: list[dict], gpu: bool) -> list[str]:
    base = {(r["shapes"]["set"], r["shapes"]["tokens"]): r for r in rows if r["backend"] == "base"}
    header = ["set", "phase", "tokens (B x T)", "E", "H", "k", "backend", "median µs", "over base µs"]
    if gpu:
        header += ["device µs", "device over base µs", "% copy BW", "% matmul"]
    header += ["experts touched", "check (rel err)"]
    order = {"base": 0, "triton": 1, "triton-graph": 2, "eager": 3}

    def key(r):
        s = r["shapes"]
        return (s["set"], s.get("expert_hidden", 0), s.get("experts", 0), s.get("top_k", 0), s["tokens"],
                s["phase"] == "decode step", order.get(r["backend"], 9))

    out = []
    for r in sorted(rows, key=key):
        s, c = r["shapes"], r["checks"]
        b = base.get((s["set"], s["tokens"]))
        over = _us(r["median_us"] - b["median_us"]) if (b and r["backend"] != "base") else "-"
        check = c.get("rel_err_delta_vs_eager", c.get("rel_err_sampled_rows_vs_fp32", c.get("rel_err_vs_formula")))
        line = [s["set"], s["phase"], f"{s['tokens']} ({s['batch']} x {s['seq']})", str(s.get("experts", "-")),
                str(s.get("expert_hidden", "-")), str(s.get("top_k", "-")), r["backend"], _us(r["median_us"]), over]
        if gpu:
            dev_over = (_us(r["device_us"] - b["device_us"])
                        if (b and r["backend"] != "base" and r.get("device_us") and b.get("device_us")) else "-")
            if r.get("device_us") and r.get("base_mlp_graph_us"):  # a captured step: over the captured bare MLP
                dev_over = f"{_us(r['device_us'] - r['base_mlp_graph_us'])} (graphed base {_us(r['base_mlp_graph_us'])})"
            line += [_us(r.get("device_us")), dev_over, _pct(r.get("hbm_fraction")), _pct(r.get("compute_fraction"))]
        line += [str(c.get("experts_touched", "-")), _err(check)]
        out.append(line)
    return _table(header, out)


def _adaptor(s: dict) -> str:
    if not s.get("experts"):
        return "-"
    where = f"layer {s['layer']}, " if s.get("layer") is not None else ""
    query = "/".join(str(s[k]) for k in ("query_source", "query_pooling") if k in s)
    return f"{s['experts']} x H{s['expert_hidden']}, {where}query {query}"


def e2e_table(rows: list[dict], gpu: bool) -> list[str]:
    unedited = {r["case"]: r for r in rows if r["backend"] == "unedited"}
    header = ["model", "phase", "batch", "prompt", "new tokens", "variant", "adaptor", "median", "tokens/s",
              "decode tokens/s", "time vs unedited", "paired vs disabled"]
    out = []
    for r in sorted(rows, key=lambda r: (r["case"], r["backend"] != "unedited", r["backend"])):
        s = r["shapes"]
        u = unedited.get(r["case"])
        ratio = f"{r['median_us'] / u['median_us']:.3f}x" if (u and r is not u) else "-"
        out.append([s["model"], s["phase"], str(s["batch"]), str(s["prompt_tokens"]),
                    str(s.get("new_tokens", "-")), r["backend"], _adaptor(s), _us(r["median_us"]) + (" µs" if r["median_us"] < 1e5 else ""),
                    _num(r.get("tokens_per_s")), _num(r.get("decode_tokens_per_s")), ratio,
                    f"{r['paired_ratio_vs_disabled']:.3f}x" if r.get("paired_ratio_vs_disabled") else "-"])
    return _table(header, out)


def question_gate_table(rows: list[dict], gpu: bool) -> list[str]:
    header = ["T (ledger entries)", "experts", "batch", "prompts", "prompt tokens", "variant", "median",
              "paired on / off", "paired on", "paired off", "one encoder call over the prompts",
              "encoder calls per prefill (gate on)"]

    def time(v):
        return "-" if v is None else _us(v) + (" µs" if v < 1e5 else "")
    out = []
    for r in sorted(rows, key=lambda r: (r["shapes"]["T"], r.get("asking", "edited"), r["shapes"].get("batch", 1),
                                         r["case"])):
        s = r["shapes"]
        out.append([str(s["T"]), str(s["experts"]), str(s.get("batch", 1)), r.get("asking", "edited"),
                    str(s["prompt_tokens"]), r["case"].rsplit("-", 2)[-2] + "-" + r["case"].rsplit("-", 1)[-1],
                    time(r["median_us"]),
                    f"{r['paired_ratio_on_vs_off']:.3f}x" if r.get("paired_ratio_on_vs_off") else "-",
                    time(r.get("paired_on_us")), time(r.get("paired_off_us")), time(r.get("encoder_us")),
                    str(r.get("encoder_calls_per_prefill", "-"))])
    return _table(header, out)


SHAPES_TEXT = {
    "routing": "queries S x d and anchors E x d (unit-norm fp32), d = 4096, top_k = 2, temperature 0.1, "
               "random thresholds (some slots gated)",
    "routing_default": "one sequence of T prompt tokens (the first T/8 masked out as padding) x d, E experts "
                       "with 4 unit-norm anchors each, d = 4096, fp32, top_k = 2, temperature 0.1, max pooling "
                       "over the prompt, random thresholds; key window W = 3 (the default since adaptor format "
                       "4): queries [3, 1, T, d], each anchor of a window drawn from 1..3 scored against the "
                       "queries pooled over as many tokens; W = 1: one-token keys",
    "layer": "base = transformers LlamaMLP (d x mlp x d, SiLU); experts gated (SwiGLU) of hidden H, "
             "query_source='hidden', sequence routing with mean pooling, gate off; decode = B sequences x 1 "
             "token routed afresh (a standalone call: prompt routing + experts), decode step = B sequences x 1 "
             "token reusing the route kept from a 16-token prefill (what serving runs per generated token), "
             "prefill = 8 sequences x tokens/8",
    "end_to_end": "adaptor of 5 random experts (hidden 1024) at the model's default layer, gate off, the "
                  "engine's default query settings (column 'adaptor'); greedy decode of random prompt tokens; "
                  "'decode tokens/s' excludes the prefill (generate time minus a separately timed prefill); "
                  "'paired vs disabled' (CPU runs): median time of the edited model over the same model with its "
                  "adaptor disabled, measured in 3 alternating pairs so both see the same machine load",
    "editing": "the editor's defaults (plan 'keys', expert width 64, AdamW, early stop) on the first T bundled "
               "edits; the same edits edited twice from the unedited model in one process, one expert at a time "
               "(`EditorConfig(block_size=1)`) and in automatic blocks; wall time of `LifelongEditor.edit` "
               "(planning, calibration, training); quality: teacher-forced reliability / generality / locality "
               "(`lemoe_engine.evaluation.evaluate`), which must agree within 0.01. The last column (when run, "
               "`LEMOE_BENCH_EDITING_SPAN_PROMPT=1`): a third run in the same process, blocked, with experts on "
               "every token of a routed prompt (the paper's span and adaptor format 2), against the default "
               "`expert_span='key'` (experts from their key token on). 'train dtype': the dtype of the frozen "
               "layers above the target while training (`EditorConfig.train_dtype`, default 'auto': bf16 where "
               "the device computes it natively; rows written before 2026-11-29 show the model's dtype); the column 'blocked in "
               "the model's dtype' (`LEMOE_BENCH_EDITING_MODEL_DTYPE=1`): a run blocked in fp32 in the same "
               "process. Case `llama7b` (GPU): a "
               "LLaMA-2-7B-shaped model with random bf16 weights and T made-up edits with distinct subjects "
               "(one expert each), blocked only, stop rule on the target's argmax (a random model cannot "
               "reach a low loss); its locality and generality say little (a random model's query vectors "
               "hardly separate prompts, so the gate cannot), only reliability and time are its figures",
    "question_gate": "the bundled SmolLM2-135M (fp32) with an adaptor whose ledger holds the first T bundled "
                     "edits, one random expert per subject, anchor gates open; prefill of B edited questions "
                     "(distinct subjects, padded, anchor gates open), which the gate serves by the subjects they "
                     "name (one encoder call over the prompts and their subject-masked forms, the ledger check, "
                     "the negatives margin and the name floor), or B real questions naming no edited subject "
                     "(anchor gates shut: nothing for the gate to check); 'paired on / "
                     "off': median time with the gate on over the same adaptor with it off, in 5 alternating "
                     "pairs; the last column: MiniLM-L6 over the prompts alone",
}
MODEL_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
"""Rows written before 'train_dtype' was recorded trained in the model's dtype."""


def editing_table(rows: list[dict], gpu: bool) -> list[str]:
    header = ["case", "T", "experts", "block", "train dtype", "one at a time", "blocked", "edits/s (1 / blocked)",
              "ratio", "quality one at a time (rel/gen/loc)", "quality blocked (rel/gen/loc)",
              "blocked in the model's dtype: time, quality",
              "blocked, experts on every token (`expert_span='prompt'`): time, quality"]

    def quality(q):
        return "/".join(f"{q[k]:.3f}" for k in ("reliability", "generality", "locality")) if q else "-"

    def secs(v):
        return "-" if v is None else f"{v:,.1f} s"
    out = []
    for r in sorted(rows, key=lambda r: r["case"]):
        seq, blk = r.get("seconds_one_at_a_time", r.get("seconds_sequential")), r.get("seconds_blocked")
        t = r.get("T", r["shapes"].get("T"))
        rate = "-" if not blk else (f"{t / seq:.3f} / " if seq else "- / ") + f"{t / blk:.3f}"
        out.append([r["case"], str(t), str(r.get("experts", r["shapes"].get("experts", "-"))),
                    str(r.get("block_size", "-")), r.get("train_dtype") or MODEL_DTYPES.get(r["dtype"], r["dtype"]), secs(seq), secs(blk), rate,
                    f"{r['ratio']:.2f}x" if r.get("ratio") else "-",
                    quality(r.get("quality_one_at_a_time")), quality(r.get("quality_blocked")),
                    "-" if r.get("seconds_blocked_model_dtype") is None else
                    f"{secs(r['seconds_blocked_model_dtype'])} (the default {r['ratio_vs_model_dtype']:.2f}x faster), "
                    f"{quality(r.get('quality_blocked_model_dtype'))}",
                    "-" if r.get("seconds_blocked_span_prompt") is None else
                    f"{secs(r['seconds_blocked_span_prompt'])} ({r['ratio_span_key_vs_prompt']:.2f}x the default's), "
                    f"{quality(r.get('quality_blocked_span_prompt'))}"])
    return _table(header, out)


TABLES = {"routing": routing_table, "routing_default": routing_default_table, "layer": layer_table,
          "end_to_end": e2e_table, "editing": editing_table, "question_gate": question_gate_table}


def render(data: dict) -> str:
    runs, rows = data.get("runs", {}), data.get("rows", [])
    gpu_rows = [r for r in rows if runs.get(r["run"], {}).get("device_kind") == "cuda"]
    lines = ["# Benchmark results", "",
             "Generated by `python benchmarks/report.py` from `benchmarks/results.json`, which "
             "`python -m pytest benchmarks` writes (benchmarking enabled; rows are keyed by device, so CPU "
             "and GPU runs merge). Every figure below passed its benchmark's correctness check in the same "
             "run (see the benchmark files' docstrings).", ""]
    lines += ["## How these figures are made", "",
              "- CPU figures: `LEMOE_BENCH_THREADS=1 python -m pytest benchmarks -q`, then "
              "`python benchmarks/report.py` (the exact command of each run is in its table's caption).",
              "- GPU figures: `bash benchmarks/gpu_run.sh` on a CUDA machine (GPU tests, this suite with "
              "benchmarking enabled, compute-sanitizer memcheck + racecheck on `benchmarks/sanitize_case.py`, "
              "this report); it copies `results.json`, `RESULTS.md` and its logs to `$OUT` when set.",
              "- CI: `python -m pytest benchmarks --benchmark-disable -q` runs every benchmark body once as a "
              "test (all checks, no timing) and writes no results.",
              "- Bytes and FLOPs counted per GPU row: routing reads queries and anchors once and writes ids and "
              "weights; a layer reads the base MLP weights, the weights of each distinct expert its tokens "
              "are routed to, the routing state, and its input and output activations once.", ""]
    if not gpu_rows:
        lines += ["## GPU figures: owed", "",
                  "**No GPU run has been made yet.** No GPU was lent to the session that built this suite, "
                  "so every figure below is a CPU figure of the eager path; the Triton kernels have not been "
                  f"timed. A session with a GPU runs `{GPU_COMMAND}` (GPU tests, this suite with "
                  "benchmarking enabled, compute-sanitizer racecheck + memcheck), then "
                  "`python benchmarks/report.py`, and commits `benchmarks/results.json` and this file.", ""]
    if gpu_rows:
        lines += ["## Reading the GPU figures", "",
                  "- End to end, decode: Hugging Face `generate` is host-bound on the lent machines (a "
                  "LLaMA-7B-shaped decode step is ~7 ms of GPU work inside ~22-35 ms of wall time, "
                  "`scripts/profile_gpu.py`), and the first case of a process also pays warm-up: the same "
                  "decode case differed by up to 1.6x between two runs. 'time vs unedited' at decode is "
                  "therefore not a measure of the adaptor's cost; prefill is, and the layer tables are.",
                  "- Layer: 'decode' rows call a standalone layer, which routes every call afresh (no "
                  "continuing sequence), so they time prompt routing plus the expert FFN; 'decode step' rows "
                  "time what serving runs per generated token: the route kept from the prefill, only the "
                  "expert FFN launches (2-3, `tests/test_kernel_layer.py`) on top of the base MLP. Both are "
                  "single eager-mode calls of one layer, so at decode sizes they include the host's launch "
                  "overhead (tens of µs per launch): 'device µs' from CUDA events counts the gaps between "
                  "launches too.",
                  "- Default routing (`pooled_route`): since 2026-11-28 14:30 UTC the pool launch splits a "
                  "prompt's tokens across programs (before, one program per sequence and anchor block walked "
                  "every token: with key windows a 2048-token prompt and 1 expert took 37.7 ms of device time, "
                  "now 0.34 ms). Since 17:11 UTC the default-routing rows time the window-sorted anchor order "
                  "(an anchor block scores only the windows it holds, not all W): with key windows 2,048 "
                  "tokens x 4,096 experts went from 55.4 ms to 19.8 ms, 512 x 1,024 from 3.5 ms to 1.9 ms. "
                  "With thousands of anchors and long prompts cuBLAS (eager) is still faster (1.1-1.5x with key windows, 1.6-1.8x with one-token keys): "
                  "the kernel's fp32 tiles run tf32x3 on FMA-sized tiles.",
                  "- Routing: the Triton rows use tf32x3 score tiles (the default since 2026-11-28); the "
                  "same cases with exact-IEEE fp32 tiles, measured in an earlier run on another H200 of the "
                  "same kind, took 2-3.5x longer (e.g. default routing T=512, 1024 experts: 5.5 ms against "
                  "2.2 ms). The eager rows of the `anchor_route` table come from that earlier run.", ""]
    cpu_runs = [m for m in runs.values() if m.get("device_kind") == "cpu"]
    if cpu_runs:
        lines += ["## Caveat on CPU timings", "",
                  "CPU figures come from a 2-core development machine shared with other work (the lead's "
                  "editing experiments ran at the same time), so they are noisy and only indicate orders of "
                  "magnitude; the load average recorded at the end of each run is given in its caption. "
                  "The CPU path is the eager PyTorch reference: the Triton interpreter is not a speed figure "
                  "and is not timed. Between the edited and the unedited model, differences of up to about 20% are "
                  "within this machine's noise; the 'paired vs disabled' column, measured in alternating "
                  "pairs, is the fairer comparison.", ""]
    for section, title in SECTIONS:
        section_rows = [r for r in rows if r["section"] == section]
        if not section_rows:
            continue
        lines += [f"## {title}", ""]
        groups = _by_run(section_rows)
        ordered = sorted(groups, key=lambda k: (runs.get(k, {}).get("device_kind") != "cuda",
                                                runs.get(k, {}).get("date", "")))
        for run_id in ordered:
            meta = runs.get(run_id, {"device": "?", "date": "?", "command": "?"})
            group = groups[run_id]
            gpu = meta.get("device_kind") == "cuda"
            lines += [f"### {meta['device']} ({meta['date'][:10]})", ""]
            lines += _caption(meta, group, SHAPES_TEXT[section])
            lines += TABLES[section](group, gpu) + [""]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str]) -> int:
    src = Path(argv[1]) if len(argv) > 1 else HERE / "results.json"
    dst = Path(argv[2]) if len(argv) > 2 else HERE / "RESULTS.md"
    data = json.loads(src.read_text()) if src.exists() else {"runs": {}, "rows": []}
    dst.write_text(render(data))
    print(f"wrote {dst} ({len(data.get('rows', []))} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
