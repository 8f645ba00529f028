"""Find every attention in a dynamo graph, lift its mask and replace it by `seqweave::attention`.

Runs before aot_autograd, on the torch-level FX graph, so that the forward and backward
ATen graphs hold exactly our ops. K/V enter the op at their true KV-head count. Multi-head
attention modules and einsum/bmm products are first rewritten into the forms the matchers
read (`mha`, `products`); a softmax that still looks like attention but was not replaced is
reported with its reason, never passed over in silence.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, replace
from typing import Sequence

import torch
from torch import fx

from seqweave.frontend.custom_ops import ATTENTION_OP
from seqweave.frontend.fx_build import NodeBuilder
from seqweave.frontend.linear_lift import LinearReport, replace_linear_attention
from seqweave.frontend.mha import FORM as MHA_FORM
from seqweave.frontend.mha import decompose_multi_head_attention
from seqweave.frontend.orphans import remove_orphans
from seqweave.frontend.mask_lift import LiftedMask, SymbolicMaskInput, lift_mask, segment_ids_from_positions
from seqweave.frontend.mask_tiles import Untileable
from seqweave.frontend.patterns import (SDPA_TARGETS, AttentionMatch, NotAttention, example, layer_name,
                                        looks_like_eager_attention, match_eager, match_sdpa, softmax_feeding)
from seqweave.frontend.products import normalise_products
from seqweave.frontend.rope_lift import LiftedRotary, NotRotary, lift_rotary, looks_rotary
from seqweave.frontend.unmatched_softmax import unmatched_softmaxes
from seqweave.ir.mask import Causal, Dense, Full


@dataclass
class AttentionReport:
    """What the frontend decided about one attention-like pattern (shown by `seqweave explain`)."""

    layer: str
    found: bool
    reason: str
    form: str = ""
    q_heads: int = 0
    kv_heads: int = 0
    head_dim: int = 0
    mask: str = ""
    batch: int = 0
    seq_len: int = 0
    element_bytes: int = 0
    score_mod: str = "none"
    #: the rotary lifted into the attention (a PositionSpec's text), or "" when none was
    positions: str = ""
    #: columns of v the op runs on (linear attention: + 1 for a row normaliser); 0: head_dim
    value_dim: int = 0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _candidates(graph: fx.Graph) -> list[tuple[fx.Node, str]]:
    found = []
    for node in graph.nodes:
        if node.op == "call_function" and node.target in SDPA_TARGETS:
            found.append((node, "sdpa"))
        elif looks_like_eager_attention(node):
            found.append((node, "eager"))
    return found


def _lift(match: AttentionMatch, placeholder_values: dict[fx.Node, torch.Tensor]) -> LiftedMask:
    if match.mask is None:
        return LiftedMask(Causal() if match.is_causal else Full(), [], "lifted")
    q, k = match.shape_4d(match.q), match.shape_4d(match.k)
    if not _static(q) or not _static(k) or not _static(example(match.mask).shape):
        # Lifting evaluates the mask at one size; with symbolic sizes that would not prove it
        # for the others, so the mask stays a dense operand (exact at every size).
        return _dense(match, "the sequence length is symbolic (dynamic shapes): kept as a dense tensor")
    heads = _as_4d(example(match.mask).shape)[1]
    try:
        return lift_mask(match.mask, placeholder_values, match.additive, (q[0], heads, q[2], k[2]))
    except SymbolicMaskInput as why:
        return _dense(match, f"{why} (dynamic shapes): kept as a dense tensor")
    except Untileable as why:
        if match.additive:  # without reading every value we cannot tell a mask from a bias (ALiBi)
            raise ValueError(f"the additive mask cannot be checked: {why}") from why
        return _dense(match, f"not lifted: {why}; kept as a dense tensor")


def _static(shape: Sequence) -> bool:
    return not any(isinstance(size, torch.SymInt) for size in shape)


def _dense(match: AttentionMatch, note: str) -> LiftedMask:
    return LiftedMask(Dense(0), [(match.mask, "dense_additive" if match.additive else "dense")], note)


def _as_4d(shape: torch.Size) -> tuple[int, ...]:
    """A mask's shape with leading broadcast dims made explicit: [Sq, Skv] -> [1, 1, Sq, Skv]."""
    return (1,) * (4 - len(shape)) + tuple(shape)


