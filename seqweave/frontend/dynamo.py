"""Capture under torch.compile: dynamo graph -> attention replaced -> aot_autograd -> IR graphs.

The frontend stops at the IR: what happens to each graph afterwards (passes, lowering,
running) is the `compile_graph` callback's business, so the frontend imports only `ir`.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import torch
from torch import fx
from torch._functorch.aot_autograd import aot_module_simplified
from torch._functorch.partitioners import default_partition

from seqweave.frontend.attention import AttentionReport, replace_attention
from seqweave.frontend.fx import import_fx
from seqweave.ir.graph import Graph

#: Turns one imported IR graph (`forward`, `backward` or `inference`) into a boxed callable. The
#: second argument is, for a training forward, how many leading outputs the caller sees (the
#: rest are activations saved for the backward, whose first inputs they become); else None.
#: The third, for a training forward, imports its backward (not compiled yet) on demand.
GraphCompiler = Callable[[Graph, "int | None", "Callable[[], Graph] | None"], Callable[[list], Any]]


def capture(gm: fx.GraphModule, example_inputs: Sequence[Any], compile_graph: GraphCompiler,
            reports: list[AttentionReport], linear_attention: bool = True) -> Callable:
    """Replace attention in `gm` (linear attention too, unless told not to), run aot_autograd,
    and hand each ATen graph to `compile_graph` as IR."""
    reports.extend(replace_attention(gm, example_inputs, linear_attention))
    user_outputs: dict[str, int] = {}
    partitioned: dict[str, fx.GraphModule] = {}

    def partition(joint: fx.GraphModule, joint_inputs: Any, *, num_fwd_outputs: int, **kwargs: Any):
        user_outputs["forward"] = num_fwd_outputs  # recorded here: the forward compiler is not told
        forward, backward = default_partition(joint, joint_inputs, num_fwd_outputs=num_fwd_outputs, **kwargs)
        partitioned["backward"] = backward  # a memory plan for the forward reads where the backward uses what it saves
        return forward, backward

    def aten_compiler(kind: str) -> Callable:
        def compile_aten(aten_gm: fx.GraphModule, _inputs: Sequence[Any]) -> Callable:
            imported = import_fx(aten_gm, kind)
            backward = (lambda: import_fx(partitioned["backward"], "backward").graph) \
                if kind == "forward" and "backward" in partitioned else None
            run = compile_graph(imported.graph, user_outputs.get(kind), backward)
            constants = imported.constants
            # the argument list is handed on emptied (see runtime.program.steal)
            boxed = (lambda args: run(_steal(args) + list(constants))) if constants else run
            boxed._boxed_call = True  # aot_autograd passes the argument list itself
            return boxed
        return compile_aten

    compiled = aot_module_simplified(gm, example_inputs, fw_compiler=aten_compiler("forward"),
                                     bw_compiler=aten_compiler("backward"),
                                     inference_compiler=aten_compiler("inference"), partition_fn=partition)
    if _symbolic(gm):
        return compiled  # a None tangent could not be replaced by zeros of a symbolic shape
    return _absent_gradients_stay_absent(compiled)


def _steal(args: list) -> list:
    taken = list(args)
    args.clear()
    return taken


def _symbolic(gm: fx.GraphModule) -> bool:
    """Does dynamo trace `gm` with symbolic sizes (dynamic shapes)?"""
    for node in gm.graph.nodes:
        value = node.meta.get("example_value") if node.op == "placeholder" else None
        if isinstance(value, torch.SymInt) or (isinstance(value, torch.Tensor) and
                                               any(isinstance(size, torch.SymInt) for size in value.shape)):
            return True
    return False


def _absent_gradients_stay_absent(compiled: Callable) -> Callable:
    """Outputs the caller never differentiates get no gradient tensor at all.

    By default autograd hands a custom Function's backward a zero tensor for every output
    that received no gradient: for returned logits nobody backpropagates that is a full
    [B, N, vocab] tensor. Turning materialisation off on aot_autograd's node makes those
    tangents None; the backward compiler then runs a variant without them (`absent-tangents`).
    """
    @functools.wraps(compiled)
    def run(*args: Any) -> Any:
        outputs = compiled(*args)
        for node in _autograd_nodes(outputs):
            node.materialize_grads = False
        return outputs
    return run


def _autograd_nodes(outputs: Any) -> list:
    """aot_autograd's backward nodes behind `outputs` (an output may be a view replayed on top)."""
    found = {}
    for value in outputs if isinstance(outputs, (tuple, list)) else [outputs]:
        node = getattr(value, "grad_fn", None) if isinstance(value, torch.Tensor) else None
        candidates = [node] + [next_node for next_node, _ in getattr(node, "next_functions", ())] if node else []
        for candidate in candidates:
            if type(candidate).__name__ == "CompiledFunctionBackward":
                found[id(candidate)] = candidate
    return list(found.values())
