"""Benchmark-suite plumbing: a ``bench_rows`` fixture the benchmarks record their figures
into, and a session-finish hook that merges them into ``benchmarks/results.json``.

* Rows are only recorded when pytest-benchmark actually timed something: with
  ``--benchmark-disable`` (CI) every benchmark body runs once as a plain test and no file is
  written.
* ``LEMOE_BENCH_RESULTS=/some/path.json`` writes there instead of ``benchmarks/results.json``.
* Rows are keyed by (device, test id): a CPU run replaces only the CPU rows of the same
  device and keeps every GPU row (and vice versa), so runs on different machines merge.

Each row names its run (device, date, command, library versions, measured GPU ceilings);
``python benchmarks/report.py`` turns the file into ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
import sys
import tempfile
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # benchlib, also when a file of this folder is run alone
    sys.path.insert(0, str(HERE))

import benchlib  # noqa: E402

DEFAULT_RESULTS = HERE / "results.json"

# LEMOE_BENCH_THREADS=n pins torch's CPU threads (recorded in the run's metadata): on a shared
# machine fewer threads than cores can oversubscribe less and give steadier figures
if os.environ.get("LEMOE_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["LEMOE_BENCH_THREADS"]))
SCHEMA = 1


class Recorder:
    def __init__(self) -> None:
        self.rows: list[dict] = []

    def add(self, benchmark, *, section: str, case: str, backend: str, dtype: torch.dtype | str,
            shapes: dict, checks: dict, device_us: float | None = None, extra: dict | None = None,
            request=None) -> None:
        """Record one timed case (call after its checks passed). No-op when not timed."""
        if benchmark is None or not benchmark.enabled or benchmark.stats is None:
            return
        st = benchmark.stats.stats
        dtype_name = dtype if isinstance(dtype, str) else benchlib.DTYPE_NAMES.get(dtype, str(dtype))
        row = {
            "key": request.node.nodeid if request is not None else f"{section}/{case}",
            "section": section, "case": case, "backend": backend, "dtype": dtype_name,
            "shapes": shapes,
            "median_us": st.median * 1e6, "min_us": st.min * 1e6, "mean_us": st.mean * 1e6,
            "stddev_us": st.stddev * 1e6 if st.rounds > 1 else 0.0,
            "iqr_us": st.iqr * 1e6 if st.rounds > 1 else 0.0,
            "rounds": st.rounds,
            "checks": checks,
        }
        if device_us is not None:
            row["device_us"] = device_us
        if extra:
            row.update(extra)
        self.rows.append(row)


RECORDER = Recorder()


@pytest.fixture
def bench_rows() -> Recorder:
    return RECORDER


@pytest.fixture(scope="session")
def ceilings():
    """Measured GPU ceilings (copy bandwidth, bf16/fp32 matmul), once per session; None on CPU."""
    return benchlib.measure_ceilings()


def _versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("triton", "transformers", "pytest_benchmark"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # pragma: no cover - optional
            out[name] = None
    return out


def _run_meta(session) -> dict:
    args = list(session.config.invocation_params.args)
    env = " ".join(f"{k}={os.environ[k]}" for k in ("LEMOE_BENCH_RESULTS", "LEMOE_BENCH_THREADS")
                   if k in os.environ)
    command = (env + " " if env else "") + "python -m pytest " + " ".join(shlex.quote(a) for a in args)
    meta = {
        "device": benchlib.device_name(),
        "device_kind": benchlib.device_kind(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": command.strip(),
        "versions": _versions(),
        "torch_threads": torch.get_num_threads(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
    }
    if hasattr(os, "getloadavg"):
        meta["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    if benchlib.CUDA:
        meta["ceilings"] = benchlib.measure_ceilings()
    return meta


def merge_results(existing: dict | None, run_id: str, meta: dict, rows: list[dict]) -> dict:
    """Replace rows of the same (device, key); keep every other row and the runs they name."""
    data = existing if existing and existing.get("schema") == SCHEMA else {"schema": SCHEMA, "runs": {}, "rows": []}
    device = meta["device"]
    new_keys = {row["key"] for row in rows}
    kept = [r for r in data["rows"] if not (r.get("device") == device and r.get("key") in new_keys)]
    for row in rows:
        kept.append({**row, "device": device, "run": run_id})
    used = {r["run"] for r in kept}
    runs = {k: v for k, v in data["runs"].items() if k in used}
    runs[run_id] = meta
    order = {"routing": 0, "routing_default": 1, "layer": 2, "end_to_end": 3}
    kept.sort(key=lambda r: (r["device"], order.get(r["section"], 9), r["key"]))
    return {"schema": SCHEMA, "runs": runs, "rows": kept}


def pytest_sessionfinish(session, exitstatus):
    if not RECORDER.rows:
        return
    path = Path(os.environ.get("LEMOE_BENCH_RESULTS") or DEFAULT_RESULTS)
    meta = _run_meta(session)
    meta["exitstatus"] = int(exitstatus)
    run_id = f"{meta['device_kind']}-{meta['date']}"
    existing = None
    if path.exists():
        try:
            existing = json.loads(path.read_text())
        except (OSError, ValueError):
            existing = None
    data = merge_results(existing, run_id, meta, RECORDER.rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".results-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1, sort_keys=False)
        f.write("\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"lemoe benchmarks: {len(RECORDER.rows)} rows merged into {path}")
