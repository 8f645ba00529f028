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


def shard(tensor: Any, dim: int, balance: str = "zigzag", mesh: Any = None) -> Any:
    """This rank's rows of a whole tensor as a DTensor, laid out as `outputs="sharded"` returns
    outputs under the same `balance` (for example the targets of a loss on sharded logits)."""
    from seqweave.runtime.sharded_outputs import shard as shard_rows

    return shard_rows(tensor, dim, balance, mesh)


def unshard(tensor: Any, balance: str = "zigzag") -> Any:
    """The whole tensor, rows in true position order, from a DTensor in `balance`'s row order."""
    from seqweave.runtime.sharded_outputs import unshard as whole

    return whole(tensor, balance)


def __getattr__(name: str) -> Any:
    if name == "register_pass":  # the pass author's decorator (imports the pass registry when asked for)
        from seqweave.passes.registry import register_pass

        return register_pass
    if name == "StreamingCache":  # needs transformers: imported when asked for
        from seqweave.runtime.streaming_cache import StreamingCache

        return StreamingCache
    raise AttributeError(f"module 'seqweave' has no attribute {name!r}")


__all__ = ["StreamingCache", "register_pass",
           "CompileOptions", "Mesh", "SeqweaveError", "backend", "compile_options", "shard", "unshard", "__version__"]
