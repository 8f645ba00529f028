"""Chunked causal linear attention in Triton (Lightning Attention-2), forward and backward.

Semantics are those of `seqweave.ir.ops.linear_attn_reference`: S_t = lambda S_{t-1} + k_t^T v_t,
o_t = q_t S_t, lambda = exp(-decay[h]). One program per (batch * head, block of Dv columns)
walks the sequence in chunks of CHUNK tokens, carrying its [BLOCK_D, BLOCK_DV] slice of the
state in fp32: inside a chunk, masked attention ((Q K^T) * M) V with M[j, s] = lambda^(j-s);
across chunks, (Q * lambda^(j+1)) S. The last chunk decays with its true length, so any N is
exact. Backward: `_dq_kernel` walks forward re-building S for dq; `_dkv_kernel` walks backward
carrying dS for dk and dv and ends with d_initial_state. dq and dk sum over Dv, so each Dv
block writes an fp32 partial that the host adds up.

Kernel bodies are plain functions, decorated on first use by `_kernels(interpret)` so the
GPU/interpreter choice is made per call (see `jit.py`). Dots whose operands are inputs run in
the input dtype with fp32 accumulation; dots with the fp32 state keep it in fp32 ("ieee" for
fp32 inputs, tf32 otherwise), because without decay the state grows with N and would overflow
fp16's range if rounded to it.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from seqweave.codegen.triton.jit import jit_decorator, use_triton
from seqweave.codegen.triton.specs import MIN_DOT_DIM, next_power_of_two
from seqweave.ir.ops.linear_attn_reference import (ERROR_PREFIX, check_linear_attention_inputs,
                                                   linear_attention_chunked)

try:
    import triton
    import triton.language as tl
except ImportError:  # kernels are only built when triton is present; see `_require_triton`
    triton = tl = None

WIDE_HEAD_DIM = 64  # above this, chunks of 16 tokens (below: 32) keep the state and tiles in registers
MAX_CHUNK = 256
MAX_HEAD_DIM = 256        # D is never split (o = Q S sums over it); Dv is split in BLOCK_DV columns
DEFAULT_BLOCK_DV = 32
GPU_WARPS = 8  # chunk, Dv block and warps chosen with offline.compile_linear_attention: no spills at sm_90
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _forward_kernel(Q, K, V, DECAY, S0, O, SN,
                    stride_qb, stride_qh, stride_qn, stride_qd,
                    stride_kb, stride_kh, stride_kn, stride_kd,
                    stride_vb, stride_vh, stride_vn, stride_ve,
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
    o_ptrs = O + off_b * stride_ob + off_h * stride_oh + offs_c[:, None] * stride_on + offs_e[None, :] * stride_oe
    s_offs = off_b * stride_sb + off_h * stride_sh + offs_d[:, None] * stride_sd + offs_e[None, :] * stride_se
    s_mask = (offs_d[:, None] < D) & (offs_e[None, :] < DV)
    log_decay = tl.load(DECAY + off_h)
    diff = offs_c[:, None] - offs_c[None, :]
    decay_matrix = tl.where(diff >= 0, tl.exp(-log_decay * tl.maximum(diff, 0).to(tl.float32)), 0.0)
    q_decay = tl.exp(-log_decay * (offs_c + 1).to(tl.float32))
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
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * decay_matrix
        out = tl.dot(scores.to(v.dtype), v, input_precision=PRECISION)
        out += tl.dot(q.to(tl.float32) * q_decay[:, None], state, input_precision=PRECISION)
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=v_mask)
        k_decay = tl.where(row_ok, tl.exp(-log_decay * tl.maximum(length - 1 - offs_c, 0).to(tl.float32)), 0.0)
        k_scaled = (k.to(tl.float32) * k_decay[:, None]).to(k.dtype)
        state = tl.exp(-log_decay * length) * state + tl.dot(tl.trans(k_scaled), v, input_precision=PRECISION)
        q_ptrs, k_ptrs = q_ptrs + CHUNK * stride_qn, k_ptrs + CHUNK * stride_kn
        v_ptrs, o_ptrs = v_ptrs + CHUNK * stride_vn, o_ptrs + CHUNK * stride_on
    tl.store(SN + s_offs, state, mask=s_mask)


def _dq_kernel(K, V, DO, DECAY, S0, DQ,
               stride_kb, stride_kh, stride_kn, stride_kd,
               stride_vb, stride_vh, stride_vn, stride_ve,
               stride_dob, stride_doh, stride_don, stride_doe,
               stride_dqp, stride_dqb, stride_dqh, stride_dqn, stride_dqd,
               stride_sb, stride_sh, stride_sd, stride_se,
               H, N, D, DV,
               HAS_INITIAL_STATE: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr,
               BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr):
    """This Dv block's fp32 share of dq = ((dO V^T) * M) K + (dO * lambda^(j+1)) S_prev^T, walking forward."""
    off_b, off_h = (tl.program_id(0) // H).to(tl.int64), (tl.program_id(0) % H).to(tl.int64)
    off_p = tl.program_id(1).to(tl.int64)
    offs_c, offs_d = tl.arange(0, CHUNK), tl.arange(0, BLOCK_D)
    offs_e = tl.program_id(1) * BLOCK_DV + tl.arange(0, BLOCK_DV)
    k_ptrs = K + off_b * stride_kb + off_h * stride_kh + offs_c[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_ptrs = V + off_b * stride_vb + off_h * stride_vh + offs_c[:, None] * stride_vn + offs_e[None, :] * stride_ve
    do_ptrs = DO + off_b * stride_dob + off_h * stride_doh + offs_c[:, None] * stride_don + offs_e[None, :] * stride_doe
    dq_ptrs = (DQ + off_p * stride_dqp + off_b * stride_dqb + off_h * stride_dqh
               + offs_c[:, None] * stride_dqn + offs_d[None, :] * stride_dqd)
    s_offs = off_b * stride_sb + off_h * stride_sh + offs_d[:, None] * stride_sd + offs_e[None, :] * stride_se
    log_decay = tl.load(DECAY + off_h)
    diff = offs_c[:, None] - offs_c[None, :]
    decay_matrix = tl.where(diff >= 0, tl.exp(-log_decay * tl.maximum(diff, 0).to(tl.float32)), 0.0)
    q_decay = tl.exp(-log_decay * (offs_c + 1).to(tl.float32))
    if HAS_INITIAL_STATE:
        state = tl.load(S0 + s_offs, mask=(offs_d[:, None] < D) & (offs_e[None, :] < DV), other=0.0)
        state = state.to(tl.float32)
    else:
        state = tl.zeros([BLOCK_D, BLOCK_DV], dtype=tl.float32)
    for start in range(0, N, CHUNK):
        length = tl.minimum(N - start, CHUNK)
        row_ok = offs_c < length
        k_mask, v_mask = row_ok[:, None] & (offs_d[None, :] < D), row_ok[:, None] & (offs_e[None, :] < DV)
        k = tl.load(k_ptrs, mask=k_mask, other=0.0)
        v = tl.load(v_ptrs, mask=v_mask, other=0.0)
        do = tl.load(do_ptrs, mask=v_mask, other=0.0)
        d_scores = tl.dot(do, tl.trans(v), input_precision=PRECISION) * decay_matrix
        dq = tl.dot(d_scores.to(k.dtype), k, input_precision=PRECISION)
        dq += tl.dot(do.to(tl.float32) * q_decay[:, None], tl.trans(state), input_precision=PRECISION)
        tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=k_mask)
        k_decay = tl.where(row_ok, tl.exp(-log_decay * tl.maximum(length - 1 - offs_c, 0).to(tl.float32)), 0.0)
        k_scaled = (k.to(tl.float32) * k_decay[:, None]).to(k.dtype)
        state = tl.exp(-log_decay * length) * state + tl.dot(tl.trans(k_scaled), v, input_precision=PRECISION)
        k_ptrs, v_ptrs = k_ptrs + CHUNK * stride_kn, v_ptrs + CHUNK * stride_vn
        do_ptrs, dq_ptrs = do_ptrs + CHUNK * stride_don, dq_ptrs + CHUNK * stride_dqn


def _dkv_kernel(Q, K, V, DO, DECAY, DSN, DS0, DK, DVOUT,
                stride_qb, stride_qh, stride_qn, stride_qd,
                stride_kb, stride_kh, stride_kn, stride_kd,
                stride_vb, stride_vh, stride_vn, stride_ve,
                stride_dob, stride_doh, stride_don, stride_doe,
                stride_dkp, stride_dkb, stride_dkh, stride_dkn, stride_dkd,
                stride_dvb, stride_dvh, stride_dvn, stride_dve,
                stride_sb, stride_sh, stride_sd, stride_se,
                H, N, D, DV,
                HAS_FINAL_GRAD: tl.constexpr, HAS_INITIAL_STATE: tl.constexpr, CHUNK: tl.constexpr,
                BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr):
    """dv, this Dv block's fp32 share of dk, and d_initial_state, walking backward carrying dS.

    dS is the gradient w.r.t. the state at the end of the current chunk from everything after it
    (d_final_state for the last chunk); with M^T[j, u] = lambda^(u-j) for u >= j:
    dv = ((K Q^T) * M^T) dO + (K * lambda^(L-1-j)) dS, dk = ((V dO^T) * M^T) Q + (V * lambda^(L-1-j)) dS^T,
    and dS <- lambda^L dS + (Q * lambda^(j+1))^T dO is the gradient w.r.t. the previous state.
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
    do_ptrs = DO + off_b * stride_dob + off_h * stride_doh + rows * stride_don + offs_e[None, :] * stride_doe
    dk_ptrs = (DK + off_p * stride_dkp + off_b * stride_dkb + off_h * stride_dkh
               + rows * stride_dkn + offs_d[None, :] * stride_dkd)
    dv_ptrs = DVOUT + off_b * stride_dvb + off_h * stride_dvh + rows * stride_dvn + offs_e[None, :] * stride_dve
    s_offs = off_b * stride_sb + off_h * stride_sh + offs_d[:, None] * stride_sd + offs_e[None, :] * stride_se
    s_mask = (offs_d[:, None] < D) & (offs_e[None, :] < DV)
    log_decay = tl.load(DECAY + off_h)
    diff = offs_c[None, :] - offs_c[:, None]
    decay_matrix_t = tl.where(diff >= 0, tl.exp(-log_decay * tl.maximum(diff, 0).to(tl.float32)), 0.0)
    q_decay = tl.exp(-log_decay * (offs_c + 1).to(tl.float32))
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
        k_decay = tl.where(row_ok, tl.exp(-log_decay * tl.maximum(length - 1 - offs_c, 0).to(tl.float32)), 0.0)
        scores_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * decay_matrix_t
        dv = tl.dot(scores_t.to(do.dtype), do, input_precision=PRECISION)
        dv += tl.dot(k.to(tl.float32) * k_decay[:, None], d_state, input_precision=PRECISION)
        tl.store(dv_ptrs, dv.to(DVOUT.dtype.element_ty), mask=v_mask)
        d_scores_t = tl.dot(v, tl.trans(do), input_precision=PRECISION) * decay_matrix_t
        dk = tl.dot(d_scores_t.to(q.dtype), q, input_precision=PRECISION)
        dk += tl.dot(v.to(tl.float32) * k_decay[:, None], tl.trans(d_state), input_precision=PRECISION)
        tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=qk_mask)
        q_scaled = (q.to(tl.float32) * q_decay[:, None]).to(q.dtype)
        d_state = tl.exp(-log_decay * length) * d_state + tl.dot(tl.trans(q_scaled), do, input_precision=PRECISION)
        q_ptrs, k_ptrs = q_ptrs - CHUNK * stride_qn, k_ptrs - CHUNK * stride_kn
        v_ptrs, do_ptrs = v_ptrs - CHUNK * stride_vn, do_ptrs - CHUNK * stride_don
        dk_ptrs, dv_ptrs = dk_ptrs - CHUNK * stride_dkn, dv_ptrs - CHUNK * stride_dvn
    if HAS_INITIAL_STATE:
        tl.store(DS0 + s_offs, d_state, mask=s_mask)


@functools.cache
def _kernels(interpret: bool) -> SimpleNamespace:
    """The three kernels, decorated for the GPU or for the interpreter (built once per mode)."""
    jit = jit_decorator(interpret)
    return SimpleNamespace(forward=jit(_forward_kernel), dq=jit(_dq_kernel), dkv=jit(_dkv_kernel))


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


def _fail(message: str, hint: str) -> ValueError:
    return ValueError(f"{ERROR_PREFIX} (triton): {message}\n  what to do: {hint}")


def _require_triton() -> None:
    if tl is None:
        raise RuntimeError(f"{ERROR_PREFIX}: the Triton kernels need the `triton` package, which is not "
                           "installed\n  what to do: install triton, or call `linear_attention` (it falls "
                           "back to the torch reference)")


def default_chunk(head_dim: int) -> int:
    """Tokens per chunk: 32, or 16 for head dims above 64 (the d x Dv state shares the registers)."""
    return 32 if head_dim <= WIDE_HEAD_DIM else 16


def _launch_config(q: torch.Tensor, v: torch.Tensor, chunk: int | None, block_dv: int | None) -> _Launch:
    """Check what the kernels support and pick block sizes."""
    if q.dtype not in KERNEL_DTYPES:
        raise _fail(f"the kernels take fp32, fp16 or bf16 inputs; got {q.dtype}",
                    "use linear_attention_chunked for other dtypes (linear_attention routes float64 there)")
    chunk = default_chunk(q.shape[3]) if chunk is None else chunk
    if chunk < MIN_DOT_DIM or chunk > MAX_CHUNK or chunk & (chunk - 1):
        raise _fail(f"chunk must be a power of two in [{MIN_DOT_DIM}, {MAX_CHUNK}]; got {chunk}",
                    f"pass chunk={default_chunk(q.shape[3])} (or None)")
    if q.shape[3] > MAX_HEAD_DIM:
        raise _fail(f"head dim D={q.shape[3]} is above the supported {MAX_HEAD_DIM}",
                    "split the heads, or use linear_attention_chunked")
    block_dv = min(DEFAULT_BLOCK_DV, next_power_of_two(v.shape[3])) if block_dv is None else block_dv
    if block_dv < MIN_DOT_DIM or block_dv & (block_dv - 1):
        raise _fail(f"block_dv must be a power of two >= {MIN_DOT_DIM}; got {block_dv}", "pass block_dv=None")
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    num_warps = GPU_WARPS if q.is_cuda or q.is_meta else 1
    return _Launch(chunk, next_power_of_two(q.shape[3]), block_dv, precision, num_warps)


def _decay_operand(decay: torch.Tensor | None, heads: int, q: torch.Tensor) -> torch.Tensor:
    if decay is None:
        return q.new_zeros(heads, dtype=torch.float32)
    return decay.detach().to(torch.float32).contiguous()


def _state_operand(state: torch.Tensor | None) -> torch.Tensor | None:
    return None if state is None else state.detach().to(torch.float32).contiguous()


def linear_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             decay: torch.Tensor | None = None, initial_state: torch.Tensor | None = None,
                             *, chunk: int | None = None,
                             block_dv: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(o [B, H, N, Dv] in the input dtype, final state [B, H, D, Dv] in fp32) from the Triton kernel.

    Runs on the GPU for CUDA tensors and under Triton's interpreter for CPU tensors.
    """
    _require_triton()
    check_linear_attention_inputs(q, k, v, decay, initial_state)
    launch = _launch_config(q, v, chunk, block_dv)
    (batch, heads, n, d), dv = q.shape, v.shape[3]
    o = v.new_empty(v.shape)
    final = q.new_empty((batch, heads, d, dv), dtype=torch.float32)
    s0 = _state_operand(initial_state)
    _kernels(not q.is_cuda).forward[launch.grid(batch, heads, dv)](
        q, k, v, _decay_operand(decay, heads, q), final if s0 is None else s0, o, final,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(), *final.stride(), heads, n, d, dv,
        HAS_INITIAL_STATE=s0 is not None, **launch.constants())
    return o, final


def _check_grads(do: torch.Tensor, v: torch.Tensor, d_final_state: torch.Tensor | None,
                 state_shape: tuple[int, ...]) -> None:
    if do.shape != v.shape or do.device != v.device or do.dtype != v.dtype:
        raise _fail(f"d_o ({do.dtype} {tuple(do.shape)} on {do.device}) must match v ({v.dtype} "
                    f"{tuple(v.shape)} on {v.device})", "pass the gradient of the output o, in o's dtype")
    if d_final_state is not None and tuple(d_final_state.shape) != state_shape:
        raise _fail(f"d_final_state {tuple(d_final_state.shape)} must be [B, H, D, Dv] = {state_shape}",
                    "pass the gradient of final_state, or None")


def linear_attention_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              decay: torch.Tensor | None, initial_state: torch.Tensor | None,
                              d_final_state: torch.Tensor | None, *, chunk: int | None = None,
                              block_dv: int | None = None
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(dq, dk, dv, d_initial_state) from the Triton kernels; d_initial_state is None without
    an initial state. `decay` is a constant here: no gradient flows to it."""
    _require_triton()
    check_linear_attention_inputs(q, k, v, decay, initial_state)
    launch = _launch_config(q, v, chunk, block_dv)
    (batch, heads, n, d), dv = q.shape, v.shape[3]
    _check_grads(do, v, d_final_state, (batch, heads, d, dv))
    grid = launch.grid(batch, heads, dv)
    kernels, decay_f32, s0 = _kernels(not q.is_cuda), _decay_operand(decay, heads, q), _state_operand(initial_state)
    dsn = _state_operand(d_final_state)
    dq_parts = q.new_empty((grid[1], batch, heads, n, d), dtype=torch.float32)
    dk_parts, dv_out = torch.empty_like(dq_parts), v.new_empty(v.shape)
    ds0 = q.new_empty((batch, heads, d, dv), dtype=torch.float32)
    kernels.dq[grid](k, v, do, decay_f32, ds0 if s0 is None else s0, dq_parts,
                     *k.stride(), *v.stride(), *do.stride(), *dq_parts.stride(), *ds0.stride(),
                     heads, n, d, dv, HAS_INITIAL_STATE=s0 is not None, **launch.constants())
    kernels.dkv[grid](q, k, v, do, decay_f32, ds0 if dsn is None else dsn, ds0, dk_parts, dv_out,
                      *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk_parts.stride(), *dv_out.stride(),
                      *ds0.stride(), heads, n, d, dv, HAS_FINAL_GRAD=dsn is not None,
                      HAS_INITIAL_STATE=s0 is not None, **launch.constants())
    d_initial = None if initial_state is None else ds0.to(initial_state.dtype)
    return dq_parts.sum(0).to(q.dtype), dk_parts.sum(0).to(k.dtype), dv_out, d_initial


class _LinearAttention(torch.autograd.Function):
    """Autograd for the Triton kernels; backward recomputes the states instead of saving them."""

    @staticmethod
    def forward(ctx, q, k, v, decay, initial_state):
        o, final = linear_attention_forward(q, k, v, decay, initial_state)
        ctx.save_for_backward(q, k, v, decay, initial_state)
        ctx.set_materialize_grads(False)
        return o, final

    @staticmethod
    def backward(ctx, do, d_final_state):
        q, k, v, decay, initial_state = ctx.saved_tensors
        do = torch.zeros_like(v) if do is None else do
        dq, dk, dv, d_initial = linear_attention_backward(do, q, k, v, decay, initial_state, d_final_state)
        return dq, dk, dv, None, d_initial


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: torch.Tensor | None = None,
                     initial_state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable causal linear attention: (o, final_state).

    Uses the Triton kernels when `use_triton` says so (CUDA, or CPU with the interpreter
    requested) and the dtype is fp32/fp16/bf16; otherwise the torch chunked reference.
    `decay` is a fixed per-head log-decay: it must not require grad.
    """
    if decay is not None and decay.requires_grad:
        raise ValueError(f"{ERROR_PREFIX}: decay requires grad, but gradients w.r.t. the decay are not "
                         "computed\n  what to do: pass decay.detach() (a fixed per-head log-decay)")
    tensors = [t for t in (q, k, v, decay, initial_state) if t is not None]
    if use_triton(*tensors) and q.dtype in KERNEL_DTYPES:
        return _LinearAttention.apply(q, k, v, decay, initial_state)
    return linear_attention_chunked(q, k, v, decay, initial_state)
