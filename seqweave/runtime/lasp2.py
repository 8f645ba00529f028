"""LASP-2: causal linear attention over sequence shards, one all-gather of d x Dv states per pass.

With S_t = lambda S_{t-1} + k_t^T v_t, a run of rows [a, b) ends in state

    S_{b-1} = lambda^(b-a) S_{a-1} + E,   E = sum_{s in [a, b)} lambda^(b-1-s) k_s^T v_s,

so the state a run starts from is the decayed sum of the E of every run before it:
S_{a-1} = sum_{runs [a', b'), b' <= a} lambda^(a - b') E'. Each rank holds one run
(contiguous layout) or more (zigzag), so:

forward   each run's E from its own rows (O(L d Dv)); one all-gather of every rank's E
          ([world, runs, B, H, D, Dv], independent of N); each run's start state by that
          prefix sum; then the chunked kernel from that state.
backward  G = sum_t lambda^(t-a+1) q_t^T do_t is what the loss asks of a run's start state
          (local, O(L d Dv)); one all-gather of [E, G] together; the start states as in the
          forward, and each run's gradient of its end state from the G of the runs after it,
          d S_{b-1} = sum_{runs [a', b'), a' >= b} lambda^(a' - b) G'; then the kernel backward.

Padding rows (positions >= N) sit after every real row, so they only reach padding outputs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from seqweave.ir.ops.attn_linear import decay_tensor
from seqweave.ir.ops.linear_attn_reference import linear_attention_chunked, linear_attention_vjp, state_dtype
from seqweave.ir.sharding import contiguous_runs
from seqweave.runtime.comm import Communicator

Run = tuple[int, int]  # global [start, stop)


@dataclass(frozen=True)
class LocalLinearAttention:
    """The chunked kernels a rank runs on its rows: forward (q, k, v, decay, s0) -> (o, final)
    and backward (do, q, k, v, decay, s0, d_final) -> (dq, dk, dv, ds0)."""

    name: str
    forward: Callable
    backward: Callable


LINEAR_REFERENCE = LocalLinearAttention("chunked torch reference", linear_attention_chunked, linear_attention_vjp)


@dataclass(frozen=True)
class RunTable:
    """Every rank's runs of global rows, in local order; `width` is the most any rank holds."""

    runs: tuple[tuple[Run, ...], ...]

    @property
    def width(self) -> int:
        return max(len(runs) for runs in self.runs)

    def everyone(self) -> list[tuple[int, int, Run]]:
        """(rank, index on that rank, run) for every run of every rank."""
        return [(rank, index, run) for rank, runs in enumerate(self.runs) for index, run in enumerate(runs)]


def run_table(positions_of: Callable[[int], Tensor], world: int) -> RunTable:
    return RunTable(tuple(tuple(contiguous_runs(positions_of(rank))) for rank in range(world)))


def _powers(log_decay: Tensor | None, exponents: Tensor, heads: int, dtype: torch.dtype) -> Tensor:
    """lambda_h ** exponents as [1, H, len, 1] (ones without decay)."""
    if log_decay is None:
        return torch.ones((1, heads, len(exponents), 1), dtype=dtype, device=exponents.device)
    return torch.exp(-log_decay.to(dtype).view(1, -1, 1, 1) * exponents.to(dtype).view(1, 1, -1, 1))


def _factor(log_decay: Tensor | None, distance: int, heads: int, dtype: torch.dtype, device) -> Tensor:
    """lambda_h ** distance as [1, H, 1, 1]."""
    return _powers(log_decay, torch.tensor([distance], device=device), heads, dtype)


def _end_state(k: Tensor, v: Tensor, log_decay: Tensor | None, acc: torch.dtype) -> Tensor:
    """E = sum_s lambda^(L-1-s) k_s^T v_s of one run's rows."""
    length = k.shape[2]
    weights = _powers(log_decay, torch.arange(length - 1, -1, -1, device=k.device), k.shape[1], acc)
    return (k.to(acc) * weights).transpose(-1, -2) @ v.to(acc)


def _start_demand(q: Tensor, do: Tensor, log_decay: Tensor | None, acc: torch.dtype) -> Tensor:
    """G = sum_t lambda^(t+1) q_t^T do_t: the gradient a run's start state receives from its own rows."""
    weights = _powers(log_decay, torch.arange(1, q.shape[2] + 1, device=q.device), q.shape[1], acc)
    return (q.to(acc) * weights).transpose(-1, -2) @ do.to(acc)


