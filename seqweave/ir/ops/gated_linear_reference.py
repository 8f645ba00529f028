"""Gated linear attention (GLA) and the delta rule (DeltaNet) in plain torch: recurrence and chunked form.

Per batch b and head h, with row vectors q_t, k_t (size D) and v_t (size Dv):

    GLA:        S_t = diag(alpha_t) S_{t-1} + k_t^T v_t,              alpha_t = exp(log_gate_t) in (0, 1]^D
    delta rule: S_t = (I - beta_t k_t^T k_t) S_{t-1} + beta_t k_t^T v_t   (beta_t usually in (0, 1))
    both:       o_t = q_t S_t,   S_{-1} = initial_state (zeros if not given); no softmax, no scale

q, k: [B, H, N, D]; v: [B, H, N, Dv]; log_gate: [B, H, N, D] (<= 0, any float dtype); beta: [B, H, N];
states: [B, H, D, Dv]. Every function returns (o in the input dtype, final state S_{N-1} in fp32,
fp64 for fp64), exactly like `linear_attn_reference`, so segments chain through the state.

`*_recurrent` are the independent references (tests run them in fp64). `*_chunked` are the CPU
paths: O(N d^2) torch ops, differentiable by autograd, accumulating in fp32 (fp64 for fp64),
never more than a chunk x chunk score tile:

- GLA: with G the cumulative log gate from the chunk start, the chunk's scores are
  A[i, j] = sum_d q_id k_jd exp(G_id - G_jd) for i >= j. Factoring that as (q e^G)(k e^-G)^T
  overflows (e^-G grows with the chunk), so rows are built in sub-chunks (GLA paper, secondary
  chunking): columns before the sub-chunk factor through the gate just before it (both factors
  are exp of something <= 0); the sub-chunk's own diagonal tile is summed over d explicitly.
- delta rule: the WY / UT form (DeltaNet paper). With T = (I + tril(diag(beta) K K^T, -1))^-1 diag(beta),
  W = T K and U = T V, the chunk's "new values" are U - W S, o = Q S + tril(Q K^T)(U - W S)
  and S <- S + K^T (U - W S). T is applied by a unit-triangular solve, never formed.
"""
from __future__ import annotations

import torch

from seqweave.ir.ops.linear_attn_reference import check_linear_attention_inputs, start_state, state_dtype

DEFAULT_CHUNK = 64
SUB_CHUNK = 16  # GLA's diagonal tiles are SUB_CHUNK^2 x D; columns before them factor through one gate
GLA_PREFIX = "gated linear attention"
DELTA_PREFIX = "delta rule"


def _fail(prefix: str, message: str, hint: str) -> ValueError:
    return ValueError(f"{prefix}: {message}\n  what to do: {hint}")


def check_gla_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_gate: torch.Tensor,
                     initial_state: torch.Tensor | None) -> None:
    """Raise ValueError naming the problem when the operands do not fit GLA's contract."""
    check_linear_attention_inputs(q, k, v, None, initial_state)
    if log_gate.shape != q.shape or not log_gate.is_floating_point():
        raise _fail(GLA_PREFIX, f"log_gate must be a float tensor shaped like q {tuple(q.shape)} "
                    f"[B, H, N, D]; got {log_gate.dtype} {tuple(log_gate.shape)}",
                    "pass one log forget gate per token and key channel, e.g. F.logsigmoid(x)")
    if log_gate.device != q.device:
        raise _fail(GLA_PREFIX, f"log_gate is on {log_gate.device} but q is on {q.device}",
                    "move log_gate to q's device")
    # -inf (a gate of exactly 0) would turn the differences of cumulative gates into inf - inf
    if bool((log_gate > 0).any()) or not bool(torch.isfinite(log_gate).all()):
        raise _fail(GLA_PREFIX, "log_gate must be finite and <= 0 (it is log alpha, 0 < alpha <= 1)",
                    "pass F.logsigmoid(x), clamped from below (e.g. .clamp(min=-20)) if it can be -inf")


def check_delta_rule_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
                            initial_state: torch.Tensor | None) -> None:
    """Raise ValueError naming the problem when the operands do not fit the delta rule's contract."""
    check_linear_attention_inputs(q, k, v, None, initial_state)
    if beta.shape != q.shape[:3] or not beta.is_floating_point():
        raise _fail(DELTA_PREFIX, f"beta must be a float tensor [B, H, N] = {tuple(q.shape[:3])}; got "
                    f"{beta.dtype} {tuple(beta.shape)}", "pass one writing strength per token, e.g. x.sigmoid()")
    if beta.device != q.device:
        raise _fail(DELTA_PREFIX, f"beta is on {beta.device} but q is on {q.device}", "move beta to q's device")


def _check_chunk(prefix: str, chunk: int) -> None:
    if chunk < 1:
        raise _fail(prefix, f"chunk must be a positive number of tokens; got {chunk}", f"use e.g. {DEFAULT_CHUNK}")


