"""Capture under torch.compile: dynamo graph -> attention replaced -> aot_autograd -> IR graphs.

The frontend stops at the IR: what happens to each graph afterwards (passes, lowering,
running) is the `compile_graph` callback's business, so the frontend imports only `ir`.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import fx
from torch._functorch.aot_autograd import aot_module_simplified

from seqweave.errors import CaptureError
from seqweave.frontend.attention import AttentionReport, replace_attention
from seqweave.frontend.fx import import_fx
from seqweave.ir.graph import Graph

#: Turns one imported IR graph (`forward`, `backward` or `inference`) into a boxed callable.
GraphCompiler = Callable[[Graph], Callable[[list], Any]]


def capture(gm: fx.GraphModule, example_inputs: Sequence[Any], compile_graph: GraphCompiler,
            reports: list[AttentionReport]) -> Callable:
    """Replace attention in `gm`, run aot_autograd, and hand each ATen graph to `compile_graph` as IR."""
    if any(isinstance(value, torch.SymInt) for value in example_inputs):
        raise CaptureError("dynamic shapes reached the seqweave backend",
                           hint="compile with torch.compile(..., dynamic=False)")
    reports.extend(replace_attention(gm, example_inputs))

    def aten_compiler(kind: str) -> Callable:
        def compile_aten(aten_gm: fx.GraphModule, _inputs: Sequence[Any]) -> Callable:
            run = compile_graph(import_fx(aten_gm, kind))
            run._boxed_call = True  # aot_autograd passes the argument list itself
            return run
        return compile_aten

    return aot_module_simplified(gm, example_inputs, fw_compiler=aten_compiler("forward"),
                                 bw_compiler=aten_compiler("backward"),
                                 inference_compiler=aten_compiler("inference"))
