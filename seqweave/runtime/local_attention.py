"""The attention kernels a rank runs on its local tiles, as one injectable pair.

Ring, Ulysses and hybrid attention call `kernels.forward` / `kernels.backward` with the
reference's signature (q, k, v, mask, score_mod, scale, operands, q_positions, kv_positions).
The default is the plain-torch blockwise reference; codegen hands in its Triton dispatch when
it lowers a graph, so the runtime never needs to know which kernels exist.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from seqweave.ir.ops.attn_reference import attention_backward, attention_forward


@dataclass(frozen=True)
class LocalAttention:
    """Forward `(out, lse)` and backward `(dq, dk, dv)` over local tiles at global positions."""

    name: str
    forward: Callable
    backward: Callable


REFERENCE = LocalAttention("reference", attention_forward, attention_backward)
