"""The sequence-parallel runtime makes every tensor on its inputs' device.

A tensor made without `device=` lands on torch's default device, which is the CPU in CPU
tests, so a forgotten `device=` passes every CPU test and breaks only on GPUs. Two audits
make the mistake visible here (see `seqweave.testing.device_audit`):

- real gloo ranks, CPU inputs, default device "meta": whatever lands on meta was made
  without a device;
- one process, inputs on "meta" and the wire faked: an index built on the CPU (positions,
  permutations) and applied to the data is a mix of devices, which CUDA would refuse.

Every distributed op goes through `distributed_ops.bind`, the path lowered programs take.
"""
from __future__ import annotations

import types
import warnings
from typing import Callable

import pytest
import torch
import torch.distributed as dist

from seqweave.ir.mask import Causal, Document
from seqweave.ir.ops.attn_reference import lse_dtype
from seqweave.runtime.comm import KINDS, Communicator
from seqweave.runtime.distributed_ops import bind
from seqweave.runtime.hybrid import HybridCommunicator, make_hybrid_communicators
from seqweave.runtime.local_attention import REFERENCE, LocalAttention
from seqweave.testing.device_audit import DeviceAudit
from seqweave.testing.distributed import run_ranks

WORLD, LENGTH, B, H, D = 2, 16, 1, 4, 8  # zigzag over 2 ranks: 8 positions each, in two chunks
MASK = Causal() & Document(0)
ATTENTION = ("ring", "ulysses", "hybrid")


def _node(op: str, **kwargs) -> types.SimpleNamespace:
    """The parts of an IR node that `bind` and the ops read."""
    return types.SimpleNamespace(op=op, kwargs=kwargs, results=[types.SimpleNamespace(name="x")])


def _attention_node(op: str) -> types.SimpleNamespace:
    return _node(op, mask=str(MASK), score_mod="none", scale=0.5, layout="zigzag", world=WORLD, length=LENGTH)


def _inputs(device: str) -> dict[str, torch.Tensor]:
    """This rank's shards (the values do not matter here, only where they live)."""
    local = LENGTH // WORLD
    q, k, v, dout = (torch.randn(B, H, local, D, dtype=torch.float64, device=device) for _ in range(4))
    segments = torch.zeros(1, LENGTH, dtype=torch.int64, device=device)  # Document's operand: whole sequence
    rows = torch.randn(B, local, H * D, dtype=torch.float64, device=device)  # [B, S, hidden] for sp.gather
    return {"q": q, "k": k, "v": v, "dout": dout, "segments": segments, "rows": rows}


def _run(comm: Communicator, step: int, node: types.SimpleNamespace, kernels: LocalAttention, *args):
    """One step of a lowered program: the bound op, called with the node's attributes as kwargs."""
    return bind(comm, step, node, kernels)(*args, **node.kwargs)


def run_every_op(comm: Communicator, x: dict[str, torch.Tensor], kernels: LocalAttention) -> list[torch.Tensor]:
    """Every distributed op once, forward and backward for attention; all the tensors they return."""
    results, operands = [], [x["segments"]]
    for scheme in ATTENTION:
        out, lse = _run(comm, 0, _attention_node(f"attn.{scheme}"), kernels, x["q"], x["k"], x["v"], operands)
        results += [out, lse, *_run(comm, 1, _attention_node(f"attn.{scheme}_backward"), kernels,
                                    x["dout"], x["q"], x["k"], x["v"], out, lse, operands)]
    gather = _node("sp.gather", dim=1, inner=1, length=LENGTH, world=WORLD, layout="zigzag", true_length=LENGTH - 3)
    all_reduce = _node("sp.all_reduce")
    return results + [_run(comm, 2, gather, kernels, x["rows"]), _run(comm, 3, all_reduce, kernels, x["rows"])]


# ----------------------------------------------------------------- default device meta, real ranks