def _stack_outputs(outputs: list[torch.Tensor], v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.cat(outputs, dim=2) if outputs else v.new_zeros(v.shape, dtype=dtype)


def gla_recurrent(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_gate: torch.Tensor,
                  initial_state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """GLA one token at a time in the input dtype: the independent reference (and "plain PyTorch
    at the same precision" for kernel tolerances)."""
    check_gla_inputs(q, k, v, log_gate, initial_state)
    alpha = torch.exp(log_gate.to(q.dtype))
    state = start_state(q, v, initial_state, q.dtype)
    outputs = []
    for t in range(q.shape[2]):
        state = alpha[:, :, t, :, None] * state + k[:, :, t, :, None] * v[:, :, t, None, :]
        outputs.append(q[:, :, t, None, :] @ state)
    return _stack_outputs(outputs, v, q.dtype), state.to(state_dtype(q.dtype))


def delta_rule_recurrent(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
                         initial_state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The delta rule one token at a time in the input dtype: the independent reference.

    Written as S <- S + beta k^T (v - k S): the state is corrected towards v where it is read at k.
    """
    check_delta_rule_inputs(q, k, v, beta, initial_state)
    beta = beta.to(q.dtype)
    state = start_state(q, v, initial_state, q.dtype)
    outputs = []
    for t in range(q.shape[2]):
        k_t = k[:, :, t, None, :]
        error = v[:, :, t, None, :] - k_t @ state
        state = state + beta[:, :, t, None, None] * k_t.transpose(-1, -2) @ error
        outputs.append(q[:, :, t, None, :] @ state)
    return _stack_outputs(outputs, v, q.dtype), state.to(state_dtype(q.dtype))


def _gla_diagonal_tile(q: torch.Tensor, k: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """Scores of a sub-chunk against itself: sum_d q_id k_jd exp(G_id - G_jd) for i >= j, else 0.

    The difference is masked before exp: for i < j it is positive and could overflow.
    """
    n = q.shape[2]
    causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()[:, :, None]
    diff = gates[:, :, :, None, :] - gates[:, :, None, :, :]
    decay = torch.exp(torch.where(causal, diff, 0.0)) * causal
    return (q[:, :, :, None, :] * k[:, :, None, :, :] * decay).sum(-1)


def _gla_chunk_scores(q: torch.Tensor, k: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """A[i, j] = sum_d q_id k_jd exp(G_id - G_jd) (i >= j) for one chunk, built SUB_CHUNK rows at a time.

    For rows from `start` on and columns before it, exp(G_i - G_j) = exp(G_i - G_r) exp(G_r - G_j)
    with r = start - 1: both exponents are <= 0 because the cumulative log gate only falls.
    """
    n = q.shape[2]
    rows = []
    for start in range(0, n, SUB_CHUNK):
        stop = min(start + SUB_CHUNK, n)
        q_rows, g_rows = q[:, :, start:stop], gates[:, :, start:stop]
        parts = []
        if start > 0:
            ref = gates[:, :, start - 1:start]
            earlier = k[:, :, :start] * torch.exp(ref - gates[:, :, :start])
            parts.append((q_rows * torch.exp(g_rows - ref)) @ earlier.transpose(-1, -2))
        parts.append(_gla_diagonal_tile(q_rows, k[:, :, start:stop], g_rows))
        parts.append(q.new_zeros((*q.shape[:2], stop - start, n - stop)))
        rows.append(torch.cat(parts, dim=-1))
    return torch.cat(rows, dim=2)


def gla_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_gate: torch.Tensor,
                initial_state: torch.Tensor | None = None,
                chunk: int = DEFAULT_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked GLA in torch ops, differentiable by autograd (also w.r.t. log_gate).

    Per chunk, with G the cumulative log gate from the chunk start (G_last at its last token):
    o = A V + (Q e^G) S and S <- diag(e^G_last) S + (K e^(G_last - G))^T V; A from `_gla_chunk_scores`.
    """
    check_gla_inputs(q, k, v, log_gate, initial_state)
    _check_chunk(GLA_PREFIX, chunk)
    acc = state_dtype(q.dtype)
    state = start_state(q, v, initial_state, acc)
    outputs = []
    for start in range(0, q.shape[2], chunk):
        qc, kc, vc, gc = (x[:, :, start:start + chunk].to(acc) for x in (q, k, v, log_gate))
        gates = gc.cumsum(2)
        last = gates[:, :, -1:]
        outputs.append(_gla_chunk_scores(qc, kc, gates) @ vc + (qc * torch.exp(gates)) @ state)
        state = torch.exp(last).transpose(-1, -2) * state + (kc * torch.exp(last - gates)).transpose(-1, -2) @ vc
    return _stack_outputs(outputs, v, acc).to(q.dtype), state


def _wy_factors(k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W = T K and U = T V for one chunk, T = (I + tril(diag(beta) K K^T, -1))^-1 diag(beta).

    (I + strictly lower) is unit lower triangular, so a triangular solve applies its inverse.
    """
    n = k.shape[2]
    strict = torch.ones(n, n, dtype=torch.bool, device=k.device).tril(-1)
    lower = torch.eye(n, dtype=k.dtype, device=k.device) + (beta * (k @ k.transpose(-1, -2))) * strict
    solve = lambda rhs: torch.linalg.solve_triangular(lower, beta * rhs, upper=False,  # noqa: E731
                                                      unitriangular=True)
    return solve(k), solve(v)


def delta_rule_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
                       initial_state: torch.Tensor | None = None,
                       chunk: int = DEFAULT_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked delta rule (WY / UT form) in torch ops, differentiable by autograd (also w.r.t. beta).

    Per chunk: new = U - W S, o = Q S + tril(Q K^T) new, S <- S + K^T new.
    """
    check_delta_rule_inputs(q, k, v, beta, initial_state)
    _check_chunk(DELTA_PREFIX, chunk)
    acc = state_dtype(q.dtype)
    state = start_state(q, v, initial_state, acc)
    outputs = []
    for start in range(0, q.shape[2], chunk):
        qc, kc, vc = (x[:, :, start:start + chunk].to(acc) for x in (q, k, v))
        w, u = _wy_factors(kc, vc, beta[:, :, start:start + chunk, None].to(acc))
        new = u - w @ state
        outputs.append(qc @ state + (qc @ kc.transpose(-1, -2)).tril() @ new)
        state = state + kc.transpose(-1, -2) @ new
    return _stack_outputs(outputs, v, acc).to(q.dtype), state
