"""Tests for seqweave.ir.mask: text form, evaluate() vs brute force, block_class() vs evaluate()."""

from __future__ import annotations

import dataclasses
import functools
import operator
from types import MappingProxyType
from typing import Callable, NamedTuple, Sequence

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from seqweave.ir.mask import (
    And, BlockClass, Causal, Chunked, Dense, Document, Full, MaskSpec, Or, Padding, Sinks, SlidingWindow, dense_mask,
)
from seqweave.ir.mask_parser import parse_mask, parse_score_mod
from seqweave.ir.score_mod import NoScoreMod, ScoreMod, Softcap

SEQ = 64  # sequence length of generated operand tensors
FAR = 10_000  # largest offset for structured-only blocks
MAX_BLOCK = 64
FAST = settings(max_examples=60, deadline=None)
THOROUGH = settings(max_examples=200, deadline=None)


# -------------------------------------------------------------- strategies


def structured_specs(window: int = 40, sinks: int = 50, chunk: int = 40) -> st.SearchStrategy[MaskSpec]:
    """Single structured (position-only) masks with parameters up to the given sizes."""
    return st.one_of(
        st.just(Full()), st.just(Causal()),
        st.builds(SlidingWindow, st.integers(0, window), st.integers(0, window)),
        st.builds(Sinks, st.integers(0, sinks)), st.builds(Chunked, st.integers(1, chunk)))


def data_specs(max_operand: int = 5) -> st.SearchStrategy[MaskSpec]:
    """Single data-dependent masks referencing operands $0..$max_operand."""
    idx = st.integers(0, max_operand)
    return st.one_of(st.builds(Document, idx), st.builds(Padding, idx), st.builds(Dense, idx))


def mask_specs(leaves: st.SearchStrategy[MaskSpec] | None = None,
               max_leaves: int = 8) -> st.SearchStrategy[MaskSpec]:
    """Random nested And/Or trees (built with & and |, so always flattened)."""
    leaves = leaves if leaves is not None else st.one_of(structured_specs(), data_specs())
    ops = st.sampled_from([operator.and_, operator.or_])
    return st.recursive(leaves, lambda kids: st.builds(
        functools.reduce, ops, st.lists(kids, min_size=2, max_size=3)), max_leaves=max_leaves)


def score_mods() -> st.SearchStrategy[ScoreMod]:
    caps = st.floats(min_value=1e-30, max_value=1e30, allow_nan=False, allow_infinity=False)
    return st.one_of(st.just(NoScoreMod()), st.builds(Softcap, caps))


class Case(NamedTuple):
    """A mask together with operand tensors that fit it."""

    spec: MaskSpec
    operands: tuple[Tensor, ...]
    batch: int
    heads: int


def _segment_ids(draw: st.DrawFn, gen: torch.Generator, batch: int, heads: int) -> Tensor:
    style = draw(st.sampled_from(["sorted", "random", "const"]))
    if style == "sorted":  # packed documents: nondecreasing ids
        p = draw(st.sampled_from([0.03, 0.2, 0.6]))
        return (torch.rand(batch, SEQ, generator=gen) < p).long().cumsum(1)
    high = draw(st.integers(1, 3)) if style == "random" else 1
    return torch.randint(0, high, (batch, SEQ), generator=gen)


def _valid(draw: st.DrawFn, gen: torch.Generator, batch: int, heads: int) -> Tensor:
    style = draw(st.sampled_from(["left", "right", "random"]))
    if style == "random":
        return torch.rand(batch, SEQ, generator=gen) < 0.5
    lengths = torch.randint(0, SEQ + 1, (batch, 1), generator=gen)
    pos = torch.arange(SEQ)[None, :]
    valid = pos < lengths if style == "right" else pos >= SEQ - lengths
    return valid.long() if draw(st.booleans()) else valid  # HF masks are int


