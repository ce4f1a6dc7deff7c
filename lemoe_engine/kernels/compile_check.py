"""Compile the kernels for real GPU architectures on a machine without a GPU.

``triton.compile`` given a ``GPUTarget`` never touches a driver, and ptxas ships inside the
Triton wheel, so every launch configuration the wrappers can pick is compiled here exactly as
a launch would compile it: the wrappers' own launch builders (``route_launches``,
``ffn_launches``, ``pooled_route_launches``) produce the arguments, and the kernel's binder
specialises them (``== 1``, ``% 16``, pointer alignment) as at a launch. Each compile reports
registers, spills (ptxas ``-v`` with Triton's flags) and shared memory,
checked against the architecture's per-block limit.

    python -m lemoe_engine.kernels.compile_check                # CI subset, all 4 archs
    python -m lemoe_engine.kernels.compile_check --full --table benchmarks/COMPILE.md

Needs Triton 3.9 (it uses ``create_function_from_signature`` and ``JITFunction._pack_args``,
internals that move between versions) and must run with ``TRITON_INTERPRET`` unset.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

SUPPORTED_TRITON = "3.9"
ARCHS = {80: "sm_80 (A100)", 86: "sm_86 (A10, RTX 30)", 89: "sm_89 (L4, L40S, RTX 40)", 90: "sm_90 (H100, H200)"}


def triton_supported() -> tuple[bool, str]:
    import triton
    if not triton.__version__.startswith(SUPPORTED_TRITON):
        return False, f"compile check pinned to Triton {SUPPORTED_TRITON}.x, found {triton.__version__}"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return False, "TRITON_INTERPRET=1: the kernels are interpreted, not compiled"
    return True, ""


@dataclasses.dataclass
class Case:
    """One launch of one wrapper configuration, for one architecture."""

    name: str           # kernel and configuration
    arch: int
    kernel: object
    args: tuple
    kwargs: dict

    def key(self) -> str:
        return f"sm_{self.arch} {self.name}"


@dataclasses.dataclass
class Result:
    name: str
    arch: int
    ok: bool
    shared: int = 0
    regs: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    stack: int = 0
    seconds: float = 0.0
    error: str = ""

    @property
    def limit(self) -> int:
        from .grouped_ffn import smem_limit_for
        return smem_limit_for((self.arch // 10, self.arch % 10))

    def problems(self) -> list[str]:
        out = []
        if not self.ok:
            out.append(f"compile failed: {self.error[:400]}")
        if self.shared > self.limit:
            out.append(f"shared memory {self.shared} B > {self.limit} B limit")
        if self.spill_stores or self.spill_loads:
            out.append(f"register spills: {self.spill_stores} B stores, {self.spill_loads} B loads")
        return out


# --------------------------------------------------------------------------- cases
def _t(shape, dtype):
    import torch
    return torch.empty(shape, dtype=dtype)


def route_cases(arch: int, full: bool):
    import torch

    from .anchor_route import route_launches
    dtypes = (torch.float32, torch.float16, torch.bfloat16) if full else (torch.float32,)
    ks = (1, 2, 3, 4) if full else (1, 2)
    # S buckets (BLOCK_S 16/32/64), E buckets (BLOCK_E 16/64), D one block or several
    shapes = ([(1, 8, 64), (1, 1024, 4096), (32, 1024, 256), (4096, 1024, 4096), (4096, 8, 64)]
              if full else [(1, 1024, 4096), (4096, 1024, 256)])
    for dtype in dtypes:
        for k in ks:
            for S, E, D in shapes:
                (kernel, _, args, kwargs), = route_launches(
                    _t((S, D), dtype), _t((E, D), dtype), _t((E,), torch.float32),
                    _t((S, k), torch.int32), _t((S, k), torch.float32), k, 0.1, False)
                name = f"anchor_route {_dn(dtype)} k={k} S={S} E={E} D={D} " + _tile(kwargs, "BLOCK_S", "BLOCK_E", "BLOCK_D")
                yield Case(name, arch, kernel, args, kwargs)


def ffn_cases(arch: int, full: bool, d: int = 4096, H: int = 64):
    import torch

    from .grouped_ffn import ACTIVATIONS, _GPU_CONFIGS, ffn_launches, gpu_config
    dtypes = (torch.float32, torch.float16, torch.bfloat16) if full else (torch.bfloat16,)
    cc = (arch // 10, arch % 10)
    for dtype in dtypes:
        table = _GPU_CONFIGS["fp32" if dtype == torch.float32 else "half"]
        buckets = [row[0] if row[0] is not None else 2 * table[-2][0] for row in table]
        if not full:
            buckets = [buckets[0], buckets[-1]]       # decode and the largest tile
        for M in buckets:
            for gated in (True, False) if full else (True,):
                for k in (1, 2, 3, 4) if full else (1, 2):
                    for act in (ACTIVATIONS if (full and M == buckets[0] and k == 1) else ("silu",)):
                        cfg = gpu_config(M, d, H, dtype, cc, gated=gated)
                        N = max(1, M // k)
                        part = (_t((cfg["SPLIT_K"] * (2 if gated else 1), N * k, H), torch.float32)
                                if cfg["SPLIT_K"] > 1 else None)
                        launches = ffn_launches(
                            _t((N, d), dtype), _t((N, k), torch.int32), _t((N, k), torch.float32),
                            _t((8, d, H), dtype), _t((8, d, H), dtype) if gated else None, _t((8, H, d), dtype),
                            _t((N, d), dtype), _t((N * k, H), dtype),
                            _t((N, d), dtype) if k == 1 else _t((N * k, d), torch.float32),
                            tuple(_t((n,), torch.int32) for n in (N * k, 8, 9, 8)), 4, 1.0, act, cfg, False,
                            part)
                        for kernel, _, args, kwargs in launches:
                            kname = kernel.fn.__name__.strip("_").replace("_kernel", "")
                            # down reads GATED/ACT (its split-K prologue applies the activation)
                            if kname == "up" or kname == "down" or \
                                    (kname == "combine" and act == "silu" and gated and M == buckets[0]):
                                name = (f"ffn.{kname} {_dn(dtype)} M<={M} k={k}"
                                        + (f" gated={int(gated)} {act}" if kname != "combine" else "")
                                        + f" d={d} H={H} " + _tile(kwargs, "BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_T")
                                        + (f" split{kwargs['SPLIT_K']}" if kwargs.get("SPLIT_K", 1) > 1 else ""))
                                yield Case(name, arch, kernel, args, kwargs)


def pooled_cases(arch: int, full: bool):
    try:
        from .pooled_route import pooled_route_cases
    except ImportError:
        return
    yield from pooled_route_cases(arch, full, _t, Case)


def all_cases(archs, full: bool):
    cases = []
    for arch in archs:
        cases += list(route_cases(arch, full)) + list(ffn_cases(arch, full)) + list(pooled_cases(arch, full))
    # the same (kernel, specialisation) may come from two wrapper configurations: keep one
    seen, unique = set(), []
    for c in cases:
        if c.key() not in seen:
            seen.add(c.key())
            unique.append(c)
    return unique


def _dn(dtype) -> str:
    return str(dtype).replace("torch.", "").replace("float", "fp").replace("bfp16", "bf16")


def _tile(kwargs, *names) -> str:
    parts = [f"{n.replace('BLOCK_', '')}{kwargs[n]}" for n in names if n in kwargs]
    return "x".join(parts) + f" w{kwargs.get('num_warps', 4)} s{kwargs.get('num_stages', 3)}"


# --------------------------------------------------------------------------- compile
def specialization(kernel, args, kwargs, arch: int = 90):
    """What a launch specialises on: (signature, constexprs, attributes) from the kernel's
    binder (Triton 3.9 internals), without compiling."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    constexprs = {k: v for k, v in kwargs.items() if k not in ("num_warps", "num_stages")}
    opts = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
    bound, spec, bopts = binder(*args, **constexprs, **opts)
    options, sig, consts, attrs = kernel._pack_args(backend, {**constexprs, **opts}, bound, spec, bopts)
    return backend, target, options, sig, consts, attrs


