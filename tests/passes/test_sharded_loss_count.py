"""A sharded mean loss is the global mean: every rank's loss equals torch's on the whole sequence.

Targets are partly ignored (ignore_index), unevenly over the ranks, so a mean of per-rank means,
or a global sum divided by one rank's count of kept targets, is wrong. The sharded graph runs
for every rank in lockstep in this process: `sp.shard` by its reference, `sp.all_reduce` as the
sum over the ranks' values; the reference is `torch.nn.functional.cross_entropy` in float64.
"""
import pytest
import torch
import torch.nn.functional as F

from seqweave.ir.graph import map_values
from seqweave.ir.interpreter import run_node
from seqweave.ir.parser import parse_graph
from seqweave.ir.sharding import Layout, padded_length, shard_positions
from seqweave.passes.shard_sequence import ShardSequence

N, VOCAB, CLASSES, IGNORE = 11, 16, 5, -100
MODEL = '''graph forward(%ids: i64[1, {n}], %w: f64[{vocab}, {c}], %target: i64[{n}]) {{
  %emb = core.embedding(%w, %ids) : f64[1, {n}, {c}]
  %flat = core.view(%emb, [{n}, {c}]) : f64[{n}, {c}]
  %logp = core._log_softmax(%flat, 1, False) : f64[{n}, {c}]
  %loss, %count = core.nll_loss_forward(%logp, %target, None, {reduction}, {ignore}) : f64[], f64[]
  return (%loss, %count)
}}
'''


def run_in_lockstep(graph, inputs: list, world: int, layout: Layout, length: int) -> list:
    """Every rank's outputs: each node runs on every rank before the next; all-reduce sums over ranks."""
    padded = padded_length(length, world, layout)
    envs = [dict(zip(graph.inputs, [*inputs, shard_positions(layout, rank, world, padded)])) for rank in range(world)]
    for node in graph.nodes:
        if node.op == "sp.all_reduce":
            total = sum(env[node.args[0]] for env in envs)
            for env in envs:
                env[node.results[0]] = total.clone()
            continue
        assert node.op != "sp.gather", "this graph should need no gather"
        for env in envs:
            run_node(node, env)
    return [map_values(graph.outputs, env.__getitem__) for env in envs]


def _inputs():
    generator = torch.Generator().manual_seed(5)
    ids = torch.randint(0, VOCAB, (1, N), generator=generator)
    weight = torch.randn(VOCAB, CLASSES, generator=generator, dtype=torch.float64)
    target = torch.randint(0, CLASSES, (N,), generator=generator)
    target[[0, 1, 2, 3, 9]] = IGNORE  # the first ranks keep fewer targets than the last
    return ids, weight, target


@pytest.mark.parametrize("layout", list(Layout))
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_every_rank_gets_the_loss_of_the_whole_sequence(reduction, world, layout):
    ids, weight, target = _inputs()
    graph = parse_graph(MODEL.format(n=N, vocab=VOCAB, c=CLASSES, reduction={"mean": 1, "sum": 2}[reduction],
                                     ignore=IGNORE))
    ShardSequence(world=world, layout=layout.value, length=N).run(graph)
    expected = F.cross_entropy(weight[ids[0]], target, ignore_index=IGNORE, reduction=reduction)
    kept = float((target != IGNORE).sum())
    for rank, (loss, count) in enumerate(run_in_lockstep(graph, [ids, weight, target], world, layout, N)):
        torch.testing.assert_close(loss, expected, msg=f"rank {rank}'s {reduction} loss")
        assert float(count) == kept, f"rank {rank} counts {float(count)} kept targets, not {kept}"
