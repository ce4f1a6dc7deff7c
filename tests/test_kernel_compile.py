"""The kernels compile for real GPUs, on this CPU machine (no GPU, no driver).

``lemoe_engine.kernels.compile_check`` compiles the launches the wrappers build, for sm_80,
sm_86, sm_89 and sm_90, with the ptxas bundled in the Triton wheel, and fails on a compile
error, on shared memory above the architecture's per-block limit, or on register spills.

* CI runs a representative subset (decode and largest tiles of every kernel, 18 per
  architecture, 72 compiles: measured 36 s on the shared 2-core machine with an empty Triton
  cache; a warm cache makes it a few seconds). ``LEMOE_COMPILE_FULL=1`` compiles every
  configuration (~1,200; the table in ``benchmarks/COMPILE.md`` comes from it).
* The compile runs in a subprocess with ``TRITON_INTERPRET`` removed from its environment:
  this pytest process may interpret the kernels (CI exports TRITON_INTERPRET=1), and Triton
  decides interpreted vs compiled once, at import.
* Pinned to Triton 3.9 (the check uses Triton internals); skipped with the reason otherwise.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FULL = os.environ.get("LEMOE_COMPILE_FULL") == "1"


def _compiled_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")     # Triton 3.9's default, stated: no warning
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _run(args, timeout):
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=_compiled_env(), capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode == 3 and proc.stdout.startswith("SKIP:"):
        pytest.skip(proc.stdout.strip()[5:].strip())
    return proc


def _needs_triton_39():
    import triton
    if not triton.__version__.startswith("3.9"):
        pytest.skip(f"the compile check is pinned to Triton 3.9 (internals); found {triton.__version__}")


def test_kernels_compile_for_sm80_sm86_sm89_sm90(tmp_path):
    _needs_triton_39()
    out = tmp_path / "compile.json"
    args = ["-m", "lemoe_engine.kernels.compile_check", "--json", str(out), "--workers", "2"]
    if FULL:
        args.append("--full")
    proc = _run(args, timeout=3600 if FULL else 600)
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert {r["arch"] for r in results} == {80, 86, 89, 90}
    names = " ".join(r["name"] for r in results)
    for kernel in ("anchor_route", "ffn.up", "ffn.down", "ffn.combine", "pooled_route.pool",
                   "pooled_route.select"):
        assert kernel in names, f"no {kernel} configuration was compiled"
    assert all(r["regs"] > 0 for r in results if r["ok"]), "ptxas -v gave no register count"
    problems = [line for line in proc.stdout.splitlines() if line.startswith("sm_") and not line.endswith(" ok")]
    assert proc.returncode == 0 and not problems, "\n".join(problems) or proc.stderr[-3000:]


SPECIALISATION_SCRIPT = r"""
import json, torch
from lemoe_engine.kernels import compile_check as cc
from lemoe_engine.kernels.anchor_route import route_launches
from lemoe_engine.kernels.grouped_ffn import ffn_launches, gpu_config
from lemoe_engine.kernels.pooled_route import pooled_route_launches
t = cc._t
f32, i32, bf16 = torch.float32, torch.int32, torch.bfloat16

def spec(launch):
    kernel, _, args, kwargs = launch
    _, _, _, sig, consts, attrs = cc.specialization(kernel, args, kwargs)
    return repr((sorted(sig.items()), sorted(attrs.items())))

def route(S, E, D=256):
    return route_launches(t((S, D), f32), t((E, D), f32), t((E,), f32), t((S, 2), i32), t((S, 2), f32),
                          2, 0.1, False)[0]

def ffn(N, E, d=512, H=64):
    cfg = gpu_config(16, d, H, bf16, (9, 0))   # decode: split over K
    assert cfg["SPLIT_K"] > 1
    return ffn_launches(t((N, d), bf16), t((N, 2), i32), t((N, 2), f32), t((E, d, H), bf16),
                        t((E, d, H), bf16), t((E, H, d), bf16), t((N, d), bf16), t((N * 2, H), bf16),
                        t((N * 2, d), f32), tuple(t((n,), i32) for n in (N * 2, 4, E + 1, E)), 4, 1.0,
                        "silu", cfg, False, t((cfg["SPLIT_K"] * 2, N * 2, H), f32))

