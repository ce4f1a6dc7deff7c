"""Shared pieces of the benchmark suite: device identity, timing, measured GPU ceilings,
byte/FLOP counting, and builders of benchmark layers with random experts.

Imported by the ``test_bench_*.py`` files (pytest puts this folder on ``sys.path``) and by
``sanitize_case.py``. Nothing here touches CUDA at import time.
"""

from __future__ import annotations

import functools
import os
import platform
from typing import Callable, Optional

import torch
from torch import nn

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda") if CUDA else torch.device("cpu")

DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
# relative-error tolerances on an expert delta (the part of the layer output the experts add)
DELTA_TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}


# --------------------------------------------------------------------------- device
@functools.lru_cache(maxsize=None)
def device_name() -> str:
    """A stable name for the machine the figures come from (rows are keyed by it)."""
    if CUDA:
        return f"cuda: {torch.cuda.get_device_name(0)}"
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"cpu: {model} ({os.cpu_count()} logical cores)"


def device_kind() -> str:
    return "cuda" if CUDA else "cpu"


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


# --------------------------------------------------------------------------- timing
def free_memory(cache: dict) -> None:
    """Drop cached models/tensors and give their memory back (between benchmark cases)."""
    cache.clear()
    import gc
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def device_time_us(fn: Callable[[], object]) -> Optional[float]:
    """Median device time of ``fn`` in microseconds from CUDA events (Triton's ``do_bench``:
    warm-up, L2 flushed before every timed call, median of ~100 ms of repeats); None on CPU."""
    if not CUDA:
        return None
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=100, return_mode="median")) * 1e3


@functools.lru_cache(maxsize=None)
def measure_ceilings() -> Optional[dict]:
    """Measured ceilings of this GPU, once per process: device-to-device copy bandwidth
    (bytes read + written), a large bf16 matmul rate (8192^3) and an IEEE fp32 matmul rate
    (4096^3, TF32 off). None on a machine without CUDA."""
    if not CUDA:
        return None
    from triton.testing import do_bench

    props = torch.cuda.get_device_properties(0)
    nbytes = 2 << 30  # 2 GiB source, 2 GiB destination: far beyond L2
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    copy_ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    del src, dst
    n = 8192
    a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    bf16_ms = do_bench(lambda: a @ b, warmup=50, rep=300, return_mode="median")
    del a, b
    m = 4096
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        a = torch.randn(m, m, device="cuda")
        b = torch.randn(m, m, device="cuda")
        fp32_ms = do_bench(lambda: a @ b, warmup=50, rep=300, return_mode="median")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    del a, b
    torch.cuda.empty_cache()
    return {
        "copy_bytes_per_s": 2 * nbytes / (copy_ms * 1e-3),
        "bf16_matmul_flops_per_s": 2 * n ** 3 / (bf16_ms * 1e-3),
        "fp32_matmul_flops_per_s": 2 * m ** 3 / (fp32_ms * 1e-3),
        "how": "torch copy_ of 2 GiB (bytes read + written); torch.matmul bf16 8192^3 and "
               "fp32 4096^3 (allow_tf32=False); medians of triton.testing.do_bench",
        "sm_count": props.multi_processor_count,
        "memory_gib": round(props.total_memory / 2 ** 30, 1),
    }


def roofline_fields(nbytes: float, flops: float, dtype: torch.dtype,
                    device_us: Optional[float]) -> dict:
    """Achieved fractions of the measured ceilings (GPU rows only)."""
    ceilings = measure_ceilings()
    fields = {"bytes": int(nbytes), "flops": int(flops)}
    if ceilings is None or device_us is None or device_us <= 0:
        return fields
    seconds = device_us * 1e-6
    rate = ceilings["fp32_matmul_flops_per_s" if dtype == torch.float32 else "bf16_matmul_flops_per_s"]
    fields.update(
        achieved_bytes_per_s=nbytes / seconds,
        achieved_flops_per_s=flops / seconds,
        hbm_fraction=nbytes / seconds / ceilings["copy_bytes_per_s"],
        compute_fraction=flops / seconds / rate,
        compute_ceiling="fp32 matmul (IEEE)" if dtype == torch.float32 else "bf16 matmul",
    )
    return fields


# --------------------------------------------------------------------------- checks
def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.double(), ref.double()
    return float((got - ref).norm() / ref.norm().clamp_min(1e-30))


def unit_rows(rows: int, dim: int, generator: torch.Generator, device=DEV) -> torch.Tensor:
    v = torch.randn(rows, dim, generator=generator, dtype=torch.float32)
    return (v / v.norm(dim=1, keepdim=True)).to(device)


