"""`torch.ops.seqweave.linear_attention` and its backward: what recognised linear attention is
replaced by, so that aot_autograd sees one opaque op (never the N x N score matrix) and the
importer turns forward and backward into `attn.linear` / `attn.linear_backward`.

The eager implementations are the IR's chunked references (`ir.ops.linear_recurrences`).
`recurrence` is `decay` (constant per-head `decay`), `gla` or `delta` (a `gate` operand:
log gates [B, H, N, D] or betas [B, H, N], which gets a gradient).
"""
from __future__ import annotations

from typing import Optional

import torch

from seqweave.ir.ops.attn_linear import scaled_backward, scaled_forward
from seqweave.ir.ops.linear_recurrences import REFERENCE


@torch.library.custom_op("seqweave::linear_attention", mutates_args=())
def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: list[float], scale: float,
                     layer: int = -1, gate: Optional[torch.Tensor] = None, recurrence: str = "decay") -> torch.Tensor:
    """q, k [B, H, N, D], v [B, H, N, Dv] (, gate) -> out [B, H, N, Dv]."""
    return scaled_forward(REFERENCE[recurrence], q, k, v, gate, list(decay), scale)[0].contiguous()


@linear_attention.register_fake
def _linear_attention_fake(q, k, v, decay, scale, layer=-1, gate=None, recurrence="decay"):
    return q.new_empty(q.shape[:3] + v.shape[3:])


@torch.library.custom_op("seqweave::linear_attention_backward", mutates_args=())
def linear_attention_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              decay: list[float], scale: float, layer: int = -1,
                              gate: Optional[torch.Tensor] = None,
                              recurrence: str = "decay"
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of `seqweave::linear_attention` for q, k, v and the gate (empty without one)."""
    dq, dk, dv, dgate, _ = scaled_backward(REFERENCE[recurrence], dout, q, k, v, gate, list(decay), scale)
    dgate = q.new_empty(0) if dgate is None else dgate.contiguous()
    return dq.contiguous(), dk.contiguous(), dv.contiguous(), dgate


@linear_attention_backward.register_fake
def _linear_attention_backward_fake(dout, q, k, v, decay, scale, layer=-1, gate=None, recurrence="decay"):
    grads = tuple(torch.empty_like(x, memory_format=torch.contiguous_format) for x in (q, k, v))
    return (*grads, q.new_empty(0) if gate is None else torch.empty_like(gate, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, decay, scale, layer, gate, recurrence = (list(inputs) + [-1, None, "decay"][len(inputs) - 5:])[:8]
    ctx.save_for_backward(q, k, v, gate)
    ctx.attrs = (decay, scale, layer)
    ctx.recurrence = recurrence


def _backward(ctx, dout):
    q, k, v, gate = ctx.saved_tensors
    dq, dk, dv, dgate = torch.ops.seqweave.linear_attention_backward(dout, q, k, v, *ctx.attrs, gate=gate,
                                                                     recurrence=ctx.recurrence)
    grads = (dq, dk, dv, None, None, None, dgate if gate is not None else None, None)
    return grads[:len(ctx.needs_input_grad)]


linear_attention.register_autograd(_backward, setup_context=_setup_context)

LINEAR_ATTENTION_OP = torch.ops.seqweave.linear_attention.default
LINEAR_ATTENTION_BACKWARD_OP = torch.ops.seqweave.linear_attention_backward.default
