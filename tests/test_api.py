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
    ({"attention": "striped-ring"}, "not available"),
    ({"attention": "hybrid"}, "needs a hybrid mesh"),
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
    assert seqweave.Mesh(ulysses=2, ring=2).sp == 4 and seqweave.Mesh(ulysses=2, ring=2).hybrid
    with pytest.raises(OptionError, match="positive number of ranks"):
        seqweave.Mesh(sp=-1)
    with pytest.raises(OptionError, match="positive number of ranks"):
        seqweave.Mesh(ring=0)
    with pytest.raises(OptionError, match="sp must be ulysses\\*ring"):
        seqweave.Mesh(sp=4, ulysses=2, ring=4)


def test_sequence_parallel_needs_attention_to_read_the_length_from():
    from seqweave.compiler import sequence_length
    from seqweave.ir.graph import Graph

    with pytest.raises(OptionError, match="found no attention to split") as caught:
        sequence_length(Graph("forward", [], [], ()))
    assert "no attention-like pattern" in str(caught.value)


def test_sequence_parallel_refuses_cross_attention_with_the_reason():
    """A Perceiver-style latent array attending to the tokens: queries and keys of different
    lengths cannot share one split of the sequence."""
    import torch
    import torch.nn.functional as F
    import seqweave

    class Latents(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.latents = torch.nn.Parameter(torch.randn(1, 2, 4, 8))

        def forward(self, x):
            return F.scaled_dot_product_attention(self.latents, x, x)

    compiled = torch.compile(Latents(), backend=seqweave.backend(mesh=seqweave.Mesh(sp=2)), fullgraph=True,
                             dynamic=False)
    with pytest.raises(Exception, match="attends from 4 queries to 16 keys"):
        compiled(torch.randn(1, 2, 16, 8))


def test_sharded_inputs_are_refused_with_what_to_do_instead():
    with pytest.raises(OptionError, match="inputs='sharded' is not offered yet") as caught:
        seqweave.backend(mesh=seqweave.Mesh(sp=2), inputs="sharded")
    assert "outputs='sharded'" in caught.value.hint


def test_outputs_must_be_gathered_or_sharded():
    with pytest.raises(OptionError, match="outputs='scattered' is not an output placement"):
        seqweave.backend(outputs="scattered")
