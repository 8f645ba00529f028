"""The torch.compile backend: capture (frontend) -> verify and pass pipeline -> lower -> run.

This module is the one place that wires the stages together; each stage imports only `ir`
and the stage before it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

from torch import fx

from seqweave.codegen.lower import lower
from seqweave.config import CompileOptions
from seqweave.frontend.attention import AttentionReport
from seqweave.frontend.dynamo import capture
from seqweave.ir.graph import Graph
from seqweave.ir.verifier import verify
from seqweave.passes.manager import PassRun, run_pipeline


@dataclass
class CompiledGraph:
    """One graph this backend compiled: `forward`, `backward` or `inference`."""

    kind: str
    graph: Graph
    passes: list[PassRun]


class SeqweaveBackend:
    """A torch.compile backend. It keeps what it did (`reports`, `graphs`) for `explain` and tests."""

    def __init__(self, options: CompileOptions | None = None) -> None:
        self.options = options or CompileOptions()
        self.reports: list[AttentionReport] = []
        self.graphs: list[CompiledGraph] = []

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
        return capture(gm, example_inputs, self._compile_graph, self.reports)

    def _compile_graph(self, graph: Graph) -> Callable[[list], Any]:
        if self.options.verify:
            verify(graph)
        runs = run_pipeline(graph, self.options.pipeline, check=self.options.verify, dump_dir=self.options.dump_dir)
        self.graphs.append(CompiledGraph(graph.name, graph, runs))
        program = lower(graph)
        return lambda args: program(args)

    def attention_count(self, kind: str = "forward") -> int:
        """attn.sdpa nodes in forward graphs (training `forward` or `inference`), or sdpa_backward in `backward`."""
        if kind == "backward":
            return sum(c.graph.count("attn.sdpa_backward") for c in self.graphs if c.kind == "backward")
        return sum(c.graph.count("attn.sdpa") for c in self.graphs if c.kind in ("forward", "inference"))


def seqweave_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], options: dict | None = None) -> Callable:
    """Entry point for `torch.compile(model, backend="seqweave", options={...})`."""
    return SeqweaveBackend(CompileOptions.from_kwargs(options))(gm, example_inputs)
