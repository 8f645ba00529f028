"""seqweave: compile PyTorch models for long-context attention.

    model = torch.compile(model, backend=seqweave.backend())
    model = torch.compile(model, backend="seqweave", options={...})
"""
from __future__ import annotations

from typing import Any

from seqweave.codegen.triton.jit import request_interpreter_from_environment

request_interpreter_from_environment()  # must run before anything imports triton.language

from seqweave.config import CompileOptions, Mesh  # noqa: E402
from seqweave.errors import SeqweaveError  # noqa: E402

__version__ = "0.1.0"


def compile_options(**options: Any) -> CompileOptions:
    """Validated options (unknown names raise OptionError listing the valid ones)."""
    return CompileOptions.from_kwargs(options)


def backend(**options: Any):
    """A torch.compile backend object; keeps `.reports` (attention found) and `.graphs` (IR compiled)."""
    from seqweave.compiler import SeqweaveBackend  # imports torch's compiler stack lazily

    return SeqweaveBackend(compile_options(**options))


__all__ = ["CompileOptions", "Mesh", "SeqweaveError", "backend", "compile_options", "__version__"]
