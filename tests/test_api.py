"""The small public API: `seqweave.backend()`, `seqweave.compile_options()`, `seqweave.Mesh`."""
import pytest
import torch

import seqweave
from seqweave.errors import OptionError


def test_backend_factory_can_be_called_repeatedly():
    first, second = seqweave.backend(), seqweave.backend()
    assert callable(seqweave.backend) and first is not second
    assert first.reports == [] and first.graphs == []


def test_backend_compiles_a_function():
    def attend(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

    q, k, v = (torch.randn(1, 2, 9, 4, dtype=torch.float64) for _ in range(3))
    backend = seqweave.backend()
    out = torch.compile(attend, backend=backend, fullgraph=True, dynamic=False)(q, k, v)
    torch.testing.assert_close(out, attend(q, k, v))
    assert backend.attention_count() == 1


@pytest.mark.parametrize("options, message", [
    ({"pipline": "canonicalize"}, "valid options"),
    ({"mesh": seqweave.Mesh()}, None),
    ({"attention": "hybrid"}, "not available"),
    ({"balance": "diagonal"}, "not a sequence layout"),
])
def test_compile_options_validate(options, message):
    if message is None:
        assert seqweave.compile_options(**options).mesh == seqweave.Mesh()
        return
    with pytest.raises(OptionError, match=message):
        seqweave.compile_options(**options)


def test_mesh_needs_a_positive_rank_count():
    assert seqweave.Mesh(sp=4).sp == 4
    with pytest.raises(OptionError, match="positive number of ranks"):
        seqweave.Mesh(sp=0)


def test_sequence_parallel_needs_attention_to_read_the_length_from():
    from seqweave.compiler import sequence_length
    from seqweave.ir.graph import Graph

    with pytest.raises(OptionError, match="one sequence length"):
        sequence_length(Graph("forward", [], [], ()), 2, "zigzag")
