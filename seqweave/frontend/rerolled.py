"""Per-step values of an unrolled loop as one tensor over tokens again.

Dynamo unrolls `for t in range(N): ... x[:, :, t] * c ...` into N slices of x, each with the
same pointwise steps. When every step t is `f(x[.., t, ..])` at index t of one dim, for one
elementwise f with scalar arguments, the values over tokens are `f(x)`: built that way, the
tensor stays an ordinary op of x (sequence parallelism shards x and never gathers it whole).
Anything else is stacked.
"""
from __future__ import annotations

import operator
from typing import Any

import torch
from torch import fx

from seqweave.frontend.fx_build import NodeBuilder
from seqweave.frontend.patterns import example, is_call

#: per-step transforms of a slice that may be applied to the whole tensor instead (elementwise,
#: scalar arguments only)
HOISTABLE_METHODS = ("exp", "clone", "to", "float", "double", "neg", "sigmoid", "contiguous", "mul", "div")
HOISTABLE_FUNCTIONS = (operator.mul, operator.truediv, operator.neg, torch.exp, torch.sigmoid, torch.mul)


def per_token(builder: NodeBuilder, nodes: list[fx.Node], extra_dims: int) -> fx.Node:
    """The per-step values on a token dim before their last `extra_dims` dims, as 4-D ([.., N, D])
    or 3-D ([.., N], betas): the whole tensor they were sliced from when they are its steps
    (so sequence parallelism shards it like any other), else stacked."""
    ndim = example(nodes[0]).dim()
    node = _unsliced(builder, nodes, ndim - extra_dims)
    if node is None:
        node = builder.call(torch.stack, list(nodes), ndim - extra_dims)
    for _ in range(2 + extra_dims - ndim):
        node = builder.method("unsqueeze", node, 0)
    return node


def _slice_of(node: fx.Node) -> tuple[fx.Node, int, int] | None:
    """(x, dim, index) when `node` is `x[:, ..., :, index]` (one int after full slices) or `x.select(dim, index)`."""
    if is_call(node, (operator.getitem,)) and isinstance(node.args[1], tuple):
        key = node.args[1]
        ints = [i for i, k in enumerate(key) if isinstance(k, int)]
        if len(ints) == 1 and all(k == slice(None) for k in key[:ints[0]]) and \
                all(k == slice(None) or k is Ellipsis for k in key[ints[0] + 1:]):
            return node.args[0], ints[0], key[ints[0]]
    if is_call(node, (torch.select,), "select") and len(node.args) == 3:
        return node.args[0], node.args[1] % example(node.args[0]).dim(), node.args[2]
    return None


def _chain(node: fx.Node) -> tuple[list[tuple[Any, tuple, dict, str]], tuple[fx.Node, int, int]] | None:
    """The unary pointwise steps (target, args after the tensor, kwargs, op) from a slice to `node`, and the slice."""
    steps = []
    for _ in range(6):
        sliced = _slice_of(node)
        if sliced is not None:
            return steps[::-1], sliced
        scalar_args = all(not isinstance(a, fx.Node) for a in node.args[1:]) and \
            all(not isinstance(a, fx.Node) for a in node.kwargs.values())
        pointwise = (node.op == "call_method" and node.target in HOISTABLE_METHODS) or \
            (node.op == "call_function" and node.target in HOISTABLE_FUNCTIONS)
        if not (scalar_args and pointwise and node.args and isinstance(node.args[0], fx.Node)):
            return None
        steps.append((node.target, tuple(node.args[1:]), dict(node.kwargs), node.op))
        node = node.args[0]
    return None


def _unsliced(builder: NodeBuilder, nodes: list[fx.Node], dim: int) -> fx.Node | None:
    """`f(x)` when every step t is `f(x[..., t, ...])` at index t of `dim`, for one pointwise f."""
    chains = [_chain(node) for node in nodes]
    if any(chain is None for chain in chains):
        return None
    steps, (source, at, _) = chains[0]
    consistent = all(c[0] == steps and c[1][0] is source and c[1][1] == at and c[1][2] == t
                     for t, c in enumerate(chains))
    if not consistent or at != dim or example(source).shape[dim] != len(nodes):
        return None
    node = source
    for target, args, kwargs, op in steps:
        node = builder.method(target, node, *args, **kwargs) if op == "call_method" else \
            builder.call(target, node, *args, **kwargs)
    return node


def split_index_and_unsqueeze(graph: fx.Graph) -> None:
    """`x[:, :, t, :, None]` as `x[:, :, t, :][:, :, :, None]`: a step's slice and a new dim in two
    nodes, so the slice is a value of its own (as `x[:, :, t][..., None]` writes it)."""
    for node in list(graph.nodes):
        if not (is_call(node, (operator.getitem,)) and isinstance(node.args[1], tuple)):
            continue
        key = node.args[1]
        if Ellipsis in key or None not in key or not any(isinstance(k, int) for k in key):
            continue
        if not all(k is None or isinstance(k, int) or k == slice(None) for k in key):
            continue
        index, unsqueeze, out_dim = [], [], 0
        for k in key:
            if k is None:
                unsqueeze.append(None)
                out_dim += 1
                continue
            index.append(k)
            if not isinstance(k, int):
                unsqueeze.append(slice(None))
                out_dim += 1
        builder = NodeBuilder(node)
        sliced = builder.call(operator.getitem, node.args[0], tuple(index))
        replacement = builder.call(operator.getitem, sliced, tuple(unsqueeze))
        node.replace_all_uses_with(replacement)
        graph.erase_node(node)
