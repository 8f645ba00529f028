"""Returned outputs are gathered by one all-gather per value, on real gloo ranks: the bytes each
rank sends equal the cost model's, the output equals eager's on every rank, at an odd length
(padding dropped) in the zigzag layout and in the contiguous one (gathered without a copy)."""
import torch
import torch.nn.functional as F

import seqweave
from seqweave.passes.cost import graph_gather_bytes
from seqweave.testing.distributed import run_ranks

VOCAB, HIDDEN, HEADS, SEQ = 48, 8, 2, 15


class Logits(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, HIDDEN)
        self.qkv = torch.nn.Linear(HIDDEN, 3 * HIDDEN)
        self.head = torch.nn.Linear(HIDDEN, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, HEADS, d // HEADS).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.head(attended.transpose(1, 2).reshape(b, n, d))


def gather_run(rank: int, world: int) -> dict:
    torch.manual_seed(0)
    model = Logits()
    ids = torch.randint(0, VOCAB, (1, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids)
    results = {}
    for balance in ("zigzag", "none"):
        torch._dynamo.reset()
        backend = seqweave.backend(mesh=seqweave.Mesh(sp=world), attention="ring", balance=balance, timeout=60)
        with torch.no_grad():
            got = torch.compile(model, backend=backend, fullgraph=True, dynamic=False)(ids)
        (graph,) = [c.graph for c in backend.graphs]
        results[balance] = {"error": float((got - expected).abs().max()), "shape": list(got.shape),
                            "sent": backend.comm_stats()["gather"]["bytes_sent"],
                            "calls": backend.comm_stats()["gather"]["calls"],
                            "predicted": graph_gather_bytes(graph), "gathers": graph.count("sp.gather"),
                            "rings": graph.count("attn.ring")}
    return results


def test_outputs_are_gathered_once_with_the_bytes_the_cost_model_predicts():
    for rank, results in enumerate(run_ranks(2, gather_run, timeout_s=240)):
        for balance, result in results.items():
            assert result["rings"] == 1 and result["gathers"] == 1, (rank, balance, result)
            assert result["shape"] == [1, SEQ, VOCAB]
            assert result["error"] <= 1e-5, (rank, balance, result)
            assert result["calls"] == 1
            # this rank's 8 padded rows of logits, sent once to the one other rank
            assert result["sent"] == result["predicted"] == 8 * VOCAB * 4, (rank, balance, result)
