"""Ring and Ulysses attention on real gloo ranks equal single-device float64 attention.

Every case runs inside one spawn per world size (processes are the expensive part): the
ranks return their shards' (out, lse, dq, dk, dv) and byte counters, and the tests
reassemble them by global position and compare with `attention_forward/backward` on the
whole, unpadded sequence. Lengths are odd, so every layout pads; padding keys are hidden
by a Padding mask and padding queries get dout = 0.
"""
from __future__ import annotations

import types
from dataclasses import dataclass

import pytest
import torch

from seqweave.ir.mask import Causal, Document, Padding, SlidingWindow
from seqweave.ir.ops.attn_reference import attention_backward, attention_forward
from seqweave.ir.score_mod import NoScoreMod
from seqweave.ir.sharding import Layout, padded_length, plan_ring, shard_positions
from seqweave.runtime.comm import Communicator
from seqweave.runtime.sequence_parallel import (SequenceParallelError, ring_attention_backward,
                                                ring_attention_forward, ulysses_attention_backward,
                                                ulysses_attention_forward, ulysses_heads)
from seqweave.testing.distributed import run_ranks

B, HQ, D, SCALE = 1, 4, 8, 0.35
LENGTHS = {2: 37, 4: 61}  # unpadded; every layout pads them
LEFT_PAD = 3  # queries 0..2 see no key under causal & padding: out 0, lse -inf
MASKS = {"causal": Causal(), "window": Causal() & SlidingWindow(5, 0),
         "document": Causal() & Document(0), "leftpad": Causal() & Padding(1)}
GRADS = ("dq", "dk", "dv")


@dataclass(frozen=True)
class Case:
    scheme: str  # "ring" or "ulysses"
    world: int
    layout: Layout
    mask: str
    kv_heads: int = 2

    def __str__(self) -> str:
        return f"{self.scheme}-w{self.world}-{self.layout.value}-{self.mask}-kv{self.kv_heads}"

    @property
    def length(self) -> int:
        return LENGTHS[self.world]

    @property
    def padded(self) -> int:
        return padded_length(self.length, self.world, self.layout)


RING = [Case("ring", w, layout, m) for w in LENGTHS for layout in Layout for m in MASKS]
ULYSSES = ([Case("ulysses", 2, Layout.CONTIGUOUS, m) for m in MASKS]
           + [Case("ulysses", 4, Layout.ZIGZAG, m, kv) for kv in (2, 1) for m in MASKS]
           + [Case("ulysses", 4, Layout.STRIPED, "document", 4)])
CASES = RING + ULYSSES


# ----------------------------------------------------------------- inputs


def full_inputs(case: Case) -> dict[str, torch.Tensor]:
    """q, k, v, dout over the unpadded sequence, and the mask operands (segment ids, left padding)."""
    gen = torch.Generator().manual_seed(sum(map(ord, str(case))))
    n = case.length

    def draw(heads: int) -> torch.Tensor:
        return torch.randn(B, heads, n, D, generator=gen, dtype=torch.float64)

    segments = torch.tensor([0] * 9 + [1] * 14 + [2] * (n - 23)).unsqueeze(0)
    return {"q": draw(HQ), "k": draw(case.kv_heads), "v": draw(case.kv_heads), "dout": draw(HQ),
            "segments": segments, "valid": (torch.arange(n) >= LEFT_PAD).unsqueeze(0)}


def padded_inputs(case: Case) -> tuple[dict[str, torch.Tensor], tuple[torch.Tensor, ...]]:
    """Inputs padded to the layout's length (zeros; dout 0 on padding) and operands ($2 hides padding keys)."""
    full, pad = full_inputs(case), case.padded - case.length
    tensors = {name: torch.nn.functional.pad(full[name], (0, 0, 0, pad)) for name in ("q", "k", "v", "dout")}
    operands = (torch.nn.functional.pad(full["segments"], (0, pad), value=-1),
                torch.nn.functional.pad(full["valid"], (0, pad), value=False),
                (torch.arange(case.padded) < case.length).unsqueeze(0))
    return tensors, operands


