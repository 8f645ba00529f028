"""`attn.linear`: causal linear attention as one op, its structure lifted into attributes.

    S_t = lambda_h S_{t-1} + k_t^T v_t        S_{-1} = 0
    o_t = scale * q_t S_t

`decay` lists the per-head log-decays s_h = -log(lambda_h) (empty: no decay, lambda = 1);
`scale` multiplies the scores. Under LASP-2 (`attn.lasp2`) each rank starts its rows from
the prefix of the earlier ranks' states instead of 0. A normaliser is not the op's business: the frontend runs the op on [v, 1] and the graph keeps
dividing by the last column, exactly as the user wrote it.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from seqweave.ir.graph import Node, Value
from seqweave.ir.ops.base import OpDef, fail
from seqweave.ir.ops.linear_attn_reference import (linear_attention_chunked, linear_attention_vjp,
                                                   state_dtype)
from seqweave.ir.types import TensorType, ValueType

LINEAR_KWARGS = ("decay", "scale")
Forward = Callable[..., tuple[torch.Tensor, torch.Tensor]]  # (q, k, v, decay, s0) -> (o, final)
Backward = Callable[..., tuple[torch.Tensor, ...]]  # (do, q, k, v, decay, s0, dsn) -> (dq, dk, dv, ds0)


def decay_tensor(decay: list[float], like: torch.Tensor) -> torch.Tensor | None:
    """The per-head log-decays as a tensor on `like`'s device, in the state dtype (None: no decay)."""
    return torch.tensor(decay, dtype=state_dtype(like.dtype), device=like.device) if decay else None


def state_shape(q: torch.Tensor, v: torch.Tensor) -> tuple[int, int, int, int]:
    return q.shape[0], q.shape[1], q.shape[3], v.shape[3]


def scaled_forward(forward: Forward, q, k, v, decay: list[float], scale: float, state_in=None) -> tuple:
    """(o, final state) of `forward` with the scores scaled by `scale` (q scaled before)."""
    return forward(q * scale if scale != 1.0 else q, k, v, decay_tensor(decay, q), state_in)


def scaled_backward(backward: Backward, do, q, k, v, decay: list[float], scale: float, state_in=None,
                    d_final=None) -> tuple:
    """(dq, dk, dv, d_state_in) of `scaled_forward`."""
    dq, dk, dv, ds0 = backward(do, q * scale if scale != 1.0 else q, k, v, decay_tensor(decay, q), state_in,
                               d_final)
    return (dq * scale if scale != 1.0 else dq), dk, dv, ds0


def _tensor(node: Node, value: Any, what: str) -> TensorType:
    if not isinstance(value, Value) or not isinstance(value.type, TensorType):
        raise fail(node, f"{what} must be a tensor value")
    return value.type


def _check(node: Node, q: TensorType, k: TensorType, v: TensorType) -> None:
    if not (q.rank == k.rank == v.rank == 4):
        raise fail(node, f"q, k, v must be [B, H, N, D]; got ranks {q.rank}, {k.rank}, {v.rank}")
    if tuple(q.shape) != tuple(k.shape) or tuple(v.shape[:3]) != tuple(q.shape[:3]):
        raise fail(node, f"q {q.shape_text()}, k {k.shape_text()}, v {v.shape_text()} do not agree")
    if not (q.dtype == k.dtype == v.dtype):
        raise fail(node, f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    missing = [key for key in LINEAR_KWARGS if key not in node.kwargs]
    if missing:
        raise fail(node, f"missing attributes {missing}")
    decay = node.kwargs["decay"]
    if not isinstance(decay, (list, tuple)) or (decay and len(decay) != int(q.shape[1])):
        raise fail(node, f"decay must list one log-decay per head ({q.shape[1]}) or none; got {decay!r}")
    if any(not (0 <= float(s) < float("inf")) for s in decay):
        raise fail(node, f"log-decays must be finite and >= 0 (s = -log lambda); got {list(decay)}")


class LinearAttention(OpDef):
    """q: [B, H, N, D], k: [B, H, N, D], v: [B, H, N, Dv] -> out: [B, H, N, Dv].

    `attn.linear(q, k, v, decay=[s_h...], scale=c)`: chunkwise, O(N d Dv) time, O(d Dv) state.
    """

    name = "attn.linear"

    def infer(self, node: Node) -> list[ValueType]:
        q, _, v = (arg.type for arg in node.args[:3])
        return [TensorType(q.shape[:3] + v.shape[3:], q.dtype, q.placements)]

    def verify(self, node: Node) -> None:
        if len(node.args) != 3:
            raise fail(node, "expects (q, k, v)")
        _check(node, *(_tensor(node, arg, what) for arg, what in zip(node.args, "qkv")))

    def reference(self, node: Node, q, k, v, **kwargs: Any) -> torch.Tensor:
        return scaled_forward(linear_attention_chunked, q, k, v, kwargs["decay"], kwargs["scale"])[0]


class LinearAttentionBackward(OpDef):
    """(dout, q, k, v) -> dq, dk, dv with the shapes of q, k, v."""

    name = "attn.linear_backward"

    def infer(self, node: Node) -> list[ValueType]:
        return [arg.type for arg in node.args[1:4]]

    def verify(self, node: Node) -> None:
        if len(node.args) != 4:
            raise fail(node, "expects (dout, q, k, v)")
        dout, q, k, v = (_tensor(node, arg, what) for arg, what in zip(node.args, ("dout", "q", "k", "v")))
        _check(node, q, k, v)
        if tuple(dout.shape) != tuple(q.shape[:3] + v.shape[3:]):
            raise fail(node, f"dout {dout.shape_text()} does not match out of q {q.shape_text()}, v {v.shape_text()}")

    def reference(self, node: Node, dout, q, k, v, **kwargs: Any) -> tuple[torch.Tensor, ...]:
        return scaled_backward(linear_attention_vjp, dout, q, k, v, kwargs["decay"], kwargs["scale"])[:3]
