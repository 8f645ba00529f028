"""Tile-by-tile evaluation of mask subgraphs equals evaluating them whole (torch itself is the reference)."""
import pytest
import torch

import seqweave.frontend.mask_tiles as mask_tiles
from seqweave.frontend.mask_tiles import Untileable, project, tiled_function

N = 24


def _causal(n):
    idx = torch.arange(n)
    return idx[:, None] >= idx[None, :]


MASKS = {
    "tril_of_ones": lambda doc, valid: torch.ones(N, N, dtype=torch.bool).tril(),
    "window_by_arange": lambda doc, valid: _causal(N) & ((torch.arange(N)[:, None] - torch.arange(N)[None, :]) < 5),
    "document_equality": lambda doc, valid: doc[:, None, :, None] == doc[:, None, None, :],
    "additive_triu": lambda doc, valid: torch.full((N, N), float("-inf")).triu(1),
    "masked_fill": lambda doc, valid: torch.zeros(N, N).masked_fill(~_causal(N), -1e9),
    "chunks": lambda doc, valid: (torch.arange(N)[:, None] // 5) == (torch.arange(N)[None, :] // 5),
    "view_expand": lambda doc, valid: _causal(N).view(1, 1, N, N).expand(2, 3, N, N),
    "padding": lambda doc, valid: _causal(N)[None, None] & valid[:, None, None, :].bool(),
    "transpose_slice": lambda doc, valid: torch.ones(N + 8, N + 8).triu()[:N, 2:N + 2].transpose(0, 1),
    "where_sinks": lambda doc, valid: torch.where(torch.arange(N)[None, :] < 3, True, _causal(N)),
    "permute_select": lambda doc, valid: (doc[:, :, None] <= doc[:, None, :]).permute(0, 2, 1)[1],
}


def _capture(fn, *inputs):
    captured = {}

    def backend(gm, example_inputs):
        captured["gm"], captured["inputs"] = gm, example_inputs
        return gm.forward
    torch._dynamo.reset()
    torch.compile(fn, backend=backend, fullgraph=True, dynamic=False)(*inputs)
    graph = captured["gm"].graph
    nodes = [node for node in graph.nodes if node.op not in ("placeholder", "output")]
    leaves = [node for node in graph.nodes if node.op == "placeholder"]
    output = next(node for node in graph.nodes if node.op == "output").args[0]
    output = output[0] if isinstance(output, (tuple, list)) else output
    return tiled_function(nodes, leaves, output), captured["inputs"]


def _inputs():
    doc = torch.repeat_interleave(torch.arange(4), torch.tensor([5, 7, 3, 9]))[None].expand(2, N).clone()
    valid = torch.ones(2, N, dtype=torch.long)
    valid[0, :6] = 0
    return doc, valid


@pytest.fixture
def tiles_only(monkeypatch):
    """Per-token values may be computed whole; anything N×N must go through a tile rule."""
    monkeypatch.setattr(mask_tiles, "SMALL_ELEMENTS", 4 * N)
    monkeypatch.setattr(mask_tiles, "MAX_WHOLE_ELEMENTS", 4 * N)


def _random_index(shape, generator):
    """A random non-empty, sorted subset of positions per dim (tiles need not be contiguous)."""
    index = []
    for size in shape:
        keep = torch.rand(size, generator=generator) < 0.4
        keep[int(torch.randint(0, size, (1,), generator=generator))] = True
        index.append(torch.nonzero(keep).flatten())
    return index


@pytest.mark.parametrize("name", sorted(MASKS))
def test_tiles_equal_the_whole_mask(tiles_only, name):
    fn = MASKS[name]
    inputs = _inputs()
    expected = fn(*inputs)
    tiled, leaf_values = _capture(fn, *inputs)
    mask = tiled([v for v in leaf_values if isinstance(v, torch.Tensor)])
    assert mask.shape == tuple(expected.shape)
    generator = torch.Generator().manual_seed(0)
    for _ in range(16):
        index = _random_index(expected.shape, generator)
        reference = expected
        for dim, positions in enumerate(index):
            reference = reference.index_select(dim, positions)
        assert torch.equal(mask.tile(project(index, mask.shape)).expand(reference.shape), reference)


def test_an_op_without_a_tile_rule_is_named(tiles_only):
    tiled, leaf_values = _capture(lambda doc, valid: torch.cumsum(_causal(N).long(), 1) > 2, *_inputs())
    with pytest.raises(Untileable, match="cumsum"):
        tiled([v for v in leaf_values if isinstance(v, torch.Tensor)])
