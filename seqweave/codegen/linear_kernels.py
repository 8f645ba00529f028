"""Which kernels run causal linear attention: the generated Triton kernels where they run
(CUDA, or CPU under SEQWEAVE_TRITON_INTERPRET=1, for fp32/fp16/bf16), the chunked torch
reference elsewhere (always for fp64). Same contract as `ir.ops.linear_attn_reference`:
S_t = lambda S_{t-1} + k_t^T v_t, o_t = q_t S_t, states fp32 (fp64 for fp64)."""
from __future__ import annotations

import torch
from torch import Tensor

from seqweave.codegen.triton import linear_attention as triton_linear
from seqweave.codegen.triton.jit import use_triton
from seqweave.ir.ops.linear_attn_reference import linear_attention_chunked, linear_attention_vjp
from seqweave.runtime.lasp2 import LocalLinearAttention


def _generated(*tensors: Tensor | None) -> bool:
    present = [t for t in tensors if t is not None]
    return present[0].dtype in triton_linear.KERNEL_DTYPES and use_triton(*present)


def forward(q: Tensor, k: Tensor, v: Tensor, decay: Tensor | None,
            initial_state: Tensor | None) -> tuple[Tensor, Tensor]:
    """(o, final state)."""
    if _generated(q, k, v, decay, initial_state):
        return triton_linear.linear_attention_forward(q, k, v, decay, initial_state)
    return linear_attention_chunked(q, k, v, decay, initial_state)


def backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, decay: Tensor | None, initial_state: Tensor | None,
             d_final_state: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """(dq, dk, dv, d_initial_state); the last is None without an initial state."""
    if _generated(q, k, v, decay, initial_state):
        return triton_linear.linear_attention_backward(do.contiguous(), q, k, v, decay, initial_state,
                                                       d_final_state)
    return linear_attention_vjp(do, q, k, v, decay, initial_state, d_final_state)


def kernels_in_use(device: torch.device | str = "cpu") -> str:
    probe = torch.empty(0, device=device)
    return "generated Triton kernels" if use_triton(probe) else "chunked torch reference"


GENERATED = LocalLinearAttention("generated kernels where they run, else the chunked reference", forward, backward)
