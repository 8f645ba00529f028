"""Where kernels run: compiled for the GPU, or under Triton's interpreter on CPU.

Triton decides once per process: its own library functions (`tl.zeros`, `tl.sum`, ...) are
decorated for the interpreter only when TRITON_INTERPRET=1 is set before `triton.language` is
first imported. `import seqweave` therefore turns `SEQWEAVE_TRITON_INTERPRET=1` into
TRITON_INTERPRET=1 (see `request_interpreter_from_environment`), and the runtime asks
`interpreter_active()` before sending CPU tensors to generated kernels.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import sys
from typing import Callable

import torch

SEQWEAVE_VARIABLE = "SEQWEAVE_TRITON_INTERPRET"
TRITON_VARIABLE = "TRITON_INTERPRET"


def _set(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0")


def request_interpreter_from_environment() -> None:
    """Before triton is imported: SEQWEAVE_TRITON_INTERPRET=1 implies TRITON_INTERPRET=1."""
    if _set(SEQWEAVE_VARIABLE) and "triton" not in sys.modules:
        os.environ.setdefault(TRITON_VARIABLE, "1")


@functools.cache
def triton_available() -> bool:
    """True when the triton package can be imported (asked on every attention call: memoised)."""
    return importlib.util.find_spec("triton") is not None


@functools.cache
def interpreter_active() -> bool:
    """True when this process's Triton runs kernels under the CPU interpreter (fixed for the
    process once triton.language is imported, which this does)."""
    if not triton_available():
        return False
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
    return isinstance(tl.zeros, InterpretedFunction)


def use_triton(*tensors: torch.Tensor) -> bool:
    """Run generated kernels for these tensors: compiled on CUDA, interpreted on CPU when asked for.

    CPU tensors go to the interpreter only when SEQWEAVE_TRITON_INTERPRET=1 asks for it (it is
    slow: tests and debugging); otherwise the plain-torch reference runs.
    """
    if not tensors or not triton_available():
        return False
    if all(t.is_cuda for t in tensors):
        return not interpreter_active()
    on_cpu = not any(t.is_cuda for t in tensors)
    return on_cpu and _set(SEQWEAVE_VARIABLE) and interpreter_active()


def jit_decorator(interpret: bool) -> Callable:
    """`triton.jit` for kernels meant for the interpreter (`interpret`) or the GPU.

    Raises a RuntimeError saying what to set when the process's Triton mode differs.
    """
    import triton
    if interpret != interpreter_active():
        wanted = "set SEQWEAVE_TRITON_INTERPRET=1" if interpret else "unset TRITON_INTERPRET"
        raise RuntimeError(f"Triton's interpreter is {'off' if interpret else 'on'} in this process but the "
                           f"tensors are on {'CPU' if interpret else 'CUDA'}; {wanted} before starting Python")
    return triton.jit


def device_key(tensor: torch.Tensor) -> str:
    """What a compiled kernel is specific to: the interpreter, or the GPU's name and capability."""
    if not tensor.is_cuda:
        return "interpreter"
    major, minor = torch.cuda.get_device_capability(tensor.device)
    return f"{torch.cuda.get_device_name(tensor.device)}-sm{major}{minor}".replace(" ", "_")