def _dense(draw: st.DrawFn, gen: torch.Generator, batch: int, heads: int) -> Tensor:
    shape = [draw(st.sampled_from([1, full])) for full in (batch, heads, SEQ, SEQ)]
    while len(shape) > 1 and shape[0] == 1 and draw(st.booleans()):
        shape = shape[1:]  # fewer dims also broadcast
    p = draw(st.sampled_from([0.0, 0.03, 0.5, 0.97, 1.0]))
    return torch.rand(shape, generator=gen) < p


_OPERAND_MAKERS = MappingProxyType({Document: _segment_ids, Padding: _valid, Dense: _dense})


def _draw_tree(draw: st.DrawFn, depth: int, leaf: Callable[[], MaskSpec]) -> MaskSpec:
    if depth == 0 or draw(st.booleans()):
        return leaf()
    op = draw(st.sampled_from([operator.and_, operator.or_]))
    return functools.reduce(op, [_draw_tree(draw, depth - 1, leaf) for _ in range(draw(st.integers(2, 3)))])


@st.composite
def masks_with_operands(draw: st.DrawFn, max_depth: int = 2) -> Case:
    """Random spec (structured and data leaves) plus random operand tensors of length SEQ."""
    batch, heads = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    operands: list[Tensor] = []

    def leaf() -> MaskSpec:
        if draw(st.booleans()):
            return draw(structured_specs(window=20, sinks=SEQ, chunk=24))
        cls = draw(st.sampled_from(sorted(_OPERAND_MAKERS, key=lambda c: c.__name__)))
        operands.append(_OPERAND_MAKERS[cls](draw, gen, batch, heads))
        return cls(len(operands) - 1)

    return Case(_draw_tree(draw, max_depth, leaf), tuple(operands), batch, heads)


def ranges(lo: int = 0, hi: int = SEQ) -> st.SearchStrategy[tuple[int, int]]:
    """Half-open ranges inside [lo, hi], at most MAX_BLOCK long, often short, sometimes empty."""
    lengths = st.one_of(st.integers(1, 8), st.integers(0, MAX_BLOCK))
    return st.tuples(st.integers(lo, hi), lengths).map(lambda t: (t[0], min(hi, t[0] + t[1])))


# --------------------------------------------------------------- reference


def _as_4d(t: Tensor) -> list:
    return t.reshape([1] * (4 - t.dim()) + list(t.shape)).tolist()


def reference_allows(spec: MaskSpec, b: int, h: int, q: int, kv: int, ops: Sequence[list]) -> bool:
    """Independent plain-Python predicate, one (b, h, q, kv) at a time."""
    if isinstance(spec, (And, Or)):
        results = [reference_allows(p, b, h, q, kv, ops) for p in spec.parts]
        return all(results) if isinstance(spec, And) else any(results)
    if isinstance(spec, Dense):
        value = ops[spec.operand]
        for i in (b, h, q, kv):
            value = value[i if len(value) > 1 else 0]  # size-1 dims broadcast
        return bool(value)
    checks = {
        Full: lambda: True, Causal: lambda: kv <= q, Sinks: lambda: kv < spec.n,
        SlidingWindow: lambda: q - spec.left <= kv <= q + spec.right,
        Chunked: lambda: q // spec.size == kv // spec.size,
        Document: lambda: ops[spec.operand][b][q] == ops[spec.operand][b][kv],
        Padding: lambda: ops[spec.operand][b][kv] != 0,
    }
    return bool(checks[type(spec)]())


def reference_grid(case: Case, qs: Sequence[int], kvs: Sequence[int]) -> Tensor:
    ops = [_as_4d(t) if any(isinstance(p, Dense) and p.operand == i for p in _leaves(case.spec))
           else t.tolist() for i, t in enumerate(case.operands)]
    values = [reference_allows(case.spec, b, h, q, kv, ops)
              for b in range(case.batch) for h in range(case.heads) for q in qs for kv in kvs]
    return torch.tensor(values, dtype=torch.bool).reshape(case.batch, case.heads, len(qs), len(kvs))


def _leaves(spec: MaskSpec) -> list[MaskSpec]:
    return [x for p in spec.parts for x in _leaves(p)] if isinstance(spec, (And, Or)) else [spec]


