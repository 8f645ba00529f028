"""Rewritten positions and spans under sequence parallelism (4 gloo ranks, ring, contiguous
layout): a training step with `streaming` / `lm-infinite` / `mixed-spans` equals the same
rewrite on one process, and the rewritten masks keep the ring's tile skipping and halo: fewer
bytes than the dense causal ring of the same model."""
import copy

import pytest
import torch

import seqweave
from seqweave.testing.compare import grad_errors
from seqweave.testing.distributed import run_ranks
from seqweave.testing.models import SampleSpec, build_sample

SEQ_LEN, WORLD = 64, 4
PIPELINES = ["streaming{sinks=4,window=8}", "lm-infinite{sinks=4,window=8,max_distance=12}",
             "mixed-spans{window=8,full=1}"]


def _bytes_sent(backend):
    return sum(comm.bytes_sent() for comm in backend.communicators)


def sharded_steps(rank: int, world: int) -> list[tuple]:
    results = []
    for pipeline in [None, *PIPELINES]:
        torch._dynamo.reset()
        model, inputs = build_sample(SampleSpec("llama-tiny", seq_len=SEQ_LEN))
        reference = copy.deepcopy(model)
        options = dict(pipeline=f"canonicalize,{pipeline}") if pipeline else {}
        backend = seqweave.backend(mesh=seqweave.Mesh(sp=world), balance="none", attention="ring", timeout=60,
                                   **options)
        loss = torch.compile(model, backend=backend, fullgraph=True, dynamic=False)(**inputs).loss
        loss.backward()
        single = seqweave.backend(**options)
        expected = torch.compile(reference, backend=single, fullgraph=True, dynamic=False)(**inputs).loss
        expected.backward()
        worst, name = grad_errors(model, reference)
        rings = sum(c.graph.count("attn.ring") + c.graph.count("attn.ring_backward") for c in backend.graphs)
        positions = all("rope(" in n.kwargs.get("positions", "") for c in backend.graphs for n in c.graph.nodes
                        if n.op.startswith("attn."))
        results.append((pipeline, float((loss - expected).detach().abs()), worst, name, rings, positions,
                        _bytes_sent(backend)))
    return results


@pytest.mark.slow
def test_rewrites_train_on_four_ranks_like_one_process_with_fewer_bytes():
    outcomes = run_ranks(WORLD, sharded_steps, timeout_s=600)
    for rank_results in outcomes:
        dense_bytes = rank_results[0][-1]
        for pipeline, loss_error, grad_error, name, rings, positions, sent in rank_results:
            assert loss_error <= 1e-5 and grad_error <= 1e-5, (pipeline, loss_error, grad_error, name)
            assert rings == 4 and positions, pipeline  # 2 layers x (forward, backward), rotary carried
            if pipeline and not pipeline.startswith("mixed"):
                assert sent < dense_bytes, (pipeline, sent, dense_bytes)
