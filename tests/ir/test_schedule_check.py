"""The static collective-schedule checker (`ir/schedule.py`): a golden schedule, agreement with
what the runtime really issues (recorded per rank through a stand-in communicator), every shipped
strategy passing, planted disagreements caught with both ranks named, dead and duplicated
collectives, and the compiler running it."""
from dataclasses import replace

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from seqweave.compiler import SeqweaveBackend
from seqweave.config import CompileOptions, Mesh
from seqweave.errors import PassError, ScheduleError
from seqweave.ir import schedule_events
from seqweave.ir.graph import Node, Value
from seqweave.ir.interpreter import bind_results, run_node
from seqweave.ir.graph import map_values
from seqweave.ir.ops import op_def
from seqweave.ir.parser import parse_graph
from seqweave.ir.schedule import (check_schedule, check_sharded_program, collective_schedule,
                                  dead_or_duplicate_collectives, schedule_text)
from seqweave.ir.sharding import Layout, shard_positions
from seqweave.passes.shard_sequence import ShardSequence
from seqweave.runtime.comm import MAX_CHANNELS
from seqweave.runtime.distributed_ops import DISTRIBUTED_OPS, bind
from seqweave.runtime.hybrid import HybridCommunicator
from seqweave.testing.strategies import (AttentionShape, GraphBuilder, attention_graph, rotary_attention_graph,
                                         structured_masks)

F64 = torch.float64


# ------------------------------------------------------------------ graphs

def _attention(shape: AttentionShape, mask: str, backward: bool = False):
    if not backward:
        return attention_graph(shape, mask)
    builder = GraphBuilder.new("attention")
    b, s, d = shape.batch, shape.q_len, shape.head_dim
    q, dout, out = (builder.input((b, shape.q_heads, s, d), F64) for _ in range(3))
    k, v = (builder.input((b, shape.kv_heads, s, d), F64) for _ in range(2))
    lse = builder.input((b, shape.q_heads, s), F64)
    operands = [builder.input((b, s), torch.int64)] if "$0" in mask else []
    kwargs = {"mask": mask, "score_mod": "none", "scale": 0.5, "kv_heads": shape.kv_heads}
    builder.graph.outputs = tuple(builder.node("attn.sdpa_backward", (dout, q, k, v, out, lse, operands), kwargs))
    return builder.graph


def _far_rotary(backward: bool):
    """A streaming-style attention: window pairs at true positions, sink pairs seen from a far
    query position, which runs the ring twice (once per set of pairs, each with its own plan)."""
    graph = rotary_attention_graph(AttentionShape(1, 1, 2, 9, 9, 4), backward=backward)
    node = graph.nodes[0]
    node.kwargs["positions"] = node.kwargs["positions"][:-1] + ", far=[sinks(1) & queries_from(4)], far_q=3)"
    node.kwargs["mask"] = "causal & (sliding_window(2, 0) | sinks(1))"
    return graph


def _linear(recurrence: str, length: int, backward: bool = False):
    builder = GraphBuilder.new("linear")
    b, h, d = 1, 2, 4
    q, k, v = (builder.input((b, h, length, d), F64) for _ in range(3))
    gate_shape = {"gla": (b, h, length, d), "delta": (b, h, length)}.get(recurrence)
    gate = [builder.input(gate_shape, F64)] if gate_shape else []
    kwargs = {"decay": [0.1, 0.2] if recurrence == "decay" else [], "scale": 0.5, "recurrence": recurrence}
    if backward:
        dout = builder.input((b, h, length, d), F64)
        builder.graph.outputs = tuple(builder.node("attn.linear_backward", (dout, q, k, v, *gate), kwargs))
    else:
        builder.graph.outputs = tuple(builder.node("attn.linear", (q, k, v, *gate), kwargs))
    return builder.graph