def _mask_operand(graph: fx.Graph, node: fx.Node, role: str) -> fx.Node:
    """Insert (before the attention) the value an operand role needs."""
    if role == "document":
        return graph.call_function(segment_ids_from_positions, (node,))
    if role == "key_padding":
        return graph.call_function(torch.logical_not, (node,))
    if role in ("dense", "dense_additive"):
        dense = graph.call_function(torch.eq, (node, 0)) if role == "dense_additive" else node
        return graph.call_function(torch.reshape, (dense, _as_4d(example(node).shape)))
    return node


def _lift_positions(match: AttentionMatch, placeholder_values: dict[fx.Node, torch.Tensor]
                    ) -> tuple[LiftedRotary | None, str]:
    """The rotary before this attention as a spec, or None and why (empty when q is not rotated)."""
    if match.flat:
        return None, ""
    try:
        return lift_rotary(match.q, match.k, placeholder_values), ""
    except NotRotary as why:
        return None, (f"rotary left in the graph: {why}" if looks_rotary(match.q) else "")


def _replace(graph: fx.Graph, match: AttentionMatch, lifted: LiftedMask, rotary: LiftedRotary | None,
             layer: int) -> list[fx.Node]:
    """Put `seqweave::attention` in place of the match; returns the nodes the match read (now
    possibly orphaned)."""
    with graph.inserting_before(match.anchor):
        operands = [_mask_operand(graph, node, role) for node, role in lifted.operands]
        q, k, v = (graph.call_method("unsqueeze", (x, 0)) if match.flat else x for x in (match.q, match.k, match.v))
        positions = "none"
        if rotary is not None:  # q and k enter unrotated; the positions' operands follow the mask's
            q, k = rotary.q, rotary.k
            offset = len(operands)
            positions = str(rotary.spec.remap_operands({i: i + offset for i in range(len(rotary.operands))}))
            operands += rotary.operands
        call = graph.call_function(ATTENTION_OP, (q, k, v, operands, str(lifted.spec), str(match.score_mod),
                                                  match.scale, positions, layer))
        out = graph.call_function(operator.getitem, (call, 0))
        if match.flat:  # [1, B*H, S, D] back to the [B*H, S, D] the bmm gave
            out = graph.call_method("squeeze", (out, 0))
    out.meta.update(match.anchor.meta)
    call.meta["nn_module_stack"] = match.anchor.meta.get("nn_module_stack", {})
    match.anchor.replace_all_uses_with(out)
    read = list(match.anchor.all_input_nodes)
    graph.erase_node(match.anchor)
    return read


def _report(match: AttentionMatch, lifted: LiftedMask, layer: str, rotary: LiftedRotary | None,
            rotary_note: str) -> AttentionReport:
    reason = "replaced" if lifted.note == "lifted" else f"replaced; {lifted.note}"
    if isinstance(lifted.spec, Dense):
        reason += f" ({_dense_bytes(match):,} bytes, growing as N²)"
    if rotary is not None:
        reason += "; rotary lifted"
    elif rotary_note:
        reason += f"; {rotary_note}"
    batch, heads, length, head_dim = (_hint(size) for size in match.shape_4d(match.q))
    return AttentionReport(layer, True, reason, match.form, heads, match.kv_heads, head_dim, str(lifted.spec),
                           batch, length, example(match.q).element_size(), str(match.score_mod),
                           str(rotary.spec) if rotary is not None else "")


def _linear_report(report: LinearReport) -> AttentionReport:
    batch, heads, length, head_dim = ((1,) * (4 - len(report.shape)) + report.shape) if report.shape else (0,) * 4
    return AttentionReport(report.layer, report.found, report.reason, "linear", heads, heads, head_dim,
                           "causal-linear" if report.found else "", batch, length, report.element_bytes,
                           value_dim=report.value_dim)


