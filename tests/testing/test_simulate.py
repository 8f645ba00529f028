"""Simulated ranks: the in-memory communicator against the definitions of its calls (values
and the byte counts runtime/comm.py's Communicator keeps, written out here), its failure
reports (deadline, deadlock, a dead peer, a missing wait), and sharded attention graphs run
on P simulated ranks against the whole graph interpreted in float64, forward and backward."""
from __future__ import annotations

import copy
import time

import pytest
import torch

from seqweave.ir.interpreter import interpret
from seqweave.passes.shard_sequence import ShardSequence
from seqweave.runtime.comm import CommError
from seqweave.testing.equivalence import random_inputs
from seqweave.testing.graph_builder import GraphBuilder
from seqweave.testing.simulate import simulate, simulate_ranks
from seqweave.testing.strategies import AttentionShape, attention_graph, rotary_attention_graph

F64 = 8  # bytes per float64 element


def _tensor(rank: int, shape=(2, 3)) -> torch.Tensor:
    return torch.full(shape, float(rank), dtype=torch.float64) + torch.arange(6, dtype=torch.float64).view(shape) / 10


# ------------------------------------------------------------------ communicator semantics


def test_shift_sends_to_the_next_rank_and_counts_the_payload():
    def body(comm):
        received = comm.shift(_tensor(comm.rank), 0, "test shift", recv_like=_tensor(0)).wait_one()
        return received

    run = simulate_ranks(3, body)
    for rank, received in enumerate(run.results):
        torch.testing.assert_close(received, _tensor((rank - 1) % 3), atol=0, rtol=0)
        assert run.stats[rank]["shift"] == {"calls": 1, "bytes_sent": 6 * F64}
    assert [(e.action, e.peer) for e in run.traces[1]] == [("send", 2), ("recv", 0)]


def test_exchange_pairs_messages_by_peer_step_and_channel():
    """Two messages between the same ranks on two channels of one step never swap."""
    def body(comm):
        peer = (comm.rank + 2) % 4
        sends = [(peer, _tensor(comm.rank))]
        first = comm.exchange(sends, [(peer, _tensor(0))], 5, "channel 0", channel=0)
        second = comm.exchange([(peer, 2 * _tensor(comm.rank))], [(peer, _tensor(0))], 5, "channel 1", channel=1)
        return second.wait_one(), first.wait_one()

    run = simulate_ranks(4, body)
    for rank, (second, first) in enumerate(run.results):
        torch.testing.assert_close(first, _tensor((rank + 2) % 4), atol=0, rtol=0)
        torch.testing.assert_close(second, 2 * _tensor((rank + 2) % 4), atol=0, rtol=0)
        assert run.stats[rank]["p2p"] == {"calls": 2, "bytes_sent": 2 * 6 * F64}


def test_all_to_all_delivers_chunk_j_to_rank_j():
    def body(comm):
        chunks = [torch.full((2,), 10.0 * comm.rank + j, dtype=torch.float64) for j in range(comm.world)]
        return comm.all_to_all(chunks, 0, "test all_to_all")

    run = simulate_ranks(3, body)
    for rank, received in enumerate(run.results):
        assert [float(t[0]) for t in received] == [10.0 * i + rank for i in range(3)]
        assert run.stats[rank]["all_to_all"] == {"calls": 1, "bytes_sent": (3 - 1) * 2 * F64}


def test_all_gather_stacks_in_rank_order_and_all_reduce_sums_in_place():
    def body(comm):
        gathered = comm.all_gather(_tensor(comm.rank), 0, "test gather")
        mine = _tensor(comm.rank)
        reduced = comm.all_reduce(mine, 1, "test all_reduce")
        return gathered, reduced is mine, mine

    run = simulate_ranks(4, body)
    for rank, (gathered, in_place, reduced) in enumerate(run.results):
        torch.testing.assert_close(gathered, torch.stack([_tensor(r) for r in range(4)]), atol=0, rtol=0)
        assert in_place
        torch.testing.assert_close(reduced, sum(_tensor(r) for r in range(4)), atol=1e-12, rtol=0)
        assert run.stats[rank]["gather"] == {"calls": 1, "bytes_sent": 3 * 6 * F64}
        assert run.stats[rank]["all_reduce"] == {"calls": 1, "bytes_sent": 6 * F64}


