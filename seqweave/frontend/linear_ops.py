"""`torch.ops.seqweave.linear_attention` and its backward: what recognised linear attention is
replaced by, so that aot_autograd sees one opaque op (never the N x N score matrix) and the
importer turns forward and backward into `attn.linear` / `attn.linear_backward`.

The eager implementations are the IR's chunked reference (`ir.ops.attn_linear`).
"""
from __future__ import annotations

import torch

from seqweave.ir.ops.attn_linear import scaled_backward, scaled_forward
from seqweave.ir.ops.linear_attn_reference import linear_attention_chunked, linear_attention_vjp


@torch.library.custom_op("seqweave::linear_attention", mutates_args=())
def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: list[float], scale: float,
                     layer: int = -1) -> torch.Tensor:
    """q, k [B, H, N, D], v [B, H, N, Dv] -> out [B, H, N, Dv]."""
    return scaled_forward(linear_attention_chunked, q, k, v, list(decay), scale)[0].contiguous()


@linear_attention.register_fake
def _linear_attention_fake(q, k, v, decay, scale, layer=-1):
    return q.new_empty(q.shape[:3] + v.shape[3:])


@torch.library.custom_op("seqweave::linear_attention_backward", mutates_args=())
def linear_attention_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              decay: list[float], scale: float,
                              layer: int = -1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of `seqweave::linear_attention` with respect to q, k and v."""
    dq, dk, dv, _ = scaled_backward(linear_attention_vjp, dout, q, k, v, list(decay), scale)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@linear_attention_backward.register_fake
def _linear_attention_backward_fake(dout, q, k, v, decay, scale, layer=-1):
    return tuple(torch.empty_like(x, memory_format=torch.contiguous_format) for x in (q, k, v))


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, decay, scale, layer = inputs
    ctx.save_for_backward(q, k, v)
    ctx.attrs = (decay, scale, layer)


def _backward(ctx, dout):
    q, k, v = ctx.saved_tensors
    dq, dk, dv = torch.ops.seqweave.linear_attention_backward(dout, q, k, v, *ctx.attrs)
    return (dq, dk, dv, None, None, None)[:len(ctx.needs_input_grad)]


linear_attention.register_autograd(_backward, setup_context=_setup_context)

LINEAR_ATTENTION_OP = torch.ops.seqweave.linear_attention.default
LINEAR_ATTENTION_BACKWARD_OP = torch.ops.seqweave.linear_attention_backward.default
