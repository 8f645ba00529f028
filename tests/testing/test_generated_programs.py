"""The bulk property run: 1,000+ generated programs (fixed seed) through every shipped pass and
attention strategy, each checked by `check_pass` (verifies, idempotent where claimed, equal to
the original on simulated ranks in float64, collective bytes as modelled, no dead collective).

Not here, and why: `double-sparsity` touches only single-query decode attentions with a
calibrated table (generated programs are prefill and training graphs: it would never fire);
`activation-memory` plans a forward and backward pair inside the backend (its `run` on one
graph is a no-op), so both are checked by their own tests.

The position rewrites change what the model computes by design: each declares what it computes
(`Pass.declared_semantics`), and `check_pass` holds `shard-sequence` after it to that.
"""
import time

import pytest
import torch

from seqweave.config import Mesh
from seqweave.testing.check_pass import check_pass
from seqweave.testing.programs import ProgramSpec, generate_programs

SEED = 20260
#: small programs: up to 2 drawn steps besides the attention, sequences up to 24
SMALL = ProgramSpec(max_seq=24, max_steps=1)
FLAT = (Mesh(sp=2), Mesh(sp=3), Mesh(sp=4))
HYBRID = (Mesh(ulysses=2, ring=2),)
SHARD = "shard-sequence{{attention={attention}, layout={layout}}}"

#: (pipeline checked, meshes, programs, head multiple (heads split over Ulysses groups), rotary on
#: every attention)
RUNS = [
    ("canonicalize", (), 140, 1, "sometimes"),
    ("canonicalize," + SHARD.format(attention="ring", layout="zigzag"), FLAT, 120, 1, "sometimes"),
    (SHARD.format(attention="ring", layout="striped"), FLAT, 90, 1, "sometimes"),
    (SHARD.format(attention="ring", layout="none"), FLAT, 90, 1, "sometimes"),
    (SHARD.format(attention="ulysses", layout="zigzag"), (Mesh(sp=2),), 45, 2, "sometimes"),
    (SHARD.format(attention="ulysses", layout="none"), (Mesh(sp=4),), 45, 4, "sometimes"),
    (SHARD.format(attention="hybrid", layout="zigzag"), HYBRID, 50, 2, "sometimes"),
    (SHARD.format(attention="hybrid", layout="striped"), HYBRID, 40, 2, "sometimes"),
    (SHARD.format(attention="auto", layout="zigzag"), FLAT, 90, 1, "sometimes"),
    (SHARD.format(attention="auto", layout="zigzag"), HYBRID, 30, 2, "sometimes"),
    ("rope-scale{factor=2.0, rule=linear}," + SHARD.format(attention="ring", layout="zigzag"), FLAT, 60, 1,
     "always"),
    ("rope-fp32," + SHARD.format(attention="ring", layout="zigzag"), FLAT, 50, 1, "always"),
    ("streaming{sinks=2, window=5}," + SHARD.format(attention="ring", layout="zigzag"), FLAT, 60, 1, "always"),
    ("lm-infinite{sinks=2, window=5, max_distance=7}," + SHARD.format(attention="ring", layout="none"), FLAT, 60,
     1, "always"),
    ("mixed-spans{window=4}," + SHARD.format(attention="ring", layout="zigzag"), FLAT, 60, 1, "sometimes"),
]


#: the forward ops of each strategy (a backward program runs its `_backward` too)
STRATEGY_OPS = ("attn.sdpa", "attn.ring", "attn.ulysses", "attn.hybrid")


def expected_strategies(pipeline: str, meshes) -> set[str]:
    """The attention ops a pipeline may leave: sdpa unsharded, else its attention option's op
    (auto: ring or Ulysses on a flat mesh, hybrid on a hybrid one)."""
    if "shard-sequence" not in pipeline:
        return {"attn.sdpa"}
    chosen = pipeline.split("attention=")[1].split(",")[0].rstrip("}")
    if chosen == "auto":
        return {"attn.hybrid"} if all(m.hybrid for m in meshes) else {"attn.ring", "attn.ulysses"}
    return {f"attn.{chosen}"}


@pytest.fixture
def one_thread():
    """Tiny tensors: torch's threads only contend (and the simulated ranks have one thread each)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_every_pass_and_strategy_on_a_thousand_generated_programs(one_thread, capsys):
    start, checked, lines, failures = time.perf_counter(), 0, [], []
    for index, (pipeline, meshes, count, multiple, rope) in enumerate(RUNS):
        spec = ProgramSpec(max_seq=SMALL.max_seq, max_steps=SMALL.max_steps, head_multiple=multiple, rope=rope)
        programs = generate_programs(SEED + index, count, spec)
        report = check_pass(pipeline, programs=programs, seed=SEED, meshes=list(meshes) or [Mesh(sp=2)])
        checked += report.checked
        failures += report.failures
        lines.append(f"  {pipeline} on {[str(m.sp) + ('x' + str(m.ulysses) if m.hybrid else '') for m in meshes]}: "
                     f"{report.summary()}")
        assert len(report.skipped) <= count // 10, f"{pipeline}: {report.skipped[:3]}"
        ran = {op for op in report.attention_ops if op in STRATEGY_OPS}
        assert ran <= expected_strategies(pipeline, meshes) and ran, f"{pipeline}: attention ran as {ran}"
    seconds = time.perf_counter() - start
    with capsys.disabled():
        print(f"\ngenerated programs: {checked} checked in {seconds:.1f} s ({checked / seconds:.1f}/s), "
              f"{len(failures)} failing")
        print("\n".join(lines))
    assert checked >= 1000
    assert not failures, f"{len(failures)} failing; the first:\n{failures[0]}"
