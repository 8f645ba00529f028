"""Recognise the cumulative-sum form of causal linear attention (fast-transformers / Performer):

    state = cumsum(outer(k, v), dim=tokens)      [..., N, D, Dv]  (N d Dv numbers, N times the state)
    out   = contract(q, state) over D            [..., N, Dv]
    norm  = contract(q, cumsum(k, dim=tokens))   [..., N]         (the usual normaliser)

spelled with einsum (`"bhnd,bhne->bhnde"`, `"bhnd,bhnde->bhne"`, `"bhnd,bhnd->bhn"`) or with
broadcasting (`k[..., None] * v[..., None, :]`, `(q[..., None] * state).sum(-2)`,
`(q * k.cumsum(-2)).sum(-1)`). Each contraction becomes `seqweave::linear_attention` (the
normaliser with a column of ones for v): the same sums, chunkwise, with an O(d Dv) state and
LASP-2 across ranks. The pattern is exact, so no value is checked; anything else (a cumsum
over another dim, a product that is not an outer product) is left as written.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx

from seqweave.frontend.fx_build import NodeBuilder
from seqweave.frontend.linear_ops import LINEAR_ATTENTION_OP
from seqweave.frontend.patterns import EINSUM_TARGETS, example, is_call

MUL_TARGETS = (operator.mul, torch.mul)


class NotCumsumForm(Exception):
    """A cumulative sum that is not linear attention's; the message says why."""


@dataclass
class CumsumMatch:
    contraction: fx.Node  # what is replaced (the einsum, or the sum after the product)
    q: fx.Node
    k: fx.Node
    v: fx.Node | None     # None: the normaliser (v is a column of ones)


def einsum_parts(node: fx.Node) -> tuple[list[str], str, list] | None:
    """(input subscripts, output subscripts, operands) of an explicit einsum without '...', else None."""
    if not is_call(node, EINSUM_TARGETS) or not isinstance(node.args[0], str):
        return None
    operands = list(node.args[1:])
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = list(operands[0])
    equation = node.args[0].replace(" ", "")
    if "->" not in equation or "." in equation:
        return None
    inputs, out = equation.split("->")
    return inputs.split(","), out, operands


def unsqueezed_source(node: object, dim: int) -> fx.Node | None:
    """x when `node` is x with a size-1 dim inserted at `dim` (negative, from the end)."""
    if not isinstance(node, fx.Node):
        return None
    ndim = example(node).dim()
    if (is_call(node, (torch.unsqueeze,), "unsqueeze") and len(node.args) > 1
            and node.args[1] % ndim == dim % ndim):
        return node.args[0]
    if is_call(node, (operator.getitem,)) and isinstance(node.args[1], tuple):
        key = node.args[1]
        if None in key and key.count(None) == 1 and all(k is Ellipsis or k is None or k == slice(None) for k in key):
            source = node.args[0]
            explicit = [k for k in key if k is not Ellipsis]
            after_none = len(explicit) - explicit.index(None) - 1 if Ellipsis in key else None
            if after_none is not None and -1 - after_none == dim:
                return source
            if Ellipsis not in key and explicit.index(None) == dim % ndim:
                return source
    return None


def outer_factors(node: fx.Node) -> tuple[fx.Node, fx.Node]:
    """(k, v) when `node` is their outer product over the last dim: [..., N, D] x [..., N, Dv] -> [..., N, D, Dv]."""
    parsed = einsum_parts(node)
    if parsed is not None:
        (a, b), out, operands = parsed
        if len(operands) == 2 and a[:-1] == b[:-1] and out == a + b[-1] and a[-1] != b[-1]:
            return operands[0], operands[1]
        raise NotCumsumForm(f"einsum '{node.args[0]}' is not an outer product k ⊗ v")
    if is_call(node, MUL_TARGETS, "mul") and len(node.args) == 2:
        k, v = unsqueezed_source(node.args[0], -1), unsqueezed_source(node.args[1], -2)
        if k is not None and v is not None:
            return k, v
    raise NotCumsumForm("the cumulative sum is not of an outer product k ⊗ v")


def _single_user(node: fx.Node) -> fx.Node:
    if len(node.users) != 1:
        raise NotCumsumForm(f"{node.name} is read {len(node.users)} times")
    return next(iter(node.users))


