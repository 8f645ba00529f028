"""Op registry: the definition behind each op name, by dialect."""
from __future__ import annotations

from seqweave.ir.ops.attn import Sdpa, SdpaBackward
from seqweave.ir.ops.attn_linear import LinearAttention, LinearAttentionBackward
from seqweave.ir.ops.sp import (AllReduceOp, GatherOp, HybridAttention, HybridAttentionBackward, Lasp2Attention,
                                Lasp2AttentionBackward, RingAttention, RingAttentionBackward, ShardOp,
                                UlyssesAttention, UlyssesAttentionBackward)
from seqweave.ir.ops.base import OpDef, VerificationError
from seqweave.ir.ops.mem import MEMORY_OPS
from seqweave.ir.ops.core import CORE_PREFIX, core_op
from seqweave.ir.ops.scalar import SCALAR_FUNCTIONS, SCALAR_PREFIX, scalar_op

_DIALECT_OPS: dict[str, OpDef] = {op.name: op for op in (Sdpa(), SdpaBackward(), ShardOp(), GatherOp(),
                                                          AllReduceOp(), RingAttention(), RingAttentionBackward(),
                                                          UlyssesAttention(), UlyssesAttentionBackward(),
                                                          HybridAttention(), HybridAttentionBackward(),
                                                          LinearAttention(), LinearAttentionBackward(),
                                                          Lasp2Attention(), Lasp2AttentionBackward(),
                                                          *MEMORY_OPS)}


def op_def(name: str) -> OpDef:
    """The definition of `name`; raises VerificationError for unknown ops."""
    if name.startswith(CORE_PREFIX):
        try:
            return core_op(name)
        except KeyError as error:
            raise VerificationError(str(error)) from error
    if name.startswith(SCALAR_PREFIX) and name[len(SCALAR_PREFIX):] in SCALAR_FUNCTIONS:
        return scalar_op(name)
    if name not in _DIALECT_OPS:
        raise VerificationError(f"unknown op {name!r}; known dialect ops: {sorted(_DIALECT_OPS)} and core.<aten op>")
    return _DIALECT_OPS[name]


__all__ = ["OpDef", "VerificationError", "op_def"]
