"""Small CUDA cases of the Triton kernels (expert FFN, pooled routing with and without key
windows, anchor routing, a layer forward), for compute-sanitizer (racecheck, memcheck).

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python benchmarks/sanitize_case.py
    compute-sanitizer --tool racecheck python benchmarks/sanitize_case.py [ffn pooled route layer]

Odd sizes (nothing a multiple of a block), several dtypes, top_k 1..4, gated slots (id -1),
empty experts, and a full LEMoE layer forward with the triton backend. Every result is
checked against the eager references; the script exits 1 on a mismatch, 2 without CUDA.
Run with the PyTorch caching allocator off (the variable above) so that memcheck sees
out-of-bounds accesses at the edge of each tensor rather than inside a pooled block.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

if not torch.cuda.is_available():
    print("sanitize_case.py needs a CUDA GPU", file=sys.stderr)
    sys.exit(2)
if os.environ.get("TRITON_INTERPRET") == "1":
    print("unset TRITON_INTERPRET: the sanitizer must see compiled kernels", file=sys.stderr)
    sys.exit(2)

from lemoe_engine.kernels import anchor_route, grouped_expert_ffn, pooled_route  # noqa: E402
from lemoe_engine.experts import expert_ffn_reference  # noqa: E402
from lemoe_engine.routing import route_reference  # noqa: E402

DEV = "cuda"
FAILURES: list[str] = []


def check(name: str, ok: bool, detail: str = "") -> None:
    print(f"{'ok  ' if ok else 'FAIL'} {name} {detail}")
    if not ok:
        FAILURES.append(name)


def unit(rows: int, dim: int, g: torch.Generator, dtype=torch.float32) -> torch.Tensor:
    v = torch.randn(rows, dim, generator=g)
    return (v / v.norm(dim=1, keepdim=True)).to(dtype).to(DEV)


def route_case(S: int, E: int, D: int, k: int, dtype: torch.dtype, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    q, a = unit(S, D, g, dtype), unit(E, D, g, dtype)
    thr = (torch.rand(E, generator=g) * 0.4 - 0.3).to(DEV)
    ids = torch.full((S, k), -7, dtype=torch.int32, device=DEV)
    w = torch.full((S, k), float("nan"), device=DEV)
    anchor_route(q, a, thr, k, 0.1, out_ids=ids, out_weights=w)
    torch.cuda.synchronize()
    ref_ids, ref_w = route_reference(q, a, thr, k, 0.1)
    same = (ids == ref_ids).all(dim=1)
    werr = float((w[same] - ref_w[same]).abs().max()) if bool(same.any()) else 0.0
    check(f"anchor_route S={S} E={E} D={D} k={k} {dtype}",
          float(same.float().mean()) >= 0.97 and werr < 1e-3 and not bool(torch.isnan(w).any()),
          f"(ids agree on {int(same.sum())}/{S}, weight err {werr:.1e})")


def pooled_case(B: int, T: int, E: int, per: int, D: int, k: int, seed: int, W: int = 1) -> None:
    """The default routing (max pooling, several anchors per expert; with W > 1 each anchor
    scored against the queries of its own key window) against the eager path."""
    from lemoe_engine.routing import expert_starts, route_scores, window_order, window_scores
    g = torch.Generator().manual_seed(seed)
    q = unit(W * B * T, D, g).reshape(W, B, T, D)
    a = unit(E * per, D, g)
    window = torch.randint(1, W + 1, (E * per,), generator=g, dtype=torch.int32).to(DEV) if W > 1 else None
    owner = torch.arange(E, device=DEV, dtype=torch.int32).repeat_interleave(per)
    mask = (torch.rand(B, T, generator=g) < 0.8).long().to(DEV)
    thr = (torch.rand(E * per, generator=g) * 0.2 - 0.1).to(DEV)
    ids = torch.full((B, k), -7, dtype=torch.int32, device=DEV)
    w = torch.full((B, k), float("nan"), device=DEV)
    pooled_route(q if W > 1 else q[0], mask, a, expert_starts(owner, E), thr, k, 0.1, out_ids=ids,
                 out_weights=w, anchor_window=window,
                 anchor_order=None if window is None else window_order(window))  # as the layer passes it
    torch.cuda.synchronize()
    scores = window_scores(q, a, window).masked_fill(mask.unsqueeze(-1) == 0, float("-inf")).max(dim=1).values
    ref_ids, ref_w = route_scores(scores, thr, owner, E, k, 0.1)
    same = (ids == ref_ids).all(dim=1)
    werr = float((w[same] - ref_w[same]).abs().max()) if bool(same.any()) else 0.0
    check(f"pooled_route B={B} T={T} E={E}x{per} D={D} k={k} W={W}",
          float(same.float().mean()) >= 0.9 and werr < 1e-3 and not bool(torch.isnan(w).any()),
          f"(ids agree on {int(same.sum())}/{B}, weight err {werr:.1e})")


def ffn_case(N: int, d: int, H: int, E: int, k: int, dtype: torch.dtype, gated: bool, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, d, generator=g).to(dtype).to(DEV)
    ids = torch.randint(-1, E, (N, k), generator=g, dtype=torch.int32).to(DEV)
    weights = torch.rand(N, k, generator=g).to(DEV)
    w_up = (torch.randn(E, d, H, generator=g) * d ** -0.5).to(dtype).to(DEV)
    w_gate = (torch.randn(E, d, H, generator=g) * d ** -0.5).to(dtype).to(DEV) if gated else None
    w_down = (torch.randn(E, H, d, generator=g) * H ** -0.5).to(dtype).to(DEV)
    base = torch.randn(N, d, generator=g).to(dtype).to(DEV)
    out = base.clone()
    grouped_expert_ffn(x, ids, weights, w_up, w_gate, w_down, "silu", out, 0.7)
    torch.cuda.synchronize()
    with torch.no_grad():
        ref = expert_ffn_reference(x.float(), ids, weights, w_up.float(),
                                   w_gate.float() if gated else None, w_down.float(), "silu",
                                   base.float().clone(), 0.7)
    delta, ref_delta = (out.float() - base.float()), (ref - base.float())
    err = float((delta - ref_delta).norm() / ref_delta.norm().clamp_min(1e-30))
    tol = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
    untouched = (ids < 0).all(dim=1)
    check(f"grouped_expert_ffn N={N} d={d} H={H} E={E} k={k} {dtype} gated={gated}",
          err < tol and torch.equal(out[untouched], base[untouched]), f"(rel err {err:.1e})")


def layer_case() -> None:
    import benchlib

    mlp = benchlib.llama_mlp(96, 160, torch.bfloat16, device=DEV)
    from lemoe_engine import LEMoELayer

    layer = LEMoELayer(mlp, 96, benchlib.lemoe_config(query_source="hidden", expert_hidden=80, top_k=2,
                                                      gate=False, backend="triton")).eval()
    benchlib.fill_random_experts(layer, 7, seed=3)
    x = torch.randn(5, 3, 96, device=DEV, dtype=torch.bfloat16)
    with torch.inference_mode():
        out = layer(x)
        layer.config.backend = "eager"
        ref = layer(x)
        base = mlp(x)
    torch.cuda.synchronize()
    err = float(((out - ref).float().norm()) / (ref - base).float().norm())
    check("LEMoELayer triton vs eager (bf16)", err < 5e-2, f"(rel err of the delta {err:.1e})")


GROUPS = {
    "ffn": lambda: (ffn_case(29, 64, 96, 5, 1, torch.float32, True, 5),
                    ffn_case(29, 72, 40, 5, 2, torch.bfloat16, True, 6),
                    ffn_case(131, 48, 112, 9, 4, torch.float16, False, 7),
                    ffn_case(3, 64, 64, 12, 2, torch.bfloat16, True, 8)),
    "pooled": lambda: (pooled_case(5, 37, 40, 3, 96, 2, 9),
                       pooled_case(2, 300, 700, 4, 256, 4, 10),
                       pooled_case(3, 41, 50, 3, 96, 2, 11, W=3)),
    "route": lambda: (route_case(37, 13, 96, 2, torch.float32, 1),
                      route_case(5, 300, 64, 4, torch.bfloat16, 2),
                      route_case(130, 1, 40, 3, torch.float16, 3),
                      route_case(70, 77, 4096, 1, torch.float32, 4)),
    "layer": layer_case,
}


def main(groups: list[str]) -> int:
    """Runs the named case groups in the order given (default: all; racecheck is slow, so a
    short lease can run the expert FFN group first: ``sanitize_case.py ffn pooled``)."""
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        print(f"unknown case group(s) {unknown}; choose from {sorted(GROUPS)}", file=sys.stderr)
        return 2
    for name in groups or list(GROUPS):
        GROUPS[name]()
    print(f"{len(FAILURES)} failure(s)")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
