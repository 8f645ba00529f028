"""Linear-attention language models written in plain PyTorch, recognised by seqweave and
trained chunkwise: a decay model (RetNet / Lightning style), a GLA-style gated model (its
reference loop over time) and a hybrid with one softmax layer in four.

    .venv/bin/python samples/train_linear_attention.py                  # one process
    seqweave run --nproc 4 samples/train_linear_attention.py --steps 3  # LASP-2 over 4 ranks

The models never mention seqweave (seqweave/testing/linear_models.py). Compiled, each linear
layer is one `attn.linear` op (no N x N score matrix); under a mesh it is `attn.lasp2`, and the
softmax layer of the hybrid runs ring / Ulysses in the same plan. The loss is taken outside the
compiled model, as users write it. Every rank runs the same script with the same full batch.
"""
import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

import seqweave
from seqweave.testing.linear_models import TinyLM

MODELS = {"decay": "ll", "gated": "gg", "hybrid": "slll"}  # l: decay, g: GLA loop, s: softmax (1 in 4)
#: the gated model is a loop over time that dynamo unrolls: kept short
LENGTHS = {"decay": 1.0, "gated": 0.25, "hybrid": 1.0}


def train(name: str, pattern: str, seq_len: int, steps: int, world: int, rank: int) -> None:
    torch.manual_seed(0)  # the same weights and batch on every rank
    model = TinyLM(pattern)
    ids = torch.randint(0, 64, (2, seq_len))
    targets = torch.roll(ids, -1, dims=1)
    mesh = {"mesh": seqweave.Mesh(sp=world), "balance": "zigzag"} if world > 1 else {}
    backend = seqweave.backend(**mesh)
    compiled = torch.compile(model, backend=backend, fullgraph=True, dynamic=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(steps):
        loss = F.cross_entropy(compiled(ids).flatten(0, 1), targets.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if rank == 0:
            print(f"step {step}: loss {loss.item():.4f} ({name}, {world} rank(s), {seq_len} tokens)")
    if rank == 0:
        ops = sorted({n.op for c in backend.graphs for n in c.graph.nodes if n.op.startswith("attn.")})
        found = sum(r.found for r in backend.reports)
        print(f"{name}: {found} attention layers recognised; ops run: {', '.join(ops)}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=128)
    args = parser.parse_args()
    distributed = "WORLD_SIZE" in os.environ
    if distributed:
        dist.init_process_group("gloo")
    world, rank = (dist.get_world_size(), dist.get_rank()) if distributed else (1, 0)
    for name, pattern in MODELS.items():
        torch._dynamo.reset()
        train(name, pattern, max(8, int(args.seq_len * LENGTHS[name])), args.steps, world, rank)
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
