"""LASP-2: linear attention over sequence shards, one all-gather of d x Dv states per pass.

Every recurrence `attn.linear` runs is linear in its state: over a run of rows [a, b)

    S_{b-1} = T S_{a-1} + E

with T the run's transition (lambda^L for a decay, diag(exp(sum g)) for GLA gates, the product
of (I - beta k^T k) for the delta rule) and E its end state from a zero start. The runs of all
ranks partition [0, N), so in global order each run starts where the previous one ended:

forward   each run's (E, T) from its own rows; one all-gather of every rank's (E, T)
          ([world, runs, ...], independent of N); each run's start state by a scan over the
          runs before it; then the chunked kernel from that state.
backward  G = what this run's own outputs ask of its start state; one all-gather of (E, T, G);
          the start states as in the forward and each run's end-state gradient by the reverse
          scan dS_end(j-1) = T_j^T dS_end(j) + G_j; then the kernel backward from both.

A rank holds one run (contiguous layout) or two (zigzag). Padding rows (positions >= N) sit
after every real row, so they only reach padding outputs. For a constant decay T is known
from the run's length and is not sent.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from seqweave.ir.ops.attn_linear import decay_tensor
from seqweave.ir.ops.linear_attn_reference import state_dtype
from seqweave.ir.ops.linear_recurrences import REFERENCE, Recurrence
from seqweave.ir.sharding import Run, RunTable, run_table  # noqa: F401 (run_table: re-exported)
from seqweave.runtime.comm import Communicator

@dataclass
class RunRows:
    """One run's rows of q, k, v and gate (the op's scale already applied to q)."""

    q: Tensor
    k: Tensor
    v: Tensor
    gate: Tensor | None  # log-decays [H] for `decay`, else the rows' gates


def _rows(q, k, v, gate, rows: slice, gate_is_operand: bool) -> RunRows:
    return RunRows(q[:, :, rows], k[:, :, rows], v[:, :, rows], gate[:, :, rows] if gate_is_operand else gate)


# ------------------------------------------------------------ per recurrence: E, T, G and T's action

def _decay_powers(log_decay: Tensor | None, exponents: Tensor, heads: int, acc: torch.dtype) -> Tensor:
    """lambda_h ** exponents as [1, H, len, 1] (ones without decay)."""
    if log_decay is None:
        return torch.ones((1, heads, len(exponents), 1), dtype=acc, device=exponents.device)
    return torch.exp(-log_decay.to(acc).view(1, -1, 1, 1) * exponents.to(acc).view(1, 1, -1, 1))


def _summary(name: str, recurrence: Recurrence, rows: RunRows, acc: torch.dtype) -> tuple[Tensor, Tensor | None]:
    """(E, T) of one run: its end state from zero, and its transition (None for a decay)."""
    q, k, v, gate = rows.q, rows.k, rows.v, rows.gate
    length, heads = k.shape[2], k.shape[1]
    if name == "decay":
        weights = _decay_powers(gate, torch.arange(length - 1, -1, -1, device=k.device), heads, acc)
        return (k.to(acc) * weights).transpose(-1, -2) @ v.to(acc), None
    if name == "gla":
        cumulative = gate.to(acc).cumsum(2)
        last = cumulative[:, :, -1:]
        end = (k.to(acc) * torch.exp(last - cumulative)).transpose(-1, -2) @ v.to(acc)
        return end, torch.exp(last).transpose(-1, -2)  # diag as [B, H, D, 1]
    end = recurrence.forward(q, k, v, gate, None)[1]
    eye = torch.eye(k.shape[3], dtype=acc, device=k.device).expand(k.shape[0], heads, -1, -1).contiguous()
    transition = recurrence.forward(q, k, torch.zeros_like(k), gate, eye)[1]  # T = T @ I, nothing written
    return end, transition


def _demand(name: str, recurrence: Recurrence, rows: RunRows, dout: Tensor, acc: torch.dtype) -> Tensor:
    """G: the gradient this run's own outputs send to its start state."""
    q, k, v, gate = rows.q, rows.k, rows.v, rows.gate
    if name == "decay":
        weights = _decay_powers(gate, torch.arange(1, q.shape[2] + 1, device=q.device), q.shape[1], acc)
        return (q.to(acc) * weights).transpose(-1, -2) @ dout.to(acc)
    if name == "gla":
        return (q.to(acc) * torch.exp(gate.to(acc).cumsum(2))).transpose(-1, -2) @ dout.to(acc)
    zero = q.new_zeros((q.shape[0], q.shape[1], q.shape[3], v.shape[3]), dtype=acc)
    return recurrence.backward(dout, q, k, v, gate, zero, None)[4]


def _transition(name: str, log_decay: Tensor | None, transition: Tensor | None, length: int, heads: int,
                acc: torch.dtype, device) -> Tensor:
    if name == "decay":
        return _decay_powers(log_decay, torch.tensor([length], device=device), heads, acc)
    return transition


def _apply(name: str, transition: Tensor, state: Tensor, transpose: bool = False) -> Tensor:
    if name == "delta":
        return (transition.transpose(-1, -2) if transpose else transition) @ state
    return transition * state  # a scalar per head or a diagonal: its own transpose


# ------------------------------------------------------------ packing one all-gather

