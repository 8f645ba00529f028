"""Causal linear attention in plain torch: the token-by-token recurrence and the chunked form.

Per batch b and head h, with lambda = exp(-decay[h]) (decay is a log-decay, >= 0):

    S_t = lambda * S_{t-1} + k_t^T v_t        S_{-1} = initial_state (zeros if not given)
    o_t = q_t S_t                              (token t sees itself; no softmax, no scale)

q, k: [B, H, N, D]; v: [B, H, N, Dv]; states: [B, H, D, Dv]. Both functions return
(o in the input dtype, final state S_{N-1}). The final state is what sequence parallelism
(LASP-2) hands from one rank to the next, so it is always returned in fp32 (fp64 for fp64).

`linear_attention_recurrent` is the independent reference (tests run it in fp64);
`linear_attention_chunked` is the CPU path: Lightning-Attention-2 tiling in torch ops,
differentiable by autograd, never materialising more than a chunk x chunk score tile.
"""
from __future__ import annotations

import torch

DEFAULT_CHUNK = 64
ERROR_PREFIX = "linear attention"


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of states in and out: fp32, or fp64 for fp64 attention (so references stay exact)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fail(message: str, hint: str) -> ValueError:
    return ValueError(f"{ERROR_PREFIX}: {message}\n  what to do: {hint}")


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise _fail(f"q, k, v must be 4-D [B, H, N, D]; got shapes {tuple(q.shape)}, {tuple(k.shape)}, "
                    f"{tuple(v.shape)}", "lay heads out as in SDPA: [batch, heads, tokens, head_dim]")
    if q.shape != k.shape:
        raise _fail(f"q {tuple(q.shape)} and k {tuple(k.shape)} must have the same shape [B, H, N, D]",
                    "pass q and k with equal batch, heads, tokens and head dim")
    if v.shape[:3] != q.shape[:3]:
        raise _fail(f"v {tuple(v.shape)} must share batch, heads and tokens with q {tuple(q.shape)}",
                    "pass v as [B, H, N, Dv] with the B, H, N of q")
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        raise _fail(f"q, k, v must share one floating dtype; got {q.dtype}, {k.dtype}, {v.dtype}",
                    "cast q, k and v to the same float dtype")
    if not (q.device == k.device == v.device):
        raise _fail(f"q, k, v are on different devices: {q.device}, {k.device}, {v.device}",
                    "move q, k and v to one device")


def _check_decay(decay: torch.Tensor, heads: int, device: torch.device) -> None:
    if decay.shape != (heads,) or not decay.is_floating_point():
        raise _fail(f"decay must be a float tensor of shape [H] = ({heads},); got {decay.dtype} "
                    f"{tuple(decay.shape)}", "pass one log-decay s_h >= 0 per head (lambda_h = exp(-s_h))")
    if decay.device != device:
        raise _fail(f"decay is on {decay.device} but q is on {device}", "move decay to q's device")
    if bool((decay < 0).any()) or not bool(torch.isfinite(decay).all()):
        raise _fail(f"decay must be finite and >= 0 (it is -log lambda); got {decay.tolist()}",
                    "pass s_h = -log(lambda_h) with 0 < lambda_h <= 1")


def _check_state(state: torch.Tensor, q: torch.Tensor, v: torch.Tensor) -> None:
    expected = (q.shape[0], q.shape[1], q.shape[3], v.shape[3])
    if tuple(state.shape) != expected or not state.is_floating_point():
        raise _fail(f"initial_state must be a float tensor [B, H, D, Dv] = {expected}; got {state.dtype} "
                    f"{tuple(state.shape)}", "pass the final_state of the previous segment (or None)")
    if state.device != q.device:
        raise _fail(f"initial_state is on {state.device} but q is on {q.device}",
                    "move initial_state to q's device")


def check_linear_attention_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                  decay: torch.Tensor | None, initial_state: torch.Tensor | None) -> None:
    """Raise ValueError naming the problem when the operands do not fit the op's contract."""
    _check_qkv(q, k, v)
    if decay is not None:
        _check_decay(decay, q.shape[1], q.device)
    if initial_state is not None:
        _check_state(initial_state, q, v)


