"""The three state recurrences `attn.linear` runs, as (forward, backward) pairs over one run of rows.

    decay  S_t = lambda_h S_{t-1} + k_t^T v_t                         gate: log-decays [H] (constant)
    gla    S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t                   gate: log gates g [B, H, N, D] <= 0
    delta  S_t = (I - beta_t k_t^T k_t) S_{t-1} + beta_t k_t^T v_t    gate: beta [B, H, N]
    o_t = q_t S_t

forward (q, k, v, gate, s0) -> (o, final state); backward (do, q, k, v, gate, s0, d_final)
-> (dq, dk, dv, d_gate or None, d_s0 or None). These are the plain-torch chunked forms
(`linear_attn_reference`, `gated_linear_reference`); codegen swaps in its kernels by name.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from seqweave.ir.ops.gated_linear_reference import delta_rule_chunked, gla_chunked
from seqweave.ir.ops.linear_attn_reference import linear_attention_chunked

RECURRENCES = ("decay", "gla", "delta")


@dataclass(frozen=True)
class Recurrence:
    name: str
    forward: Callable
    backward: Callable
    #: does the gate get a gradient (a tensor operand), or is it the op's constant decay?
    gate_is_operand: bool


def autograd_backward(forward: Callable, gate_gets_grad: bool = True) -> Callable:
    """The backward of a differentiable `forward`, by autograd through it (recomputes the forward).
    Without `gate_gets_grad` the gate is a constant (a decay) and its gradient is None."""
    def backward(do, q, k, v, gate, s0, d_final):
        with torch.enable_grad():
            leaves = [x.detach().requires_grad_() for x in (q, k, v)]
            if gate_gets_grad:
                leaves.append(gate.detach().requires_grad_())
            state = None if s0 is None else s0.detach().requires_grad_()
            o, final = forward(*leaves[:3], leaves[3] if gate_gets_grad else gate, state)
            outputs, grads = [o], [do.to(o.dtype)]
            if d_final is not None:
                outputs.append(final)
                grads.append(d_final.to(final.dtype))
            wrt = leaves + ([state] if state is not None else [])
            found = torch.autograd.grad(outputs, wrt, grads, allow_unused=True)
        found = [torch.zeros_like(x) if g is None else g for g, x in zip(found, wrt)]
        dgate = found[3] if gate_gets_grad else None
        return (*found[:3], dgate, found[len(leaves)] if state is not None else None)
    return backward


REFERENCE = {
    "decay": Recurrence("decay", linear_attention_chunked, autograd_backward(linear_attention_chunked, False),
                        False),
    "gla": Recurrence("gla", gla_chunked, autograd_backward(gla_chunked), True),
    "delta": Recurrence("delta", delta_rule_chunked, autograd_backward(delta_rule_chunked), True),
}