def _full(case: Case, got: Tensor) -> Tensor:
    assert got.dim() == 4 and got.dtype == torch.bool
    return got.expand(case.batch, case.heads, *got.shape[2:])


# --------------------------------------------------------------- text form

GOLDEN = (
    (Full(), "full"), (Causal(), "causal"), (SlidingWindow(4095, 0), "sliding_window(4095, 0)"),
    (Sinks(4), "sinks(4)"), (Chunked(128), "chunked(128)"), (Document(0), "document($0)"),
    (Padding(1), "padding($1)"), (Dense(2), "dense($2)"),
    (Causal() & (Sinks(4) | SlidingWindow(1023, 0)), "causal & (sinks(4) | sliding_window(1023, 0))"),
    ((Causal() & Sinks(4)) | Full(), "causal & sinks(4) | full"),
    (Causal() & (Sinks(1) & Document(3)), "causal & sinks(1) & document($3)"),
)


@pytest.mark.parametrize("spec, text", GOLDEN, ids=[t for _, t in GOLDEN])
def test_golden_strings(spec: MaskSpec, text: str) -> None:
    assert str(spec) == text
    assert parse_mask(text) == spec


@FAST
@given(mask_specs())
def test_text_round_trip(spec: MaskSpec) -> None:
    assert parse_mask(str(spec)) == spec
    assert hash(parse_mask(str(spec))) == hash(spec)


@FAST
@given(score_mods())
def test_score_mod_round_trip(mod: ScoreMod) -> None:
    assert parse_score_mod(str(mod)) == mod


def test_parse_is_lenient_about_spacing_parens_and_nesting() -> None:
    assert parse_mask(" causal&( sinks( 4 )|(full))") == Causal() & (Sinks(4) | Full())
    assert parse_mask("causal()") == Causal()
    assert parse_mask("(causal & sinks(1)) & document($0)") == And((Causal(), Sinks(1), Document(0)))
    assert parse_mask("full | (causal | sinks(2))") == Or((Full(), Causal(), Sinks(2)))
    assert parse_score_mod("softcap(30)") == Softcap(30.0) and str(Softcap(30)) == "softcap(30.0)"
    assert str(parse_score_mod("softcap(1e-05)")) == "softcap(1e-05)"


@pytest.mark.parametrize("text, fragment", [
    ("causl", "'causl' at position 0"),
    ("causal &", "end of input at position 8"),
    ("causal & (sinks(4)", "end of input at position 18; expected ')'"),
    ("sinks(x)", "'x' at position 6; expected an integer"),
    ("document(3)", "'3' at position 9; expected an operand"),
    ("sliding_window(4)", "')' at position 16; expected ','"),
    ("causal ^ full", "'^' at position 7"),
    ("causal full", "'full' at position 7; expected '&', '|' or end of input"),
    ("", "end of input at position 0"),
])
def test_parse_errors_name_token_position_and_kinds(text: str, fragment: str) -> None:
    with pytest.raises(ValueError) as err:
        parse_mask(text)
    assert fragment in str(err.value)
    assert "sliding_window(left, right)" in str(err.value) and "document($N)" in str(err.value)


def test_parse_errors_for_score_mods_and_bad_values() -> None:
    with pytest.raises(ValueError, match="'causal' at position 0.*none, softcap\\(cap\\)"):
        parse_score_mod("causal")
    with pytest.raises(ValueError, match="left must be an int >= 0, got -1"):
        parse_mask("sliding_window(-1, 0)")
    with pytest.raises(ValueError, match="a str"):
        parse_mask(None)  # type: ignore[arg-type]


# ---------------------------------------------------------------- evaluate

ZIGZAG_RANK0 = (0, 1, 2, 3, 12, 13, 14, 15)  # world 2, 4 chunks of 4: rank 0 holds chunks 0 and 3
ODD_INDICES = (7, 3, 3, 0, 63, 31, 32, 1)  # unsorted, repeated, far apart