def start_state(q: torch.Tensor, v: torch.Tensor, initial_state: torch.Tensor | None,
                 dtype: torch.dtype) -> torch.Tensor:
    if initial_state is not None:
        return initial_state.to(dtype)
    b, h, _, d = q.shape
    return q.new_zeros((b, h, d, v.shape[3]), dtype=dtype)


def _log_decay(decay: torch.Tensor | None, heads: int, like: torch.Tensor,
               dtype: torch.dtype) -> torch.Tensor:
    """Per-head log-decay as [1, H, 1, 1] in `dtype` (zeros when there is no decay)."""
    if decay is None:
        return like.new_zeros((1, heads, 1, 1), dtype=dtype)
    return decay.to(dtype).view(1, heads, 1, 1)


def linear_attention_recurrent(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               decay: torch.Tensor | None = None,
                               initial_state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence one token at a time, computed in the input dtype: the independent reference.

    Nothing is tiled or reassociated, so it shares no code path with the chunked forms; in fp16
    it is also "plain PyTorch at the same precision" for kernel tolerances.
    """
    check_linear_attention_inputs(q, k, v, decay, initial_state)
    lam = torch.exp(-_log_decay(decay, q.shape[1], q, q.dtype))
    state = start_state(q, v, initial_state, q.dtype)
    outputs = []
    for t in range(q.shape[2]):
        update = k[:, :, t, :, None] * v[:, :, t, None, :]
        state = lam * state + update
        outputs.append((q[:, :, t, None, :] @ state).squeeze(2))
    o = torch.stack(outputs, dim=2) if outputs else v.new_zeros(v.shape)
    return o, state.to(state_dtype(q.dtype))


def _chunk_decays(log_decay: torch.Tensor, length: int) -> tuple[torch.Tensor, ...]:
    """For one chunk of `length` tokens: the intra-chunk decay matrix M[j, s] = lambda^(j-s) (j >= s,
    else 0), the query decays lambda^(j+1), the key decays lambda^(L-1-s) and lambda^L."""
    pos = torch.arange(length, device=log_decay.device, dtype=log_decay.dtype)
    diff = pos[:, None] - pos[None, :]
    causal = diff >= 0
    matrix = torch.exp(-log_decay * diff.clamp(min=0)) * causal
    q_decay = torch.exp(-log_decay * (pos + 1)[:, None])
    k_decay = torch.exp(-log_decay * (length - 1 - pos)[:, None])
    return matrix, q_decay, k_decay, torch.exp(-log_decay * length)


def linear_attention_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             decay: torch.Tensor | None = None, initial_state: torch.Tensor | None = None,
                             chunk: int = DEFAULT_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked linear attention (Lightning Attention-2 tiling) in torch ops, differentiable by autograd.

    Within a chunk: masked attention ((Q K^T) * M) V; across chunks: (Q * lambda^(j+1)) S_prev.
    Accumulates in fp32 (fp64 for fp64 inputs); the last chunk uses its true length.
    """
    check_linear_attention_inputs(q, k, v, decay, initial_state)
    if chunk < 1:
        raise _fail(f"chunk must be a positive number of tokens; got {chunk}", f"use e.g. {DEFAULT_CHUNK}")
    acc = state_dtype(q.dtype)
    log_decay = _log_decay(decay, q.shape[1], q, acc)
    state = start_state(q, v, initial_state, acc)
    outputs = []
    for start in range(0, q.shape[2], chunk):
        qc, kc, vc = (x[:, :, start:start + chunk].to(acc) for x in (q, k, v))
        matrix, q_decay, k_decay, state_decay = _chunk_decays(log_decay, qc.shape[2])
        intra = ((qc @ kc.transpose(-1, -2)) * matrix) @ vc
        outputs.append(intra + (qc * q_decay) @ state)
        state = state_decay * state + (kc * k_decay).transpose(-1, -2) @ vc
    o = torch.cat(outputs, dim=2) if outputs else v.new_zeros(v.shape, dtype=acc)
    return o.to(q.dtype), state

