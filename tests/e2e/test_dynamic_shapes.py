"""Dynamic shapes on one device: a graph whose sequence length is symbolic runs exactly (masks
that cannot be proved at every length stay dense operands), and sequence parallelism, which
needs static shapes, refuses such a graph by name instead of running it."""
import copy

import pytest
import torch

import seqweave
from seqweave.testing.models import SampleSpec, build_sample

TOLERANCE = 1e-5


def test_training_at_three_lengths_matches_eager_from_one_symbolic_graph():
    model, inputs = build_sample(SampleSpec("llama-tiny", seq_len=32, batch=1, layers=1))
    eager = copy.deepcopy(model)
    backend = seqweave.backend()
    compiled = torch.compile(model, backend=backend, fullgraph=True, dynamic=True)
    for length in (32, 24, 17):
        ids = inputs["input_ids"][:, :length]
        got = compiled(input_ids=ids, labels=ids, use_cache=False).loss
        expected = eager(input_ids=ids, labels=ids, use_cache=False).loss
        got.backward()
        expected.backward()
        assert abs(float(got - expected)) <= TOLERANCE, length
    for mine, theirs in zip(model.parameters(), eager.parameters()):
        torch.testing.assert_close(mine.grad, theirs.grad, atol=TOLERANCE, rtol=TOLERANCE)
    # dynamo may compile the first length statically, then one symbolic graph pair: never one per length
    assert [graph.kind for graph in backend.graphs] in (["forward", "backward"], ["forward", "backward"] * 2)
    replaced = [report for report in backend.reports if report.found]
    assert replaced and all(report.mask == "dense($0)" and "symbolic" in report.reason for report in replaced)


def test_sequence_parallelism_refuses_symbolic_shapes():
    backend = seqweave.backend(mesh=seqweave.Mesh(sp=2))
    model, inputs = build_sample(SampleSpec("llama-tiny", seq_len=16, batch=1, layers=1))
    compiled = torch.compile(model.eval(), backend=backend, fullgraph=True, dynamic=True)
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed, match="sequence parallelism needs static shapes"), \
            torch.no_grad():
        compiled(input_ids=inputs["input_ids"], use_cache=False)