def _route64(scores: torch.Tensor, thresholds: torch.Tensor, top_k: int, temperature: float):
    """float64 routing, gate first: anchors under their threshold drop out, then top-k (ties to
    the lower id), softmax over the chosen; returns ids, weights and the sorted gated scores."""
    S, E = scores.shape
    k = min(top_k, E)
    gated = torch.where(scores >= thresholds[None, :], scores, torch.full_like(scores, float("-inf")))
    ordered, order = torch.sort(gated, dim=1, descending=True, stable=True)
    top, idx = ordered[:, :k], order[:, :k]
    keep = torch.isfinite(top)
    logits = torch.where(keep, top / temperature, torch.full_like(top, float("-inf")))
    probs = torch.nan_to_num(torch.softmax(logits, dim=1), nan=0.0)
    ids = torch.full((S, top_k), -1, dtype=torch.int64, device=scores.device)
    weights = torch.zeros((S, top_k), dtype=torch.float64, device=scores.device)
    ids[:, :k] = torch.where(keep, idx, torch.full_like(idx, -1))
    weights[:, :k] = torch.where(keep, probs, torch.zeros_like(probs))
    return ids, weights, ordered[:, :k + 1]


def check_route_float64(queries, anchors, thresholds, top_k, temperature, ids, weights,
                        margin: float = 1e-5, min_checked: float = 0.9) -> dict:
    """Compare a routing result (one anchor per expert) with a float64 recomputation written
    here, independent of ``route_reference``: ids exactly and weights to 1e-5 on every row
    whose decision is robust to rounding (the same ids with every threshold moved by
    +-``margin``, and the deciding score gaps > ``margin``). Returns check figures."""
    scores = queries.double() @ anchors.double().T
    thr = thresholds.double()
    exp_ids, exp_w, ordered = _route64(scores, thr, top_k, temperature)
    lo_ids = _route64(scores, thr - margin, top_k, temperature)[0]
    hi_ids = _route64(scores, thr + margin, top_k, temperature)[0]
    robust = (lo_ids == exp_ids).all(dim=1) & (hi_ids == exp_ids).all(dim=1)
    if ordered.shape[1] > 1:
        a, b = ordered[:, :-1], ordered[:, 1:]
        close = torch.isfinite(b) & ((a - b) <= margin)
        robust &= ~close.any(dim=1)
    S = scores.shape[0]
    checked = int(robust.sum())
    assert checked >= min_checked * S, f"only {checked}/{S} rows are free of near-ties"
    assert torch.equal(ids.long()[robust], exp_ids[robust]), "expert ids differ from the float64 reference"
    werr = float((weights.double()[robust] - exp_w[robust]).abs().max()) if checked else 0.0
    assert werr < 1e-5, f"routing weights off by {werr}"
    routed = float((exp_ids[:, 0] >= 0).double().mean())
    return {"rows_checked": checked, "max_weight_err": werr, "routed_fraction": routed}


def check_pooled_route_float64(queries, mask, anchors, owner, num_experts, thresholds, top_k, temperature,
                               ids, weights, margin: float = 1e-5, anchor_window=None) -> dict:
    """The default routing (masked max over tokens, gate per anchor, per-expert max over its
    anchors, top-k, softmax) recomputed in float64 here: ids exactly and weights to 1e-5 on
    sequences without a near-tie (deciding gaps and anchor-threshold gaps > ``margin``). With
    ``anchor_window`` [M] (values 1..W), queries are [W, B, T, d] and anchor m is scored against
    ``queries[anchor_window[m] - 1]`` only."""
    if anchor_window is None:
        s = torch.einsum("btd,md->btm", queries.double(), anchors.double())
    else:
        every = torch.einsum("wbtd,md->wbtm", queries.double(), anchors.double())
        pick = (anchor_window.long() - 1).to(every.device)[None, None, None, :].expand(1, *every.shape[1:])
        s = every.gather(0, pick)[0]
    s = s.masked_fill(mask[:, :, None] == 0, float("-inf")).max(dim=1).values
    thr = thresholds.double()
    near_thr = ((s - thr).abs() <= margin).any(dim=1)
    s = torch.where(s >= thr, s, torch.full_like(s, float("-inf")))
    per = torch.full((s.shape[0], num_experts), float("-inf"), dtype=torch.float64, device=s.device)
    per = per.scatter_reduce(1, owner.long()[None].expand(s.shape[0], -1), s, reduce="amax")
    exp_ids, exp_w, ordered = _route64(per, torch.full((num_experts,), float("-inf"), dtype=torch.float64,
                                                        device=s.device), top_k, temperature)
    robust = ~near_thr
    if ordered.shape[1] > 1:
        a, b = ordered[:, :-1], ordered[:, 1:]
        robust &= ~(torch.isfinite(b) & ((a - b) <= margin)).any(dim=1)
    checked = int(robust.sum())
    assert torch.equal(ids.long()[robust], exp_ids[robust]), "expert ids differ from the float64 reference"
    werr = float((weights.double()[robust] - exp_w[robust]).abs().max()) if checked else 0.0
    assert werr < 1e-5, f"routing weights off by {werr}"
    assert not bool(torch.isnan(weights).any()) and bool(((ids >= -1) & (ids < num_experts)).all())
    return {"rows_checked": checked, "max_weight_err": werr,
            "routed_fraction": float((exp_ids[:, 0] >= 0).double().mean())}


