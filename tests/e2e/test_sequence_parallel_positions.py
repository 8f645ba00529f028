"""Rewritten positions and spans under sequence parallelism (gloo ranks, ring, contiguous
layout): a training step with `streaming` / `lm-infinite` on 2 ranks equals the same rewrite
on one process (the far pairs cross ranks: rank 1 sees rank 0's sinks), and on 4 ranks the
rewritten masks keep the ring's tile skipping and halo: the near pairs' ring is a one-hop
halo, the far pairs' ring computes only where sinks are seen from far queries, and a
`mixed-spans` window layer plans a halo where its full layers plan the whole ring."""
import copy

import pytest
import torch

import seqweave
from seqweave.ir.mask_parser import parse_mask
from seqweave.ir.positions import parse_positions
from seqweave.ir.sharding import Layout, plan_ring
from seqweave.testing.compare import grad_errors
from seqweave.testing.distributed import run_ranks
from seqweave.testing.models import SampleSpec, build_sample

SEQ_LEN, WORLD = 64, 4
RANKS = 2  # the runtime check; plans are checked for WORLD
#: mixed-spans only narrows masks, which the sequence-parallel mask tests cover: its plan is checked below
PIPELINES = ["streaming{sinks=4,window=8}", "lm-infinite{sinks=4,window=8,max_distance=12}"]


def sharded_steps(rank: int, world: int) -> list[tuple]:
    results = []
    for pipeline in PIPELINES:
        torch._dynamo.reset()
        model, inputs = build_sample(SampleSpec("llama-tiny", seq_len=SEQ_LEN))
        reference = copy.deepcopy(model)
        options = dict(pipeline=f"canonicalize,{pipeline}")
        backend = seqweave.backend(mesh=seqweave.Mesh(sp=world), balance="none", attention="ring", timeout=60,
                                   **options)
        loss = torch.compile(model, backend=backend, fullgraph=True, dynamic=False)(**inputs).loss
        loss.backward()
        single = seqweave.backend(**options)
        expected = torch.compile(reference, backend=single, fullgraph=True, dynamic=False)(**inputs).loss
        expected.backward()
        worst, name = grad_errors(model, reference)
        rings = sum(c.graph.count("attn.ring") + c.graph.count("attn.ring_backward") for c in backend.graphs)
        attention = [n for c in backend.graphs for n in c.graph.nodes if n.op.startswith("attn.")]
        positions = all("rope(" in str(n.kwargs.get("positions", "")) for n in attention)
        spec = parse_positions(attention[0].kwargs["positions"])
        results.append((pipeline, float((loss - expected).detach().abs()), worst, name, rings, positions,
                        attention[0].kwargs["mask"], spec.far))
    return results


@pytest.mark.slow
def test_rewrites_train_on_ranks_like_one_process_with_halo_plans():
    outcomes = run_ranks(RANKS, sharded_steps, timeout_s=600)
    for rank_results in outcomes:
        for pipeline, loss_error, grad_error, name, rings, positions, *_ in rank_results:
            assert loss_error <= 1e-5 and grad_error <= 1e-5, (pipeline, loss_error, grad_error, name)
            assert rings == 4 and positions, pipeline  # 2 layers x (forward, backward), rotary carried
    dense = plan_ring(parse_mask("causal"), Layout("none"), WORLD, SEQ_LEN)
    for pipeline, *_, mask, far in outcomes[0]:  # the attributes are the same whatever the rank count
        near = plan_ring(parse_mask(mask), Layout("none"), WORLD, SEQ_LEN)
        assert near.sends_total() == WORLD - 1 < dense.sends_total(), pipeline  # one hop each: a halo
        assert near.steps_with_compute() < dense.steps_with_compute()
        far_plan = plan_ring(parse_mask(far), Layout("none"), WORLD, SEQ_LEN)
        # every rank computes once, against rank 0's keys (the sinks), and nothing else
        assert far_plan.steps_with_compute() == WORLD, pipeline
        assert all(far_plan.classes[rank][source].value == "empty" for rank in range(WORLD)
                   for source in range(1, WORLD)), pipeline


def test_mixed_spans_windows_become_halo_plans():
    from seqweave.passes.manager import run_pipeline
    from seqweave.testing.strategies import AttentionShape, rotary_attention_graph

    shape = AttentionShape(1, 1, 1, SEQ_LEN, SEQ_LEN, 8)
    windowed, full = rotary_attention_graph(shape, layer=0), rotary_attention_graph(shape, layer=1)
    for graph in (windowed, full):
        run_pipeline(graph, "mixed-spans{window=8,full=1}")
    plans = [plan_ring(parse_mask(g.nodes[0].kwargs["mask"]), Layout("none"), WORLD, SEQ_LEN) for g in (windowed, full)]
    assert plans[0].sends_total() == WORLD - 1 < plans[1].sends_total()