def _fixed_case(spec: MaskSpec) -> Case:
    gen = torch.Generator().manual_seed(0)
    seg = torch.tensor([[0] * 10 + [1] * 30 + [2] * 24, [5] * 40 + [6] * 24])
    valid = torch.arange(SEQ)[None, :] >= torch.tensor([[0], [20]])  # left padding
    dense = torch.rand(2, 1, SEQ, SEQ, generator=gen) < 0.5
    return Case(spec, (seg, valid.long(), dense), 2, 3)


@pytest.mark.parametrize("spec", [
    Full(), Causal(), SlidingWindow(3, 1), SlidingWindow(0, 0), Sinks(2), Sinks(0), Chunked(4), Chunked(1),
    Document(0), Padding(1), Dense(2), Causal() & (Sinks(2) | SlidingWindow(5, 0)) & Document(0),
    Padding(1) | Dense(2) & Chunked(8)], ids=str)
@pytest.mark.parametrize("qs, kvs", [
    (range(16), range(16)), (ZIGZAG_RANK0, range(16)), (ODD_INDICES, ZIGZAG_RANK0), ([], [5]), ([40], [])])
def test_evaluate_matches_brute_force(spec: MaskSpec, qs: Sequence[int], kvs: Sequence[int]) -> None:
    case = _fixed_case(spec)
    got = spec.evaluate(torch.tensor(qs, dtype=torch.long), torch.tensor(kvs, dtype=torch.long), case.operands)
    assert torch.equal(_full(case, got), reference_grid(case, list(qs), list(kvs)))


@FAST
@given(masks_with_operands(), st.lists(st.integers(0, SEQ - 1), max_size=10),
       st.lists(st.integers(0, SEQ - 1), max_size=10))
def test_evaluate_random_specs_match_brute_force(case: Case, qs: list[int], kvs: list[int]) -> None:
    got = case.spec.evaluate(torch.tensor(qs, dtype=torch.long), torch.tensor(kvs, dtype=torch.long),
                             case.operands)
    assert torch.equal(_full(case, got), reference_grid(case, qs, kvs))


def test_evaluate_shapes() -> None:
    case = _fixed_case(Full())
    q, kv = torch.arange(5), torch.arange(7)
    assert Causal().evaluate(q, kv).shape == (1, 1, 5, 7)
    assert Document(0).evaluate(q, kv, case.operands).shape == (2, 1, 5, 7)
    assert Padding(1).evaluate(q, kv, case.operands).shape == (2, 1, 5, 7)
    assert Dense(0).evaluate(q, kv, [torch.ones(1, SEQ, dtype=torch.bool)]).shape == (1, 1, 5, 7)
    assert dense_mask(Causal(), 2, 3, q_offset=5, kv_offset=4)[0, 0].tolist() == [[1, 1, 0], [1, 1, 1]]


def test_evaluate_errors() -> None:
    with pytest.raises(ValueError, match=r"needs operands\[1\] but 1 operand"):
        Padding(1).evaluate(torch.arange(2), torch.arange(2), [torch.ones(1, 2)])
    with pytest.raises(ValueError, match="must be the int segment_ids"):
        Document(0).evaluate(torch.arange(2), torch.arange(2), [torch.ones(2)])
    with pytest.raises(ValueError, match="1-D"):
        Causal().evaluate(torch.zeros(2, 2, dtype=torch.long), torch.arange(2))
    with pytest.raises(ValueError, match="integer dtype"):
        Causal().evaluate(torch.zeros(2), torch.arange(2))


# ------------------------------------------------------------- block_class


def _check_block(case: Case, q: tuple[int, int], kv: tuple[int, int], exact: bool,
                 blind: bool = False) -> None:
    """block_class never contradicts evaluate; if ``exact``, PARTIAL iff the block is mixed.

    ``blind`` classifies without operands (data-dependent kinds must then say PARTIAL).
    """
    cls = case.spec.block_class(q, kv, None if blind else case.operands)
    values = _full(case, case.spec.evaluate(torch.arange(*q), torch.arange(*kv), case.operands))
    if values.numel() == 0:
        assert cls is BlockClass.EMPTY
        return
    assert cls is not BlockClass.EMPTY or not values.any(), (str(case.spec), q, kv)
    assert cls is not BlockClass.FULL or values.all(), (str(case.spec), q, kv)
    if exact:
        mixed = bool(values.any()) and not bool(values.all())
        assert (cls is BlockClass.PARTIAL) == mixed, (str(case.spec), q, kv, cls)