def test_received_tensors_are_copies():
    """A sender editing its tensor after the send, or a receiver editing what it got, changes nobody else."""
    def body(comm):
        mine = _tensor(comm.rank)
        pending = comm.shift(mine, 0, "copy", recv_like=mine)
        mine.zero_()
        received = pending.wait_one()
        gathered = comm.all_gather(_tensor(comm.rank), 1, "copy gather")
        gathered.zero_()
        again = comm.all_gather(_tensor(comm.rank), 2, "copy gather again")
        return received, again

    run = simulate_ranks(2, body)
    for rank, (received, again) in enumerate(run.results):
        torch.testing.assert_close(received, _tensor(1 - rank), atol=0, rtol=0)
        torch.testing.assert_close(again, torch.stack([_tensor(0), _tensor(1)]), atol=0, rtol=0)


def test_a_receive_buffer_read_before_its_wait_holds_nan():
    def body(comm):
        pending = comm.shift(_tensor(comm.rank), 0, "early", recv_like=_tensor(0))
        early = pending._received[0].clone()
        pending.wait()
        return early

    assert all(torch.isnan(early).all() for early in simulate_ranks(2, body).results)


@pytest.mark.parametrize("call, message", [
    (lambda comm: comm.exchange([], [], 0, "op", channel=16), "channel"),
    (lambda comm: comm.exchange([], [], -1, "op"), "step"),
    (lambda comm: comm.exchange([(2, _tensor(0))], [], 0, "op"), "outside the group"),
    (lambda comm: comm.all_to_all([_tensor(0)], 0, "op"), "all_to_all needs 2 chunks"),
    (lambda comm: comm.all_to_all([_tensor(0), _tensor(0, (3, 2))], 0, "op"), "one shape"),
])
def test_argument_checks_are_the_communicators(call, message):
    with pytest.raises(ValueError, match=message):
        simulate_ranks(2, call)


def test_a_hybrid_communicator_groups_ranks_as_the_runtime_does():
    """4 ranks, Ulysses groups of 2: {0, 1}, {2, 3}; rings {0, 2}, {1, 3}."""
    def body(comm):
        inner = comm.inner.all_gather(torch.tensor([float(comm.rank)]), 0, "inner")
        outer = comm.outer.all_gather(torch.tensor([float(comm.rank)]), 0, "outer")
        return inner.flatten().tolist(), outer.flatten().tolist(), comm.inner.rank, comm.outer.rank

    run = simulate_ranks(4, body, ulysses=2)
    assert run.results == [([0, 1], [0, 2], 0, 0), ([0, 1], [1, 3], 1, 0), ([2, 3], [0, 2], 0, 1),
                           ([2, 3], [1, 3], 1, 1)]
    assert run.stats[0]["gather"]["calls"] == 2  # summed over the rank's communicators


# ------------------------------------------------------------------ failures are reported, never hang


def test_a_wait_past_its_deadline_raises_comm_error_naming_rank_step_and_op():
    def body(comm):
        if comm.rank == 1:
            time.sleep(0.4)  # busy, not waiting: only the deadline can end rank 0's wait
            return None
        return comm.exchange([], [(1, _tensor(0))], 3, "slow receive").wait()

    start = time.monotonic()
    with pytest.raises(CommError, match=r"rank 0: step 3, slow receive timed out after 0.1 s"):
        simulate_ranks(2, body, timeout_s=0.1)
    assert time.monotonic() - start < 5


def test_ranks_waiting_for_each_other_are_a_deadlock_not_a_hang():
    def body(comm):
        return comm.exchange([], [(1 - comm.rank, _tensor(0))], 0, "both receive").wait()

    start = time.monotonic()
    with pytest.raises(CommError, match="deadlock"):
        simulate_ranks(2, body, timeout_s=30)
    assert time.monotonic() - start < 5


