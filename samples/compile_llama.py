"""A newcomer's first look: compile a tiny Llama with seqweave, train a few steps, see what it found.

    .venv/bin/python samples/compile_llama.py
"""
import torch

import seqweave
from seqweave.testing.models import SampleSpec, build_sample

STEPS = 3

model, batch = build_sample(SampleSpec("llama-tiny", seq_len=64, layers=2, padded=True))
backend = seqweave.backend()
compiled = torch.compile(model, backend=backend, fullgraph=True, dynamic=False)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

for step in range(STEPS):
    loss = compiled(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    print(f"step {step}: loss {loss.item():.4f}")

for report in backend.reports:
    print(f"{report.layer}: {report.form} attention, {report.q_heads} q / {report.kv_heads} kv heads, "
          f"mask {report.mask}")
for compiled_graph in backend.graphs:
    print(f"{compiled_graph.kind} graph: {len(compiled_graph.graph.nodes)} IR nodes, "
          f"{compiled_graph.graph.notes[-1]}")
