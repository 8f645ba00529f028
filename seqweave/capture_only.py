"""Compile without running: what `explain` and the memory prediction use at 128k tokens.

Every graph goes through the frontend, the pass pipeline and (single device) lowering, so
what is reported is what would run; but the compiled callable raises `Captured` instead of
computing, and a sequence-parallel graph is sharded without any process group.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from seqweave.compiler import SeqweaveBackend
from seqweave.config import CompileOptions
from seqweave.targets import call_model


class Captured(Exception):
    """Raised instead of running the compiled graph."""


def _stop(_args: list) -> None:
    raise Captured()


class CaptureOnlyBackend(SeqweaveBackend):
    """A SeqweaveBackend whose graphs are compiled but never run."""

    def _compile_graph(self, graph, user_outputs=None, backward=None) -> Callable[[list], Any]:
        super()._compile_graph(graph, user_outputs, backward)
        return _stop

    def _sharded_program(self, graph, world) -> Callable[[list], Any]:
        return _stop  # no communicator: nothing runs, so no process group is needed


def capture(model: torch.nn.Module, inputs: Any, options: CompileOptions | None = None,
            training: bool = False) -> CaptureOnlyBackend:
    """Capture `model(**inputs)` (a training forward when `training`, else inference) without running it."""
    backend = CaptureOnlyBackend(options)
    compiled = torch.compile(model, backend=backend, fullgraph=True, dynamic=False)
    try:
        with torch.set_grad_enabled(training):
            call_model(compiled, inputs)
    except Captured:
        pass
    return backend
