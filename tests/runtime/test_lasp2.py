"""LASP-2's scan over ranks, property-tested with threads standing in for ranks: for any
recurrence (decay, GLA gates, delta rule), world size, layout and length, every rank's output
rows and gradients (q, k, v, gate) equal the single-device recurrence over the whole sequence
in float64, and each rank gathers once per pass. (Real gloo ranks: tests/e2e/test_linear_attention_sp.py.)"""
from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from seqweave.ir.ops.gated_linear_reference import delta_rule_recurrent, gla_recurrent
from seqweave.ir.ops.linear_attn_reference import linear_attention_recurrent
from seqweave.ir.ops.linear_recurrences import REFERENCE
from seqweave.ir.sharding import Layout, padded_length, shard_positions
from seqweave.runtime.lasp2 import lasp2_backward, lasp2_forward, run_table

B, H, D, DV = 1, 2, 4, 3


class ThreadGroup:
    """All-gather between threads: what each LASP-2 rank needs of a Communicator."""

    def __init__(self, world: int) -> None:
        self.world, self.slots = world, [None] * world
        self.barrier = threading.Barrier(world)
        self.calls = [0] * world

    def member(self, rank: int) -> "ThreadRank":
        return ThreadRank(self, rank)


class ThreadRank:
    def __init__(self, group: ThreadGroup, rank: int) -> None:
        self.group, self.rank = group, rank

    def all_gather(self, tensor: torch.Tensor, step: int, op: str, kind: str = "gather") -> torch.Tensor:
        self.group.slots[self.rank] = tensor.clone()
        self.group.barrier.wait()
        stacked = torch.stack(self.group.slots)
        self.group.barrier.wait()
        self.group.calls[self.rank] += 1
        return stacked


def _problem(name: str, length: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    q, k, v = rand(B, H, length, D), rand(B, H, length, D), rand(B, H, length, DV)
    if name == "delta":
        k = F.normalize(k, dim=-1)
        gate = torch.rand(B, H, length, generator=gen, dtype=torch.float64)
    elif name == "gla":
        gate = -torch.rand(B, H, length, D, generator=gen, dtype=torch.float64)
    else:
        gate = None
    return q, k, v, gate


def _whole(name: str, q, k, v, gate, decay: list[float]):
    """Single-device output and gradients (q, k, v, gate) by autograd through the recurrence."""
    leaves = [x.clone().requires_grad_() for x in (q, k, v)] + ([gate.clone().requires_grad_()] if gate is not None
                                                               else [])
    if name == "decay":
        out = linear_attention_recurrent(*leaves, torch.tensor(decay, dtype=torch.float64) if decay else None)[0]
    else:
        out = (gla_recurrent if name == "gla" else delta_rule_recurrent)(*leaves)[0]
    dout = torch.cos(torch.arange(out.numel(), dtype=torch.float64)).view(out.shape)
    out.backward(dout)
    return out.detach(), dout, [x.grad for x in leaves]


def _rows(x: torch.Tensor, positions: torch.Tensor, padded: int) -> torch.Tensor:
    """This rank's rows (zero rows past the end, as shard-sequence pads)."""
    grown = F.pad(x, [0, 0] * (x.dim() - 3) + [0, padded - x.shape[2]]) if x.dim() > 3 else \
        F.pad(x, [0, padded - x.shape[2]])
    return grown.index_select(2, positions)


@settings(max_examples=12)
@given(name=st.sampled_from(["decay", "gla", "delta"]), world=st.integers(2, 4), length=st.integers(3, 23),
       layout=st.sampled_from(["none", "zigzag"]), seed=st.integers(0, 1000))
def test_every_rank_matches_the_whole_sequence(name, world, length, layout, seed):
    decay = [0.05, 0.7] if name == "decay" else []
    q, k, v, gate = _problem(name, length, seed)
    want, dout, grads = _whole(name, q, k, v, gate, decay)
    padded = padded_length(length, world, Layout(layout))
    positions_of = lambda rank: shard_positions(Layout(layout), rank, world, padded)  # noqa: E731
    table, group = run_table(positions_of, world), ThreadGroup(world)
    results: dict[int, object] = {}

    def rank_main(rank: int) -> None:
        mine = positions_of(rank)
        local = [_rows(x, mine, padded) for x in (q, k, v)]
        local_gate = _rows(gate, mine, padded) if gate is not None else None
        comm = group.member(rank)
        try:
            out = lasp2_forward(comm, 0, name, REFERENCE[name], *local, local_gate, decay, 1.0, table)
            back = lasp2_backward(comm, 1, name, REFERENCE[name], _rows(dout, mine, padded), *local, local_gate,
                                  decay, 1.0, table)
            results[rank] = (mine, out, back)
        except BaseException as error:  # noqa: BLE001 - surfaced below, with the rank
            group.barrier.abort()
            results[rank] = error

    threads = [threading.Thread(target=rank_main, args=(rank,)) for rank in range(world)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for rank in range(world):
        assert not isinstance(results[rank], BaseException), (rank, results[rank])
        mine, out, back = results[rank]
        real = mine < length
        torch.testing.assert_close(out[:, :, real], want[:, :, mine[real]], rtol=1e-10, atol=1e-10)
        for got, whole in zip(back, grads):
            torch.testing.assert_close(got[:, :, real], whole[:, :, mine[real]], rtol=1e-9, atol=1e-9)
    assert group.calls == [2] * world  # one all-gather forward, one backward
