"""Chunked gated linear attention (GLA) and delta rule (DeltaNet) in Triton.

Semantics are those of `seqweave.ir.ops.gated_linear_reference`:
GLA S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t, delta rule S_t = (I - beta_t k_t^T k_t) S_{t-1} + beta_t k_t^T v_t,
o_t = q_t S_t. As in `linear_attention.py`, one program per (batch * head, block of Dv columns) walks
the sequence in chunks of CHUNK tokens carrying its [BLOCK_D, BLOCK_DV] slice of the state in fp32;
the last chunk uses its true length, so any N is exact.

GLA. With G the cumulative log gate from the chunk start: o = A V + (Q e^G) S and
S <- diag(e^G_last) S + (K e^(G_last - G))^T V, where A[i, j] = sum_d q_id k_jd e^(G_id - G_jd) (i >= j)
is summed over d on a [CHUNK, CHUNK, BLOCK_D] tile: no factorisation through e^-G, which overflows
(the price: that tile is CHUNK^2 D registers, hence chunks of 16). Backward: `_gla_dq_kernel` walks
forward re-building S (and writes S_N), `_gla_dkv_kernel` walks backward carrying dS. The gate's
gradient needs no kernel: with q~ = q e^G, k~ = k e^-G, dG_t = q_t dq_t - k_t dk_t, plus
rowsum(dS_N * S_N) at the last token, and dg is the reverse cumulative sum of dG over the sequence.

Delta rule. Per chunk (WY / UT form): T = (I + tril(diag(beta) K K^T, -1))^-1 diag(beta) by forward
substitution on CHUNK rows, W = T K, U = T V, new = U - W S, o = Q S + tril(Q K^T) new,
S <- S + K^T new. Its backward is NOT a Triton kernel: `delta_rule_backward` recomputes the chunked
torch reference (fp32) under autograd, which is exact but runs at torch speed with its memory.

Kernel bodies are plain functions, decorated on first use by `_kernels(interpret)` (see `jit.py`).
Dots with the fp32 state keep it in fp32 ("ieee" for fp32 inputs, tf32 otherwise).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from seqweave.codegen.triton.jit import jit_decorator, use_triton
from seqweave.codegen.triton.linear_attention import DEFAULT_BLOCK_DV, GPU_WARPS, KERNEL_DTYPES, MAX_HEAD_DIM
from seqweave.codegen.triton.specs import MIN_DOT_DIM, next_power_of_two
from seqweave.ir.ops.gated_linear_reference import (DELTA_PREFIX, GLA_PREFIX, check_delta_rule_inputs,
                                                    check_gla_inputs, delta_rule_chunked, gla_chunked)

try:
    import triton
    import triton.language as tl
except ImportError:  # kernels are only built when triton is present; see `_require_triton`
    triton = tl = None

DEFAULT_CHUNK = 16  # GLA's [CHUNK, CHUNK, D] gate tile and the delta rule's CHUNK-step substitution
MAX_CHUNK = 64


def _gate_tile(gates, causal):
    """exp(G_i - G_j) for i >= j, else 0, as [CHUNK, CHUNK, BLOCK_D]; masked before exp (i < j overflows)."""
    diff = gates[:, None, :] - gates[None, :, :]
    return tl.where(causal[:, :, None], tl.exp(tl.where(causal[:, :, None], diff, 0.0)), 0.0)


def _last_row(x, offs_c, length):
    """Row `length - 1` of a [CHUNK, BLOCK] tile, as a [BLOCK] vector (registers cannot be indexed)."""
    return tl.sum(tl.where(offs_c[:, None] == length - 1, x, 0.0), axis=0)


def _gla_forward_kernel(Q, K, V, G, S0, O, SN,
                        stride_qb, stride_qh, stride_qn, stride_qd,
                        stride_kb, stride_kh, stride_kn, stride_kd,
                        stride_vb, stride_vh, stride_vn, stride_ve,
                        stride_gb, stride_gh, stride_gn, stride_gd,
                        stride_ob, stride_oh, stride_on, stride_oe,
                        stride_sb, stride_sh, stride_sd, stride_se,
                        H, N, D, DV,
                        HAS_INITIAL_STATE: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr):
    """o and the final state for one (b, h, Dv block); S0 and SN share the strides stride_s*."""
    off_b, off_h = (tl.program_id(0) // H).to(tl.int64), (tl.program_id(0) % H).to(tl.int64)
    offs_c, offs_d = tl.arange(0, CHUNK), tl.arange(0, BLOCK_D)
    offs_e = tl.program_id(1) * BLOCK_DV + tl.arange(0, BLOCK_DV)
    q_ptrs = Q + off_b * stride_qb + off_h * stride_qh + offs_c[:, None] * stride_qn + offs_d[None, :] * stride_qd
    k_ptrs = K + off_b * stride_kb + off_h * stride_kh + offs_c[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_ptrs = V + off_b * stride_vb + off_h * stride_vh + offs_c[:, None] * stride_vn + offs_e[None, :] * stride_ve
    g_ptrs = G + off_b * stride_gb + off_h * stride_gh + offs_c[:, None] * stride_gn + offs_d[None, :] * stride_gd
    o_ptrs = O + off_b * stride_ob + off_h * stride_oh + offs_c[:, None] * stride_on + offs_e[None, :] * stride_oe
    s_offs = off_b * stride_sb + off_h * stride_sh + offs_d[:, None] * stride_sd + offs_e[None, :] * stride_se
    s_mask = (offs_d[:, None] < D) & (offs_e[None, :] < DV)
    causal = offs_c[:, None] >= offs_c[None, :]
    if HAS_INITIAL_STATE:
        state = tl.load(S0 + s_offs, mask=s_mask, other=0.0).to(tl.float32)
    else:
        state = tl.zeros([BLOCK_D, BLOCK_DV], dtype=tl.float32)
    for start in range(0, N, CHUNK):
        length = tl.minimum(N - start, CHUNK)
        row_ok = offs_c < length
        qk_mask, v_mask = row_ok[:, None] & (offs_d[None, :] < D), row_ok[:, None] & (offs_e[None, :] < DV)
        q = tl.load(q_ptrs, mask=qk_mask, other=0.0)
        k = tl.load(k_ptrs, mask=qk_mask, other=0.0)
        v = tl.load(v_ptrs, mask=v_mask, other=0.0)
        # padded rows get gate 0, so their cumulative gate stays at G_last and e^(G_last - G) = 1 on zero k
        gates = tl.cumsum(tl.load(g_ptrs, mask=qk_mask, other=0.0).to(tl.float32), axis=0)
        g_last = _last_row(gates, offs_c, length)
        qf, kf = q.to(tl.float32), k.to(tl.float32)
        scores = tl.sum(qf[:, None, :] * kf[None, :, :] * _gate_tile(gates, causal), axis=2)
        out = tl.dot(scores.to(v.dtype), v, input_precision=PRECISION)
        out += tl.dot(qf * tl.exp(gates), state, input_precision=PRECISION)
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=v_mask)
        k_scaled = (kf * tl.exp(g_last[None, :] - gates)).to(k.dtype)
        state = tl.exp(g_last)[:, None] * state + tl.dot(tl.trans(k_scaled), v, input_precision=PRECISION)
        q_ptrs, k_ptrs, g_ptrs = q_ptrs + CHUNK * stride_qn, k_ptrs + CHUNK * stride_kn, g_ptrs + CHUNK * stride_gn
        v_ptrs, o_ptrs = v_ptrs + CHUNK * stride_vn, o_ptrs + CHUNK * stride_on
    tl.store(SN + s_offs, state, mask=s_mask)


def _gla_dq_kernel(K, V, G, DO, S0, DQ, SN,
                   stride_kb, stride_kh, stride_kn, stride_kd,
                   stride_vb, stride_vh, stride_vn, stride_ve,
                   stride_gb, stride_gh, stride_gn, stride_gd,
                   stride_dob, stride_doh, stride_don, stride_doe,
                   stride_dqp, stride_dqb, stride_dqh, stride_dqn, stride_dqd,
                   stride_sb, stride_sh, stride_sd, stride_se,
                   H, N, D, DV,
                   HAS_INITIAL_STATE: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr):
    """This Dv block's fp32 share of dq, walking forward, and the final state (the gate's gradient needs it).

    dq_i = sum_{j <= i} (do_i . v_j) k_j e^(G_i - G_j) + e^G_i (do_i S_prev^T).
    """
    off_b, off_h = (tl.program_id(0) // H).to(tl.int64), (tl.program_id(0) % H).to(tl.int64)
    off_p = tl.program_id(1).to(tl.int64)
    offs_c, offs_d = tl.arange(0, CHUNK), tl.arange(0, BLOCK_D)
    offs_e = tl.program_id(1) * BLOCK_DV + tl.arange(0, BLOCK_DV)
    k_ptrs = K + off_b * stride_kb + off_h * stride_kh + offs_c[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_ptrs = V + off_b * stride_vb + off_h * stride_vh + offs_c[:, None] * stride_vn + offs_e[None, :] * stride_ve
    g_ptrs = G + off_b * stride_gb + off_h * stride_gh + offs_c[:, None] * stride_gn + offs_d[None, :] * stride_gd
    do_ptrs = DO + off_b * stride_dob + off_h * stride_doh + offs_c[:, None] * stride_don + offs_e[None, :] * stride_doe
    dq_ptrs = (DQ + off_p * stride_dqp + off_b * stride_dqb + off_h * stride_dqh
               + offs_c[:, None] * stride_dqn + offs_d[None, :] * stride_dqd)
    s_offs = off_b * stride_sb + off_h * stride_sh + offs_d[:, None] * stride_sd + offs_e[None, :] * stride_se
    s_mask = (offs_d[:, None] < D) & (offs_e[None, :] < DV)
    causal = offs_c[:, None] >= offs_c[None, :]
    if HAS_INITIAL_STATE:
        state = tl.load(S0 + s_offs, mask=s_mask, other=0.0).to(tl.float32)
    else:
        state = tl.zeros([BLOCK_D, BLOCK_DV], dtype=tl.float32)
    for start in range(0, N, CHUNK):
        length = tl.minimum(N - start, CHUNK)
        row_ok = offs_c < length
        k_mask, v_mask = row_ok[:, None] & (offs_d[None, :] < D), row_ok[:, None] & (offs_e[None, :] < DV)
        k = tl.load(k_ptrs, mask=k_mask, other=0.0)
        v = tl.load(v_ptrs, mask=v_mask, other=0.0)
        do = tl.load(do_ptrs, mask=v_mask, other=0.0)
        gates = tl.cumsum(tl.load(g_ptrs, mask=k_mask, other=0.0).to(tl.float32), axis=0)
        g_last = _last_row(gates, offs_c, length)
        kf = k.to(tl.float32)
        d_scores = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        dq = tl.sum(d_scores[:, :, None] * kf[None, :, :] * _gate_tile(gates, causal), axis=1)
        dq += tl.dot(do.to(tl.float32), tl.trans(state), input_precision=PRECISION) * tl.exp(gates)
        tl.store(dq_ptrs, dq, mask=k_mask)
        k_scaled = (kf * tl.exp(g_last[None, :] - gates)).to(k.dtype)
        state = tl.exp(g_last)[:, None] * state + tl.dot(tl.trans(k_scaled), v, input_precision=PRECISION)
        k_ptrs, v_ptrs, g_ptrs = k_ptrs + CHUNK * stride_kn, v_ptrs + CHUNK * stride_vn, g_ptrs + CHUNK * stride_gn
        do_ptrs, dq_ptrs = do_ptrs + CHUNK * stride_don, dq_ptrs + CHUNK * stride_dqn
    tl.store(SN + s_offs, state, mask=s_mask)


def _gla_dkv_kernel(Q, K, V, G, DO, DSN, DS0, DK, DVOUT,
                    stride_qb, stride_qh, stride_qn, stride_qd,
                    stride_kb, stride_kh, stride_kn, stride_kd,
                    stride_vb, stride_vh, stride_vn, stride_ve,
                    stride_gb, stride_gh, stride_gn, stride_gd,
                    stride_dob, stride_doh, stride_don, stride_doe,
                    stride_dkp, stride_dkb, stride_dkh, stride_dkn, stride_dkd,
                    stride_dvb, stride_dvh, stride_dvn, stride_dve,
                    stride_sb, stride_sh, stride_sd, stride_se,
                    H, N, D, DV,
                    HAS_FINAL_GRAD: tl.constexpr, HAS_INITIAL_STATE: tl.constexpr, CHUNK: tl.constexpr,
                    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr):
    """dv, this Dv block's fp32 share of dk, and d_initial_state, walking backward carrying dS.

    dS is the gradient w.r.t. the state at the end of the current chunk (d_final_state for the last):
    dv_j = sum_{i >= j} A_ij do_i + (k_j e^(G_last - G_j)) dS,
    dk_j = sum_{i >= j} (do_i . v_j) q_i e^(G_i - G_j) + e^(G_last - G_j) (v_j dS^T),
    and dS <- diag(e^G_last) dS + (Q e^G)^T dO is the gradient w.r.t. the previous state.
    """
    off_b, off_h = (tl.program_id(0) // H).to(tl.int64), (tl.program_id(0) % H).to(tl.int64)
    off_p = tl.program_id(1).to(tl.int64)
    offs_c, offs_d = tl.arange(0, CHUNK), tl.arange(0, BLOCK_D)
    offs_e = tl.program_id(1) * BLOCK_DV + tl.arange(0, BLOCK_DV)
    num_chunks = tl.cdiv(N, CHUNK)
    rows = ((num_chunks - 1) * CHUNK + offs_c).to(tl.int64)[:, None]  # the last chunk's rows: walk backward
    q_ptrs = Q + off_b * stride_qb + off_h * stride_qh + rows * stride_qn + offs_d[None, :] * stride_qd
    k_ptrs = K + off_b * stride_kb + off_h * stride_kh + rows * stride_kn + offs_d[None, :] * stride_kd
    v_ptrs = V + off_b * stride_vb + off_h * stride_vh + rows * stride_vn + offs_e[None, :] * stride_ve
    g_ptrs = G + off_b * stride_gb + off_h * stride_gh + rows * stride_gn + offs_d[None, :] * stride_gd
    do_ptrs = DO + off_b * stride_dob + off_h * stride_doh + rows * stride_don + offs_e[None, :] * stride_doe
    dk_ptrs = (DK + off_p * stride_dkp + off_b * stride_dkb + off_h * stride_dkh
               + rows * stride_dkn + offs_d[None, :] * stride_dkd)
    dv_ptrs = DVOUT + off_b * stride_dvb + off_h * stride_dvh + rows * stride_dvn + offs_e[None, :] * stride_dve
    s_offs = off_b * stride_sb + off_h * stride_sh + offs_d[:, None] * stride_sd + offs_e[None, :] * stride_se
    s_mask = (offs_d[:, None] < D) & (offs_e[None, :] < DV)
    causal = offs_c[:, None] >= offs_c[None, :]
    if HAS_FINAL_GRAD:
        d_state = tl.load(DSN + s_offs, mask=s_mask, other=0.0).to(tl.float32)
    else:
        d_state = tl.zeros([BLOCK_D, BLOCK_DV], dtype=tl.float32)
    for i in range(num_chunks):
        start = (num_chunks - 1 - i) * CHUNK
        length = tl.minimum(N - start, CHUNK)
        row_ok = offs_c < length
        qk_mask, v_mask = row_ok[:, None] & (offs_d[None, :] < D), row_ok[:, None] & (offs_e[None, :] < DV)
        q = tl.load(q_ptrs, mask=qk_mask, other=0.0)
        k = tl.load(k_ptrs, mask=qk_mask, other=0.0)
        v = tl.load(v_ptrs, mask=v_mask, other=0.0)
        do = tl.load(do_ptrs, mask=v_mask, other=0.0)
        gates = tl.cumsum(tl.load(g_ptrs, mask=qk_mask, other=0.0).to(tl.float32), axis=0)
        g_last = _last_row(gates, offs_c, length)
        qf, kf = q.to(tl.float32), k.to(tl.float32)
        tile = _gate_tile(gates, causal)
        k_decay = tl.exp(g_last[None, :] - gates)
        scores = tl.sum(qf[:, None, :] * kf[None, :, :] * tile, axis=2)
        dv = tl.dot(tl.trans(scores).to(do.dtype), do, input_precision=PRECISION)
        dv += tl.dot(kf * k_decay, d_state, input_precision=PRECISION)
        tl.store(dv_ptrs, dv.to(DVOUT.dtype.element_ty), mask=v_mask)
        d_scores = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        dk = tl.sum(d_scores[:, :, None] * qf[:, None, :] * tile, axis=0)
        dk += tl.dot(v.to(tl.float32), tl.trans(d_state), input_precision=PRECISION) * k_decay
        tl.store(dk_ptrs, dk, mask=qk_mask)
        q_scaled = (qf * tl.exp(gates)).to(q.dtype)
        d_state = tl.exp(g_last)[:, None] * d_state + tl.dot(tl.trans(q_scaled), do, input_precision=PRECISION)
        q_ptrs, k_ptrs, g_ptrs = q_ptrs - CHUNK * stride_qn, k_ptrs - CHUNK * stride_kn, g_ptrs - CHUNK * stride_gn
        v_ptrs, do_ptrs = v_ptrs - CHUNK * stride_vn, do_ptrs - CHUNK * stride_don
        dk_ptrs, dv_ptrs = dk_ptrs - CHUNK * stride_dkn, dv_ptrs - CHUNK * stride_dvn
    if HAS_INITIAL_STATE:
        tl.store(DS0 + s_offs, d_state, mask=s_mask)


def _unit_lower_inverse(lower, offs_c, CHUNK: tl.constexpr):
    """(I + lower)^-1 for a strictly lower [CHUNK, CHUNK] tile, by forward substitution on rows:
    X_i = e_i - sum_{j < i} lower_ij X_j (rows i.. are still e_i, and lower_ij = 0 for j >= i)."""
    eye = offs_c[:, None] == offs_c[None, :]
    inverse = tl.where(eye, 1.0, 0.0)
    for i in range(1, CHUNK):
        row = tl.sum(tl.where(offs_c[:, None] == i, lower, 0.0), axis=0)
        solved = tl.where(offs_c == i, 1.0, 0.0) - tl.sum(row[:, None] * inverse, axis=0)
        inverse = tl.where(offs_c[:, None] == i, solved[None, :], inverse)
    return inverse


def _delta_forward_kernel(Q, K, V, BETA, S0, O, SN,
                          stride_qb, stride_qh, stride_qn, stride_qd,
                          stride_kb, stride_kh, stride_kn, stride_kd,
                          stride_vb, stride_vh, stride_vn, stride_ve,
                          stride_bb, stride_bh, stride_bn,
                          stride_ob, stride_oh, stride_on, stride_oe,
                          stride_sb, stride_sh, stride_sd, stride_se,
                          H, N, D, DV,
                          HAS_INITIAL_STATE: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr,
                          BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr):
    """o and the final state for one (b, h, Dv block). W needs all of D, so D is never split; each
    Dv block re-derives T for its chunk (T does not depend on v)."""
    off_b, off_h = (tl.program_id(0) // H).to(tl.int64), (tl.program_id(0) % H).to(tl.int64)
    offs_c, offs_d = tl.arange(0, CHUNK), tl.arange(0, BLOCK_D)
    offs_e = tl.program_id(1) * BLOCK_DV + tl.arange(0, BLOCK_DV)
    q_ptrs = Q + off_b * stride_qb + off_h * stride_qh + offs_c[:, None] * stride_qn + offs_d[None, :] * stride_qd
    k_ptrs = K + off_b * stride_kb + off_h * stride_kh + offs_c[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_ptrs = V + off_b * stride_vb + off_h * stride_vh + offs_c[:, None] * stride_vn + offs_e[None, :] * stride_ve
    b_ptrs = BETA + off_b * stride_bb + off_h * stride_bh + offs_c * stride_bn
    o_ptrs = O + off_b * stride_ob + off_h * stride_oh + offs_c[:, None] * stride_on + offs_e[None, :] * stride_oe
    s_offs = off_b * stride_sb + off_h * stride_sh + offs_d[:, None] * stride_sd + offs_e[None, :] * stride_se
    s_mask = (offs_d[:, None] < D) & (offs_e[None, :] < DV)
    causal = offs_c[:, None] >= offs_c[None, :]
    strict = offs_c[:, None] > offs_c[None, :]
    if HAS_INITIAL_STATE:
        state = tl.load(S0 + s_offs, mask=s_mask, other=0.0).to(tl.float32)
    else:
        state = tl.zeros([BLOCK_D, BLOCK_DV], dtype=tl.float32)
    for start in range(0, N, CHUNK):
        length = tl.minimum(N - start, CHUNK)
        row_ok = offs_c < length
        qk_mask, v_mask = row_ok[:, None] & (offs_d[None, :] < D), row_ok[:, None] & (offs_e[None, :] < DV)
        q = tl.load(q_ptrs, mask=qk_mask, other=0.0)
        k = tl.load(k_ptrs, mask=qk_mask, other=0.0)
        v = tl.load(v_ptrs, mask=v_mask, other=0.0)
        # padded rows get beta 0: their rows and columns of T vanish, so they write nothing
        beta = tl.load(b_ptrs, mask=row_ok, other=0.0).to(tl.float32)
        lower = tl.where(strict, tl.dot(k, tl.trans(k), input_precision=PRECISION) * beta[:, None], 0.0)
        transform = _unit_lower_inverse(lower, offs_c, CHUNK) * beta[None, :]
        w = tl.dot(transform, k.to(tl.float32), input_precision=PRECISION)
        new = tl.dot(transform, v.to(tl.float32), input_precision=PRECISION)
        new -= tl.dot(w, state, input_precision=PRECISION)
        scores = tl.where(causal, tl.dot(q, tl.trans(k), input_precision=PRECISION), 0.0)
        out = tl.dot(q.to(tl.float32), state, input_precision=PRECISION)
        out += tl.dot(scores, new, input_precision=PRECISION)
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=v_mask)
        state += tl.dot(tl.trans(k.to(tl.float32)), new, input_precision=PRECISION)
        q_ptrs, k_ptrs, b_ptrs = q_ptrs + CHUNK * stride_qn, k_ptrs + CHUNK * stride_kn, b_ptrs + CHUNK * stride_bn
        v_ptrs, o_ptrs = v_ptrs + CHUNK * stride_vn, o_ptrs + CHUNK * stride_on
    tl.store(SN + s_offs, state, mask=s_mask)


_HELPERS = {"_gate_tile": _gate_tile, "_last_row": _last_row, "_unit_lower_inverse": _unit_lower_inverse}


@functools.cache
def _kernels(interpret: bool) -> SimpleNamespace:
    """The kernels, decorated for the GPU or for the interpreter (built once per mode).

    A kernel finds the helpers it calls by name in this module's globals, and Triton only calls
    jitted helpers: so the plain helpers in `_HELPERS` are jitted into the globals first.
    """
    jit = jit_decorator(interpret)
    globals().update({name: jit(body) for name, body in _HELPERS.items()})
    return SimpleNamespace(gla_forward=jit(_gla_forward_kernel), gla_dq=jit(_gla_dq_kernel),
                           gla_dkv=jit(_gla_dkv_kernel), delta_forward=jit(_delta_forward_kernel))


@dataclass(frozen=True)
class _Launch:
    """Block sizes and dot precision for one call; dims are padded to powers of two >= 16."""
    chunk: int
    block_d: int
    block_dv: int
    precision: str
    num_warps: int

    def grid(self, batch: int, heads: int, dv: int) -> tuple[int, int]:
        return batch * heads, triton.cdiv(dv, self.block_dv)

    def constants(self) -> dict:
        return dict(CHUNK=self.chunk, BLOCK_D=self.block_d, BLOCK_DV=self.block_dv,
                    PRECISION=self.precision, num_warps=self.num_warps)


def _fail(prefix: str, message: str, hint: str) -> ValueError:
    return ValueError(f"{prefix} (triton): {message}\n  what to do: {hint}")


def _require_triton(prefix: str) -> None:
    if tl is None:
        raise RuntimeError(f"{prefix}: the Triton kernels need the `triton` package, which is not installed\n"
                           "  what to do: install triton, or call `gla` / `delta_rule` (they fall back to the "
                           "torch reference)")


def _launch_config(prefix: str, q: torch.Tensor, v: torch.Tensor, chunk: int | None,
                   block_dv: int | None) -> _Launch:
    """Check what the kernels support and pick block sizes."""
    if q.dtype not in KERNEL_DTYPES:
        raise _fail(prefix, f"the kernels take fp32, fp16 or bf16 inputs; got {q.dtype}",
                    "use the *_chunked torch reference for other dtypes (gla / delta_rule route float64 there)")
    chunk = DEFAULT_CHUNK if chunk is None else chunk
    if chunk < MIN_DOT_DIM or chunk > MAX_CHUNK or chunk & (chunk - 1):
        raise _fail(prefix, f"chunk must be a power of two in [{MIN_DOT_DIM}, {MAX_CHUNK}]; got {chunk}",
                    f"pass chunk={DEFAULT_CHUNK} (or None)")
    if q.shape[3] > MAX_HEAD_DIM:
        raise _fail(prefix, f"head dim D={q.shape[3]} is above the supported {MAX_HEAD_DIM}",
                    "split the heads, or use the *_chunked torch reference")
    block_dv = min(DEFAULT_BLOCK_DV, next_power_of_two(v.shape[3])) if block_dv is None else block_dv
    if block_dv < MIN_DOT_DIM or block_dv & (block_dv - 1):
        raise _fail(prefix, f"block_dv must be a power of two >= {MIN_DOT_DIM}; got {block_dv}",
                    "pass block_dv=None")
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    num_warps = GPU_WARPS if q.is_cuda else 1
    return _Launch(chunk, next_power_of_two(q.shape[3]), block_dv, precision, num_warps)


def _state_operand(state: torch.Tensor | None) -> torch.Tensor | None:
    return None if state is None else state.detach().to(torch.float32).contiguous()


def _check_grads(prefix: str, do: torch.Tensor, v: torch.Tensor, d_final_state: torch.Tensor | None,
                 state_shape: tuple[int, ...]) -> None:
    if do.shape != v.shape or do.device != v.device or do.dtype != v.dtype:
        raise _fail(prefix, f"d_o ({do.dtype} {tuple(do.shape)} on {do.device}) must match v ({v.dtype} "
                    f"{tuple(v.shape)} on {v.device})", "pass the gradient of the output o, in o's dtype")
    if d_final_state is not None and tuple(d_final_state.shape) != state_shape:
        raise _fail(prefix, f"d_final_state {tuple(d_final_state.shape)} must be [B, H, D, Dv] = {state_shape}",
                    "pass the gradient of final_state, or None")


def gla_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_gate: torch.Tensor,
                initial_state: torch.Tensor | None = None, *, chunk: int | None = None,
                block_dv: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(o [B, H, N, Dv] in the input dtype, final state [B, H, D, Dv] in fp32) from the GLA kernel.

    Runs on the GPU for CUDA tensors and under Triton's interpreter for CPU tensors.
    """
    _require_triton(GLA_PREFIX)
    check_gla_inputs(q, k, v, log_gate, initial_state)
    launch = _launch_config(GLA_PREFIX, q, v, chunk, block_dv)
    (batch, heads, n, d), dv = q.shape, v.shape[3]
    o = v.new_empty(v.shape)
    final = q.new_empty((batch, heads, d, dv), dtype=torch.float32)
    s0 = _state_operand(initial_state)
    _kernels(not q.is_cuda).gla_forward[launch.grid(batch, heads, dv)](
        q, k, v, log_gate, final if s0 is None else s0, o, final,
        *q.stride(), *k.stride(), *v.stride(), *log_gate.stride(), *o.stride(), *final.stride(), heads, n, d, dv,
        HAS_INITIAL_STATE=s0 is not None, **launch.constants())
    return o, final


