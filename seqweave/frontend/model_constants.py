"""Subgraphs that compute constants of the model (a decay mask, a per-head decay), cut out and
evaluated. A value is a constant only if everything it reads is a buffer or a graph attribute:
not a tensor the caller passes (dynamo guards no tensor values, so the next call may bring
others) and not a parameter that is trained (its value changes every step)."""
from __future__ import annotations

import torch
from torch import fx

from seqweave.frontend.mask_lift import passed_by_caller


class NotConstant(ValueError):
    """The value reads something that may change between calls; the message names it."""


def constant_value(leaf: fx.Node, placeholder_values: dict[fx.Node, torch.Tensor], what: str) -> torch.Tensor:
    """The value of a leaf that `what` reads, or NotConstant saying why it is not a constant."""
    if leaf.op == "get_attr":
        return fx.graph_module._get_attr(leaf.graph.owning_module, leaf.target)
    if leaf not in placeholder_values or passed_by_caller(leaf):
        raise NotConstant(f"{what} reads {leaf.name}, a tensor the caller passes: its values may change")
    value = placeholder_values[leaf]
    if value.requires_grad:
        raise NotConstant(f"{what} reads {leaf.name}, a parameter that is trained (a learned decay is not a "
                          "constant)")
    return value