def reference(case: Case) -> dict[str, torch.Tensor]:
    """Single-device float64 attention and gradients on the whole unpadded sequence."""
    full, mask = full_inputs(case), MASKS[case.mask]
    operands = (full["segments"], full["valid"])
    out, lse = attention_forward(full["q"], full["k"], full["v"], mask, NoScoreMod(), SCALE, operands)
    grads = attention_backward(full["dout"], full["q"], full["k"], full["v"], out, lse, mask, NoScoreMod(),
                               SCALE, operands)
    return {"out": out, "lse": lse, **dict(zip(GRADS, grads))}


# ----------------------------------------------------------------- rank side


def _bytes(comm: Communicator) -> dict[str, int]:
    return {kind: entry["bytes_sent"] for kind, entry in comm.stats.items()}


def _delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {kind: after[kind] - before[kind] for kind in after}


def run_case(comm: Communicator, case: Case) -> dict:
    """This rank's shard results and bytes sent (forward, backward) for one case."""
    tensors, operands = padded_inputs(case)
    mask = MASKS[case.mask] & Padding(2)

    def positions_of(rank: int) -> torch.Tensor:
        return shard_positions(case.layout, rank, case.world, case.padded)

    mine = positions_of(comm.rank)
    q, k, v, dout = (tensors[name][:, :, mine] for name in ("q", "k", "v", "dout"))
    common = (mask, NoScoreMod(), SCALE)
    if case.scheme == "ring":
        plan = plan_ring(mask, case.layout, case.world, case.padded)
        forward, backward, common = ring_attention_forward, ring_attention_backward, common + (plan,)
    else:
        forward, backward = ulysses_attention_forward, ulysses_attention_backward
    start = _bytes(comm)
    out, lse = forward(comm, q, k, v, *common, positions_of, operands)
    middle = _bytes(comm)
    grads = backward(comm, dout, q, k, v, out, lse, *common, positions_of, operands)
    return {"positions": mine, "out": out, "lse": lse, **dict(zip(GRADS, grads)),
            "forward_bytes": _delta(middle, start), "backward_bytes": _delta(_bytes(comm), middle)}


def rank_worker(rank: int, world: int, cases: list[Case]) -> dict[str, dict]:
    """Entry point on each spawned rank: every case of this world size, in one process group."""
    comm = Communicator(timeout_s=30)
    return {str(case): run_case(comm, case) for case in cases}


@pytest.fixture(scope="module")
def rank_results():
    """world -> per-rank {case id: results}; each world size is spawned once, on first use."""
    cache: dict[int, list[dict]] = {}

    def get(world: int) -> list[dict]:
        if world not in cache:
            cases = [case for case in CASES if case.world == world]
            cache[world] = run_ranks(world, rank_worker, cases, timeout_s=120)
        return cache[world]

    return get


def assemble(per_rank: list[dict], name: str, length: int) -> torch.Tensor:
    """The full padded tensor `name` from every rank's shard, by global position."""
    first = per_rank[0][name]
    full = torch.full(first.shape[:2] + (length,) + first.shape[3:], float("nan"), dtype=first.dtype)
    for result in per_rank:
        full[:, :, result["positions"]] = result[name]
    return full


# ----------------------------------------------------------------- tests


@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_single_device_float64(case: Case, rank_results):
    per_rank = [result[str(case)] for result in rank_results(case.world)]
    expected = reference(case)
    for name, want in expected.items():
        got = assemble(per_rank, name, case.padded)
        assert not torch.isnan(got).any(), f"{case}: {name} has NaN (or a position no rank returned)"
        torch.testing.assert_close(got[:, :, :case.length], want, atol=1e-10, rtol=0,
                                   msg=lambda text, name=name: f"{case} {name}: {text}")
    for name in ("dk", "dv"):  # padding keys are hidden: no gradient reaches them
        assert assemble(per_rank, name, case.padded)[:, :, case.length:].abs().sum() == 0


@pytest.mark.parametrize("case", [c for c in CASES if c.mask == "leftpad"], ids=str)
def test_fully_masked_rows_give_zero_and_minus_inf(case: Case, rank_results):
    per_rank = [result[str(case)] for result in rank_results(case.world)]
    out, lse = assemble(per_rank, "out", case.padded), assemble(per_rank, "lse", case.padded)
    assert (out[:, :, :LEFT_PAD] == 0).all() and torch.isneginf(lse[:, :, :LEFT_PAD]).all()
    assert torch.isfinite(lse[:, :, LEFT_PAD:]).all()


