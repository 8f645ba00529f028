"""Lower an IR graph to the runtime's step list.

Ops run their plain-torch reference, except attention: `attn.sdpa` and its backward, and the
local tiles of ring / Ulysses / hybrid attention, run `codegen.attention_kernels` (linear
attention `codegen.linear_kernels`), which picks
the generated Triton kernels on CUDA (or under SEQWEAVE_TRITON_INTERPRET=1) and the blockwise
reference elsewhere. The choice is made per call, from the tensors' device and dtype.
"""
from __future__ import annotations

import functools

from seqweave.codegen import attention_kernels, linear_kernels
from seqweave.codegen.attention_observer import observed
from seqweave.ir.graph import Graph, Node, Value, map_values
from seqweave.ir.mask_parser import parse_mask, parse_score_mod
from seqweave.ir.ops import op_def
from seqweave.ir.ops.attn import positions_of
from seqweave.ir.ops.attn_linear import recurrence_of, scaled_backward, scaled_forward
from seqweave.ir.ops.attn_positions import positional_backward, positional_forward
from seqweave.ir.ops.attn_sparsity import parse_sparsity, sparse_attend
from seqweave.runtime.comm import Communicator
from seqweave.runtime import memory_ops
from seqweave.runtime.distributed_ops import DISTRIBUTED_OPS, bind
from seqweave.runtime.program import Program, Slot, Step


LOCAL_ATTENTION_OPS = ("attn.sdpa", "attn.sdpa_backward")
LINEAR_ATTENTION_OPS = ("attn.linear", "attn.linear_backward")


def _last_readers(graph: Graph) -> dict[Value, int]:
    last: dict[Value, int] = {}
    for index, node in enumerate(graph.nodes):
        for value in node.operands:
            last[value] = index
    return last


def _frees(graph: Graph, index: int, node: Node, last: dict[Value, int], slot_of: dict[Value, int]) -> tuple[int, ...]:
    outputs = set(graph.output_values())
    dead = {v for v in node.operands if last.get(v) == index and v not in outputs}
    dead |= {v for v in node.results if v not in last and v not in outputs}  # results nobody reads
    return tuple(sorted(slot_of[v] for v in dead))


def _local_attention(node: Node):
    """`attn.sdpa` / `attn.sdpa_backward` through the kernel dispatch, mask and positions parsed
    once here (positions rotate q and k around the kernels, `ir.ops.attn_positions`; a decode
    attention with `sparsity` attends to its selected keys only, `ir.ops.attn_sparsity`)."""
    mask, score_mod, scale = parse_mask(node.kwargs["mask"]), parse_score_mod(node.kwargs["score_mod"]), \
        node.kwargs["scale"]
    positions, sparsity = positions_of(node), parse_sparsity(node.kwargs.get("sparsity"))
    if node.op == "attn.sdpa":
        def kernel(q, k, v, mask_, operands):
            return attention_kernels.forward(q, k, v, mask_, score_mod, scale, operands)

        def forward(q, k, v, operands, **kw):
            attend = observed(node.kwargs.get("layer", -1), sparse_attend(kernel, operands, sparsity), operands)
            return positional_forward(attend, q, k, v, mask, positions, operands)
        return forward

    def backward(dout, q, k, v, out, lse, operands, **kw):
        attend_backward = lambda dout_, q_, k_, v_, out_, lse_, mask_: attention_kernels.backward(  # noqa: E731
            dout_, q_, k_, v_, out_, lse_, mask_, score_mod, scale, operands)
        return positional_backward(attend_backward, dout, q, k, v, out, lse, mask, positions, operands)
    return backward


def _local_linear_attention(node: Node):
    """`attn.linear` / `attn.linear_backward` through the linear-attention kernel dispatch."""
    decay, scale = node.kwargs["decay"], node.kwargs["scale"]
    recurrence = linear_kernels.GENERATED[recurrence_of(node.kwargs)]
    if node.op == "attn.linear":
        def forward(q, k, v, gate=None, **kw):
            return scaled_forward(recurrence, q, k, v, gate, decay, scale)[0]
        return forward

    def backward(dout, q, k, v, gate=None, **kw):
        grads = scaled_backward(recurrence, dout, q, k, v, gate, decay, scale)
        return grads[:4] if gate is not None else grads[:3]
    return backward


def implementation(node: Node, index: int, comm: Communicator | None):
    """The op's implementation: generated kernels for attention, the runtime's for ops that talk
    to other ranks (bound to `comm`) and for `mem.*` (pooled, stream-ordered copies), the
    plain-torch reference for the rest."""
    if node.op in LOCAL_ATTENTION_OPS:
        return _local_attention(node)
    if node.op in LINEAR_ATTENTION_OPS:
        return _local_linear_attention(node)
    if node.op.startswith("mem."):
        return memory_ops.bind(node)
    if node.op not in DISTRIBUTED_OPS:
        return functools.partial(op_def(node.op).reference, node)
    if comm is None:
        raise ValueError(f"{node.op} needs a communicator: lower sharded graphs with lower(graph, comm)")
    return bind(comm, index, node, attention_kernels.GENERATED, linear_kernels.GENERATED)


def lower(graph: Graph, comm: Communicator | None = None) -> Program:
    """One step per node, slots numbered in definition order."""
    slot_of = {value: index for index, value in enumerate(graph.values())}
    to_slot = lambda value: Slot(slot_of[value])  # noqa: E731
    last = _last_readers(graph)
    steps = []
    for index, node in enumerate(graph.nodes):
        steps.append(Step(node.op, implementation(node, index, comm),
                          map_values(node.args, to_slot), map_values(node.kwargs, to_slot),
                          tuple(slot_of[r] for r in node.results), _frees(graph, index, node, last, slot_of)))
    stats = {"steps": len(steps), "attention": graph.count("attn.sdpa"),
             "attention_backward": graph.count("attn.sdpa_backward"),
             "linear_attention": graph.count("attn.linear") + graph.count("attn.lasp2")}
    return Program(graph.name, len(slot_of), tuple(slot_of[v] for v in graph.inputs), steps,
                   map_values(graph.outputs, to_slot), stats)