def _dense_bytes(match: AttentionMatch) -> int:
    """Bytes of the dense mask operand as the boolean tensor attention reads."""
    return math.prod(_hint(size) for size in example(match.mask).shape)


def _hint(size: int | torch.SymInt) -> int:
    """A size as the int it had at capture (a symbolic size's example value)."""
    return size if isinstance(size, int) else size.node.hint


def _allowed_mask(match: AttentionMatch, negations: dict[fx.Node, fx.Node]) -> AttentionMatch:
    """The match with a mask that is True where attention is allowed (masked_fill reads the hidden
    positions): a `logical_not` inserted right after the mask, one per mask however many layers share it."""
    if not match.mask_hides:
        return match
    if match.mask not in negations:
        after = match.mask
        if after.op == "placeholder":  # placeholders stay together at the top
            after = [node for node in after.graph.nodes if node.op == "placeholder"][-1]
        negations[match.mask] = NodeBuilder(match.mask, after=after).call(torch.logical_not, match.mask)
    return replace(match, mask=negations[match.mask], mask_hides=False)


def replace_attention(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor],
                      linear_attention: bool = True) -> list[AttentionReport]:
    """Rewrite `gm` in place; returns one report per attention-like pattern: the multi-head
    attention left whole, then the attentions in graph order, then the linear attentions
    (unless `linear_attention` is False), then softmaxes that look like attention but were
    not replaced."""
    placeholders = [node for node in gm.graph.nodes if node.op == "placeholder"]
    placeholder_values = {node: value for node, value in zip(placeholders, example_inputs)
                          if isinstance(value, torch.Tensor)}
    reports = [AttentionReport(layer_name(node), False, f"left alone: {why}", MHA_FORM)
               for node, why in decompose_multi_head_attention(gm.graph)]
    kept_products = normalise_products(gm.graph)
    found, tried_softmaxes = _replace_matches(gm.graph, placeholder_values)
    reports += found
    if linear_attention:
        linear, orphans = replace_linear_attention(gm.graph, placeholder_values, sum(r.found for r in found))
        remove_orphans(gm.graph, orphans)
        reports += [_linear_report(report) for report in linear]
    reports += [AttentionReport(layer_name(node), False, f"attention-like softmax left alone: {why}", "softmax")
                for node, why in unmatched_softmaxes(gm.graph, tried_softmaxes, kept_products)]
    gm.recompile()
    return reports


def _replace_matches(graph: fx.Graph, placeholder_values: dict[fx.Node, torch.Tensor]
                     ) -> tuple[list[AttentionReport], set[fx.Node]]:
    """Match, lift and replace every candidate; returns their reports and the softmaxes tried."""
    reports = []
    lifted_by_mask: dict[tuple, LiftedMask] = {}  # HF shares one mask between all layers
    negations: dict[fx.Node, fx.Node] = {}
    orphan_candidates: list[fx.Node] = []
    tried_softmaxes: set[fx.Node] = set()
    for node, form in _candidates(graph):
        layer = layer_name(node)
        if form == "eager":
            tried_softmaxes.add(softmax_feeding(node))
        try:
            match = _allowed_mask(match_sdpa(node) if form == "sdpa" else match_eager(node), negations)
            key = (match.mask, match.is_causal, str(match.shape_4d(match.q)), str(match.shape_4d(match.k)))
            if key not in lifted_by_mask:
                lifted_by_mask[key] = _lift(match, placeholder_values)
            lifted = lifted_by_mask[key]
        except (NotAttention, ValueError) as why:
            reports.append(AttentionReport(layer, False, f"left alone: {why}", form))
            continue
        rotary, rotary_note = _lift_positions(match, placeholder_values)
        orphan_candidates += _replace(graph, match, lifted, rotary, sum(report.found for report in reports))
        orphan_candidates += [match.q, match.k] if rotary is not None else []
        reports.append(_report(match, lifted, layer, rotary, rotary_note))
    # Never a whole-graph DCE: it drops in-place writes. Unused negations go too.
    remove_orphans(graph, orphan_candidates + list(negations.values()))
    return reports, tried_softmaxes