def _sum_over(node: fx.Node, dim: int) -> bool:
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    dims = list(dims) if isinstance(dims, (list, tuple)) else [dims]
    ndim = example(node.args[0]).dim()
    keep = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
    return (is_call(node, (torch.sum,), "sum") and len(dims) == 1 and dims[0] is not None
            and dims[0] % ndim == dim % ndim and not keep)


def _contraction(state: fx.Node, key_dims: int) -> tuple[fx.Node, fx.Node]:
    """(q, the node giving the result) for `q` contracted with `state` over D."""
    user = _single_user(state)
    parsed = einsum_parts(user)
    if parsed is not None:
        subscripts, out, operands = parsed
        if len(operands) == 2 and state in operands:
            at = operands.index(state)
            a, b, q = subscripts[1 - at], subscripts[at], operands[1 - at]
            query = b[:-1] if key_dims == 2 else b  # q reads [..., N, D] of the state's indices
            kept = b[:-2] + b[-1:] if key_dims == 2 else b[:-1]
            if a == query and out == kept:
                return q, user
        raise NotCumsumForm(f"einsum '{user.args[0]}' does not contract q with the state over D")
    if is_call(user, MUL_TARGETS, "mul") and len(user.args) == 2:
        other = user.args[0] if user.args[1] is state else user.args[1]
        q = unsqueezed_source(other, -1) if key_dims == 2 else other
        total = _single_user(user)
        if q is not None and _sum_over(total, -2 if key_dims == 2 else -1):
            return q, total
    raise NotCumsumForm("the state is not contracted with q over D")


def match_cumsum(cumsum: fx.Node) -> CumsumMatch:
    """The cumsum form the cumulative sum `cumsum` belongs to, or NotCumsumForm."""
    source = cumsum.args[0]
    dim = cumsum.args[1] if len(cumsum.args) > 1 else cumsum.kwargs.get("dim")
    ndim = example(source).dim()
    if cumsum.kwargs.get("dtype") is not None:
        raise NotCumsumForm("cumsum with a dtype")
    if dim % ndim == ndim - 3 and ndim >= 4:
        k, v = outer_factors(source)
        q, contraction = _contraction(cumsum, 2)
    elif dim % ndim == ndim - 2 and ndim >= 2:
        k, v = source, None
        q, contraction = _contraction(cumsum, 1)
    else:
        raise NotCumsumForm(f"the cumulative sum runs over dim {dim} of a {ndim}-d value, not over tokens")
    shapes = [tuple(example(x).shape) for x in (q, k) + ((v,) if v is not None else ())]
    if shapes[0] != shapes[1] or any(s[:-1] != shapes[0][:-1] for s in shapes) or len(shapes[0]) > 4:
        raise NotCumsumForm(f"q, k, v shapes {shapes} do not share batch, heads and tokens")
    if len({example(x).dtype for x in (q, k) + ((v,) if v is not None else ())}) != 1:
        raise NotCumsumForm("q, k, v differ in dtype")
    return CumsumMatch(contraction, q, k, v)


def replace_cumsum(match: CumsumMatch, layer: int) -> None:
    """Put `seqweave::linear_attention` where the contraction was."""
    builder = NodeBuilder(match.contraction)
    value = match.v if match.v is not None else builder.call(
        torch.ones_like, builder.call(operator.getitem, match.k, (Ellipsis, slice(0, 1))))
    four_d = []
    for node in (match.q, match.k, value):
        for _ in range(4 - example(node).dim()):
            node = builder.method("unsqueeze", node, 0)
        four_d.append(node)
    out = builder.call(LINEAR_ATTENTION_OP, *four_d, [], 1.0, layer)
    leading = tuple(example(match.q).shape[:-1])
    result = builder.method("reshape", out, *leading, example(value).shape[-1])
    if match.v is None:
        result = builder.call(operator.getitem, result, (Ellipsis, 0))
    match.contraction.replace_all_uses_with(result)
    match.contraction.graph.erase_node(match.contraction)


def cumsums(graph: fx.Graph) -> list[fx.Node]:
    return [node for node in graph.nodes if is_call(node, (torch.cumsum,), "cumsum")]
