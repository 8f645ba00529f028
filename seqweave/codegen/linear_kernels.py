"""Which kernels run linear attention: the generated Triton kernels where they run (CUDA, or
CPU under SEQWEAVE_TRITON_INTERPRET=1, for fp32/fp16/bf16), the chunked torch reference
elsewhere (always for fp64). Same contracts as `ir.ops.linear_recurrences`, per recurrence:
forward (q, k, v, gate, s0) -> (o, final); backward (do, q, k, v, gate, s0, d_final) ->
(dq, dk, dv, d_gate or None, d_s0 or None)."""
from __future__ import annotations

import torch
from torch import Tensor

from seqweave.codegen.triton import gated_linear_attention as triton_gated
from seqweave.codegen.triton import linear_attention as triton_linear
from seqweave.codegen.triton.jit import use_triton
from seqweave.ir.ops.linear_recurrences import REFERENCE, Recurrence


def _generated(*tensors: Tensor | None) -> bool:
    present = [t for t in tensors if t is not None]
    return present[0].dtype in triton_linear.KERNEL_DTYPES and use_triton(*present)


def _decay_forward(q, k, v, decay, s0):
    if _generated(q, k, v, decay, s0):
        return triton_linear.linear_attention_forward(q, k, v, decay, s0)
    return REFERENCE["decay"].forward(q, k, v, decay, s0)


def _decay_backward(do, q, k, v, decay, s0, d_final):
    if _generated(q, k, v, decay, s0):
        dq, dk, dv, ds0 = triton_linear.linear_attention_backward(do.contiguous(), q, k, v, decay, s0, d_final)
        return dq, dk, dv, None, ds0
    return REFERENCE["decay"].backward(do, q, k, v, decay, s0, d_final)


def _gated(name: str, kernel: str) -> Recurrence:
    """`kernel`_forward / _backward of `triton.gated_linear_attention` (looked up per call)."""
    reference = REFERENCE[name]

    def forward(q, k, v, gate, s0):
        if _generated(q, k, v, gate, s0):
            return getattr(triton_gated, f"{kernel}_forward")(q, k, v, gate, s0)
        return reference.forward(q, k, v, gate, s0)

    def backward(do, q, k, v, gate, s0, d_final):
        if _generated(q, k, v, gate, s0):
            return getattr(triton_gated, f"{kernel}_backward")(do.contiguous(), q, k, v, gate, s0, d_final)
        return reference.backward(do, q, k, v, gate, s0, d_final)
    return Recurrence(name, forward, backward, True)


GENERATED = {
    "decay": Recurrence("decay", _decay_forward, _decay_backward, False),
    "gla": _gated("gla", "gla"),
    "delta": _gated("delta", "delta_rule"),
}


def kernels_in_use(device: torch.device | str = "cpu") -> str:
    probe = torch.empty(0, device=device)
    return "generated Triton kernels" if use_triton(probe) else "chunked torch reference"
