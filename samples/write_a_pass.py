"""Write a pass: `(x * a) * b` becomes `x * (a*b)`, with a typed option, a rewrite rule and its
property test. Put the class in your package and declare it, and pipelines find it by name:

    [project.entry-points."seqweave.passes"]
    fold-scalar-muls = "my_package.passes:FoldScalarMuls"

Run this file to run the test: `python samples/write_a_pass.py`.
"""
from dataclasses import dataclass

from hypothesis import strategies as st

from seqweave import register_pass
from seqweave.ir.parser import parse_graph
from seqweave.passes.base import Pass, PassResult
from seqweave.passes.rewriter import Op, Rule, Var, rewrite
from seqweave.testing.check_pass import check_pass


def is_float(value):
    return isinstance(value, float)


@register_pass
@dataclass(frozen=True)
class FoldScalarMuls(Pass):
    """One multiply instead of two; products beyond `max_scale` are left alone (fp16 would overflow)."""

    name = "fold-scalar-muls"
    max_scale: float = 1e4

    def run(self, graph):
        inner = Op("core.mul.Scalar", Var("x"), Var("a", where=is_float))
        rule = Rule(Op("core.mul.Scalar", inner, Var("b", where=is_float)), self.fold)
        count = rewrite(graph, [rule])
        return PassResult(count, f"{count} multiplies folded")

    def fold(self, build, match):
        scale = match["a"] * match["b"]
        if abs(scale) > self.max_scale:
            return match.nodes[0].results[0]  # the root itself: the rule declines
        return build.op("core.mul.Scalar", match["x"], scale)


def chain(steps, keep_middle):
    """IR text: x through `steps` (a float: `* it`, None: `neg`), returning the last (and a middle) value."""
    lines, last = [], "x"
    for index, step in enumerate(steps):
        call = "core.neg(%" + last + ")" if step is None else f"core.mul.Scalar(%{last}, {step!r})"
        lines.append(f"  %v{index} = {call} : f64[3, 5]")
        last = f"v{index}"
    middle = f"%v{len(steps) // 2}" if keep_middle and steps else "%x"
    return "graph g(%x: f64[3, 5]) {\n" + "\n".join(lines) + f"\n  return (%{last}, {middle})\n}}\n"


# a hypothesis strategy of programs: chains of up to 8 steps, half of them keeping a middle value alive
PROGRAMS = st.builds(lambda steps, keep_middle: parse_graph(chain(steps, keep_middle)),
                     st.lists(st.one_of(st.none(), st.floats(-8, 8, allow_nan=False)), max_size=8), st.booleans())


def test_fold_scalar_muls():
    """The IR verifies after the pass, a second run changes nothing, and in float64 the outputs
    equal the original's on random inputs (seqweave.testing.check_pass checks all three)."""
    report = check_pass("fold-scalar-muls{max_scale=50}", programs=PROGRAMS, examples=25, seed=0)
    report.raise_if_failed()
    assert report.fired["fold-scalar-muls"] > 0, "no program had two multiplies in a row"
    return report


if __name__ == "__main__":
    print(test_fold_scalar_muls().summary())
    print("fold-scalar-muls: same outputs in float64, verifies, idempotent")
