"""Linear attention across gloo ranks (LASP-2): recognised linear models (decay, normalised,
GLA and delta-rule loops), and a hybrid with a softmax layer, train on 2, 3 and 4 ranks
exactly as one float64 process does, at lengths that divide neither the chunk nor the ranks;
each linear layer runs `attn.lasp2`, the softmax layer ring / Ulysses; the bytes the runtime
sends for states equal the cost model's and do not grow with N."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import seqweave
from seqweave.ir.sharding import Layout, chunks_per_rank
from seqweave.passes.cost import graph_lasp2_bytes
from seqweave.testing.distributed import run_ranks
from seqweave.testing.linear_models import TinyLM

TOLERANCE = 1e-5
#: (pattern, balance, N): l decay, c causal + normaliser, g GLA loop, d delta-rule loop, s softmax
CASES = [("lc", "none", 37), ("ls", "zigzag", 37), ("lc", "none", 53), ("gd", "zigzag", 19)]
#: the same model at two lengths on 2 ranks (bytes independent of N); the hybrid on 3 and 4
#: (zigzag, two runs per rank); the gated and delta loops (transitions gathered too) on 2 and 3
CASES_BY_WORLD = {2: [CASES[0], CASES[2], CASES[3]], 3: [CASES[1], CASES[3]], 4: [CASES[1]]}


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.detach().double() - want.detach()).abs().max() / want.detach().abs().max())


def _case(world: int, pattern: str, balance: str, length: int) -> dict:
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = TinyLM(pattern)
    reference = copy.deepcopy(model).double()
    ids, targets = torch.randint(0, 64, (2, length)), torch.randint(0, 64, (2, length))
    backend = seqweave.backend(mesh=seqweave.Mesh(sp=world), balance=balance, timeout=60)
    logits = torch.compile(model, backend=backend, fullgraph=True, dynamic=False)(ids)
    F.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()  # the loss outside the graph
    want = reference(ids)
    F.cross_entropy(want.flatten(0, 1), targets.flatten()).backward()
    grads = max(_relative(p.grad, q.grad) for p, q in zip(model.parameters(), reference.parameters()))
    runs = chunks_per_rank(Layout(balance))
    return {"logits": _relative(logits, want), "grads": grads,
            "ops": sorted({n.op for c in backend.graphs for n in c.graph.nodes if n.op.startswith("attn.")}),
            "state_bytes": backend.comm_stats()["states"]["bytes_sent"],
            "gathered_whole": [w for c in backend.graphs for run in c.passes for w in run.result.warnings
                               if "gathered whole" in w and "output" not in w],
            "predicted": sum(graph_lasp2_bytes(c.graph, runs) for c in backend.graphs)}


def _all_cases(rank: int, world: int) -> list[dict]:
    return [_case(world, *case) for case in CASES_BY_WORLD[world]]


@pytest.mark.parametrize("world", [2, 3, 4])
def test_linear_and_hybrid_models_train_on_ranks_like_one_process(world):
    results = run_ranks(world, _all_cases, timeout_s=240)
    for rank_results in results:
        for (pattern, balance, length), got in zip(CASES_BY_WORLD[world], rank_results):
            where = f"{pattern} {balance} N={length} on {world} ranks"
            assert got["logits"] < TOLERANCE and got["grads"] < TOLERANCE, (where, got)
            assert {"attn.lasp2", "attn.lasp2_backward"} <= set(got["ops"]), where
            assert "attn.linear" not in got["ops"]
            if "s" in pattern:  # the softmax layer keeps a softmax strategy in the same plan
                assert any(op in got["ops"] for op in ("attn.ring", "attn.ulysses", "attn.hybrid")), got["ops"]
            assert got["state_bytes"] == got["predicted"] > 0, where
            assert got["gathered_whole"] == [], where  # loops' per-step slices are taken from shards too
    if world == 2:  # the same model at two lengths sends the same state bytes: independent of N
        assert results[0][0]["state_bytes"] == results[0][1]["state_bytes"]


def test_striped_balance_is_refused_for_linear_attention():
    backend = seqweave.backend(mesh=seqweave.Mesh(sp=2), balance="striped")
    with pytest.raises(Exception, match="needs contiguous runs of rows; striped balance"):
        torch.compile(TinyLM("l"), backend=backend, fullgraph=True, dynamic=False)(torch.randint(0, 64, (1, 16)))
