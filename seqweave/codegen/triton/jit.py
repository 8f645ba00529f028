"""Where kernels run: compiled for the GPU, or under Triton's interpreter on CPU.

Triton picks the interpreter when `triton.jit` decorates a function and TRITON_INTERPRET=1 is
set at that moment. seqweave decorates its kernels itself, when it first needs them, so the
choice is made per call site and never depends on import order: `SEQWEAVE_TRITON_INTERPRET=1`
(or TRITON_INTERPRET=1) routes CPU tensors to the interpreter.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Callable

import torch

INTERPRET_VARIABLES = ("SEQWEAVE_TRITON_INTERPRET", "TRITON_INTERPRET")


def triton_available() -> bool:
    """True when the triton package can be imported."""
    return importlib.util.find_spec("triton") is not None


def interpret_requested() -> bool:
    """True when the user asked for Triton's CPU interpreter."""
    return any(os.environ.get(name, "0") not in ("", "0") for name in INTERPRET_VARIABLES)


def use_triton(*tensors: torch.Tensor) -> bool:
    """Run generated kernels for these tensors: on CUDA, or on CPU under the interpreter."""
    if not triton_available():
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    return on_cuda or (interpret_requested() and not any(t.is_cuda for t in tensors))


def jit_decorator(interpret: bool) -> Callable:
    """`triton.jit`, or the interpreter's equivalent when `interpret` is set."""
    import triton
    if not interpret:
        return triton.jit
    from triton.runtime.interpreter import InterpretedFunction
    return lambda fn: InterpretedFunction(fn)


def device_key(tensor: torch.Tensor) -> str:
    """What a compiled kernel is specific to: the interpreter, or the GPU's name and capability."""
    if not tensor.is_cuda:
        return "interpreter"
    major, minor = torch.cuda.get_device_capability(tensor.device)
    return f"{torch.cuda.get_device_name(tensor.device)}-sm{major}{minor}".replace(" ", "_")
