"""`attn.*`: attention as data. The mask is a MaskSpec (text attribute) whose `$i` operands
are the tensors in the node's fourth argument; heads are laid out as in SDPA, [B, H, S, D].

Optional attributes: `positions` (a PositionSpec's text, `ir.positions`: q and k arrive
unrotated and the op rotates them; its `$i` operands share the list with the mask's) and
`layer` (the attention's index in the captured model, the same in forward and backward)."""
from __future__ import annotations

from typing import Any

import torch

from seqweave.ir.graph import Node, Value
from seqweave.ir.mask import MaskSpec
from seqweave.ir.mask_parser import parse_mask, parse_score_mod
from seqweave.ir.score_mod import ScoreMod
from seqweave.ir.ops.attn_positions import positional_backward, positional_forward
from seqweave.ir.ops.attn_reference import attention_backward, attention_forward, lse_dtype
from seqweave.ir.ops.attn_sparsity import parse_sparsity, sparse_attend
from seqweave.ir.ops.workspace import attention_workspace
from seqweave.ir.ops.base import OpDef, fail
from seqweave.ir.positions import PositionSpec, Rope, parse_positions
from seqweave.ir.types import TensorType, ValueType

ATTN_KWARGS = ("mask", "score_mod", "scale", "kv_heads")


def mask_of(node: Node) -> MaskSpec:
    return parse_mask(node.kwargs["mask"])


def score_mod_of(node: Node) -> ScoreMod:
    return parse_score_mod(node.kwargs["score_mod"])


def positions_of(node: Node) -> PositionSpec:
    """The node's PositionSpec (`NoPositions` when it has none)."""
    return parse_positions(node.kwargs.get("positions", "none"))


def _tensor_type(node: Node, value: Any, what: str) -> TensorType:
    if not isinstance(value, Value) or not isinstance(value.type, TensorType):
        raise fail(node, f"{what} must be a tensor value")
    return value.type


def _differ(a: Any, b: Any) -> bool:
    """Sizes that certainly differ. Two symbolic sizes (dynamo may give equal lengths different
    symbols) are not known to differ; the kernels check the real sizes when they run."""
    return a != b and bool(getattr(a, "is_Integer", True)) and bool(getattr(b, "is_Integer", True))