def _sharded(graph, world: int, length: int, layout: str = "zigzag", attention: str = "ring", ulysses: int = 1):
    ShardSequence(world=world, layout=layout, length=length, attention=attention, ulysses=ulysses).run(graph)
    return graph


SUM_OVER_SEQUENCE = '''graph inference(%ids: i64[1, 8], %w: f32[16, 4]) {
  %emb = core.embedding(%w, %ids) : f32[1, 8, 4]
  %total = core.sum.dim_IntList(%emb, [1]) : f32[1, 4]
  return (%total, %emb)
}
'''


# ------------------------------------------------------------------ golden

GOLDEN = """rank 0:
  0 b0   send [32] f64 to rank 1 tag 0  (%sdpa0 = attn.ring (node 3): ring forward shift of k/v, step 0)
  1 b1   all_gather [1, 2, 4, 4] f64 over (0, 1)  (%gather = sp.gather (node 4): gather of %gather)
  2 b2   all_gather [1, 2, 4] f64 over (0, 1)  (%gather_1 = sp.gather (node 5): gather of %gather_1)
rank 1:
  0 b0   recv [32] f64 from rank 0 tag 0  (%sdpa0 = attn.ring (node 3): ring forward shift of k/v, step 0)
  1 b1   all_gather [1, 2, 4, 4] f64 over (0, 1)  (%gather = sp.gather (node 4): gather of %gather)
  2 b2   all_gather [1, 2, 4] f64 over (0, 1)  (%gather_1 = sp.gather (node 5): gather of %gather_1)
"""

GOLDEN_BACKWARD = """rank 0:
  0 b0   send [32] f64 to rank 1 tag 0  (%sdpa_backward0 = attn.ring_backward (node 6): ring backward shift of k/v, step 0)
  1 b0   send [32] f64 to rank 1 tag 1  (%sdpa_backward0 = attn.ring_backward (node 6): ring backward shift of dk/dv, step 0)
  2 b1   recv [32] f64 from rank 1 tag 18  (%sdpa_backward0 = attn.ring_backward (node 6): ring backward return of dk/dv, step 1)
"""  # noqa: E501


def test_golden_schedule_of_a_causal_ring_on_two_contiguous_ranks():
    """Causal, contiguous halves: rank 1's queries need rank 0's keys, rank 0 needs nothing from
    rank 1, so one K/V message 0 -> 1 (k and v: 2 x 16 elements) and no message back."""
    graph = _sharded(_attention(AttentionShape(1, 1, 2, 8, 8, 4), "causal"), 2, 8, layout="none")
    assert schedule_text(graph, 2) == GOLDEN


def test_golden_backward_returns_the_key_gradients_home():
    """The backward follows the same path: K/V and their dK/dV go 0 -> 1 at step 0; rank 1, the
    path's last holder, sends rank 0's dK/dV home at step 1 (tag 1*16 + channel 2)."""
    graph = _sharded(_attention(AttentionShape(1, 1, 2, 8, 8, 4), "causal", backward=True), 2, 8, layout="none")
    text = schedule_text(graph, 2)
    assert text.startswith(GOLDEN_BACKWARD), text
    rank1 = [line for line in text.split("rank 1:\n")[1].splitlines() if "ring" in line]
    assert [line.split("(")[0].split(maxsplit=2)[2].strip() for line in rank1] == [
        "recv [32] f64 from rank 0 tag 0", "recv [32] f64 from rank 0 tag 1", "send [32] f64 to rank 0 tag 18"]


# ------------------------------------------------------------------ what the runtime really issues

class _Log:
    """One rank's transfers as the runtime issues them; batches close at the first wait after a post."""

    def __init__(self) -> None:
        self.entries, self.batch, self.open = [], 0, False

    def post(self, *entry) -> None:
        self.entries.append((*entry, self.batch))
        self.open = True

    def close(self) -> None:
        if self.open:
            self.batch, self.open = self.batch + 1, False