@THOROUGH
@given(masks_with_operands(max_depth=0), ranges(), ranges())
def test_single_kind_block_class_exact(case: Case, q: tuple[int, int], kv: tuple[int, int]) -> None:
    _check_block(case, q, kv, exact=True)
    _check_block(case, q, kv, exact=not case.spec.is_data_dependent(), blind=True)
    if case.spec.is_data_dependent() and q[0] < q[1] and kv[0] < kv[1]:
        assert case.spec.block_class(q, kv) is BlockClass.PARTIAL


@THOROUGH
@given(masks_with_operands(), ranges(), ranges())
def test_combined_block_class_never_contradicts(case: Case, q: tuple[int, int],
                                                kv: tuple[int, int]) -> None:
    _check_block(case, q, kv, exact=False)
    _check_block(case, q, kv, exact=False, blind=True)


@THOROUGH
@given(structured_specs(window=200, sinks=FAR, chunk=300), ranges(0, FAR),
       st.one_of(st.integers(-8, 8), st.integers(-300, 300)), st.integers(0, MAX_BLOCK))
def test_structured_block_class_exact_at_large_offsets(spec: MaskSpec, q: tuple[int, int],
                                                       shift: int, kv_len: int) -> None:
    kv_start = max(0, q[0] + shift)
    _check_block(Case(spec, (), 1, 1), q, (kv_start, kv_start + kv_len), exact=True)


EXHAUSTIVE_N = 12  # every block of an N x N grid
EXHAUSTIVE_SPECS = (Full(), Causal(), SlidingWindow(0, 0), SlidingWindow(2, 0), SlidingWindow(3, 2),
                    SlidingWindow(0, 4), Sinks(0), Sinks(1), Sinks(5), Chunked(1), Chunked(3), Chunked(5))


@pytest.mark.parametrize("spec", EXHAUSTIVE_SPECS, ids=str)
def test_structured_block_class_exact_on_every_small_block(spec: MaskSpec) -> None:
    grid = dense_mask(spec, EXHAUSTIVE_N, EXHAUSTIVE_N)[0, 0]
    spans = [(a, b) for a in range(EXHAUSTIVE_N + 1) for b in range(a, EXHAUSTIVE_N + 1)]
    for q in spans:
        for kv in spans:
            block = grid[q[0]:q[1], kv[0]:kv[1]]
            want = (BlockClass.EMPTY if block.numel() == 0 or not block.any()
                    else BlockClass.FULL if block.all() else BlockClass.PARTIAL)
            assert spec.block_class(q, kv) is want, (q, kv)


@FAST
@given(mask_specs(structured_specs(window=200, sinks=FAR, chunk=300)), ranges(0, FAR), ranges(0, FAR))
def test_structured_combinations_never_contradict(spec: MaskSpec, q: tuple[int, int],
                                                  kv: tuple[int, int]) -> None:
    _check_block(Case(spec, (), 1, 1), q, kv, exact=False)


