"""Softmaxes that still look like attention once replacement is done, each with the reason.

A softmax looks like attention when a product (matmul, bmm, einsum) makes its scores or reads
its probabilities. Every one the matchers did not turn into `seqweave::attention` is reported,
so an attention the frontend cannot read shows up in `seqweave explain` instead of silently
running unsharded.
"""
from __future__ import annotations

from torch import fx

from seqweave.frontend.patterns import probability_products, score_product, softmax_feeding, softmaxes


def unmatched_softmaxes(graph: fx.Graph, reported: set[fx.Node],
                        kept_products: dict[fx.Node, str]) -> list[tuple[fx.Node, str]]:
    """(softmax, why) for each attention-like softmax left in `graph` that no report covers yet.

    `kept_products` says, per softmax, why a product beside it kept its einsum/bmm form.
    """
    found = []
    for softmax in softmaxes(graph):
        readers = probability_products(softmax)
        if softmax in reported or (score_product(softmax) is None and not readers):
            continue
        found.append((softmax, _why(softmax, readers, kept_products)))
    return found


def _why(softmax: fx.Node, readers: list[fx.Node], kept_products: dict[fx.Node, str]) -> str:
    if softmax in kept_products:
        return kept_products[softmax]
    if not readers:
        users = ", ".join(user.name for user in softmax.users) or "nothing"
        return f"no product with values reads its probabilities (read by {users})"
    reader = readers[0]
    if softmax_feeding(reader) is softmax:
        return f"its probabilities feed {reader.name}, a product the matcher does not read"
    return f"its probabilities are not the left operand of {reader.name} (probabilities @ values is what is read)"