def home_returns(plan, rank: int) -> int:
    """How many sources' dK/dV paths end at `rank` away from home (the test's own walk of plan.sends)."""
    count = 0
    for source in range(plan.world):
        holder, step = source, 0
        while step < plan.world - 1 and plan.sends[step][holder]:
            holder, step = (holder + 1) % plan.world, step + 1
        count += holder == rank and holder != source
    return count


@pytest.mark.parametrize("case", RING, ids=str)
def test_ring_bytes_equal_plan(case: Case, rank_results):
    mask = MASKS[case.mask] & Padding(2)
    plan = plan_ring(mask, case.layout, case.world, case.padded)
    kv_bytes = 2 * B * case.kv_heads * (case.padded // case.world) * D * 8  # k + v shard, float64
    for rank, result in enumerate(rank_results(case.world)):
        sends = sum(plan.sends[step][rank] for step in range(case.world - 1))
        got = result[str(case)]
        assert got["forward_bytes"] == {"shift": sends * kv_bytes, "p2p": 0, "all_to_all": 0, "all_reduce": 0,
                                        "gather": 0, "states": 0}
        # backward: K/V on the forward's paths, dK/dV (fp64, same size) beside them, one return home per path
        assert got["backward_bytes"]["shift"] == 2 * sends * kv_bytes
        assert got["backward_bytes"]["p2p"] == home_returns(plan, rank) * kv_bytes


# Zigzag over 2 ranks cannot skip: each rank's two chunks border both of the other's.
@pytest.mark.parametrize("world, layout", [(2, Layout.CONTIGUOUS), (4, Layout.CONTIGUOUS), (4, Layout.ZIGZAG)])
def test_narrow_window_skips_ring_sends(world: int, layout: Layout):
    case = Case("ring", world, layout, "window")
    plan = plan_ring(MASKS["window"] & Padding(2), layout, world, case.padded)
    assert plan.sends_total() < world * (world - 1)
    if layout is Layout.CONTIGUOUS:  # a 5-token window reaches only the previous shard
        assert plan.sends_total() == world - 1


@pytest.mark.parametrize("case", ULYSSES, ids=str)
def test_ulysses_bytes(case: Case, rank_results):
    heads = ulysses_heads(case.world, HQ, case.kv_heads)
    local = case.padded // case.world
    kv_rep = case.kv_heads * heads.kv_repeat
    per_token = (HQ * D + 2 * kv_rep * D) * 8  # q, k, v (k/v replicated) in float64
    forward = B * local * (per_token + (HQ * D + HQ) * 8)  # there: q, k, v; back: out, lse
    backward = B * local * (2 * per_token + (2 * HQ * D + HQ) * 8)  # there: dout q k v out lse; back: dq dk dv
    for result in rank_results(case.world):
        got = result[str(case)]
        assert got["forward_bytes"]["all_to_all"] * case.world == forward * (case.world - 1)
        assert got["backward_bytes"]["all_to_all"] * case.world == backward * (case.world - 1)


@pytest.mark.parametrize("world, q_heads, kv_heads, repeat", [(4, 4, 2, 2), (4, 4, 1, 4), (2, 4, 2, 1), (4, 8, 8, 1)])
def test_ulysses_heads_split(world, q_heads, kv_heads, repeat):
    assert ulysses_heads(world, q_heads, kv_heads).kv_repeat == repeat


@pytest.mark.parametrize("world, q_heads, kv_heads, words", [(4, 6, 2, "use ring attention"),
                                                             (4, 12, 6, "use ring attention"),
                                                             (4, 8, 3, "multiple of 3 kv heads")])
def test_ulysses_rejects_unsplittable_heads(world, q_heads, kv_heads, words):
    with pytest.raises(SequenceParallelError, match=words):
        ulysses_heads(world, q_heads, kv_heads)


def test_ring_rejects_plan_for_another_world():
    comm = types.SimpleNamespace(rank=0, world=2)  # validation happens before any transfer
    plan = plan_ring(Causal(), Layout.CONTIGUOUS, 4, 16)
    x = torch.zeros(1, 1, 8, 4)
    with pytest.raises(SequenceParallelError, match="plan is for 4 ranks but the group has 2"):
        ring_attention_forward(comm, x, x, x, Causal(), NoScoreMod(), 1.0, plan,
                               lambda r: shard_positions(Layout.CONTIGUOUS, r, 2, 16))