def compile_case(case: Case) -> Result:
    import triton
    from triton.compiler import ASTSource
    start = time.perf_counter()
    try:
        backend, target, options, sig, consts, attrs = specialization(case.kernel, case.args, case.kwargs, case.arch)
        compiled = triton.compile(ASTSource(case.kernel, sig, consts, attrs), target=target,
                                  options=options.__dict__)
        res = Result(case.name, case.arch, True, shared=int(compiled.metadata.shared))
        res.regs, res.spill_stores, res.spill_loads, res.stack = _resource_usage(compiled, case.arch)
    except Exception as exc:  # a compile failure is a result, not a crash of the check
        res = Result(case.name, case.arch, False, error=f"{type(exc).__name__}: {exc}")
    res.seconds = time.perf_counter() - start
    return res


def _resource_usage(compiled, arch: int) -> tuple[int, int, int, int]:
    """(registers, spill store bytes, spill load bytes, stack bytes): ptxas ``-v`` on the
    compiled PTX with the flags Triton uses (a cache hit prints no ptxas log, so ptxas runs
    again here; its answer is cached beside Triton's cache, keyed by the kernel's hash)."""
    cache_dir = Path(os.environ.get("TRITON_CACHE_DIR") or Path.home() / ".triton" / "cache") / "lemoe_ptxas_v"
    cached = cache_dir / f"{compiled.hash}-sm{arch}.json"
    if cached.exists():
        try:
            return tuple(json.loads(cached.read_text()))
        except (OSError, ValueError):
            pass
    usage = _ptxas_usage(compiled, arch)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        cached.write_text(json.dumps(usage))
    except OSError:
        pass
    return usage


