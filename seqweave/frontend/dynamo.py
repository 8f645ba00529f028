"""The torch.compile backend: dynamo graph -> attention replaced -> aot_autograd -> IR -> passes -> program."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import fx
from torch._functorch.aot_autograd import aot_module_simplified

from seqweave.codegen.lower import lower
from seqweave.config import CompileOptions
from seqweave.errors import CaptureError
from seqweave.frontend.attention import AttentionReport, replace_attention
from seqweave.frontend.fx import import_fx
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
        if any(isinstance(value, torch.SymInt) for value in example_inputs):
            raise CaptureError("dynamic shapes reached the seqweave backend",
                               hint="compile with torch.compile(..., dynamic=False)")
        self.reports.extend(replace_attention(gm, example_inputs))
        return aot_module_simplified(gm, example_inputs, fw_compiler=self._compiler("forward"),
                                     bw_compiler=self._compiler("backward"),
                                     inference_compiler=self._compiler("inference"))

    def _compiler(self, kind: str) -> Callable:
        def compile_graph(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
            graph = import_fx(gm, kind)
            if self.options.verify:
                verify(graph)
            runs = run_pipeline(graph, self.options.pipeline, check=self.options.verify,
                                dump_dir=self.options.dump_dir)
            self.graphs.append(CompiledGraph(kind, graph, runs))
            program = lower(graph)

            def run(args: list) -> Any:
                return program(args)

            run._boxed_call = True  # aot_autograd passes the argument list itself
            return run
        return compile_graph

    def attention_count(self, kind: str = "forward") -> int:
        """attn.sdpa nodes in forward graphs (training `forward` or `inference`), or sdpa_backward in `backward`."""
        if kind == "backward":
            return sum(c.graph.count("attn.sdpa_backward") for c in self.graphs if c.kind == "backward")
        return sum(c.graph.count("attn.sdpa") for c in self.graphs if c.kind in ("forward", "inference"))


def seqweave_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], options: dict | None = None) -> Callable:
    """Entry point for `torch.compile(model, backend="seqweave", options={...})`."""
    return SeqweaveBackend(CompileOptions.from_kwargs(options))(gm, example_inputs)
