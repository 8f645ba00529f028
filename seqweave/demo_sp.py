"""`seqweave demo --sp P`: tiny Llama trained one step on P local gloo ranks under each
sequence-parallel strategy, against one process running eager."""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch

from seqweave.compiler import SeqweaveBackend
from seqweave.config import CompileOptions, Mesh
from seqweave.ir.mask_parser import parse_mask
from seqweave.ir.sharding import Layout, plan_ring, shard_positions
from seqweave.passes.cost import evaluate_expr, hybrid_bytes, ring_bytes, ulysses_bytes
from seqweave.passes.strategy import LayerShape, choose_strategy
from seqweave.runtime.hybrid import hybrid_plan
from seqweave.testing.compare import grad_errors
from seqweave.testing.distributed import run_ranks
from seqweave.testing.models import HEADS, SampleSpec, build_sample

#: (label, balance, attention)
STRATEGIES = (("ring (zigzag)", "zigzag", "ring"), ("ring (striped)", "striped", "ring"),
              ("ulysses", "zigzag", "ulysses"), ("hybrid (ulysses 2 x ring)", "zigzag", "hybrid"),
              ("auto", "zigzag", "auto"))
HYBRID_ULYSSES = 2
LAYERS = 2
ATTENTION_KINDS = {"attn.ring": ("shift", "p2p"), "attn.ulysses": ("all_to_all",),
                   "attn.hybrid": ("shift", "p2p", "all_to_all")}


@dataclass(frozen=True)
class SpRow:
    label: str
    attention_op: str
    loss_error: float
    grad_error: float
    bytes_measured: int       # attention traffic of the busiest rank, forward + backward, all layers
    bytes_predicted: int
    time_ratio: float         # compiled step / eager step (one process, whole sequence)
    saved_ratio: float        # activations saved for backward per rank / by one process

    def passed(self, tolerance: float) -> bool:
        return self.loss_error <= tolerance and self.grad_error <= tolerance and \
            self.bytes_measured == self.bytes_predicted


def _timed_step(model, inputs) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    loss = model(**inputs).loss
    loss.backward()
    return loss.detach(), time.perf_counter() - start


def run_strategy(rank: int, world: int, seq_len: int, balance: str, attention: str) -> dict:
    """One rank's view of one compiled training step (run by run_ranks in every process)."""
    model, inputs = build_sample(SampleSpec("llama-tiny", seq_len=seq_len, layers=LAYERS))
    reference = copy.deepcopy(model)
    mesh = Mesh(ulysses=HYBRID_ULYSSES, ring=world // HYBRID_ULYSSES) if attention == "hybrid" else Mesh(sp=world)
    backend = SeqweaveBackend(CompileOptions(mesh=mesh, balance=balance, attention=attention))
    compiled = torch.compile(model, backend=backend, fullgraph=True, dynamic=False)
    loss, _ = _timed_step(compiled, inputs)
    expected, eager_s = _timed_step(reference, inputs)
    single = SeqweaveBackend()
    _timed_step(torch.compile(copy.deepcopy(reference), backend=single, fullgraph=True, dynamic=False), inputs)
    grad_error, _ = grad_errors(model, reference)
    model.zero_grad()
    before = backend.comm_stats()
    _, compiled_s = _timed_step(compiled, inputs)
    after = backend.comm_stats()
    ops = {node.op for c in backend.graphs for node in c.graph.nodes if node.op in ATTENTION_KINDS}
    kinds = [kind for op in ops for kind in ATTENTION_KINDS[op]]
    sent = sum(after[k]["bytes_sent"] - before.get(k, {"bytes_sent": 0})["bytes_sent"] for k in kinds)
    saved = sum(c.saved_bytes for c in backend.graphs) / sum(c.saved_bytes for c in single.graphs)
    return {"loss_error": float((loss - expected).abs()), "grad_error": grad_error, "bytes": sent,
            "op": ",".join(sorted(ops)), "time_ratio": compiled_s / eager_s, "mask": backend.reports[0].mask,
            "saved_ratio": saved}


def chosen_bytes(mask: str, world: int, seq_len: int, balance: str) -> int:
    """What `attention="auto"` should send: the chooser's own prediction (forward + backward,
    times the layers), not a figure for whatever op ran."""
    shape = LayerShape(2, seq_len, HEADS, HEADS // 2, 16, world, 4)
    choice = choose_strategy(parse_mask(mask), shape, Layout(balance))
    predicted = choice.estimate.evaluate(**shape.values(choice.seq_len))
    return LAYERS * (predicted["forward_bytes"] + predicted["backward_bytes"])


def predicted_bytes(op: str, mask: str, world: int, seq_len: int, balance: str) -> int:
    """The cost model's forward + backward bytes of the busiest rank for `op`, times the layers."""
    shape = LayerShape(2, seq_len, HEADS, HEADS // 2, 16, world, 4)
    values = shape.values(seq_len)
    if op == "attn.ulysses":
        return LAYERS * evaluate_expr(ulysses_bytes() + ulysses_bytes(backward=True), **values)
    if op == "attn.hybrid":
        rings = world // HYBRID_ULYSSES
        positions_of = lambda r: shard_positions(Layout(balance), r, world, seq_len)  # noqa: E731
        plan = hybrid_plan(parse_mask(mask), positions_of, HYBRID_ULYSSES, rings)
        both = hybrid_bytes(HYBRID_ULYSSES, rings, plan) + hybrid_bytes(HYBRID_ULYSSES, rings, plan, backward=True)
        return LAYERS * evaluate_expr(both, **values)
    plan = plan_ring(parse_mask(mask), Layout(balance), world, seq_len)
    return LAYERS * evaluate_expr(ring_bytes(plan) + ring_bytes(plan, backward=True), **values)


def run_demo(world: int, seq_len: int) -> list[SpRow]:
    rows = []
    for label, balance, attention in STRATEGIES:
        if attention == "hybrid" and (world < 2 * HYBRID_ULYSSES or world % HYBRID_ULYSSES):
            continue
        ranks = run_ranks(world, run_strategy, seq_len, balance, attention, timeout_s=900)
        first = ranks[0]
        predicted = chosen_bytes(first["mask"], world, seq_len, balance) if attention == "auto" else \
            predicted_bytes(first["op"], first["mask"], world, seq_len, balance)
        rows.append(SpRow(f"{label}", first["op"], max(r["loss_error"] for r in ranks),
                          max(r["grad_error"] for r in ranks), max(r["bytes"] for r in ranks), predicted,
                          sum(r["time_ratio"] for r in ranks) / world, max(r["saved_ratio"] for r in ranks)))
    return rows