def test_a_rank_that_fails_stops_the_others_and_its_error_is_raised():
    def body(comm):
        if comm.rank == 1:
            raise RuntimeError("boom")
        return comm.all_reduce(_tensor(0), 0, "waits for rank 1")

    with pytest.raises(RuntimeError, match="boom") as caught:
        simulate_ranks(2, body, timeout_s=30)
    assert "simulated rank 1" in " ".join(caught.value.__notes__)


def test_ranks_joining_different_collectives_are_told_so():
    def body(comm):
        if comm.rank == 0:
            return comm.all_reduce(_tensor(0), 0, "reduce")
        return comm.all_gather(_tensor(0), 0, "gather")

    with pytest.raises(CommError, match="all_reduce .* while rank . joined all_gather|all_gather .* while rank . "
                                        "joined all_reduce"):
        simulate_ranks(2, body)


def test_a_missing_wait_is_reported():
    def body(comm):
        if comm.rank == 0:
            comm.exchange([(1, _tensor(0))], [], 2, "send never waited")
            return None
        return comm.exchange([], [(0, _tensor(0))], 2, "receive").wait_one()

    with pytest.raises(CommError, match="rank 0: step 2, send never waited: a send to rank 1 started but never waited"):
        simulate_ranks(2, body)


def test_a_message_nobody_receives_is_reported():
    def body(comm):
        if comm.rank == 0:
            comm.exchange([(1, _tensor(0))], [], 4, "lonely send").wait()

    with pytest.raises(CommError, match="lonely send: a message to rank 1 .* never received"):
        simulate_ranks(2, body)


# ------------------------------------------------------------------ sharded attention on simulated ranks


def _backward_graph(shape: AttentionShape, mask: str, scale: float = 0.25):
    """`dq, dk, dv = attn.sdpa_backward(dout, q, k, v, out, lse, [operands])` by itself."""
    builder = GraphBuilder.new("backward")
    b, d, s = shape.batch, shape.head_dim, shape.q_len
    dout, q = (builder.input((b, shape.q_heads, s, d), torch.float64) for _ in range(2))
    k, v = (builder.input((b, shape.kv_heads, s, d), torch.float64) for _ in range(2))
    out = builder.input((b, shape.q_heads, s, d), torch.float64)
    lse = builder.input((b, shape.q_heads, s), torch.float64)
    operands = [builder.input((b, s), torch.int64)] if "$0" in mask else []
    kwargs = {"mask": mask, "score_mod": "none", "scale": scale, "kv_heads": shape.kv_heads}
    builder.graph.outputs = tuple(builder.node("attn.sdpa_backward", (dout, q, k, v, out, lse, operands), kwargs))
    return builder.graph


def _backward_inputs(shape: AttentionShape, mask: str) -> list:
    """dout and the forward's q, k, v, out, lse (the backward assumes out / lse are q, k, v's)."""
    forward = attention_graph(shape, mask)
    q, k, v, *operands = random_inputs(forward, seed=1)
    out, lse = interpret(forward, [q, k, v, *operands])
    dout = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    return [dout, q, k, v, out, lse, *operands]


def _sharded(graph, world: int, layout: str, attention: str, ulysses: int = 1):
    sharded = copy.deepcopy(graph)
    ShardSequence(world=world, layout=layout, length=_length(graph), attention=attention, ulysses=ulysses).run(sharded)
    return sharded


def _length(graph) -> int:
    node = next(n for n in graph.nodes if n.op.startswith("attn."))
    return int(node.args[1 if node.op.endswith("_backward") else 0].type.shape[2])


def _assert_every_rank_equals_whole(graph, sharded, inputs, world: int):
    whole = interpret(graph, [t.clone() for t in inputs])
    simulation = simulate(sharded, inputs, world)
    for rank in range(world):
        for got, want in zip(simulation.outputs[rank], whole, strict=True):
            torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    return simulation


