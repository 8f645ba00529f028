"""`attn.linear`: causal linear attention as one op, its structure lifted into attributes.

    S_t = A_t S_{t-1} + (write of k_t, v_t)     S_{-1} = 0
    o_t = scale * q_t S_t

`recurrence` (default `decay`) names A_t and the write (`ir.ops.linear_recurrences`):
`decay` lists per-head log-decays s_h = -log(lambda_h) in the `decay` attribute (empty: no
decay); `gla` reads per-token, per-channel log gates and `delta` per-token betas as a fourth
operand, which gets a gradient. Under LASP-2 (`attn.lasp2`) each rank starts its rows from the
prefix of the earlier ranks' states instead of 0. A normaliser is not the op's business: the
frontend runs the op on [v, 1] and the graph keeps dividing by the last column, as written.
"""
from __future__ import annotations

from typing import Any

import torch

from seqweave.ir.graph import Node, Value
from seqweave.ir.ops.workspace import linear_workspace
from seqweave.ir.ops.base import OpDef, fail
from seqweave.ir.ops.linear_attn_reference import state_dtype
from seqweave.ir.ops.linear_recurrences import RECURRENCES, REFERENCE, Recurrence
from seqweave.ir.types import TensorType, ValueType

LINEAR_KWARGS = ("decay", "scale")


def recurrence_of(kwargs: dict) -> str:
    return kwargs.get("recurrence", "decay")


def decay_tensor(decay: list[float], like: torch.Tensor) -> torch.Tensor | None:
    """The per-head log-decays as a tensor on `like`'s device, in the state dtype (None: no decay)."""
    return torch.tensor(decay, dtype=state_dtype(like.dtype), device=like.device) if decay else None


def _gate(recurrence: Recurrence, decay: list[float], gate: torch.Tensor | None, q: torch.Tensor):
    return gate if recurrence.gate_is_operand else decay_tensor(decay, q)


def scaled_forward(recurrence: Recurrence, q, k, v, gate, decay: list[float], scale: float, state_in=None) -> tuple:
    """(o, final state) with the scores scaled by `scale` (q scaled before)."""
    return recurrence.forward(q * scale if scale != 1.0 else q, k, v, _gate(recurrence, decay, gate, q), state_in)


def scaled_backward(recurrence: Recurrence, do, q, k, v, gate, decay: list[float], scale: float, state_in=None,
                    d_final=None) -> tuple:
    """(dq, dk, dv, d_gate or None, d_state_in or None) of `scaled_forward`."""
    dq, dk, dv, dgate, ds0 = recurrence.backward(do, q * scale if scale != 1.0 else q, k, v,
                                                 _gate(recurrence, decay, gate, q), state_in, d_final)
    return (dq * scale if scale != 1.0 else dq), dk, dv, dgate, ds0


def _tensor(node: Node, value: Any, what: str) -> TensorType:
    if not isinstance(value, Value) or not isinstance(value.type, TensorType):
        raise fail(node, f"{what} must be a tensor value")
    return value.type


def _check_gate(node: Node, q: TensorType, gate: TensorType | None) -> None:
    recurrence = recurrence_of(node.kwargs)
    if recurrence not in RECURRENCES:
        raise fail(node, f"recurrence must be one of {RECURRENCES}; got {recurrence!r}")
    wants = REFERENCE[recurrence].gate_is_operand
    if wants != (gate is not None):
        raise fail(node, f"recurrence={recurrence} takes {'a gate operand' if wants else 'no gate operand'}")
    if gate is None:
        return
    expected = tuple(q.shape) if recurrence == "gla" else tuple(q.shape[:3])
    if tuple(gate.shape) != expected:
        raise fail(node, f"the {recurrence} gate {gate.shape_text()} must have shape {list(expected)}")


def _check(node: Node, q: TensorType, k: TensorType, v: TensorType, gate: TensorType | None) -> None:
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
    _check_gate(node, q, gate)


def _split(node: Node, args: tuple, first: int) -> tuple:
    """(q, k, v, gate or None) types from the op's tensor operands starting at `first`."""
    names = ("q", "k", "v", "gate")
    types = [_tensor(node, arg, name) for arg, name in zip(args[first:], names)]
    return (*types[:3], types[3] if len(types) > 3 else None)


class LinearAttention(OpDef):
    """q: [B, H, N, D], k: [B, H, N, D], v: [B, H, N, Dv] (, gate) -> out: [B, H, N, Dv].

    `attn.linear(q, k, v[, gate], decay=[s_h...], scale=c[, recurrence=gla|delta])`: chunkwise,
    O(N d Dv) time, O(d Dv) state.
    """

    name = "attn.linear"

    def workspace(self, node: Node) -> int:
        return linear_workspace(node)

    def infer(self, node: Node) -> list[ValueType]:
        q, _, v = (arg.type for arg in node.args[:3])
        return [TensorType(q.shape[:3] + v.shape[3:], q.dtype, q.placements)]

    def verify(self, node: Node) -> None:
        if len(node.args) not in (3, 4):
            raise fail(node, "expects (q, k, v) or (q, k, v, gate)")
        _check(node, *_split(node, node.args, 0))

    def reference(self, node: Node, q, k, v, gate=None, **kwargs: Any) -> torch.Tensor:
        recurrence = REFERENCE[recurrence_of(kwargs)]
        return scaled_forward(recurrence, q, k, v, gate, kwargs["decay"], kwargs["scale"])[0]


class LinearAttentionBackward(OpDef):
    """(dout, q, k, v[, gate]) -> dq, dk, dv[, d_gate] with the shapes of q, k, v (, gate)."""

    name = "attn.linear_backward"

    def workspace(self, node: Node) -> int:
        return linear_workspace(node)

    def infer(self, node: Node) -> list[ValueType]:
        return [arg.type for arg in node.args[1:]]

    def verify(self, node: Node) -> None:
        if len(node.args) not in (4, 5):
            raise fail(node, "expects (dout, q, k, v) or (dout, q, k, v, gate)")
        dout = _tensor(node, node.args[0], "dout")
        q, k, v, gate = _split(node, node.args, 1)
        _check(node, q, k, v, gate)
        if tuple(dout.shape) != tuple(q.shape[:3] + v.shape[3:]):
            raise fail(node, f"dout {dout.shape_text()} does not match out of q {q.shape_text()}, v {v.shape_text()}")

    def reference(self, node: Node, dout, q, k, v, gate=None, **kwargs: Any) -> tuple[torch.Tensor, ...]:
        recurrence = REFERENCE[recurrence_of(kwargs)]
        grads = scaled_backward(recurrence, dout, q, k, v, gate, kwargs["decay"], kwargs["scale"])
        return grads[:4] if gate is not None else grads[:3]
