"""Helpers shared by the kernel launch wrappers (no CUDA calls at import)."""

from __future__ import annotations

import contextlib
import os

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

ROUTE_FP32_DOT = os.environ.get("LEMOE_ROUTE_FP32_DOT", "tf32x3")
"""``tl.dot`` precision of the routing kernels' fp32 (and mixed) score tiles when compiled:
"tf32x3" (the default: three TF32 tensor-core products, fp32-level error; 2-3.5x faster than
"ieee" on an H200, benchmarks/RESULTS.md) or "ieee" (FMA, exact fp32 rounding). Read once at
import from LEMOE_ROUTE_FP32_DOT (a measurement knob); the interpreter always runs fp32."""
if ROUTE_FP32_DOT not in ("ieee", "tf32x3"):
    from ..errors import ConfigError
    raise ConfigError(f"LEMOE_ROUTE_FP32_DOT must be 'ieee' or 'tf32x3', got {ROUTE_FP32_DOT!r}")


def route_dot_precision(upcast: bool, interpreted: bool) -> str:
    """The score tiles' dot precision: fp16/bf16 tiles are exact products either way."""
    return ROUTE_FP32_DOT if upcast and not interpreted else "ieee"


TORCH_TO_TL_NAME = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def is_interpreted(kernel) -> bool:
    """True when ``kernel`` was decorated while TRITON_INTERPRET=1 (CPU interpreter).

    Triton decides this once, when ``@triton.jit`` runs, so the kernel object is the truth,
    not the environment at call time."""
    return type(kernel).__name__ == "InterpretedFunction"


def check_tensor(name: str, t, ndim: int, dtypes, *, dtype_hint: str = "") -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} has dtype {str(t.dtype).replace('torch.', '')}; expected {allowed}"
                        + (f" ({dtype_hint})" if dtype_hint else ""))
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (call .contiguous() first); "
                         f"got strides {t.stride()} for shape {tuple(t.shape)}")


def check_devices(named: dict, interpreted: bool) -> torch.device:
    """All tensors on one device; CUDA unless the kernels run in the Triton interpreter."""
    devices = {name: t.device for name, t in named.items() if t is not None}
    first_name, device = next(iter(devices.items()))
    for name, dev in devices.items():
        if dev != device:
            raise ValueError(f"all tensors must be on one device: {first_name} is on {device}, "
                             f"{name} is on {dev}")
    if device.type != "cuda" and not interpreted:
        raise ValueError(f"Triton kernels need CUDA tensors, got tensors on {device} "
                         "(set TRITON_INTERPRET=1 before importing kernels to run them on CPU)")
    return device


def device_guard(device: torch.device):
    """Launch on ``device``, not on the current CUDA device.

    Triton launches on ``torch.cuda.current_device()`` (and its current stream); with a model
    spread over several GPUs (``device_map="auto"``) that is often not the device of the
    tensors, and the kernel would read another GPU's addresses. Every wrapper enters this
    guard around its launches; on the CPU (interpreter) it does nothing."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()