def test_block_class_examples() -> None:
    assert Causal().block_class((0, 64), (64, 128)) is BlockClass.EMPTY
    assert Causal().block_class((64, 128), (0, 64)) is BlockClass.FULL
    assert Causal().block_class((0, 64), (0, 64)) is BlockClass.PARTIAL
    assert (Causal() & Sinks(4)).block_class((100, 200), (0, 4)) is BlockClass.FULL
    assert (Sinks(4) | Causal()).block_class((0, 2), (4, 8)) is BlockClass.EMPTY
    assert Document(0).block_class((0, 8), (0, 8)) is BlockClass.PARTIAL
    seg = [torch.tensor([[0, 0, 1, 1], [3, 3, 4, 4]])]
    assert Document(0).block_class((0, 2), (2, 4), seg) is BlockClass.EMPTY
    assert Document(0).block_class((2, 4), (2, 4), seg) is BlockClass.FULL
    assert Document(0).block_class((1, 3), (2, 4), seg) is BlockClass.PARTIAL
    two_rows = [torch.tensor([[0, 0, 1, 1], [3, 4, 4, 4]])]  # row 0 disjoint, row 1 overlaps
    assert Document(0).block_class((0, 2), (2, 4), two_rows) is BlockClass.PARTIAL
    assert Full().block_class((5, 5), (0, 8)) is BlockClass.EMPTY
    with pytest.raises(ValueError, match="start <= stop"):
        Full().block_class((5, 4), (0, 8))
    with pytest.raises(ValueError, match="outside the operand"):
        Padding(0).block_class((0, 4), (0, 9), [torch.ones(1, 8)])
    with pytest.raises(ValueError, match="outside the operand"):
        Padding(0).block_class((0, 4), (3, 5), [torch.ones(1, 1)])  # only Dense broadcasts size-1 dims


# ------------------------------------------------ validation, operands, mods


@pytest.mark.parametrize("make, fragment", [
    (lambda: SlidingWindow(-1, 0), "left must be an int >= 0, got -1; pass how many earlier"),
    (lambda: SlidingWindow(0, -2), "right must be an int >= 0"),
    (lambda: Sinks(-1), "n must be an int >= 0, got -1; pass how many leading keys"),
    (lambda: Sinks(1.5), "n must be an int"),
    (lambda: Chunked(0), "size must be an int >= 1, got 0; pass the chunk length"),
    (lambda: Document(-1), "operand must be an int >= 0, got -1; pass the index N"),
    (lambda: Dense(True), "operand must be an int"),
    (lambda: Softcap(0.0), "cap must be a finite number > 0, got 0.0; pass the logit cap"),
    (lambda: Softcap(float("nan")), "cap must be a finite number"),
    (lambda: And((Causal(),)), "And needs at least 2 parts, got 1"),
    (lambda: Or((Causal(), "full")), "Or parts must be MaskSpecs"),
])
def test_constructor_validation(make: Callable[[], object], fragment: str) -> None:
    with pytest.raises(ValueError) as err:
        make()
    assert fragment in str(err.value)


def test_specs_are_frozen_values() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        Sinks(4).n = 5  # type: ignore[misc]
    assert {Sinks(4), Sinks(4), Causal()} == {Sinks(4), Causal()}
    assert Document(0) != Padding(0)
    assert And((And((Causal(), Sinks(1))), Full())).parts == (Causal(), Sinks(1), Full())


def test_operand_bookkeeping() -> None:
    spec = Causal() & (Document(0) | Dense(2)) & Padding(0)
    assert spec.operand_indices() == frozenset({0, 2})
    assert spec.is_data_dependent() and not (Causal() | Sinks(3)).is_data_dependent()
    assert spec.remap_operands({0: 5, 2: 1}) == Causal() & (Document(5) | Dense(1)) & Padding(5)
    assert spec.remap_operands({2: 0}) == Causal() & (Document(0) | Dense(0)) & Padding(0)
    assert Sinks(3).remap_operands({0: 1}) == Sinks(3)


@pytest.mark.parametrize("mod", [NoScoreMod(), Softcap(2.5), Softcap(50.0)], ids=str)
def test_score_mod_apply_and_grad_factor(mod: ScoreMod) -> None:
    raw = torch.linspace(-200, 200, 101, dtype=torch.float64, requires_grad=True)
    out = mod.apply(raw)
    (grad,) = torch.autograd.grad(out.sum(), raw)
    torch.testing.assert_close(mod.grad_factor(raw.detach()), grad)
    if isinstance(mod, Softcap):
        assert out.abs().max() <= mod.cap
        torch.testing.assert_close(out, mod.cap * torch.tanh(raw / mod.cap))
    else:
        assert torch.equal(out, raw)