def _gate_gradient(q: torch.Tensor, k: torch.Tensor, dq: torch.Tensor, dk: torch.Tensor,
                   final: torch.Tensor, d_final_state: torch.Tensor | None) -> torch.Tensor:
    """d log_gate in fp32: the reverse cumulative sum over tokens of q dq - k dk, plus rowsum(dS_N * S_N)
    for every token (each gate scales the final state). dq, dk: fp32 gradients of q and k."""
    d_cumulative = q.float() * dq - k.float() * dk
    d_gate = d_cumulative.flip(2).cumsum(2).flip(2)
    if d_final_state is not None:
        d_gate = d_gate + (d_final_state.float() * final).sum(-1)[:, :, None, :]
    return d_gate


def gla_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_gate: torch.Tensor,
                 initial_state: torch.Tensor | None, d_final_state: torch.Tensor | None, *,
                 chunk: int | None = None, block_dv: int | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(dq, dk, dv, d_log_gate, d_initial_state) from the Triton kernels; d_initial_state is None
    without an initial state. The kernels re-build the states instead of reading saved ones."""
    _require_triton(GLA_PREFIX)
    check_gla_inputs(q, k, v, log_gate, initial_state)
    launch = _launch_config(GLA_PREFIX, q, v, chunk, block_dv)
    (batch, heads, n, d), dv = q.shape, v.shape[3]
    _check_grads(GLA_PREFIX, do, v, d_final_state, (batch, heads, d, dv))
    grid = launch.grid(batch, heads, dv)
    kernels, s0, dsn = _kernels(not q.is_cuda), _state_operand(initial_state), _state_operand(d_final_state)
    dq_parts = q.new_empty((grid[1], batch, heads, n, d), dtype=torch.float32)
    dk_parts, dv_out = torch.empty_like(dq_parts), v.new_empty(v.shape)
    final, ds0 = (q.new_empty((batch, heads, d, dv), dtype=torch.float32) for _ in range(2))
    kernels.gla_dq[grid](k, v, log_gate, do, final if s0 is None else s0, dq_parts, final,
                         *k.stride(), *v.stride(), *log_gate.stride(), *do.stride(), *dq_parts.stride(),
                         *final.stride(), heads, n, d, dv, HAS_INITIAL_STATE=s0 is not None, **launch.constants())
    kernels.gla_dkv[grid](q, k, v, log_gate, do, ds0 if dsn is None else dsn, ds0, dk_parts, dv_out,
                          *q.stride(), *k.stride(), *v.stride(), *log_gate.stride(), *do.stride(),
                          *dk_parts.stride(), *dv_out.stride(), *ds0.stride(), heads, n, d, dv,
                          HAS_FINAL_GRAD=dsn is not None, HAS_INITIAL_STATE=s0 is not None, **launch.constants())
    dq, dk = dq_parts.sum(0), dk_parts.sum(0)
    d_gate = _gate_gradient(q, k, dq, dk, final, dsn)
    d_initial = None if initial_state is None else ds0.to(initial_state.dtype)
    return dq.to(q.dtype), dk.to(k.dtype), dv_out, d_gate.to(log_gate.dtype), d_initial


def delta_rule_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
                       initial_state: torch.Tensor | None = None, *, chunk: int | None = None,
                       block_dv: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(o [B, H, N, Dv] in the input dtype, final state [B, H, D, Dv] in fp32) from the delta-rule kernel."""
    _require_triton(DELTA_PREFIX)
    check_delta_rule_inputs(q, k, v, beta, initial_state)
    launch = _launch_config(DELTA_PREFIX, q, v, chunk, block_dv)
    (batch, heads, n, d), dv = q.shape, v.shape[3]
    o = v.new_empty(v.shape)
    final = q.new_empty((batch, heads, d, dv), dtype=torch.float32)
    s0 = _state_operand(initial_state)
    _kernels(not q.is_cuda).delta_forward[launch.grid(batch, heads, dv)](
        q, k, v, beta, final if s0 is None else s0, o, final,
        *q.stride(), *k.stride(), *v.stride(), *beta.stride(), *o.stride(), *final.stride(), heads, n, d, dv,
        HAS_INITIAL_STATE=s0 is not None, **launch.constants())
    return o, final