# --------------------------------------------------------------------------- layers
def llama_mlp(d: int, intermediate: int, dtype: torch.dtype, device=DEV, seed: int = 0) -> nn.Module:
    """A transformers LlamaMLP (gate/up/down projections, SiLU) with random weights."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    config = LlamaConfig(hidden_size=d, intermediate_size=intermediate, hidden_act="silu",
                         num_attention_heads=max(1, d // 64), num_hidden_layers=1, vocab_size=128)
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            mlp = LlamaMLP(config)
    finally:
        torch.set_default_dtype(previous)
    return mlp.eval().requires_grad_(False)


def fill_random_experts(layer, count: int, seed: int, thresholds: Optional[torch.Tensor] = None):
    """Give ``layer`` ``count`` frozen experts with random non-zero weights (scaled by
    1/sqrt(fan-in)) and random unit anchors, in one allocation per stacked weight.

    ``tests/tiny_models.add_random_experts`` adds experts through ``add_expert``; that path
    concatenates the stack once per expert (quadratic in E, and it initialises on the CPU),
    which at LLaMA-7B shapes (64 experts of 3 x 4096 x 11008) costs tens of seconds. The
    stacks built here have exactly the layout ``add_expert``/``freeze_expert`` produce."""
    from lemoe_engine.routing import l2_normalize

    device = layer.anchors.device
    dtype = layer.expert_dtype
    d, hidden = layer.hidden_size, layer.config.expert_hidden
    g = torch.Generator(device=device).manual_seed(seed)
    shapes = {"w_up": (count, d, hidden), "w_gate": (count, d, hidden), "w_down": (count, hidden, d)}
    for name in layer.weight_names:
        fan_in = shapes[name][1]
        w = torch.randn(shapes[name], generator=g, device=device, dtype=dtype)
        w.mul_(fan_in ** -0.5)
        setattr(layer, name, nn.Parameter(w, requires_grad=False))
    anchors = torch.randn(count, layer.anchors.shape[1], generator=g, device=device)
    layer.anchors = l2_normalize(anchors)
    if hasattr(layer, "anchor_expert"):  # one anchor per expert, anchor i owned by expert i
        layer.anchor_expert = torch.arange(count, dtype=torch.int32, device=device)
        layer.anchor_window = torch.ones(count, dtype=torch.int32, device=device)  # one-token keys
    layer.thresholds = (thresholds.to(device=device, dtype=torch.float32) if thresholds is not None
                        else torch.full((count,), float("-inf"), device=device))
    layer.expert_info = [{"benchmark": True} for _ in range(count)]
    layer._sequence_route = None
    assert layer.num_experts == layer.num_frozen == count
    return layer


def lemoe_config(**fields):
    """A LEMoEConfig for the benchmarks. Sequence routing pools the prompt by its mean (the
    paper's query, one per input: the path the fused ``anchor_route`` kernel serves) wherever
    the config knows pooling modes; ``fields`` override."""
    import dataclasses

    from lemoe_engine import LEMoEConfig

    known = {f.name for f in dataclasses.fields(LEMoEConfig)}
    if "query_pooling" in known:
        fields.setdefault("query_pooling", "mean")
    return LEMoEConfig(**fields)


def config_summary(config) -> dict:
    """The routing-related knobs of a config, for the result rows."""
    names = ("query_source", "query_pooling", "routing", "query_hidden", "key_dim", "gate", "temperature")
    return {n: getattr(config, n) for n in names if hasattr(config, n)}


def expert_bytes(layer, expert_ids: torch.Tensor) -> int:
    """Bytes of the expert weights the routed ids touch (each distinct expert read once)."""
    touched = int(torch.unique(expert_ids[expert_ids >= 0]).numel())
    per_expert = sum(getattr(layer, name)[0].numel() for name in layer.weight_names)
    return touched * per_expert * torch.finfo(layer.expert_dtype).bits // 8


def module_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def query_bytes(layer) -> int:
    """Routing state read per call: query projection, centre, anchors, thresholds."""
    enc = layer.query_encoder
    total = enc.center.numel() * 4 + layer.anchors.numel() * 4 + layer.thresholds.numel() * 4
    if enc.has_projection:
        total += enc.down.numel() * 4 + enc.up.numel() * 4
    return total
