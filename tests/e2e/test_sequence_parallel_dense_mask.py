"""A user-built dense [B, 1, N, N] packed-documents mask (doc-id equality, causal) under sequence
parallelism, at a length that does not split over the ranks: the mask is padded with the
sequence, ring attention runs on it, and loss and gradients equal one eager process."""
import pytest
import torch
import torch.nn.functional as F

import seqweave
from seqweave.testing.compare import grad_errors
from seqweave.testing.distributed import run_ranks

VOCAB, HIDDEN, HEADS, SEQ = 40, 8, 2, 29  # 29: splits over neither 2 nor 3 ranks (nor 2P for zigzag)
TOLERANCE = 1e-5


class PackedDocuments(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, HIDDEN)
        self.qkv = torch.nn.Linear(HIDDEN, 3 * HIDDEN)
        self.head = torch.nn.Linear(HIDDEN, VOCAB)

    def forward(self, ids, doc_ids, labels):
        x = self.embed(ids)
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, HEADS, d // HEADS).permute(2, 0, 3, 1, 4)
        positions = torch.arange(n)
        mask = (doc_ids[:, None, :, None] == doc_ids[:, None, None, :]) & (positions[:, None] >= positions[None, :])
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        logits = self.head(out.transpose(1, 2).reshape(b, n, d))
        return F.cross_entropy(logits.view(-1, VOCAB), labels.view(-1))


def dense_mask_step(rank: int, world: int, balance: str) -> dict:
    torch.manual_seed(0)
    model, reference = PackedDocuments(), PackedDocuments()
    reference.load_state_dict(model.state_dict())
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (1, SEQ), generator=generator)
    doc_ids = torch.repeat_interleave(torch.tensor([0, 1, 2, 3]), torch.tensor([7, 11, 2, 9]))[None]
    labels = torch.randint(0, VOCAB, (1, SEQ), generator=generator)
    backend = seqweave.backend(mesh=seqweave.Mesh(sp=world), attention="ring", balance=balance, timeout=60)
    loss = torch.compile(model, backend=backend, fullgraph=True, dynamic=False)(ids, doc_ids, labels)
    loss.backward()
    expected = reference(ids, doc_ids, labels)
    expected.backward()
    worst, param = grad_errors(model, reference)
    return {"loss": abs(loss.item() - expected.item()), "grad": worst, "param": param,
            "masks": [r.mask for r in backend.reports],
            "rings": sum(c.graph.count("attn.ring") + c.graph.count("attn.ring_backward") for c in backend.graphs)}


@pytest.mark.parametrize("world, balance", [(3, "zigzag")])  # 29 tokens padded to 30 (2P = 6 chunks)
def test_dense_mask_at_an_uneven_length_matches_eager(world, balance):
    for rank, result in enumerate(run_ranks(world, dense_mask_step, balance, timeout_s=240)):
        assert result["masks"] == ["dense($0)"], result  # no MaskSpec expresses doc-id equality here
        assert result["rings"] == 2, result
        assert result["loss"] <= TOLERANCE and result["grad"] <= TOLERANCE, (rank, result)
