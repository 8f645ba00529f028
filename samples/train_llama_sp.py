"""Train a tiny Llama with its sequence split over every rank of the job.

    seqweave run --nproc 4 samples/train_llama_sp.py --steps 3
    torchrun --nproc-per-node 4 samples/train_llama_sp.py      # works the same way

Every rank runs this same script with the same full batch (inputs="replicated"): the
compiled program takes each rank's share of the sequence, runs ring attention over the
ranks, all-reduces the gradients and hands back the global loss, so the training loop is
the single-device one. Rank 0 also runs the model eagerly once to show the two agree.
"""
import argparse
import copy

import torch
import torch.distributed as dist

import seqweave
from seqweave.testing.models import SampleSpec, build_sample


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=256)
    args = parser.parse_args()

    dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    model, batch = build_sample(SampleSpec("llama-tiny", seq_len=args.seq_len, layers=2))  # same seed everywhere
    eager = copy.deepcopy(model)
    backend = seqweave.backend(mesh=seqweave.Mesh(sp=world), balance="zigzag")
    compiled = torch.compile(model, backend=backend, fullgraph=True, dynamic=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    for step in range(args.steps):
        loss = compiled(**batch).loss
        loss.backward()
        if step == 0 and rank == 0:
            eager(**batch).loss.backward()
            worst = max(float((p.grad - e.grad).abs().max() / e.grad.abs().max())
                        for p, e in zip(model.parameters(), eager.parameters()))
            print(f"step 0 vs one process eager: worst relative gradient error {worst:.1e}")
        optimizer.step()
        optimizer.zero_grad()
        if rank == 0:
            print(f"step {step}: loss {loss.item():.4f} ({world} ranks, {args.seq_len // world} tokens each)")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
