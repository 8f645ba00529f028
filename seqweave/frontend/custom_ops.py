"""`torch.ops.seqweave.attention` and its backward: what captured attention is replaced by.

They exist so that aot_autograd sees one opaque op per attention (instead of decomposing
SDPA into its CPU flash kernel) and the forward and backward ATen graphs hold exactly
these ops, which the importer turns into `attn.sdpa` / `attn.sdpa_backward`.
The eager implementations are the IR's blockwise reference. `positions` is a PositionSpec's
text (`none`, or the rotary the frontend lifted; its operands follow the mask's in the list)
and `layer` the attention's index in the captured graph, which forward and backward share.
"""
from __future__ import annotations

import torch

from seqweave.ir.mask_parser import parse_mask, parse_score_mod
from seqweave.ir.ops.attn_positions import positional_backward, positional_forward
from seqweave.ir.ops.attn_reference import attention_backward as reference_backward
from seqweave.ir.ops.attn_reference import attention_forward as reference_forward
from seqweave.ir.ops.attn_reference import lse_dtype
from seqweave.ir.positions import parse_positions


@torch.library.custom_op("seqweave::attention", mutates_args=())
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask_operands: list[torch.Tensor],
              mask: str, score_mod: str, scale: float, positions: str = "none",
              layer: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, Hq, Sq, D], k/v [B, Hkv, Skv, D] -> (out [B, Hq, Sq, Dv], lse [B, Hq, Sq] fp32, fp64 for fp64)."""
    modifier = parse_score_mod(score_mod)
    attend = lambda q_, k_, v_, mask_: reference_forward(q_, k_, v_, mask_, modifier, scale, mask_operands)  # noqa: E731
    return positional_forward(attend, q, k, v, parse_mask(mask), parse_positions(positions), mask_operands)


@attention.register_fake
def _attention_fake(q, k, v, mask_operands, mask, score_mod, scale, positions="none", layer=-1):
    # Contiguous outputs, as the real kernel returns: Inductor checks these strides.
    out = q.new_empty(q.shape[:3] + v.shape[3:])
    lse = q.new_empty(q.shape[:3], dtype=lse_dtype(q.dtype))
    return out, lse


@torch.library.custom_op("seqweave::attention_backward", mutates_args=())
def attention_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       out: torch.Tensor, lse: torch.Tensor, mask_operands: list[torch.Tensor],
                       mask: str, score_mod: str, scale: float, positions: str = "none",
                       layer: int = -1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of `seqweave::attention` with respect to q, k and v."""
    modifier = parse_score_mod(score_mod)
    attend_backward = lambda dout_, q_, k_, v_, out_, lse_, mask_: reference_backward(  # noqa: E731
        dout_, q_, k_, v_, out_, lse_, mask_, modifier, scale, mask_operands)
    return positional_backward(attend_backward, dout.contiguous(), q, k, v, out, lse, parse_mask(mask),
                               parse_positions(positions), mask_operands)


@attention_backward.register_fake
def _attention_backward_fake(dout, q, k, v, out, lse, mask_operands, mask, score_mod, scale, positions="none",
                             layer=-1):
    return torch.empty_like(q, memory_format=torch.contiguous_format), \
        torch.empty_like(k, memory_format=torch.contiguous_format), \
        torch.empty_like(v, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, mask_operands, mask, score_mod, scale, positions, layer = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)  # as in ATen's flash attention: the backward has no dlse term
    ctx.save_for_backward(q, k, v, out, lse, *mask_operands)
    ctx.attrs = (mask, score_mod, scale, positions, layer)
    ctx.num_mask_operands = len(mask_operands)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, *mask_operands = ctx.saved_tensors
    mask, score_mod, scale, positions, layer = ctx.attrs
    dq, dk, dv = torch.ops.seqweave.attention_backward(dout, q, k, v, out, lse, mask_operands, mask, score_mod, scale,
                                                       positions, layer)
    grads = (dq, dk, dv, [None] * ctx.num_mask_operands, None, None, None, None, None)
    return grads[:len(ctx.needs_input_grad)]  # one per argument the call gave (defaults left out have none)


attention.register_autograd(_backward, setup_context=_setup_context)

ATTENTION_OP = torch.ops.seqweave.attention.default
ATTENTION_BACKWARD_OP = torch.ops.seqweave.attention_backward.default