def _start_states(table: RunTable, ends: Tensor, mine: tuple[Run, ...], log_decay, acc) -> list[Tensor]:
    """For each of this rank's runs, the decayed sum of the end states of the runs before it."""
    heads = ends.shape[3]
    starts = []
    for start, _ in mine:
        state = torch.zeros_like(ends[0, 0])
        for rank, index, (_, stop) in table.everyone():
            if stop <= start:
                state = state + _factor(log_decay, start - stop, heads, acc, ends.device) * ends[rank, index]
        starts.append(state)
    return starts


def _end_grads(table: RunTable, demands: Tensor, mine: tuple[Run, ...], log_decay, acc) -> list[Tensor]:
    """For each of this rank's runs, what the runs after it ask of its end state."""
    heads = demands.shape[3]
    grads = []
    for _, stop in mine:
        grad = torch.zeros_like(demands[0, 0])
        for rank, index, (start, _) in table.everyone():
            if start >= stop:
                grad = grad + _factor(log_decay, start - stop, heads, acc, demands.device) * demands[rank, index]
        grads.append(grad)
    return grads


def _local_slices(mine: tuple[Run, ...]) -> list[slice]:
    slices, offset = [], 0
    for start, stop in mine:
        slices.append(slice(offset, offset + stop - start))
        offset += stop - start
    return slices


def _stacked(parts: list[Tensor], width: int) -> Tensor:
    """[width, *part]: this rank's per-run tensors, zero-padded to the widest rank's count."""
    out = parts[0].new_zeros((width, *parts[0].shape))
    for index, part in enumerate(parts):
        out[index] = part
    return out


def lasp2_forward(comm: Communicator, step: int, q: Tensor, k: Tensor, v: Tensor, decay: list[float], scale: float,
                  table: RunTable, kernels: LocalLinearAttention = LINEAR_REFERENCE) -> Tensor:
    """This rank's output rows of causal linear attention over the whole sequence."""
    acc, mine = state_dtype(q.dtype), table.runs[comm.rank]
    log_decay, slices = decay_tensor(decay, q), _local_slices(mine)
    ends = [_end_state(k[:, :, s], v[:, :, s], log_decay, acc) for s in slices]
    gathered = comm.all_gather(_stacked(ends, table.width), step, "lasp2 states", kind="states")
    q = q * scale if scale != 1.0 else q
    outs = [kernels.forward(q[:, :, s], k[:, :, s], v[:, :, s], log_decay, start)[0]
            for s, start in zip(slices, _start_states(table, gathered, mine, log_decay, acc))]
    return torch.cat(outs, 2) if len(outs) > 1 else outs[0]


def lasp2_backward(comm: Communicator, step: int, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, decay: list[float],
                   scale: float, table: RunTable,
                   kernels: LocalLinearAttention = LINEAR_REFERENCE) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv of this rank's rows; one all-gather of end states and start demands together."""
    acc, mine = state_dtype(q.dtype), table.runs[comm.rank]
    log_decay, slices = decay_tensor(decay, q), _local_slices(mine)
    q = q * scale if scale != 1.0 else q
    ends = [_end_state(k[:, :, s], v[:, :, s], log_decay, acc) for s in slices]
    demands = [_start_demand(q[:, :, s], dout[:, :, s], log_decay, acc) for s in slices]
    both = comm.all_gather(torch.stack([_stacked(ends, table.width), _stacked(demands, table.width)]), step,
                           "lasp2 states and state gradients", kind="states")
    starts = _start_states(table, both[:, 0], mine, log_decay, acc)
    finals = _end_grads(table, both[:, 1], mine, log_decay, acc)
    grads = [kernels.backward(dout[:, :, s], q[:, :, s], k[:, :, s], v[:, :, s], log_decay, start, final)[:3]
             for s, start, final in zip(slices, starts, finals)]
    dq, dk, dv = (torch.cat(parts, 2) if len(parts) > 1 else parts[0] for parts in zip(*grads))
    return (dq * scale if scale != 1.0 else dq), dk, dv