def pooled(B, T, M, E, D=256):
    return pooled_route_launches(t((B, T, D), f32), t((B, T), torch.int64), t((M, D), f32), t((E + 1,), i32),
                                 t((M,), f32), t((B, 2), i32), t((B, 2), f32), t((B, M), f32), 2, 0.1, False)

out = {
  "route_S_E": [spec(route(S, E)) for S, E in ((1, 1), (16, 16), (17, 33), (4096, 1000))],
  "route_D": [spec(route(4, 8, D)) for D in (256, 257)],
  "ffn_E_N": [[spec(l) for l in ffn(N, E)] for N, E in ((1, 1), (16, 16), (7, 33))],
  "ffn_d": [[spec(l) for l in ffn(4, 8, d)] for d in (512, 520)],
  "pooled_BTME": [[spec(l) for l in pooled(B, T, M, E)] for B, T, M, E in ((1, 1, 1, 1), (16, 32, 64, 16), (3, 17, 99, 41))],
}
print(json.dumps(out))
"""


def test_serving_sizes_are_not_value_specialised():
    """S, E, N, B, T, M change while serving (batch, prompt length, a new expert): the kernels
    must not be specialised on their values (``== 1``, ``% 16``), or a new expert would compile
    a new kernel mid-serving, possibly inside a CUDA-graph capture. d, D and H stay specialised
    (the check can fail: changing them changes the specialisation)."""
    _needs_triton_39()
    proc = _run(["-c", SPECIALISATION_SCRIPT], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for name in ("route_S_E", "ffn_E_N", "pooled_BTME"):
        assert len({json.dumps(v) for v in out[name]}) == 1, f"{name}: specialised on a serving size"
    for name in ("route_D", "ffn_d"):
        assert len({json.dumps(v) for v in out[name]}) == 2, f"{name}: D/d should stay specialised"


@pytest.mark.parametrize("capability,limit", [((9, 0), None), ((8, 0), None), ((8, 6), None), ((8, 9), None),
                                              ((8, 6), 48 * 1024), ((7, 5), None)])
def test_tiles_fit_the_shared_memory_limit(capability, limit):
    """Every table entry, cut to the device's limit, fits it by the pipeline estimate (the
    compile check holds the estimate against real compiles); on sm_86/sm_89 the gated decode
    tile is cut (its 4 stages need 108 KiB there), on sm_90 it is not."""
    from lemoe_engine.kernels.grouped_ffn import _GPU_CONFIGS, gpu_config, pipeline_smem, smem_limit_for
    cap_limit = limit if limit is not None else smem_limit_for(capability)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        esize = 4 if dtype == torch.float32 else 2
        for row in _GPU_CONFIGS["fp32" if dtype == torch.float32 else "half"]:
            M = row[0] or 100_000
            for gated in (True, False):
                for d, H in ((4096, 64), (576, 1536), (8192, 256)):
                    cfg = gpu_config(M, d, H, dtype, capability, limit, gated)
                    up = pipeline_smem(cfg["BLOCK_M"], cfg["BLOCK_N_UP"], cfg["BLOCK_K_UP"], cfg["STAGES_UP"],
                                       esize, 2 if gated else 1)
                    down = pipeline_smem(cfg["BLOCK_M"], cfg["BLOCK_N_DOWN"], cfg["BLOCK_K_DOWN"],
                                         cfg["STAGES_DOWN"], esize, 1)
                    assert up <= cap_limit and down <= cap_limit, (dtype, row, gated, d, H, cfg)
                    assert min(cfg["BLOCK_N_UP"], cfg["BLOCK_K_UP"], cfg["BLOCK_N_DOWN"], cfg["BLOCK_K_DOWN"]) >= 16
    decode = gpu_config(1, 4096, 64, torch.bfloat16, capability, limit, True)
    table_stages = _GPU_CONFIGS["half"][0][5]
    if cap_limit >= 200 * 1024:
        assert decode["STAGES_UP"] == table_stages
    elif cap_limit <= 99 * 1024:
        assert (decode["STAGES_UP"], decode["BLOCK_K_UP"]) != (table_stages, _GPU_CONFIGS["half"][0][3])
