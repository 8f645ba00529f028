"""What an attention op allocates inside itself, at most: the bytes the activation-memory plan
reserves at that op on top of its operands and results.

The blockwise reference (CPU) holds a handful of [B, Hq, BLOCK_Q, BLOCK_KV] score tiles at
a time, casts operands to fp32 when they are not, and rotates q and k when it carries RoPE
positions; a sharded op also holds what it exchanges (the K/V blocks a ring step sends and
receives, the all-to-all buffers of Ulysses). The Triton kernels hold their tiles on chip,
so this is an upper bound there.
"""
from __future__ import annotations

import math

from seqweave.ir.graph import Node
from seqweave.ir.ops.attn_reference import BLOCK_KV, BLOCK_Q
from seqweave.ir.types import TensorType

#: score-sized tiles live at once inside one tile step (measured under `runtime.live_bytes`: about
#: 5.3 forward and 5.2 backward, the rest being per-block rows)
FORWARD_TILES, BACKWARD_TILES = 6, 6
SHARDED = ("attn.ring", "attn.ulysses", "attn.hybrid", "attn.lasp2")


def _bytes(value) -> int:
    kind = getattr(value, "type", None)
    if not isinstance(kind, TensorType) or not kind.is_static():
        return 0
    return math.prod(kind.concrete_shape()) * kind.dtype.itemsize


def attention_workspace(node: Node) -> int:
    backward = node.op.endswith("_backward")
    first = 1 if backward else 0
    q = node.args[first].type
    if not isinstance(q, TensorType) or not q.is_static() or len(q.shape) != 4:
        return 0
    batch, heads, queries, _ = q.concrete_shape()
    tile = batch * heads * min(queries, BLOCK_Q) * BLOCK_KV * 4
    operands = sum(_bytes(arg) for arg in node.args[:first + 3])
    upcast = operands * (4 // q.dtype.itemsize - 1) if q.dtype.itemsize < 4 else 0
    # RoPE around the kernel: q and k rotated (rotate_half's pieces live a moment), and in the
    # backward dq and dk rotated back; measured at ~1.1x and ~3.2x (q + k), held at 2x and 4x
    rotated = (4 if backward else 2) * (_bytes(node.args[first]) + _bytes(node.args[first + 1])) \
        if str(node.kwargs.get("positions", "none")) != "none" else 0  # text or a typed PositionSpec
    results = sum(_bytes(value) for value in node.results)
    # a ring step holds the next K/V block (or gradient block) in flight, and merges partial
    # results into accumulators; Ulysses' all-to-alls hold a copy of what they exchange
    exchanged = 2 * operands + results if node.op.startswith(SHARDED) else 0
    upcast += results * (4 // q.dtype.itemsize - 1) if q.dtype.itemsize < 4 else 0
    return (BACKWARD_TILES if backward else FORWARD_TILES) * tile + upcast + rotated + exchanged


def linear_workspace(node: Node) -> int:
    """Chunked linear attention: per-chunk products and states, about its operands again twice."""
    return 2 * sum(_bytes(arg) for arg in node.operands)