class _Posted:
    def __init__(self, log: _Log, received: list) -> None:
        self.log, self.received = log, received

    def wait(self):
        self.log.close()
        return self.received

    def wait_one(self):
        received = self.wait()
        return received[0] if received else None


class Recording:
    """A Communicator stand-in: records every call (kind, group, shape, dtype, peer, tag) and
    answers at once with tensors of the right shape; ranks run one after another."""

    def __init__(self, name: str, members: tuple[int, ...], me: int, log: _Log) -> None:
        self.name, self.members, self.rank, self.world, self.log = name, members, me, len(members), log

    def shift(self, tensor, step, op, *, recv_like=None, channel=0):
        sends = [] if tensor is None else [((self.rank + 1) % self.world, tensor)]
        recvs = [] if recv_like is None else [((self.rank - 1) % self.world, recv_like)]
        return self.exchange(sends, recvs, step, op, channel=channel)

    def exchange(self, sends, recvs, step, op, *, channel=0, kind="p2p"):
        tag = step * MAX_CHANNELS + channel
        for direction, pairs in (("send", sends), ("recv", recvs)):
            for peer, tensor in pairs:
                self.log.post(direction, self.name, self.members, tuple(tensor.shape), tensor.dtype,
                              self.members[peer], tag)
        return _Posted(self.log, [torch.zeros_like(like) for _, like in recvs])

    def _collective(self, kind, tensor) -> None:
        self.log.close()
        self.log.post(kind, self.name, self.members, tuple(tensor.shape), tensor.dtype, None, None)
        self.log.close()

    def all_to_all(self, chunks, step, op, kind="all_to_all"):
        self._collective("all_to_all", chunks[0])
        return list(chunks)

    def all_gather(self, tensor, step, op, kind="gather"):
        self._collective("all_gather", tensor)
        return torch.stack([tensor] * self.world)

    def all_reduce(self, tensor, step, op, reduce_op=None):
        self._collective("all_reduce", tensor)
        return tensor