def _pack(parts: list[list[Tensor]], width: int) -> Tensor:
    """[width, X]: each run's tensors flattened side by side, zero rows for runs this rank lacks."""
    rows = [torch.cat([t.reshape(-1) for t in run]) for run in parts]
    out = rows[0].new_zeros((width, rows[0].numel()))
    for index, row in enumerate(rows):
        out[index] = row
    return out


def _unpack(gathered: Tensor, shapes: list[torch.Size]) -> list[Tensor]:
    """[world, width, X] back into one [world, width, *shape] tensor per packed part."""
    sizes = [int(torch.Size(s).numel()) for s in shapes]
    return [part.reshape(*gathered.shape[:2], *shape)
            for part, shape in zip(torch.split(gathered, sizes, dim=2), shapes)]


def _local_slices(mine: tuple[Run, ...]) -> list[slice]:
    slices, offset = [], 0
    for start, stop in mine:
        slices.append(slice(offset, offset + stop - start))
        offset += stop - start
    return slices


# ------------------------------------------------------------ the scans

def _start_states(name, table: RunTable, ends: Tensor, transitions: Tensor | None, log_decay, acc) -> dict:
    """{(rank, index): state its run starts from}, scanning the runs in global order."""
    starts, state = {}, torch.zeros_like(ends[0, 0])
    for rank, index, (start, stop) in table.in_order():
        starts[(rank, index)] = state
        transition = _transition(name, log_decay, None if transitions is None else transitions[rank, index],
                                 stop - start, ends.shape[3], acc, ends.device)
        state = _apply(name, transition, state) + ends[rank, index]
    return starts


def _end_grads(name, table: RunTable, demands: Tensor, transitions: Tensor | None, log_decay, acc) -> dict:
    """{(rank, index): gradient of its run's end state}, scanning the runs in reverse order."""
    grads, grad = {}, torch.zeros_like(demands[0, 0])
    for rank, index, (start, stop) in reversed(table.in_order()):
        grads[(rank, index)] = grad
        transition = _transition(name, log_decay, None if transitions is None else transitions[rank, index],
                                 stop - start, demands.shape[3], acc, demands.device)
        grad = _apply(name, transition, grad, transpose=True) + demands[rank, index]
    return grads


def _prepare(name, q, k, v, gate, decay, scale, table, rank):
    recurrence = REFERENCE[name]
    acc, mine = state_dtype(q.dtype), table.runs[rank]
    q = q * scale if scale != 1.0 else q
    gate = gate if recurrence.gate_is_operand else decay_tensor(decay, q)
    runs = [_rows(q, k, v, gate, rows, recurrence.gate_is_operand) for rows in _local_slices(mine)]
    return acc, gate, runs


def lasp2_forward(comm: Communicator, step: int, name: str, recurrence: Recurrence, q: Tensor, k: Tensor,
                  v: Tensor, gate: Tensor | None, decay: list[float], scale: float, table: RunTable) -> Tensor:
    """This rank's output rows of the recurrence over the whole sequence."""
    acc, log_decay, runs = _prepare(name, q, k, v, gate, decay, scale, table, comm.rank)
    summaries = [_summary(name, recurrence, rows, acc) for rows in runs]
    parts = [[end] + ([] if transition is None else [transition]) for end, transition in summaries]
    shapes = [t.shape for t in parts[0]]
    gathered = _unpack(comm.all_gather(_pack(parts, table.width), step, "lasp2 states", kind="states"), shapes)
    starts = _start_states(name, table, gathered[0], gathered[1] if len(gathered) > 1 else None, log_decay, acc)
    outs = [recurrence.forward(rows.q, rows.k, rows.v, rows.gate, starts[(comm.rank, index)])[0]
            for index, rows in enumerate(runs)]
    return torch.cat(outs, 2) if len(outs) > 1 else outs[0]


def lasp2_backward(comm: Communicator, step: int, name: str, recurrence: Recurrence, dout: Tensor, q: Tensor,
                   k: Tensor, v: Tensor, gate: Tensor | None, decay: list[float], scale: float,
                   table: RunTable) -> tuple[Tensor, ...]:
    """dq, dk, dv (and d_gate) of this rank's rows; one all-gather of states, transitions and demands."""
    acc, log_decay, runs = _prepare(name, q, k, v, gate, decay, scale, table, comm.rank)
    slices = _local_slices(table.runs[comm.rank])
    parts = []
    for rows, where in zip(runs, slices):
        end, transition = _summary(name, recurrence, rows, acc)
        demand = _demand(name, recurrence, rows, dout[:, :, where], acc)
        parts.append([end, demand] + ([] if transition is None else [transition]))
    shapes = [t.shape for t in parts[0]]
    gathered = _unpack(comm.all_gather(_pack(parts, table.width), step, "lasp2 states and state gradients",
                                       kind="states"), shapes)
    transitions = gathered[2] if len(gathered) > 2 else None
    starts = _start_states(name, table, gathered[0], transitions, log_decay, acc)
    finals = _end_grads(name, table, gathered[1], transitions, log_decay, acc)
    grads = [recurrence.backward(dout[:, :, where], rows.q, rows.k, rows.v, rows.gate, starts[(comm.rank, index)],
                                 finals[(comm.rank, index)])[:4]
             for index, (rows, where) in enumerate(zip(runs, slices))]
    joined = [torch.cat(parts, 2) if len(parts) > 1 else parts[0] for parts in zip(*grads) if parts[0] is not None]
    dq, rest = joined[0], joined[1:]
    return ((dq * scale if scale != 1.0 else dq), *rest)