def audited(audit: DeviceAudit, run: Callable[[], list[torch.Tensor]]) -> dict:
    """What the audit saw while `run` ran, the error it ended with if any, and its outputs' devices.
    Errors are kept, not raised: the findings say where the wrong tensor came from."""
    error, outputs = None, []
    try:
        with audit:
            outputs = run()
    except Exception as raised:  # noqa: BLE001
        error = f"{type(raised).__name__}: {raised}"
    return {"findings": audit.findings, "error": error, "devices": sorted({str(t.device) for t in outputs})}


def assert_clean(seen: dict, device: str, who: str = "") -> None:
    report = "\n".join([f"{who}:", *seen["findings"], f"error: {seen['error']}"])
    assert seen["findings"] == [] and seen["error"] is None, report
    assert seen["devices"] == [device], f"{who}: outputs on {seen['devices']}"


def meta_default_rank(rank: int, world: int) -> dict:
    """Run every op on CPU inputs while the default device is meta; what the audit saw."""
    x = _inputs("cpu")
    comm = HybridCommunicator(ulysses=WORLD, timeout_s=30)  # a world communicator that also runs attn.hybrid
    with torch.device("meta"):
        return audited(DeviceAudit(forbidden="meta"), lambda: run_every_op(comm, x, REFERENCE))


def test_no_tensor_lands_on_the_default_device():
    for rank, seen in enumerate(run_ranks(WORLD, meta_default_rank, timeout_s=60)):
        assert_clean(seen, "cpu", f"rank {rank}")


# ----------------------------------------------------------------- inputs on meta, wire faked


class WirelessCommunicator(HybridCommunicator):
    """Rank 0 of `world`, with the real buffer handling of `Communicator` but nothing on the
    wire: receives come back as the empty buffers the runtime allocated (on meta they hold
    no data anyway). Its inner/outer groups are wireless too, for attn.hybrid."""

    def __init__(self, world: int, ulysses: int | None = None) -> None:
        # Not super().__init__: it asks torch.distributed for the rank, and there is no group.
        self.group, self.rank, self.world, self.timeout_s = None, 0, world, 1.0
        self.stats = {kind: {"calls": 0, "bytes_sent": 0} for kind in KINDS}
        if ulysses is not None:
            self.inner, self.outer = WirelessCommunicator(ulysses), WirelessCommunicator(world // ulysses)

    def _global(self, peer: int) -> int:
        return peer

    def _start(self, start, peer, outgoing, step, op) -> None:
        return None  # the transfer never starts; `_await` below has nothing to wait for

    def _await(self, transfer, deadline, step, op) -> None:
        return None


def _shape_only_forward(q, k, v, mask, score_mod, scale, operands, q_positions, kv_positions):
    """Meta tensors carry no values to evaluate a mask on: (out, lse) of the right shapes, from q."""
    return q.new_zeros(q.shape[:3] + (v.shape[-1],)), q.new_zeros(q.shape[:3], dtype=lse_dtype(q.dtype))


def _shape_only_backward(dout, q, k, v, out, lse, mask, score_mod, scale, operands, q_positions, kv_positions):
    return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)


SHAPE_ONLY = LocalAttention("shape-only", _shape_only_forward, _shape_only_backward)


def test_indices_follow_the_data_to_its_device():
    comm, x = WirelessCommunicator(WORLD, ulysses=WORLD), _inputs("meta")
    assert_clean(audited(DeviceAudit(), lambda: run_every_op(comm, x, SHAPE_ONLY)), "meta", "meta inputs")


# ----------------------------------------------------------------- process groups


def test_hybrid_groups_use_the_worlds_backend():
    """Subgroups take the world's backend (NCCL on GPUs), never a hard-coded one: on a world of
    torch's fake backend, a subgroup asking for gloo would fail to be created."""
    fake_pg = pytest.importorskip("torch.testing._internal.distributed.fake_pg")
    assert not dist.is_initialized(), "another test left a process group behind"
    dist.init_process_group("fake", store=fake_pg.FakeStore(), rank=0, world_size=4)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch only sets timeouts on nccl and gloo groups
            inner, outer = make_hybrid_communicators(2, timeout_s=5)
        assert {dist.get_backend(inner.group), dist.get_backend(outer.group)} == {dist.get_backend()}
    finally:
        dist.destroy_process_group()