def _ptxas_usage(compiled, arch: int) -> tuple[int, int, int, int]:
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "k.ptx"
        ptx.write_text(compiled.asm["ptx"])
        proc = subprocess.run([get_ptxas(arch).path, "-lineinfo", "-v",
                               "--regAllocOptLevel=2", f"--gpu-name={sm_arch_from_capability(arch)}",
                               str(ptx), "-o", str(Path(tmp) / "k.o")],
                              capture_output=True, text=True, check=True)
    log = proc.stderr + proc.stdout
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    stack = re.search(r"(\d+) bytes stack frame", log)
    stores = re.search(r"(\d+) bytes spill stores", log)
    loads = re.search(r"(\d+) bytes spill loads", log)
    return (regs, int(stores.group(1)) if stores else 0, int(loads.group(1)) if loads else 0,
            int(stack.group(1)) if stack else 0)


def run(archs, full: bool, workers: int = 1) -> list[Result]:
    cases = all_cases(archs, full)
    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            return list(pool.map(compile_case, cases))
    return [compile_case(c) for c in cases]


def table(results: list[Result], title: str) -> str:
    lines = [f"# {title}", "",
             "Generated by `python -m lemoe_engine.kernels.compile_check --full --table "
             "benchmarks/COMPILE.md` (Triton's bundled ptxas, no GPU). One row per kernel launch "
             "configuration the wrappers can choose; registers per thread and spills from "
             "ptxas `-v` (run with Triton's flags), shared memory per block from the compiled metadata, "
             "against the architecture's per-block limit.", ""]
    for arch in sorted({r.arch for r in results}):
        rows = [r for r in results if r.arch == arch]
        bad = [r for r in rows if r.problems()]
        limit = rows[0].limit
        lines += [f"## {ARCHS.get(arch, f'sm_{arch}')}: {len(rows)} configurations, {len(bad)} with problems, "
                  f"shared-memory limit {limit // 1024} KiB", "",
                  "| configuration | regs | spill st/ld (B) | shared (KiB) | % of limit | status |",
                  "|---|---:|---:|---:|---:|---|"]
        for r in rows:
            status = "; ".join(r.problems()) or "ok"
            lines.append(f"| {r.name} | {r.regs} | {r.spill_stores}/{r.spill_loads} | {r.shared / 1024:.1f} | "
                         f"{100 * r.shared / limit:.0f}% | {status} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", default="80,86,89,90")
    parser.add_argument("--full", action="store_true", help="every configuration (default: the CI subset)")
    parser.add_argument("--table", help="write a markdown table here")
    parser.add_argument("--json", help="write the results as JSON here")
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    ok, why = triton_supported()
    if not ok:
        print(f"SKIP: {why}")
        return 3
    archs = [int(a) for a in args.archs.split(",")]
    start = time.perf_counter()
    results = run(archs, args.full, args.workers)
    elapsed = time.perf_counter() - start
    bad = [r for r in results if r.problems()]
    for r in results:
        print(f"sm_{r.arch} {r.name}: regs={r.regs} spill={r.spill_stores}/{r.spill_loads} "
              f"shared={r.shared} ({r.seconds:.1f}s) {'; '.join(r.problems()) or 'ok'}")
    print(f"{len(results)} configurations compiled in {elapsed:.0f} s; {len(bad)} with problems")
    if args.table:
        Path(args.table).write_text(table(results, "Kernel compile table (registers, spills, shared memory)") + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps([dataclasses.asdict(r) for r in results], indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
