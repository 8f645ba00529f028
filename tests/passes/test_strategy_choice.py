"""One strategy chooser: what `attention="auto"` compiles is what `explain --sp` reports, and it
is the cheaper of ring (under the layout's mask-aware plan) and Ulysses by the cost model,
recomputed here from cost.py's formulas (a chooser picking the costlier one fails)."""
import pytest

from seqweave.capture_only import capture
from seqweave.config import CompileOptions, Mesh
from seqweave.explain import strategy_for
from seqweave.ir.mask_parser import parse_mask
from seqweave.ir.sharding import Layout, padded_length, plan_ring
from seqweave.passes.cost import evaluate_expr, ring_bytes, ulysses_bytes
from seqweave.passes.strategy import LayerShape
from seqweave.testing.models import SampleSpec, build_sample


def _cheaper_by_formula(report, world: int, layout: Layout) -> str:
    padded = padded_length(report.seq_len, world, layout)
    shape = LayerShape(report.batch, report.seq_len, report.q_heads, report.kv_heads, report.head_dim, world,
                       report.element_bytes)
    values = shape.values(padded)
    plan = plan_ring(parse_mask(report.mask), layout, world, padded)
    ring = evaluate_expr(ring_bytes(plan) + ring_bytes(plan, backward=True), **values)
    ulysses = evaluate_expr(ulysses_bytes() + ulysses_bytes(backward=True), **values)
    return "attn.ulysses" if ulysses < ring else "attn.ring"


@pytest.mark.parametrize("name, seq_len, balance, options", [
    ("mistral-tiny", 256, "none", {}),            # window narrower than a shard: the halo ring is cheaper
    ("llama-tiny", 256, "zigzag", {}),            # causal, 4 heads over 4 ranks
    ("llama-tiny", 64, "striped", dict(packed=True)),
])
def test_auto_compiles_the_strategy_explain_reports_and_the_formulas_favour(name, seq_len, balance, options):
    world = 4
    backend = capture(*build_sample(SampleSpec(name, seq_len=seq_len, layers=1, kv_heads=4, **options)),
                      CompileOptions(mesh=Mesh(sp=world), balance=balance, attention="auto"))
    explained = {"sp": strategy_for(backend.reports[0], world, balance)}  # what `explain --sp` prints
    (graph,) = [c.graph for c in backend.graphs]
    ran = [op for op in ("attn.ring", "attn.ulysses") if graph.count(op)]
    expected = _cheaper_by_formula(backend.reports[0], world, Layout(balance))
    assert ran == [expected], (ran, explained["sp"])
    assert {"halo": "attn.ring", "ring": "attn.ring", "ulysses": "attn.ulysses"}[explained["sp"]["strategy"]] == expected
