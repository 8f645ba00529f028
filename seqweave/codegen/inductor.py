"""Run an IR graph through Inductor: `inner_backend="inductor"`.

The graph is lowered to FX (`codegen.fx_lower`) with seqweave's attention and collectives as
extern calls, and compiled by `torch._inductor.compile_fx` the first time it is
called, with the real inputs as examples (a program compiles once per input layout; the
shapes are static, so in practice once). Inductor's FX-graph cache is keyed by the graph's
code, which holds no rank and no Python object, so ranks running the same program share one
entry; a file lock per program makes the first rank on a machine compile it while the others
wait and then read the cache.
"""
from __future__ import annotations

import hashlib
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import torch

from seqweave.codegen.extern_op import running
from seqweave.codegen.fx_lower import LoweredFx, to_fx
from seqweave.codegen.lower import lower
from seqweave.errors import SeqweaveError
from seqweave.ir.graph import Graph
from seqweave.ir.printer import format_node, format_type
from seqweave.runtime.comm import Communicator
from seqweave.runtime.program import steal

log = logging.getLogger("seqweave.inductor")
MAX_LAYOUTS = 4  # input layouts compiled per program; more run eager


class InductorCompileError(SeqweaveError):
    """Inductor could not compile a lowered graph."""


def program_digest(graph: Graph) -> str:
    """A name for the program's code, the same on every rank that runs it (no notes, no timings)."""
    text = "\n".join([*(f"{v.name}: {format_type(v.type)}" for v in graph.inputs), *map(format_node, graph.nodes)])
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _layout(args: list[Any]) -> tuple:
    """What a compiled variant is specialised on: each tensor's shape, strides, dtype and device."""
    return tuple((tuple(a.shape), a.stride(), a.dtype, a.device) if isinstance(a, torch.Tensor) else ("value", a)
                 for a in args)


def _lock_path(digest: str) -> str:
    from torch._inductor.runtime.cache_dir_utils import cache_dir
    os.makedirs(os.path.join(cache_dir(), "seqweave-locks"), exist_ok=True)
    return os.path.join(cache_dir(), "seqweave-locks", f"{digest}.lock")


def _cache_hits() -> int:
    from torch._dynamo.utils import counters
    return counters["inductor"]["fxgraph_cache_hit"]


def _fakes(examples: list[Any]) -> list[Any]:
    """The examples as static fake tensors under a mode with a shape environment, as dynamo
    would hand them: Inductor's FX-graph cache refuses graphs compiled without one."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv
    mode = FakeTensorMode(shape_env=ShapeEnv())
    return [mode.from_tensor(a, static_shapes=True) if isinstance(a, torch.Tensor) else a for a in examples]


class InductorProgram:
    """Callable like `runtime.program.Program`: a boxed argument list in, the IR outputs out.

    A layout Inductor fails on, or one past `MAX_LAYOUTS`, runs the eager step list instead
    (exact, slower), said once as a warning and counted in `stats["eager_fallbacks"]`.
    """

    def __init__(self, graph: Graph, comm: Communicator | None = None) -> None:
        self.graph, self.comm = graph, comm
        self.digest = program_digest(graph)
        # lowering now refuses (NotLowerable) what Inductor cannot take; the first compile reuses it
        self._first_lowering: LoweredFx | None = to_fx(graph, comm)
        self.variants: dict[tuple, Callable[[list], Any]] = {}
        self.stats = {"compiles": 0, "cache_hits": 0, "compile_s": 0.0, "extern_calls": 0, "eager_fallbacks": 0}

    def __call__(self, args: list[Any]) -> Any:
        inputs = steal(args)
        layout = _layout(inputs)
        run = self.variants.get(layout) or self._variant(layout, inputs)
        return run(inputs)

    def _variant(self, layout: tuple, inputs: list[Any]) -> Callable[[list], Any]:
        if len(self.variants) >= MAX_LAYOUTS:
            run = self._eager(f"a {len(self.variants) + 1}th input layout (shapes, strides, dtypes or devices)")
        else:
            try:
                run = self._compile(inputs)
            except InductorCompileError as error:
                run = self._eager(str(error))
        self.variants[layout] = run
        return run

    def _eager(self, why: str) -> Callable[[list], Any]:
        self.stats["eager_fallbacks"] += 1
        if self.comm is None or self.comm.rank == 0:
            log.warning("inner_backend='inductor': the %s graph runs eager for this call's inputs: %s",
                        self.graph.name, why)
        return lower(self.graph, self.comm)

    def _compile(self, inputs: list[Any]) -> Callable[[list], Any]:
        # one FX module per variant: its extern table is bound to that variant's compiled code
        lowered, self._first_lowering = self._first_lowering or to_fx(self.graph, self.comm), None
        lowered.table.device = next((a.device for a in inputs if isinstance(a, torch.Tensor)), torch.device("cpu"))
        self.stats["extern_calls"] = len(lowered.table.calls)
        log.info("compiling the %s graph with Inductor (%d nodes, %d extern calls)…", self.graph.name,
                 len(self.graph.nodes), len(lowered.table.calls))
        started, hits = time.perf_counter(), _cache_hits()
        compiled = self._compile_fx(lowered, [*inputs, torch.empty(0)])
        self.stats["compiles"] += 1
        self.stats["cache_hits"] += _cache_hits() - hits
        self.stats["compile_s"] += time.perf_counter() - started

        def run(inputs: list[Any]) -> Any:
            inputs.append(torch.empty(0))  # the first token
            with running(lowered.table):
                flat = compiled(inputs)  # boxed: it empties the list, so each input can go after its last use
            return lowered.outputs(list(flat))
        return run

    def _compile_fx(self, lowered: LoweredFx, examples: list[Any]) -> Callable:
        """Compile on a fresh thread: the first call comes from inside aot_autograd's runtime,
        whose thread-local dispatch state (what functionalization and autograd see) would leak
        into Inductor's own tracing."""
        from torch._dynamo.utils import GmWrapper
        from torch._inductor.compile_fx import compile_fx
        from torch.utils._filelock import FileLock

        def compile_here() -> Callable:
            # wrapped, the module compiles to a boxed function (one list in, which it empties)
            boxed = GmWrapper(lowered.module, lambda args: args)
            with FileLock(_lock_path(self.digest)), running(lowered.table), torch.no_grad():
                compiled = compile_fx(boxed, _fakes(examples))
            if not getattr(compiled, "_boxed_call", False):
                return lambda args: compiled(*steal(args))
            return compiled
        try:
            with ThreadPoolExecutor(1, thread_name_prefix="seqweave-inductor") as pool:
                return pool.submit(compile_here).result()
        except Exception as error:  # Inductor's own errors are many kinds; name the graph and the way out
            raise InductorCompileError(f"Inductor could not compile the {self.graph.name} graph: "
                                       f"{type(error).__name__}: {error}",
                                       hint="compile with inner_backend='eager' and report this graph") from error