def delta_rule_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
                        initial_state: torch.Tensor | None, d_final_state: torch.Tensor | None, *,
                        chunk: int | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(dq, dk, dv, d_beta, d_initial_state); d_initial_state is None without an initial state.

    Not a Triton kernel: autograd through `delta_rule_chunked` recomputed from the inputs (fp32
    accumulation, chunks of `chunk` tokens): exact, but at torch speed and with torch's memory.
    """
    check_delta_rule_inputs(q, k, v, beta, initial_state)
    _check_grads(DELTA_PREFIX, do, v, d_final_state, (q.shape[0], q.shape[1], q.shape[3], v.shape[3]))
    leaves = [x.detach().requires_grad_() for x in (q, k, v, beta)]
    state = None if initial_state is None else initial_state.detach().requires_grad_()
    with torch.enable_grad():
        o, final = delta_rule_chunked(*leaves, state, chunk=DEFAULT_CHUNK if chunk is None else chunk)
        outputs, grads = [o], [do]
        if d_final_state is not None:
            outputs.append(final)
            grads.append(d_final_state.to(final.dtype))
        inputs = leaves + ([] if state is None else [state])
        found = torch.autograd.grad(outputs, inputs, grads, allow_unused=True)
    found = [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, found)]
    return (*found[:4], found[4] if state is not None else None)


class _GatedLinearAttention(torch.autograd.Function):
    """Autograd for the GLA kernels; backward recomputes the states instead of saving them."""

    @staticmethod
    def forward(ctx, q, k, v, log_gate, initial_state):
        o, final = gla_forward(q, k, v, log_gate, initial_state)
        ctx.save_for_backward(q, k, v, log_gate, initial_state)
        ctx.set_materialize_grads(False)
        return o, final

    @staticmethod
    def backward(ctx, do, d_final_state):
        q, k, v, log_gate, initial_state = ctx.saved_tensors
        do = torch.zeros_like(v) if do is None else do
        return gla_backward(do, q, k, v, log_gate, initial_state, d_final_state)


class _DeltaRule(torch.autograd.Function):
    """Autograd for the delta-rule forward kernel; backward is `delta_rule_backward` (torch autograd)."""

    @staticmethod
    def forward(ctx, q, k, v, beta, initial_state):
        o, final = delta_rule_forward(q, k, v, beta, initial_state)
        ctx.save_for_backward(q, k, v, beta, initial_state)
        ctx.set_materialize_grads(False)
        return o, final

    @staticmethod
    def backward(ctx, do, d_final_state):
        q, k, v, beta, initial_state = ctx.saved_tensors
        do = torch.zeros_like(v) if do is None else do
        return delta_rule_backward(do, q, k, v, beta, initial_state, d_final_state)


def _use_kernels(q: torch.Tensor, *tensors: torch.Tensor | None) -> bool:
    return use_triton(q, *(t for t in tensors if t is not None)) and q.dtype in KERNEL_DTYPES


def gla(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_gate: torch.Tensor,
        initial_state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable gated linear attention (gradients for q, k, v, log_gate, initial_state): (o, final_state).

    Uses the Triton kernels (forward and backward) when `use_triton` says so (CUDA, or CPU with
    the interpreter requested) and the dtype is fp32/fp16/bf16; otherwise `gla_chunked`.
    """
    if _use_kernels(q, k, v, log_gate, initial_state):
        return _GatedLinearAttention.apply(q, k, v, log_gate, initial_state)
    return gla_chunked(q, k, v, log_gate, initial_state)


def delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
               initial_state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable delta rule (gradients for q, k, v, beta, initial_state): (o, final_state).

    Uses the Triton forward kernel when `use_triton` says so and the dtype is fp32/fp16/bf16
    (backward: autograd through the torch chunked form, see `delta_rule_backward`); otherwise
    `delta_rule_chunked`. Keep ||k|| beta < 2 (e.g. L2-normalised k, beta in (0, 1)) or the state grows.
    """
    if _use_kernels(q, k, v, beta, initial_state):
        return _DeltaRule.apply(q, k, v, beta, initial_state)
    return delta_rule_chunked(q, k, v, beta, initial_state)
