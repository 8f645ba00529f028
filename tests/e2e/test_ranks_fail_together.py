"""One rank failing to compile stops every rank within seconds, with that rank's message —
not a wait in the first collective until the timeout (3 gloo ranks, a 60 s timeout)."""
import time

import torch
import torch.nn.functional as F

import seqweave
from seqweave.errors import PassError
from seqweave.passes.shard_sequence import ShardSequence
from seqweave.testing.distributed import run_ranks_outcomes

TIMEOUT_S = 60


class Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = torch.nn.Linear(8, 24)

    def forward(self, x):
        q, k, v = self.qkv(x).view(1, -1, 3, 2, 4).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True).sum()


def failing_rank(rank: int, world: int, broken: int) -> dict:
    if rank == broken:
        def refuse(self, graph):
            raise PassError("planted failure on one rank", pass_name="shard-sequence")
        ShardSequence.run = refuse
    backend = seqweave.backend(mesh=seqweave.Mesh(sp=world), attention="ring", timeout=TIMEOUT_S)
    compiled = torch.compile(Block(), backend=backend, fullgraph=True, dynamic=False)
    try:
        compiled(torch.randn(1, 12, 8))
    except Exception as error:  # noqa: BLE001 (the test inspects every rank's error)
        return {"stopped": time.time(), "error": f"{type(error).__name__}: {error}"}
    return {"stopped": time.time(), "error": None}


def test_a_rank_that_fails_compiling_stops_all_ranks_with_its_message():
    results = [outcome.value for outcome in run_ranks_outcomes(3, failing_rank, 1, timeout_s=2 * TIMEOUT_S)]
    assert "planted failure on one rank" in results[1]["error"]
    for rank in (0, 2):
        error = results[rank]["error"]
        assert error and "PeerFailedError" in error and "rank 1 failed" in error, (rank, error)
        assert "planted failure on one rank" in error
    stops = [result["stopped"] for result in results]
    assert max(stops) - min(stops) < 5, f"ranks stopped {max(stops) - min(stops):.1f} s apart"
