"""The pass author's API: options typed by the dataclass fields, `@register_pass`, name clashes."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Literal

import pytest

import seqweave
from seqweave.errors import OptionError
from seqweave.ir.graph import Graph
from seqweave.passes import registry
from seqweave.passes.base import Pass, PassResult
from seqweave.passes.canonicalize import Canonicalize
from seqweave.passes.manager import PASSES, parse_pipeline
from seqweave.passes.shard_sequence import ShardSequence


class Colour(enum.Enum):
    RED = "red"
    BLUE = "blue"


@dataclass(frozen=True)
class Typed(Pass):
    """One option of every kind a pipeline can spell."""

    name = "typed"
    count: int = 1
    ratio: float = 0.5
    strict: bool = False
    label: str = ""
    mode: Literal["ring", "ulysses"] = "ring"
    size: int | str = 0
    budget: str | float | int = 1.0
    layers: tuple[int, ...] = ()
    pair: tuple[int, str] = (0, "")
    colour: Colour = Colour.RED
    anything: object = ""
    found: dict = field(default_factory=dict, compare=False)  # a result, not an option

    def run(self, graph: Graph) -> PassResult:
        return PassResult(0)


@pytest.fixture
def typed() -> type[Typed]:
    registry.register_pass(Typed)
    yield Typed
    PASSES.pop(Typed.name)


@pytest.mark.parametrize("text, expected", [
    ("count=3", {"count": 3}),
    ("count = -2", {"count": -2}),
    ("ratio=2", {"ratio": 2.0}),
    ("ratio=1e-3", {"ratio": 0.001}),
    ("strict=true", {"strict": True}),
    ("strict=False", {"strict": False}),
    ("label=abc", {"label": "abc"}),
    ("label=3", {"label": "3"}),  # a str option keeps digits as text
    ("mode=ulysses", {"mode": "ulysses"}),
    ("size=7", {"size": 7}),
    ("size=all", {"size": "all"}),
    ("budget=2", {"budget": 2}),  # int before float: a byte count stays an int
    ("budget=0.25", {"budget": 0.25}),
    ("budget=40GiB", {"budget": "40GiB"}),
    ("layers=0+5", {"layers": (0, 5)}),
    ("layers=(1, 2, 3)", {"layers": (1, 2, 3)}),
    ("layers=[4]", {"layers": (4,)}),
    ("layers=", {"layers": ()}),
    ("pair=3+x", {"pair": (3, "x")}),
    ("colour=blue", {"colour": Colour.BLUE}),
    ("anything=4", {"anything": 4}),
    ("anything=0+5", {"anything": "0+5"}),
])
def test_pipeline_text_becomes_the_field_type(typed, text, expected):
    (made,) = parse_pipeline(f"typed{{{text}}}")
    assert made == Typed(**expected)
    for option, value in expected.items():
        assert type(getattr(made, option)) is type(value)


@pytest.mark.parametrize("text, option, expected", [
    ("count=two", "count", "expected int"),
    ("count=2.5", "count", "expected int"),
    ("ratio=half", "ratio", "expected float"),
    ("strict=maybe", "strict", "expected bool"),
    ("mode=zigzag", "mode", "expected 'ring' | 'ulysses'"),
    ("layers=0+x", "layers", "expected tuple[int, ...]"),
    ("layers=(1, 'a')", "layers", "expected tuple[int, ...]"),
    ("pair=1+2+3", "pair", "expected tuple[int, str]"),
    ("colour=green", "colour", "expected 'red' | 'blue'"),
])
def test_a_wrong_type_in_a_pipeline_names_pass_option_value_and_type(typed, text, option, expected):
    with pytest.raises(OptionError) as caught:
        parse_pipeline(f"canonicalize,typed{{{text}}}")
    given = text.partition("=")[2]
    assert f"option {option}={given!r} of pass typed: {expected}" in str(caught.value)


def test_a_wrong_type_from_python_is_an_option_error_before_the_pass_code_runs(typed):
    with pytest.raises(OptionError, match=r"option count='3' of pass typed: expected int"):
        Typed(count="3")
    with pytest.raises(OptionError, match=r"option strict=1 of pass typed: expected bool"):
        Typed(strict=1)
    with pytest.raises(OptionError, match=r"pass typed has no option\(s\) \['colour_'\]"):
        Typed(colour_=Colour.RED)
    assert Typed(ratio=1).ratio == 1  # an int is a valid float


@pytest.mark.parametrize("make, message", [
    (lambda: ShardSequence(world="two"), "option world='two' of pass shard-sequence: expected int"),
    (lambda: ShardSequence(input_seqs=((0, 2),)), "expected tuple[tuple[int, int, int], ...]"),
    (lambda: parse_pipeline("shard-sequence{world=two}"), "option world='two' of pass shard-sequence"),
    (lambda: parse_pipeline("rope-scale{original_max=big,rule=yarn}"), "option original_max='big' of pass rope-scale"),
    (lambda: parse_pipeline("canonicalize{foo=1}"), "pass canonicalize has no option(s) ['foo']"),
])
def test_built_in_passes_check_their_options(make, message):
    with pytest.raises(OptionError) as caught:
        make()
    assert message in str(caught.value)


def test_structured_options_parse_from_a_pipeline():
    (made,) = parse_pipeline("shard-sequence{world=4, input_seqs=((0, 2, 1), (3, 1, 8)), attention=auto}")
    assert made == ShardSequence(world=4, input_seqs=((0, 2, 1), (3, 1, 8)), attention="auto")


def test_compare_false_fields_are_results_not_options(typed):
    with pytest.raises(OptionError, match=r"no option\(s\) \['found'\]"):
        parse_pipeline("typed{found=1}")
    assert "report" not in str(pytest.raises(OptionError, parse_pipeline, "shard-sequence{x=1}").value)


def test_built_ins_are_registered_through_the_registry():
    assert registry.lookup("canonicalize") is Canonicalize
    assert PASSES["shard-sequence"] is ShardSequence
    assert seqweave.register_pass is registry.register_pass


def test_a_name_clash_is_an_option_error():
    @dataclass(frozen=True)
    class Impostor(Pass):
        name = "canonicalize"

    with pytest.raises(OptionError, match="two passes are named 'canonicalize'"):
        registry.register_pass(Impostor)
    assert registry.lookup("canonicalize") is Canonicalize


def test_registering_the_same_class_again_is_harmless(typed):
    assert registry.register_pass(Typed) is Typed
    assert Typed(count=2).count == 2
    with pytest.raises(OptionError):
        Typed(count="2")


def test_only_named_pass_classes_register():
    with pytest.raises(OptionError, match="not a Pass subclass with a name"):
        registry.register_pass(dict)


def test_dataclasses_replace_keeps_working_on_a_registered_pass():
    """`replace` hands every init field to `__init__`, results (`report`, compare=False) included."""
    import dataclasses

    import seqweave.passes.manager  # noqa: F401  (registers the built-ins)
    from seqweave.passes.shard_sequence import ShardSequence

    assert dataclasses.replace(ShardSequence(world=2, length=8), length=16).length == 16
    with pytest.raises(OptionError, match="length"):
        dataclasses.replace(ShardSequence(world=2, length=8), length="sixteen")