def _check_attention_operands(node: Node, q: TensorType, k: TensorType, v: TensorType) -> None:
    if not (q.rank == k.rank == v.rank == 4):
        raise fail(node, f"q, k, v must be [B, H, S, D]; got ranks {q.rank}, {k.rank}, {v.rank}")
    kv_heads = node.kwargs.get("kv_heads")
    if k.shape[1] != kv_heads or v.shape[1] != kv_heads:
        raise fail(node, f"k and v must have kv_heads={kv_heads} heads, got {k.shape[1]} and {v.shape[1]}")
    if (q.shape[1] % kv_heads) != 0:
        raise fail(node, f"{q.shape[1]} query heads are not a multiple of kv_heads={kv_heads}")
    if _differ(k.shape[2], v.shape[2]) or _differ(q.shape[3], k.shape[3]) or _differ(q.shape[0], k.shape[0]):
        raise fail(node, f"q {q.shape_text()}, k {k.shape_text()}, v {v.shape_text()} do not agree")
    if not (q.dtype == k.dtype == v.dtype):
        raise fail(node, f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")


def _check_attributes(node: Node, mask_operands: Any) -> None:
    missing = [key for key in ATTN_KWARGS if key not in node.kwargs]
    if missing:
        raise fail(node, f"missing attributes {missing}")
    try:
        mask = mask_of(node)
        score_mod_of(node)
    except ValueError as error:
        raise fail(node, str(error)) from error
    if not isinstance(mask_operands, list):
        raise fail(node, "the mask operands must be a list")
    bad = [i for i in mask.operand_indices() if i >= len(mask_operands)]
    if bad:
        raise fail(node, f"mask {mask} uses operands {bad} but only {len(mask_operands)} are given")
    try:
        positions = positions_of(node)
    except ValueError as error:
        raise fail(node, str(error)) from error
    bad = [i for i in positions.operand_indices() if i >= len(mask_operands)]
    if bad:
        raise fail(node, f"positions {positions} use operands {bad} but only {len(mask_operands)} are given")
    try:
        parse_sparsity(node.kwargs.get("sparsity"))
    except ValueError as error:
        raise fail(node, str(error)) from error
    if node.kwargs.get("sparsity") and node.op != "attn.sdpa":
        raise fail(node, "sparsity is a decode-time approximation: only attn.sdpa (inference) may carry it")
    if isinstance(positions, Rope) and positions.far:
        try:
            parse_mask(positions.far)
        except ValueError as error:
            raise fail(node, f"positions: far mask: {error}") from error


class Sdpa(OpDef):
    """q: [B, Hq, Sq, D], k: [B, Hkv, Skv, D], v: [B, Hkv, Skv, Dv] -> out: [B, Hq, Sq, Dv], lse: [B, Hq, Sq] fp32 (fp64 for fp64).

    Canonical attention: `attn.sdpa(q, k, v, [mask operands], mask=..., score_mod=..., scale=..., kv_heads=...)`.
    """

    name = "attn.sdpa"

    def workspace(self, node: Node) -> int:
        return attention_workspace(node)

    def infer(self, node: Node) -> list[ValueType]:
        q, _, v = (arg.type for arg in node.args[:3])
        out = TensorType(q.shape[:3] + v.shape[3:], q.dtype, q.placements)
        return [out, TensorType(q.shape[:3], lse_dtype(q.dtype), q.placements)]

    def verify(self, node: Node) -> None:
        if len(node.args) != 4:
            raise fail(node, "expects (q, k, v, [mask operands])")
        _check_attributes(node, node.args[3])
        q, k, v = (_tensor_type(node, arg, what) for arg, what in zip(node.args[:3], "qkv"))
        _check_attention_operands(node, q, k, v)

    def reference(self, node: Node, q, k, v, operands, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        modifier = parse_score_mod(kwargs["score_mod"])
        kernel = lambda q_, k_, v_, mask, operands_: attention_forward(  # noqa: E731
            q_, k_, v_, mask, modifier, kwargs["scale"], operands_)
        attend = sparse_attend(kernel, operands, parse_sparsity(kwargs.get("sparsity")))
        return positional_forward(attend, q, k, v, parse_mask(kwargs["mask"]),
                                  parse_positions(kwargs.get("positions", "none")), operands)


class SdpaBackward(OpDef):
    """(dout, q, k, v, out, lse, [mask operands]) -> dq, dk, dv with the shapes of q, k, v."""

    name = "attn.sdpa_backward"

    def workspace(self, node: Node) -> int:
        return attention_workspace(node)

    def infer(self, node: Node) -> list[ValueType]:
        return [arg.type for arg in node.args[1:4]]

    def verify(self, node: Node) -> None:
        if len(node.args) != 7:
            raise fail(node, "expects (dout, q, k, v, out, lse, [mask operands])")
        _check_attributes(node, node.args[6])
        dout, q, k, v, out, lse = (_tensor_type(node, arg, "operand") for arg in node.args[:6])
        _check_attention_operands(node, q, k, v)
        if dout.shape != out.shape or lse.shape != q.shape[:3]:
            raise fail(node, f"dout {dout.shape_text()} / lse {lse.shape_text()} do not match q {q.shape_text()}")

    def reference(self, node: Node, dout, q, k, v, out, lse, operands, **kwargs: Any) -> tuple[torch.Tensor, ...]:
        modifier = parse_score_mod(kwargs["score_mod"])
        attend_backward = lambda dout_, q_, k_, v_, out_, lse_, mask: attention_backward(  # noqa: E731
            dout_, q_, k_, v_, out_, lse_, mask, modifier, kwargs["scale"], operands)
        return positional_backward(attend_backward, dout, q, k, v, out, lse, parse_mask(kwargs["mask"]),
                                   parse_positions(kwargs.get("positions", "none")), operands)
