"""Rewrite einsum, bmm and baddbmm next to a softmax into the matmul chain `match_eager` reads.

Attention written as `einsum("bqhd,bkhd->bhqk", q, k)` or `torch.bmm(q, k.transpose(1, 2))`
is the same computation as `q @ k^T` up to permutes. Rewriting the products into
permute -> matmul -> permute (einsum runs that way itself) lets one matcher read every
spelling. Only products that make a softmax's scores or read its probabilities are rewritten;
keys get the `transpose(-2, -1)` the matcher looks for.
"""
from __future__ import annotations

import operator

import torch
from torch import fx

from seqweave.frontend.fx_build import NodeBuilder
from seqweave.frontend.patterns import (BADDBMM_TARGETS, BMM_TARGETS, EINSUM_TARGETS, FORM_META, is_call,
                                        probability_products, score_product, softmaxes)


class NotRewritten(Exception):
    """A product next to a softmax that has no matmul form; the message says why."""


def normalise_products(graph: fx.Graph) -> dict[fx.Node, str]:
    """Rewrite the products around every softmax; returns {softmax: why a product was kept}."""
    kept = {}
    for softmax in softmaxes(graph):
        for product in [score_product(softmax), *probability_products(softmax)]:
            if product is None:
                continue
            try:
                rewrite_product(product)
            except NotRewritten as why:
                kept[softmax] = f"{product.name}: {why}"
    return kept


def rewrite_product(product: fx.Node) -> fx.Node:
    """Replace an einsum / bmm / baddbmm product by its matmul form; returns what stands in its place."""
    if is_call(product, EINSUM_TARGETS):
        equation, operands = _einsum_operands(product)
        new = _einsum_as_matmul(NodeBuilder(product), equation, *operands)
    elif is_call(product, BMM_TARGETS, "bmm") or product.target in ("matmul", "__matmul__"):
        new = _matmul(NodeBuilder(product), *product.args[:2])
    elif is_call(product, BADDBMM_TARGETS, "baddbmm"):
        new = _baddbmm_as_matmul(product)
    else:
        return product  # already a matmul
    product.replace_all_uses_with(new)
    product.graph.erase_node(product)
    return new


def _matmul(builder: NodeBuilder, lhs: fx.Node, rhs: fx.Node) -> fx.Node:
    """`lhs @ rhs`, marked with the product it was written as (reports show it as the form)."""
    node = builder.call(torch.matmul, lhs, rhs)
    origin = builder.origin.target
    node.meta[FORM_META] = origin if isinstance(origin, str) else getattr(origin, "__name__", "matmul")
    return node


def _einsum_operands(node: fx.Node) -> tuple[str, list[fx.Node]]:
    equation, *operands = node.args
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = list(operands[0])
    if not isinstance(equation, str) or len(operands) != 2 or not all(isinstance(x, fx.Node) for x in operands):
        raise NotRewritten("einsum of other than two tensors")
    return equation, operands


def _einsum_as_matmul(builder: NodeBuilder, equation: str, a: fx.Node, b: fx.Node) -> fx.Node:
    """`einsum(equation, a, b)` for one batched matrix product: permute, matmul, permute."""
    left, right, out = _parse(equation)
    batch = [c for c in out if c in left and c in right]
    free_left = [c for c in out if c in left and c not in right]
    free_right = [c for c in out if c in right and c not in left]
    contracted = [c for c in left if c in right and c not in out]
    if len(free_left) != 1 or len(free_right) != 1 or len(contracted) != 1 \
            or not len(left) == len(right) == len(out) == len(batch) + 2:
        raise NotRewritten(f"einsum '{equation}' is not one batched product of two matrices")
    lhs = _permuted(builder, a, left, batch + free_left + contracted)
    if right.index(contracted[0]) > right.index(free_right[0]):  # keys: contract over their last dim
        rhs = builder.method("transpose", _permuted(builder, b, right, batch + free_right + contracted), -2, -1)
    else:
        rhs = _permuted(builder, b, right, batch + contracted + free_right)
    return _permuted(builder, _matmul(builder, lhs, rhs), "".join(batch + free_left + free_right), out)


def _parse(equation: str) -> tuple[str, str, str]:
    text = equation.replace(" ", "")
    if "->" not in text or "." in text:
        raise NotRewritten(f"einsum '{equation}' without an explicit output or with '...'")
    inputs, out = text.split("->")
    operands = inputs.split(",")
    if len(operands) != 2 or any(len(set(x)) != len(x) for x in (*operands, out)):
        raise NotRewritten(f"einsum '{equation}' has a repeated index (a trace or diagonal)")
    return operands[0], operands[1], out


def _permuted(builder: NodeBuilder, node: fx.Node, have: str, want: list[str] | str) -> fx.Node:
    order = [have.index(c) for c in want]
    return node if order == sorted(order) else builder.method("permute", node, *order)


def _baddbmm_as_matmul(node: fx.Node) -> fx.Node:
    """`baddbmm(input, b1, b2, beta=, alpha=)` as `b1 @ b2 * alpha + input * beta`."""
    args = dict(zip(("input", "batch1", "batch2"), node.args))
    beta, alpha = node.kwargs.get("beta", 1), node.kwargs.get("alpha", 1)
    if not isinstance(beta, (int, float)) or not isinstance(alpha, (int, float)):
        raise NotRewritten("baddbmm with beta or alpha computed at run time")
    builder = NodeBuilder(node)
    product = _matmul(builder, args["batch1"], args["batch2"])
    if alpha != 1:
        product = builder.call(operator.mul, product, alpha)
    if beta == 0:  # torch ignores input then (even its nan and inf)
        return product
    added = args["input"] if beta == 1 else builder.call(operator.mul, args["input"], beta)
    return builder.call(operator.add, product, added)


def split_einsum_factors(graph: fx.Graph) -> None:
    """`einsum("bhqd,bhkd,hqk->bhqk", q, k, m)` as `einsum("bhqd,bhkd->bhqk", q, k) * m`: an operand
    whose every index is kept in the output only multiplies elementwise (RetNet's decay, as
    published code writes it), which leaves one product of two matrices for the matchers."""
    for node in list(graph.nodes):
        if not is_call(node, EINSUM_TARGETS):
            continue
        equation, *operands = node.args
        if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
            operands = list(operands[0])
        if not isinstance(equation, str) or len(operands) != 3 or "->" not in equation or "." in equation:
            continue
        inputs, out = equation.replace(" ", "").split("->")
        subscripts = inputs.split(",")
        factor = next((i for i, s in enumerate(subscripts) if set(s) <= set(out) and len(set(s)) == len(s)), None)
        if factor is None:
            continue
        rest = [i for i in range(3) if i != factor]
        builder = NodeBuilder(node)
        product = builder.call(torch.einsum, f"{subscripts[rest[0]]},{subscripts[rest[1]]}->{out}",
                               operands[rest[0]], operands[rest[1]])
        kept = "".join(c for c in out if c in subscripts[factor])
        aligned = builder.call(torch.einsum, f"{subscripts[factor]}->{kept}", operands[factor])
        for position, index in enumerate(out):
            if index not in kept:
                aligned = builder.method("unsqueeze", aligned, position)
        replacement = builder.call(operator.mul, product, aligned)
        node.replace_all_uses_with(replacement)
        graph.erase_node(node)