class RecordingHybrid(Recording, HybridCommunicator):
    def __init__(self, rank: int, world: int, ulysses: int, log: _Log) -> None:
        super().__init__("world", tuple(range(world)), rank, log)
        group, member = divmod(rank, ulysses)
        inner = tuple(group * ulysses + j for j in range(ulysses))
        outer = tuple(g * ulysses + member for g in range(world // ulysses))
        self.inner, self.outer = Recording("ulysses", inner, member, log), Recording("ring", outer, group, log)


def _recorded(graph, rank: int, world: int, layout: str, ulysses: int) -> list[tuple]:
    """Run the sharded graph as `rank` with the runtime's own op implementations; what it sent."""
    log = _Log()
    comm = RecordingHybrid(rank, world, ulysses, log) if ulysses > 1 else Recording("world", tuple(range(world)),
                                                                                      rank, log)
    gen = torch.Generator().manual_seed(rank)
    inputs = [-torch.rand([int(d) for d in v.type.shape], generator=gen, dtype=v.type.dtype)  # <= 0: GLA log gates
              if v.type.dtype.is_floating_point else torch.zeros([int(d) for d in v.type.shape], dtype=v.type.dtype)
              for v in graph.inputs[:-1]]
    padded = int(graph.inputs[-1].type.shape[0]) * world
    env = dict(zip(graph.inputs, [*inputs, shard_positions(Layout(layout), rank, world, padded)]))
    for index, node in enumerate(graph.nodes):
        if node.op not in DISTRIBUTED_OPS:
            run_node(node, env)
            continue
        args, kwargs = map_values(node.args, env.__getitem__), map_values(node.kwargs, env.__getitem__)
        bind_results(node, bind(comm, index, node)(*args, **kwargs), env)
    return log.entries


def _predicted(graph, rank: int, world: int, ulysses: int) -> list[tuple]:
    return [(e.kind, e.comm, e.group, e.shape, e.dtype, e.peer, e.tag, e.batch)
            for e in collective_schedule(graph, rank, world, ulysses)]


SHAPE = AttentionShape(1, 1, 2, 7, 7, 4)  # GQA 2:1, an odd length
CASES = {
    "ring-causal-zigzag-w3": (lambda b: _attention(SHAPE, "causal", b), 3, "zigzag", "ring", 1),
    "ring-window-none-w4": (lambda b: _attention(replace(SHAPE, q_len=9, kv_len=9), "causal & sliding_window(2, 0)",
                                                 b), 4, "none", "ring", 1),
    "ring-document-striped-w2": (lambda b: _attention(SHAPE, "causal & document($0)", b), 2, "striped", "ring", 1),
    "ulysses-gqa-w2": (lambda b: _attention(SHAPE, "causal", b), 2, "zigzag", "ulysses", 1),
    "hybrid-u2-w4": (lambda b: _attention(SHAPE, "causal", b), 4, "zigzag", "hybrid", 2),
    "lasp2-decay-zigzag-w2": (lambda b: _linear("decay", 7, b), 2, "zigzag", "ring", 1),
    "lasp2-gla-none-w3": (lambda b: _linear("gla", 7, b), 3, "none", "ring", 1),
    "lasp2-delta-zigzag-w2": (lambda b: _linear("delta", 8, b), 2, "zigzag", "ring", 1),
    "ring-far-rotation-zigzag-w3": (_far_rotary, 3, "zigzag", "ring", 1),
}


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "backward"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_schedule_is_what_the_runtime_issues(case, backward):
    """Transfer for transfer (kind, group, shape, dtype, peer, tag, batch), every rank."""
    build, world, layout, attention, ulysses = CASES[case]
    graph = build(backward)
    length = int(graph.inputs[0].type.shape[2])
    _sharded(graph, world, length, layout, attention, ulysses)
    for rank in range(world):
        assert _predicted(graph, rank, world, ulysses) == _recorded(graph, rank, world, layout, ulysses), rank
    check_schedule(graph, world, ulysses)


# ------------------------------------------------------------------ every shipped strategy passes

@pytest.mark.parametrize("mask", ["causal", "causal & sliding_window(3, 0)", "full", "sliding_window(2, 2)"])
@pytest.mark.parametrize("layout", [layout.value for layout in Layout])
@pytest.mark.parametrize("world", [2, 3, 4])
def test_every_ring_layout_and_mask_passes(mask, layout, world):
    for backward in (False, True):
        graph = _sharded(_attention(replace(SHAPE, q_len=11, kv_len=11), mask, backward), world, 11, layout)
        check_schedule(graph, world)
        assert dead_or_duplicate_collectives(graph) == []


@pytest.mark.parametrize("world, attention, ulysses", [(2, "ulysses", 1), (4, "ulysses", 1), (4, "hybrid", 2),
                                                       (6, "hybrid", 2), (6, "hybrid", 3), (8, "hybrid", 4)])
@pytest.mark.parametrize("layout", [layout.value for layout in Layout])
def test_every_ulysses_and_hybrid_mesh_passes(world, attention, ulysses, layout):
    shape = AttentionShape(1, 1, world, 13, 13, 4)  # one KV head for `world` query heads: replicated per group
    for backward in (False, True):
        graph = _sharded(_attention(shape, "causal & sliding_window(4, 0)", backward), world, 13, layout, attention,
                         ulysses)
        assert graph.count(f"attn.{attention}" + ("_backward" if backward else "")) == 1
        check_sharded_program(graph, world, ulysses)


@pytest.mark.parametrize("recurrence", ["decay", "gla", "delta"])
@pytest.mark.parametrize("layout", ["none", "zigzag"])
@pytest.mark.parametrize("world", [2, 3, 4])
def test_every_lasp2_layout_passes(recurrence, layout, world):
    for backward in (False, True):
        graph = _sharded(_linear(recurrence, 11, backward), world, 11, layout)
        assert graph.count("attn.lasp2" + ("_backward" if backward else "")) == 1
        check_sharded_program(graph, world)


@given(world=st.integers(1, 6), layout=st.sampled_from([layout.value for layout in Layout]),
       attention=st.sampled_from(["ring", "ulysses", "hybrid", "auto"]), mask=structured_masks(),
       half=st.integers(1, 8), kv_heads=st.sampled_from([1, 2]), group=st.sampled_from([1, 2, 4]),
       backward=st.booleans())
@settings(max_examples=40)
def test_the_shipped_pass_always_passes_the_check(world, layout, attention, mask, half, kv_heads, group, backward):
    ulysses = 2 if attention == "hybrid" else 1
    assume(attention != "hybrid" or (world % 2 == 0 and world >= 4))
    length = 2 * half + 1
    graph = _attention(AttentionShape(1, kv_heads, group, length, length, 4), mask, backward)
    try:
        _sharded(graph, world, length, layout, attention, ulysses)
    except PassError:
        assume(False)  # heads that the strategy cannot split: refused by the pass, nothing to check
    check_sharded_program(graph, world, ulysses)


# ------------------------------------------------------------------ planted disagreements

def _ring_graph(world: int, layout: str = "none", mask: str = "causal"):
    return _sharded(_attention(replace(SHAPE, q_len=8, kv_len=8), mask), world, 8, layout)


def test_a_rank_skipping_a_send_its_peer_waits_for_is_caught(monkeypatch):
    """Causal over 3 contiguous ranks: rank 1 forwards its K/V to rank 2 at step 0. A plan that
    drops that send on rank 1 only leaves rank 2's receive without its send."""
    original = schedule_events._ring_forward

    def skipping(out, group, plan, kv):
        if group.me == 1:
            sends = [list(row) for row in plan.sends]
            sends[0][1] = False
            plan = replace(plan, sends=tuple(map(tuple, sends)))
        original(out, group, plan, kv)

    graph = _ring_graph(3)
    check_schedule(graph, 3)
    monkeypatch.setattr(schedule_events, "_ring_forward", skipping)
    with pytest.raises(ScheduleError, match="a receive has no send") as caught:
        check_schedule(graph, 3)
    message = str(caught.value)
    assert "rank 2 step 0: recv [24] f64 from rank 1 tag 0" in message and "rank 1 posts 0 send(s)" in message


def test_a_plan_that_never_delivers_what_a_step_computes_with_is_caught(monkeypatch):
    """Every rank agrees on a plan that stops rank 0's K/V at rank 1 (sends and receives still
    pair), but causal rank 2 needs them at step 2: the ranks would agree and still fail."""
    original = schedule_events.Plans.ring

    def dropped(self, *args):
        plan = original(self, *args)
        sends = [list(row) for row in plan.sends]
        sends[1][1] = False
        return replace(plan, sends=tuple(map(tuple, sends)))

    graph = _ring_graph(3)
    monkeypatch.setattr(schedule_events.Plans, "ring", dropped)
    with pytest.raises(ScheduleError, match="rank 2 computes at ring step 2 with the K/V of rank 0, which never "
                                            "reach it: rank 1 does not forward them at step 1"):
        check_schedule(graph, 3)


def test_a_group_that_leaves_ranks_out_is_caught(monkeypatch):
    """Ranks 0 and 1 all-reduce over (0, 1) while 2 and 3 all-reduce over all four."""
    graph = parse_graph(SUM_OVER_SEQUENCE)
    _sharded(graph, 4, 8, layout="none")
    check_schedule(graph, 4)
    original = schedule_events._Rank.world_group

    def partial_group(self):
        group = original(self)
        return replace(group, members=(0, 1)) if self.rank < 2 else group

    monkeypatch.setattr(schedule_events._Rank, "world_group", partial_group)
    with pytest.raises(ScheduleError) as caught:
        check_schedule(graph, 4)
    message = str(caught.value)
    assert "collective #0 over (0, 1, 2, 3)" in message
    assert "rank 0 has no such collective (step 0: all_reduce [1, 4] f32 over (0, 1)" in message
    assert "rank 2 step 0: all_reduce [1, 4] f32 over (0, 1, 2, 3)" in message


def test_a_collective_that_depends_on_the_rank_is_caught(monkeypatch):
    """Rank 1 all-reduces where every other rank gathers: both ranks' steps are named."""
    original = schedule_events._gather

    def conditional(ctx, node):
        (schedule_events._all_reduce if ctx.rank == 1 else original)(ctx, node)

    graph = _ring_graph(2, layout="zigzag")
    monkeypatch.setitem(schedule_events.RULES, "sp.gather", conditional)
    with pytest.raises(ScheduleError, match="ranks disagree on collective #0") as caught:
        check_schedule(graph, 2)
    message = str(caught.value)
    assert "rank 0 step 2: all_gather [1, 2, 4, 4] f64 over (0, 1)" in message
    assert "rank 1 step 2: all_reduce [1, 2, 4, 4] f64 over (0, 1)" in message
    assert "what to do" in message


def test_receives_posted_before_sends_on_every_rank_deadlock(monkeypatch):
    """Pairs still match, but each rank waits for its receive before sending: a wait cycle."""
    original = schedule_events._Recorder.exchange

    def receive_first(self, group, sends, recvs, tag, payload, what):
        original(self, group, [], recvs, tag, payload, what)
        self.wait()
        original(self, group, sends, [], tag, payload, what)

    graph = _ring_graph(2, layout="zigzag", mask="full")
    monkeypatch.setattr(schedule_events._Recorder, "exchange", receive_first)
    with pytest.raises(ScheduleError, match="deadlock") as caught:
        check_schedule(graph, 2)
    message = str(caught.value)
    assert "rank 0 step 0: recv [32] f64 from rank 1 tag 0" in message and "waits for rank 1" in message
    assert "rank 1 step 0: recv [32] f64 from rank 0 tag 0" in message and "waits for rank 0" in message


def test_a_message_whose_sides_disagree_on_shape_is_caught(monkeypatch):
    original = schedule_events._ring_forward

    def short(out, group, plan, kv):
        original(out, group, plan, ((kv[0][0] - 1,), kv[1]) if group.me == 0 else kv)

    graph = _ring_graph(2, layout="zigzag", mask="full")
    monkeypatch.setattr(schedule_events, "_ring_forward", short)
    with pytest.raises(ScheduleError, match="a message's sides disagree") as caught:
        check_schedule(graph, 2)
    assert "rank 0 step 0: send [31] f64 to rank 1" in str(caught.value)
    assert "rank 1 step 1: recv [32] f64 from rank 0" in str(caught.value)


def test_an_op_that_communicates_without_a_rule_is_refused(monkeypatch):
    monkeypatch.delitem(schedule_events.RULES, "sp.gather")
    with pytest.raises(ScheduleError, match="no schedule rule for sp.gather"):
        check_schedule(_ring_graph(2, layout="zigzag"), 2)


def test_a_graph_sharded_for_another_mesh_is_refused():
    with pytest.raises(ScheduleError, match="planned for 2 ranks but the program runs on 4"):
        check_schedule(_ring_graph(2, layout="zigzag"), 4)


# ------------------------------------------------------------------ dead and duplicate collectives

def _append(graph, op: str, args: tuple, kwargs: dict, name: str) -> Value:
    node = Node(op, args, kwargs, [])
    node.results = [Value(name, op_def(op).infer(node)[0], node)]
    graph.nodes.append(node)
    return node.results[0]


def test_a_dead_gather_is_reported():
    graph = _ring_graph(2, layout="zigzag")
    q = graph.nodes[0].results[0]  # this rank's rows of q
    _append(graph, "sp.gather", (q,), {"dim": 2, "inner": 1, "length": 8, "world": 2, "layout": "zigzag"}, "unread")
    check_schedule(graph, 2)  # the ranks agree on it; it is only wasted
    assert dead_or_duplicate_collectives(graph) == [
        "dead: %unread = sp.gather: nobody reads its results and they are not outputs"]
    with pytest.raises(ScheduleError, match="1 wasted collective"):
        check_sharded_program(graph, 2)


def test_a_duplicated_all_reduce_is_reported():
    graph = _sharded(parse_graph(SUM_OVER_SEQUENCE), 2, 8, layout="none")
    first = next(node for node in graph.nodes if node.op == "sp.all_reduce")
    again = _append(graph, "sp.all_reduce", first.args, dict(first.kwargs), "again")
    graph.outputs = (*graph.outputs, again)
    assert dead_or_duplicate_collectives(graph) == [
        f"duplicate: %again = sp.all_reduce repeats %{first.results[0].name} (same op, attributes and operands)"]


def test_the_same_op_on_another_operand_is_no_duplicate():
    graph = _ring_graph(2, layout="zigzag")
    gathers = [node for node in graph.nodes if node.op == "sp.gather"]
    assert len(gathers) == 2 and gathers[0].kwargs == gathers[1].kwargs
    assert dead_or_duplicate_collectives(graph) == []


# ------------------------------------------------------------------ the compiler runs it

MODEL = '''graph inference(%q: f64[1, 2, 8, 4], %k: f64[1, 1, 8, 4], %v: f64[1, 1, 8, 4]) {
  %out, %lse = attn.sdpa(%q, %k, %v, [], mask="causal", score_mod="none", scale=0.5, kv_heads=1) : f64[1, 2, 8, 4], f64[1, 2, 8]
  return (%out,)
}
'''  # noqa: E501


@pytest.mark.parametrize("verify", [True, False])
def test_the_compiler_checks_every_sharded_program_when_verifying(monkeypatch, verify):
    calls = []
    monkeypatch.setattr("seqweave.compiler.check_sharded_program", lambda *args: calls.append(args))
    monkeypatch.setattr(SeqweaveBackend, "_sharded_program", lambda self, graph, world: "program")
    backend = SeqweaveBackend(CompileOptions(mesh=Mesh(sp=2), attention="ring", verify=verify))
    assert backend._compile_real(parse_graph(MODEL), None) == "program"
    assert [(graph.name, world) for graph, world, _ in calls] == ([("inference", 2)] if verify else [])
    if verify:
        assert calls[0][0].count("attn.ring") == 1  # the sharded program, not the whole one


def test_the_compiler_refuses_a_program_whose_ranks_disagree(monkeypatch):
    original = schedule_events._gather
    monkeypatch.setitem(schedule_events.RULES, "sp.gather",
                        lambda ctx, node: (schedule_events._all_reduce if ctx.rank else original)(ctx, node))
    monkeypatch.setattr(SeqweaveBackend, "_sharded_program", lambda self, graph, world: "program")
    backend = SeqweaveBackend(CompileOptions(mesh=Mesh(sp=2), attention="ring"))
    with pytest.raises(ScheduleError, match="rank 1 step .*: all_reduce"):
        backend._compile_real(parse_graph(MODEL), None)


def test_checking_a_small_model_takes_milliseconds():
    """Measured here: about 10 ms of CPU for this 4-rank forward+backward pair, most of it planning
    the ring (which the runtime also does when it lowers); 170 ms for 32 layers on 8 ranks."""
    import time
    graphs = [_sharded(_attention(replace(SHAPE, q_len=64, kv_len=64), "causal", b), 4, 64) for b in (False, True)]
    start = time.perf_counter()
    for graph in graphs:
        check_sharded_program(graph, 4)
    elapsed = time.perf_counter() - start
    print(f"schedule check: {elapsed * 1e3:.1f} ms")
    assert elapsed < 1.0
