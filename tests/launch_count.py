"""Counting kernel launches on the CPU: torch ops through a ``TorchDispatchMode`` and Triton
launches through a wrapper around every kernel of ``lemoe_engine.kernels``.

A torch op counts as a launch unless it only makes a view or an uninitialised allocation
(views, reshapes, ``empty``): on a GPU those launch nothing. Used to pin the number of
launches per decode step so that it cannot regress."""

from __future__ import annotations

import importlib
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

KERNEL_MODULES = ("lemoe_engine.kernels.anchor_route", "lemoe_engine.kernels.grouped_ffn",
                  "lemoe_engine.kernels.pooled_route")

# allocation or metadata only: no kernel on a GPU
_FREE = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "detach",
         "alias", "lift_fresh", "_unsafe_view", "view", "reshape", "expand", "as_strided",
         "t", "transpose", "permute", "unsqueeze", "squeeze", "slice", "select", "unbind",
         "split", "split_with_sizes", "chunk", "narrow", "diagonal", "_reshape_alias", "sym_size",
         "sym_stride", "sym_numel", "sym_storage_offset", "is_contiguous", "contiguous"}


def triton_kernels():
    """Every @triton.jit kernel object of the kernel modules, by name."""
    found = {}
    for name in KERNEL_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        for attr, value in vars(module).items():
            if (hasattr(value, "run") and type(value).__name__ in ("JITFunction", "InterpretedFunction")
                    and all(value is not v for v in found.values())):   # helpers are imported twice
                found[f"{name.rsplit('.', 1)[1]}.{attr}"] = value
    return found


class _TorchOps(TorchDispatchMode):
    def __init__(self, log):
        super().__init__()
        self.log = log

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not (name in _FREE or getattr(func, "is_view", False)):
            self.log.append(f"torch.{name}")
        return func(*args, **(kwargs or {}))


@contextmanager
def count_launches(on_launch=None):
    """Yields a list that collects one entry per launch: ``torch.<op>`` or ``triton.<kernel>``.
    ``on_launch(name)`` is called before each Triton launch (e.g. to check a device guard)."""
    log: list[str] = []
    kernels = triton_kernels()
    originals = {}
    for name, kernel in kernels.items():
        original = kernel.run
        originals[name] = original

        def run(*args, _name=name, _original=original, **kwargs):
            log.append(f"triton.{_name}")
            if on_launch is not None:
                on_launch(_name)
            # the interpreter moves tensors through numpy with torch ops of its own: not counted
            with _disable_current_modes():
                return _original(*args, **kwargs)

        kernel.run = run
    try:
        with _TorchOps(log):
            yield log
    finally:
        for name, kernel in kernels.items():
            del kernel.run