# (attention, world, ulysses, layout, shape [batch, kv heads, GQA group, q len, kv len, head dim], mask)
CASES = [
    ("ring", 2, 1, "zigzag", AttentionShape(1, 1, 2, 7, 7, 4), "causal"),
    ("ring", 3, 1, "striped", AttentionShape(2, 2, 2, 9, 9, 4), "causal & sliding_window(3, 0)"),
    ("ring", 4, 1, "none", AttentionShape(1, 1, 1, 10, 10, 2), "chunked(4)"),
    ("ring", 4, 1, "zigzag", AttentionShape(1, 1, 2, 9, 9, 4), "causal & padding($0)"),
    ("ulysses", 2, 1, "zigzag", AttentionShape(1, 1, 2, 7, 7, 4), "causal"),  # MQA: K/V heads replicated
    ("ulysses", 4, 1, "none", AttentionShape(1, 2, 2, 9, 9, 2), "causal & document($0)"),
    ("hybrid", 4, 2, "zigzag", AttentionShape(1, 2, 2, 9, 9, 4), "causal"),
    ("hybrid", 4, 2, "striped", AttentionShape(2, 1, 2, 11, 11, 2), "sliding_window(2, 2)"),
]
#: the collective kinds each strategy's attention sends with, forward and backward (besides gathers)
KINDS = {"ring": ({"shift"}, {"shift", "p2p"}), "ulysses": ({"all_to_all"}, {"all_to_all"}),
         "hybrid": ({"all_to_all", "shift"}, {"all_to_all", "shift", "p2p"})}


@pytest.mark.parametrize("attention, world, ulysses, layout, shape, mask", CASES)
def test_sharded_forward_on_simulated_ranks_equals_the_whole_graph(attention, world, ulysses, layout, shape, mask):
    graph = attention_graph(shape, mask)
    sharded = _sharded(graph, world, layout, attention, ulysses)
    assert sharded.count(f"attn.{attention}") == 1 and sharded.count("attn.sdpa") == 0
    simulation = _assert_every_rank_equals_whole(graph, sharded, random_inputs(graph), world)
    assert simulation.kinds_used() == KINDS[attention][0] | {"gather"}


@pytest.mark.parametrize("attention, world, ulysses, layout, shape, mask", CASES)
def test_sharded_backward_on_simulated_ranks_equals_the_whole_graph(attention, world, ulysses, layout, shape, mask):
    graph = _backward_graph(shape, mask)
    sharded = _sharded(graph, world, layout, attention, ulysses)
    assert sharded.count(f"attn.{attention}_backward") == 1 and sharded.count("attn.sdpa_backward") == 0
    simulation = _assert_every_rank_equals_whole(graph, sharded, _backward_inputs(shape, mask), world)
    sent = simulation.kinds_used() - {"gather"}
    # a mask-aware plan may send no dK/dV home when every path ends at its own source
    assert KINDS[attention][0] <= sent <= KINDS[attention][1]


@pytest.mark.parametrize("attention, world, ulysses", [("ring", 3, 1), ("hybrid", 4, 2)])
@pytest.mark.parametrize("backward", [False, True])
def test_rotary_attention_on_simulated_ranks(backward, attention, world, ulysses):
    """Each rank rotates its own rows by their global positions (the hybrid's rank is the world's)."""
    shape = AttentionShape(1, 2, 2, 9, 9, 4)
    graph = rotary_attention_graph(shape, backward=backward)
    inputs = random_inputs(graph)
    inputs[3] = torch.arange(9).view(1, 9)  # token positions
    sharded = _sharded(graph, world, "zigzag", attention, ulysses)
    _assert_every_rank_equals_whole(graph, sharded, inputs, world)


def test_ranks_that_ran_different_schedules_fail_the_simulation():
    """A ring whose plan differs per rank (one rank told another world) fails, it does not hang."""
    graph = attention_graph(AttentionShape(1, 1, 1, 8, 8, 2), "causal")
    sharded = _sharded(graph, 2, "none", "ring")
    with pytest.raises(ValueError, match="sharded for \\[2\\] ranks"):
        simulate(sharded, random_inputs(graph), 4)


def test_simulate_refuses_an_unsharded_graph():
    graph = attention_graph(AttentionShape(1, 1, 1, 8, 8, 2), "causal")
    with pytest.raises(ValueError, match="not sharded"):
        simulate(graph, random_inputs(graph), 2)
