"""Side-by-side comparison of LEMoE, its ablations and baseline editors (FT-L, GRACE, no edit).

For every method and every stream length T (lifelong protocol):

1. a fresh model is loaded;
2. the locality reference (the unedited model's argmax on every locality answer) is taken, and
   an evaluation pass of the unedited model gives the pre-edit scores;
3. the first T edits are planned into batches and edited, batch after batch (LEMoE: through its
   own editor, by default one expert per edit, ``lemoe-kmeans`` the paper's k-means
   batches of its routing queries; the baselines: ``planner.plan_order`` k-means batches of
   ``batch_size`` on the planner's default sentence features);
4. reliability / generality / locality / specificity (and the leak rate) are measured over all T
   edits after the LAST batch with ``evaluation.evaluate``, in every metric style asked for
   (``styles``): teacher-forced token accuracy, greedy generation on the raw prompts, and greedy
   generation through the chat template (each against the unedited model's reference taken in
   step 2 in the same style); then the teacher-forced pass is timed on the edited model and with the edit switched
   off in place (LEMoE: ``adaptors_disabled``; FT-L: original weight swapped back; GRACE: codebook
   off), interleaved, fastest of ``timing_repeats`` each: edited / unedited is the inference
   overhead (interleaving keeps a busy machine's load out of the ratio).

Rows are merged into ``editing_results.json`` (keyed by model, data set, method and T, so runs
can be done piecewise), and ``EDITING.md`` and ``editing_vs_T.png`` are rewritten from all rows.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as _dt
import gc
import json
import math
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from .baselines import FTLConfig, FTLEditor, GraceConfig, GraceEditor, NoEditEditor, config_dict
from .config import LEMoEConfig
from .editor import DEFAULT_BATCH_SIZE, DEFAULT_PLAN
from .errors import ConfigError, LEMoEError
from .evaluation import evaluate, unedited_reference

RESULTS_JSON = "editing_results.json"
RESULTS_MD = "EDITING.md"
RESULTS_PNG = "editing_vs_T.png"
METRICS = ("reliability", "generality", "locality", "average")
STYLES = ("teacher_forced", "greedy", "chat")
"""Metric styles of ``lemoe compare``: teacher-forced token accuracy, greedy generation on the raw
prompt, greedy generation through the chat template (see ``evaluation``)."""
STYLE_ARGS = {"teacher_forced": dict(mode="teacher_forced"), "greedy": dict(mode="generate"),
              "chat": dict(mode="generate", chat=True)}
BUNDLED_DATA = "bundled"


@dataclass(frozen=True)
class Method:
    name: str
    kind: str  # "lemoe" | "ft-l" | "grace" | "none"
    description: str
    config: dict = field(default_factory=dict)  # LEMoEConfig changes (kind "lemoe")
    plan: str = "kmeans"  # LEMoE methods: DEFAULT_PLAN unless set


METHODS: dict[str, Method] = {m.name: m for m in [
    Method("lemoe", "lemoe", "LEMoE, default config: one expert per edit, picked by the question gate",
           plan=DEFAULT_PLAN),
    Method("lemoe-kmeans", "lemoe", "LEMoE, the paper's k-means batches (batch_size edits per expert)",
           plan="kmeans"),
    Method("lemoe-noplan", "lemoe", "LEMoE, batches in arrival order (no planning)", plan="none"),
    Method("lemoe-nogate", "lemoe", "LEMoE without the locality gate", {"gate": False}, plan=DEFAULT_PLAN),
    Method("lemoe-noqgate", "lemoe", "LEMoE served without the question gate (the default before format 5)",
           {"question_gate": None}, plan=DEFAULT_PLAN),
    Method("lemoe-token", "lemoe", "LEMoE with token-level routing", {"routing": "token"}, plan=DEFAULT_PLAN),
    Method("lemoe-hidden", "lemoe", "LEMoE, queries from the MLP input", {"query_source": "hidden"},
           plan=DEFAULT_PLAN),
    Method("lemoe-embedding", "lemoe", "LEMoE, queries from the token embeddings (the paper)",
           {"query_source": "embedding"}, plan=DEFAULT_PLAN),
    Method("lemoe-meanpool", "lemoe", "LEMoE, one mean-pooled query per prompt (the paper)",
           {"query_pooling": "mean"}, plan=DEFAULT_PLAN),
    Method("lemoe-top2", "lemoe", "LEMoE, top-2 experts", {"top_k": 2}, plan=DEFAULT_PLAN),
    Method("lemoe-h256", "lemoe", "LEMoE, expert width 256", {"expert_hidden": 256}, plan=DEFAULT_PLAN),
    Method("lemoe-h1024", "lemoe", "LEMoE, expert width 1024", {"expert_hidden": 1024}, plan=DEFAULT_PLAN),
    Method("ft-l", "ft-l", "FT-L: fine-tune the target layer's MLP down-projection"),
    Method("grace", "grace", "GRACE codebook at the target layer's MLP"),
    Method("none", "none", "no edit (floor)", plan="none"),
]}
DEFAULT_METHODS = ("lemoe", "ft-l", "grace", "none")


def _check_methods(methods: Sequence[str]) -> list[str]:
    methods = [m.strip() for m in methods if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ConfigError(f"unknown method(s) {unknown or methods!r}; choose from {', '.join(METHODS)}")
    return list(dict.fromkeys(methods))


def _check_limits(limits: Sequence[int], n_edits: int) -> list[int]:
    out = []
    for t in limits:
        if isinstance(t, bool) or not isinstance(t, int) or t < 1:
            raise ConfigError(f"every limit T must be a positive integer, got {t!r}")
        if t > n_edits:
            raise ConfigError(f"limit T={t} exceeds the {n_edits} edits given")
        out.append(t)
    if not out:
        raise ConfigError("give at least one limit T")
    return sorted(set(out))


def device_description(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    return f"cpu ({cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def _finite(x) -> Optional[float]:
    return float(x) if x is not None and math.isfinite(float(x)) else None


def _evaluate(model, tokenizer, edits, ref, batch_size: int):
    return evaluate(model, tokenizer, edits, locality_ref=ref, batch_size=batch_size, progress=False)


def _overhead_timing(model, tokenizer, edits, ref, repeats: int, batch_size: int, unedited) -> tuple[float, float]:
    """Fastest time of an evaluation pass without the edit (``unedited()`` context) and with it,
    the two interleaved so both see the same machine load."""
    best = {"unedited": float("inf"), "edited": float("inf")}
    for r in range(repeats):
        for state in (("unedited", "edited") if r % 2 == 0 else ("edited", "unedited")):
            start = time.perf_counter()
            with unedited() if state == "unedited" else contextlib.nullcontext():
                _evaluate(model, tokenizer, edits, ref, batch_size)
            best[state] = min(best[state], time.perf_counter() - start)
    return best["unedited"], best["edited"]


def _metrics_dict(metrics) -> dict:
    return {"reliability": metrics.reliability, "generality": metrics.generality,
            "locality": metrics.locality, "average": metrics.average()}


def _style_dict(metrics, seconds: float) -> dict:
    return {**_metrics_dict(metrics), "specificity": metrics.specificity,
            "n_specificity": metrics.n_specificity, "leak_rate": metrics.leak_rate,
            "specificity_leak_rate": metrics.specificity_leak_rate, "eval_seconds": seconds}


def _check_styles(styles: Sequence[str]) -> list[str]:
    styles = [x.strip() for x in styles if x.strip()]
    unknown = [x for x in styles if x not in STYLES]
    if unknown or not styles:
        raise ConfigError(f"unknown metric style(s) {unknown or styles!r}; choose from {', '.join(STYLES)}")
    if "teacher_forced" not in styles:
        styles.insert(0, "teacher_forced")  # the row's main columns and the timing use it
    return list(dict.fromkeys(styles))


def _run_one(method: Method, model, tokenizer, edits, **kwargs) -> dict:
    """Edit ``model`` with ``method``; returns (a context factory running the model as unedited,
    the row's editing part). Raises ConfigError when the method refuses the configuration.
    Every method edits under the same attention backends (``training.editing_attention``), so
    their edit times compare."""
    from .training import editing_attention
    with editing_attention(next(model.parameters()).device):
        return _edit_with(method, model, tokenizer, edits, **kwargs)


def _edit_with(method: Method, model, tokenizer, edits, *, batch_size, seed, progress, unrelated_prompts,
               lemoe_config, editor_config, ftl_config, grace_config, plan_features) -> dict:
    plan_seconds = 0.0
    if method.kind == "lemoe":
        from .editor import EditorConfig, LifelongEditor
        # from_dict: a field this version does not know is a ConfigError (recorded), not a crash
        config = LEMoEConfig.from_dict({**(lemoe_config or {}), **method.config})
        editor_config = editor_config or EditorConfig()
        started = time.perf_counter()
        editor = LifelongEditor(model, tokenizer, config, editor_config, unrelated_prompts=unrelated_prompts)
        reports = editor.edit(edits, plan=method.plan, batch_size=None if method.plan == "keys" else batch_size,
                              seed=seed, progress=progress)
        edit_seconds = time.perf_counter() - started
        method_config = {"lemoe": config.to_dict(), "editor": dataclasses.asdict(editor_config)}
        from .patching import adaptors_disabled

        def unedited():
            return adaptors_disabled(model)
        plan_name = {"keys": "one expert per edit (per group of indistinguishable routing keys without the "
                             "question gate)",
                     "kmeans": "kmeans on LEMoE's routing queries",
                     "none": "arrival order"}[method.plan]
    else:
        from .planner import plan_order, sentence_features
        if method.kind == "ft-l":
            editor = FTLEditor(model, tokenizer, ftl_config)
        elif method.kind == "grace":
            editor = GraceEditor(model, tokenizer, grace_config)
        else:
            editor = NoEditEditor(model, tokenizer)
        started = time.perf_counter()
        features = None
        if method.plan == "kmeans":
            features = (plan_features or sentence_features)([e.prompt for e in edits])
        batches = plan_order(edits, batch_size=batch_size, plan=method.plan, seed=seed, features=features)
        plan_seconds = time.perf_counter() - started
        started = time.perf_counter()
        reports = [editor.edit_batch([edits[i] for i in batch]) for batch in batches]
        edit_seconds = time.perf_counter() - started
        method_config = config_dict(getattr(editor, "config", None))
        plan_name = ("kmeans on the planner's sentence features" if method.plan == "kmeans"
                     else "arrival order")
        unedited = editor.unedited
    return unedited, {
        "edit_seconds": edit_seconds,
        "plan_seconds": plan_seconds,
        "batch_seconds": sum(r.seconds for r in reports),
        "seconds_per_edit": edit_seconds / len(edits),
        "batches": len(reports),
        "steps": sum(r.steps for r in reports),
        "final_batch_loss": _finite(reports[-1].loss) if reports else None,
        "plan": plan_name,
        "method_config": method_config,
    }


def run_comparison(model_name: str, edits, methods: Sequence[str] = DEFAULT_METHODS,
                   limit_values: Sequence[int] = (10, 100), batch_size: int = DEFAULT_BATCH_SIZE, seed: int = 0,
                   out_dir: str | os.PathLike = "benchmarks", progress: bool = True, *,
                   model_loader: Optional[Callable[[str], tuple]] = None, device: str = "cpu",
                   unrelated_prompts: Optional[Sequence[str]] = None, lemoe_config: Optional[dict] = None,
                   editor_config=None,
                   ftl_config: Optional[FTLConfig] = None, grace_config: Optional[GraceConfig] = None,
                   plan_features: Optional[Callable[[list[str]], Any]] = None, timing_repeats: int = 3,
                   eval_batch_size: int = 32, command: Optional[str] = None,
                   styles: Sequence[str] = STYLES, data_name: str = BUNDLED_DATA) -> list[dict]:
    """Compare ``methods`` on the first T edits for every T in ``limit_values``; returns the new
    rows and writes/merges ``out_dir``/{editing_results.json, EDITING.md, editing_vs_T.png}.

    ``lemoe_config``: LEMoEConfig fields every LEMoE method starts from (its own changes win);
    ``editor_config`` / ``ftl_config`` / ``grace_config``: training knobs of each editor.
    ``model_loader(model_name) -> (model, tokenizer)`` loads a fresh model (default:
    ``models.load_model`` on ``device``). ``plan_features(prompts) -> array [n, f]`` replaces the
    planner's sentence encoder for the baselines. A method that refuses its configuration
    (``ConfigError``, e.g. a routing the editor does not train) gets a row with status
    "unsupported" and the reason, never a number.

    ``styles``: metric styles (``STYLES``; teacher-forced always runs); a style the tokenizer
    cannot do (chat without a chat template) is left out of the row with the reason.
    ``data_name``: the edit set's name, part of each row's key (default ``"bundled"``).
    """
    edits = list(edits)
    if not edits:
        raise ConfigError("no edits given")
    methods = _check_methods(methods)
    limits = _check_limits(limit_values, len(edits))
    styles = _check_styles(styles)
    if isinstance(timing_repeats, bool) or not isinstance(timing_repeats, int) or timing_repeats < 1:
        raise ConfigError(f"timing_repeats must be a positive int, got {timing_repeats!r}")
    if model_loader is None:
        from .models import load_model

        def model_loader(name):
            return load_model(name, device=device)
    out_dir = Path(out_dir)
    command = command if command is not None else shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])
    rows = []
    for T in limits:
        subset = edits[:T]
        for name in methods:
            method = METHODS[name]
            torch.manual_seed(seed)
            model, tokenizer = model_loader(model_name)
            param = next(model.parameters())
            row: dict[str, Any] = {
                "method": name, "T": T, "model": str(model_name), "description": method.description,
                "batch_size": batch_size, "seed": seed, "device": device_description(param.device),
                "dtype": str(param.dtype).replace("torch.", ""), "torch": torch.__version__,
                "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "command": command, "data": data_name,
            }
            # every style's reference: the fresh model, before any edit
            refs: dict[str, Any] = {}
            for style in styles:
                try:
                    refs[style] = unedited_reference(model, tokenizer, subset, batch_size=eval_batch_size,
                                                     progress=False, **STYLE_ARGS[style])
                except ConfigError as err:  # e.g. no chat template
                    row.setdefault("styles_skipped", {})[style] = str(err)
            ref = refs["teacher_forced"]
            pre = _evaluate(model, tokenizer, subset, ref, eval_batch_size)
            try:
                unedited, info = _run_one(
                    method, model, tokenizer, subset, batch_size=batch_size, seed=seed, progress=progress,
                    unrelated_prompts=unrelated_prompts, lemoe_config=lemoe_config, editor_config=editor_config,
                    ftl_config=ftl_config, grace_config=grace_config, plan_features=plan_features)
            except ConfigError as err:
                row.update(status="unsupported", reason=str(err))
                for metric in METRICS:
                    row[metric] = None
                if progress:
                    print(f"compare: {name} T={T}: not supported: {err}", file=sys.stderr, flush=True)
            else:
                row.update(info)
                started = time.perf_counter()
                post = _evaluate(model, tokenizer, subset, ref, eval_batch_size)
                row.update(status="ok", **_metrics_dict(post), n_edits=T)
                row.update({k: v for k, v in _style_dict(post, time.perf_counter() - started).items()
                            if k not in row})
                for style in styles[1:]:
                    if style in refs:
                        started = time.perf_counter()
                        metrics = evaluate(model, tokenizer, subset, locality_ref=refs[style],
                                           batch_size=eval_batch_size, progress=False, **STYLE_ARGS[style])
                        row[style] = _style_dict(metrics, time.perf_counter() - started)
                unedited_s, edited_s = _overhead_timing(model, tokenizer, subset, ref, timing_repeats,
                                                        eval_batch_size, unedited)
                row["inference"] = {
                    "pass": "evaluate(): rel + gen + loc (+ spec) teacher-forced over the T edits, batch "
                            f"{eval_batch_size}; fastest of {timing_repeats}, edited and unedited "
                            "(edit switched off in place) interleaved",
                    "unedited_seconds": unedited_s, "edited_seconds": edited_s,
                    "overhead": edited_s / unedited_s if unedited_s > 0 else None,
                }
                if progress:
                    styled = " ".join(
                        f"| {st} {_fmt(row[st]['reliability'])}/{_fmt(row[st]['generality'])}/"
                        f"{_fmt(row[st]['locality'])}/{_fmt(row[st]['specificity'])}"
                        for st in styles[1:] if st in row)
                    print(f"compare: {name} T={T}: rel {row['reliability']:.3f} gen {row['generality']:.3f} "
                          f"loc {row['locality']:.3f} spec {_fmt(row.get('specificity'))} "
                          f"leak {_fmt(row.get('leak_rate'))} {styled} edit {row['edit_seconds']:.1f}s "
                          f"overhead x{row['inference']['overhead']:.2f}", file=sys.stderr, flush=True)
            row["pre_edit"] = _metrics_dict(pre)
            rows.append(row)
            del model, tokenizer
            gc.collect()
            write_results(out_dir, [row])
    return rows


# --------------------------------------------------------------------------------------------
# output files
# --------------------------------------------------------------------------------------------

def _row_key(row: dict) -> tuple:
    return (row.get("model"), row.get("data") or BUNDLED_DATA, row["method"], int(row["T"]))


def _method_rank(name: str) -> tuple:
    order = list(METHODS)
    return (order.index(name) if name in order else len(order), name)


def merge_rows(existing: list[dict], new: list[dict]) -> list[dict]:
    """``existing`` with every row of ``new`` added or replacing the row of the same key."""
    merged = {_row_key(r): r for r in existing}
    for row in new:
        merged[_row_key(row)] = row
    return sorted(merged.values(), key=lambda r: (str(r.get("model")), str(r.get("data") or BUNDLED_DATA),
                                                  int(r["T"]), _method_rank(r["method"])))


def _sanitize(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _sanitize(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_sanitize(v) for v in value]
    return value


def write_results(out_dir: str | os.PathLike, rows: list[dict]) -> list[dict]:
    """Merge ``rows`` into ``out_dir``/editing_results.json and rewrite the table and the plot."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / RESULTS_JSON
    existing = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else []
    if not isinstance(existing, list):
        raise ConfigError(f"{path} does not hold a list of result rows")
    merged = merge_rows(existing, [_sanitize(r) for r in rows])
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(merged, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    (out_dir / RESULTS_MD).write_text(markdown_table(merged), encoding="utf-8")
    plot_results(merged, out_dir / RESULTS_PNG)
    return merged


def _fmt(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _style_cells(row: dict, style: str) -> list[str]:
    values = row if style == "teacher_forced" else (row.get(style) or {})
    return [_fmt(values.get(k)) for k in ("reliability", "generality", "locality", "specificity")]


def markdown_table(rows: list[dict]) -> str:
    lines = ["# Editing comparison: LEMoE vs baselines", "",
             "Lifelong protocol: the first T edits are applied batch after batch and every metric is "
             "measured after the last batch, over all T edits, against the unedited model's answers. "
             "Three metric styles side by side (lemoe_engine/evaluation.py): **TF** = teacher-forced "
             "token accuracy as EasyEdit computes it; **greedy** = greedy generation on the raw prompt "
             "(an edit counts when the continuation starts with the target, normalised; locality / "
             "specificity when the first 8 tokens equal the unedited model's); **chat** = the prompt "
             "asked through the tokenizer's chat template (an edit counts when the first 32 new tokens "
             "contain the target; locality / specificity when the unedited model's first 16 tokens are "
             "reproduced). Spec = specificity: same-subject prompts about other relations (prompts "
             "about a fact edited in the same stream are skipped; '-' where the data has none). Leak = "
             "fraction of locality prompts that reach any expert (LEMoE) or codebook entry (GRACE), raw "
             "and through the chat template; '-' for methods without a router. Edit time is the wall "
             "time of planning + editing for LEMoE, editing alone for the baselines (their planning is "
             "`plan s`). Overhead = time of one teacher-forced evaluation pass of the edited model / the "
             "same pass with the edit switched off in place (LEMoE: adaptors disabled, FT-L: original "
             "weight, GRACE: codebook off), interleaved, fastest of N each. Written by `lemoe compare` "
             "(lemoe_engine/compare.py); raw rows in editing_results.json.", ""]
    by_model: dict[tuple, list[dict]] = {}
    for row in rows:
        by_model.setdefault((str(row.get("model")), str(row.get("data") or BUNDLED_DATA)), []).append(row)
    for (model, data), group in by_model.items():
        devices = sorted({str(r.get("device")) for r in group})
        lines += [f"## {model}, {data} edits", "", f"Device: {'; '.join(devices)}", "",
                  "| method | T | TF Rel | TF Gen | TF Loc | TF Spec | greedy Rel | greedy Gen | greedy Loc "
                  "| greedy Spec | chat Rel | chat Gen | chat Loc | chat Spec | leak | chat leak | edit s | status |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in group:
            status = r.get("status", "ok")
            if status != "ok":
                status = f"{status}: {str(r.get('reason', '')).splitlines()[0][:90]}"
            cells = [r["method"], str(r["T"])]
            for style in STYLES:
                cells += _style_cells(r, style)
            cells += [_fmt(r.get("leak_rate")), _fmt((r.get("chat") or {}).get("leak_rate")),
                      _fmt(r.get("edit_seconds"), 1), status]
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", "| method | T | batches (LEMoE: experts) | edit s | s/edit | plan s | steps | overhead "
                  "| spec prompts | eval s (TF / greedy / chat) |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in group:
            inference = r.get("inference") or {}
            overhead = inference.get("overhead")
            evals = " / ".join(_fmt((r if st == "teacher_forced" else (r.get(st) or {})).get("eval_seconds"), 0)
                               for st in STYLES)
            lines.append(
                f"| {r['method']} | {r['T']} | {r.get('batches', '-')} | {_fmt(r.get('edit_seconds'), 1)} "
                f"| {_fmt(r.get('seconds_per_edit'), 2)} | {_fmt(r.get('plan_seconds'), 1)} "
                f"| {r.get('steps', '-')} | {'-' if overhead is None else f'x{overhead:.2f}'} "
                f"| {r.get('n_specificity', '-')} | {evals} |")
        lines.append("")
        commands = sorted({str(r.get("command")) for r in group if r.get("command")})
        if commands:
            lines += ["Commands:", ""] + [f"    {c}" for c in commands] + [""]
    return "\n".join(lines)


def plot_results(rows: list[dict], path: str | os.PathLike) -> None:
    """One panel per metric (teacher-forced), the metric against T, one line per (model, data,
    method)."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 8))
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2).ravel()
    ok = [r for r in rows if r.get("status", "ok") == "ok" and r.get("reliability") is not None]
    models = sorted({(str(r.get("model")), str(r.get("data") or BUNDLED_DATA)) for r in ok})
    series: dict[tuple, list[dict]] = {}
    for r in ok:
        series.setdefault((f"{r.get('model')}, {r.get('data') or BUNDLED_DATA}", r["method"]), []).append(r)
    ts = sorted({int(r["T"]) for r in ok})
    markers = "os^vD<>ph*X"
    for ax, metric in zip(axes, METRICS):
        ordered = sorted(series.items(), key=lambda kv: (kv[0][0], _method_rank(kv[0][1])))
        for k, ((model, method), group) in enumerate(ordered):
            group = sorted(group, key=lambda r: int(r["T"]))
            label = method if len(models) == 1 else f"{method} ({model})"
            # open markers of different shapes: methods with equal scores stay visible
            ax.plot([int(r["T"]) for r in group], [r[metric] for r in group], marker=markers[k % len(markers)],
                    markersize=9 - 0.5 * (k % 6), fillstyle="none", label=label)
        ax.set_title(metric)
        ax.set_xlabel("T (edits)")
        ax.set_ylim(-0.03, 1.03)
        if ts and max(ts) / min(ts) >= 10:
            ax.set_xscale("log")
        ax.set_xticks(ts, [str(t) for t in ts])
        ax.minorticks_off()
        ax.grid(True, alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize="small")
    fig.suptitle("Lifelong editing: metrics after the last of T edits")
    fig.tight_layout(rect=(0, 0.07, 1, 0.96))
    fig.savefig(path, dpi=110)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------

def add_compare_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``lemoe compare``."""
    parser.add_argument("--model", default="smollm2-135m",
                        help="bundled model name or local Hugging Face folder (default: smollm2-135m)")
    parser.add_argument("--edits", default=None,
                        help="edit file (ZsRE / EasyEdit JSON or JSONL); default: the bundled country edits")
    parser.add_argument("--limit", type=int, action="append", dest="limits", metavar="T",
                        help="stream length T (repeat for several; default: 10 and 100)")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help=f"comma-separated methods (default: %(default)s); known: {', '.join(METHODS)}")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                        help=f"edits per batch of the baselines, lemoe-kmeans and lemoe-noplan "
                             f"(default: {DEFAULT_BATCH_SIZE})")
    parser.add_argument("--seed", type=int, default=0, help="seed for planning and training (default: 0)")
    parser.add_argument("--out", default="benchmarks", help="output folder (default: benchmarks)")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--timing-repeats", type=int, default=3,
                        help="evaluation passes timed per model state; the fastest counts (default: 3)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars or per-row lines")
    parser.add_argument("--styles", default=",".join(STYLES),
                        help="comma-separated metric styles (default: %(default)s; teacher_forced always "
                             "runs; chat needs a tokenizer with a chat template)")
    from .cli import skip_invalid_arg
    skip_invalid_arg(parser)
    return parser


def run_compare_command(namespace: argparse.Namespace) -> int:
    """Run ``lemoe compare`` from parsed arguments; 0 on success, 2 on a user error."""
    from .cli import load_edit_file
    from .data import BUNDLED_EDITS
    try:
        methods = _check_methods(namespace.methods.split(","))
        limits = namespace.limits or [10, 100]
        edits = load_edit_file(namespace.edits or BUNDLED_EDITS, skip_invalid=namespace.skip_invalid)
        _check_limits(limits, len(edits))
        styles = _check_styles(namespace.styles.split(","))
        data_name = Path(namespace.edits).name if namespace.edits else BUNDLED_DATA
        command = getattr(namespace, "command_line", None) or shlex.join(["lemoe", *sys.argv[1:]])
        rows = run_comparison(namespace.model, edits, methods, limits, batch_size=namespace.batch_size,
                              seed=namespace.seed, out_dir=namespace.out, progress=not namespace.no_progress,
                              device=namespace.device, timing_repeats=namespace.timing_repeats, command=command,
                              styles=styles, data_name=data_name)
    except LEMoEError as err:
        print(f"lemoe compare: error: {err}", file=sys.stderr)
        return 2
    out = Path(namespace.out)
    print(f"{len(rows)} row(s) written to {out / RESULTS_JSON}, {out / RESULTS_MD}, {out / RESULTS_PNG}")
    return 0


def compare_main(args: Optional[Sequence[str]] = None) -> int:
    """``lemoe compare`` as a standalone entry point (``args``: the arguments after 'compare')."""
    args = list(sys.argv[1:] if args is None else args)
    parser = add_compare_arguments(argparse.ArgumentParser(
        prog="lemoe compare", description="Compare LEMoE with baseline editors over stream lengths T."))
    namespace = parser.parse_args(args)
    namespace.command_line = shlex.join(["lemoe", "compare", *args])
    return run_compare_command(namespace)
