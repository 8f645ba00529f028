"""Text form: golden output, exact print/parse round trips and parse errors."""
from __future__ import annotations

import math
from typing import Any

import pytest
import sympy
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from seqweave.ir.graph import Graph, Node, Value
from seqweave.ir.ops.core import core_op
from seqweave.ir.parser import ParseError, parse_graph, size_symbol
from seqweave.ir.printer import print_graph
from seqweave.ir.types import Partial, Replicate, Shard, TensorType
from seqweave.ir.verifier import verify

S0 = size_symbol("s0")


def canon(template: Any) -> Any:
    """A template with exact literal kinds made comparable (1 != 1.0 != True, nan == nan, -0.0 != 0.0)."""
    if isinstance(template, Value):
        return ("%", template.name)
    if isinstance(template, float):
        return ("float", repr(template))
    if isinstance(template, (list, tuple)):
        return (type(template).__name__, tuple(canon(item) for item in template))
    if isinstance(template, dict):
        return ("dict", tuple((key, canon(item)) for key, item in template.items()))
    return (type(template).__name__, template)


def structure(graph: Graph) -> tuple:
    """Everything that defines a graph, in comparable form."""
    nodes = [(n.op, canon(n.args), canon(n.kwargs), [(r.name, r.type) for r in n.results], n.loc)
             for n in graph.nodes]
    return (graph.name, list(graph.notes), [(v.name, v.type) for v in graph.inputs], nodes, canon(graph.outputs))


def assert_round_trip(graph: Graph) -> Graph:
    """print -> parse gives an equal graph whose operands are the defined Values, and prints identically."""
    text = print_graph(graph)
    parsed = parse_graph(text)
    assert structure(parsed) == structure(graph)
    assert print_graph(parsed) == text
    defined = {id(value) for value in parsed.values()}
    assert all(id(value) in defined for node in parsed.nodes for value in node.operands)
    assert all(value.producer is node for node in parsed.nodes for value in node.results)
    return parsed


def make_node(op: str, args: tuple, kwargs: dict, results: list[Value], loc: str = "") -> Node:
    node = Node(op, args, kwargs, results, loc)
    for value in results:
        value.producer = node
    return node


def golden_graph() -> Graph:
    x = Value("x", TensorType.of((4, 8), torch.float32))
    w = Value("w", TensorType.of((8, 8), torch.float32))
    mm = Value("mm", TensorType.of((4, 8), torch.float32))
    add = Value("add", TensorType.of((4, 8), torch.float32))
    halves = [Value(f"halves.{i}", TensorType.of((4, 4), torch.float32)) for i in range(2)]
    nodes = [make_node("core.mm", (x, w), {}, [mm]),
             make_node("core.add.Tensor", (mm, 1.5), {"alpha": 2}, [add], loc="model.layers.0"),
             make_node("core.split.Tensor", (add, 4, -1), {}, halves)]
    return Graph("golden", [x, w], nodes, (halves[0], None, [mm]), notes=["after capture"])


GOLDEN = """\
# after capture
graph golden(%x: f32[4, 8], %w: f32[8, 8]) {
  %mm = core.mm(%x, %w) : f32[4, 8]
  %add = core.add.Tensor(%mm, 1.5, alpha=2) : f32[4, 8] loc("model.layers.0")
  %halves.0, %halves.1 = core.split.Tensor(%add, 4, -1) : f32[4, 4], f32[4, 4]
  return (%halves.0, None, [%mm])
}
"""


def test_golden_print() -> None:
    graph = golden_graph()
    assert print_graph(graph) == GOLDEN
    verify(graph)
    verify(assert_round_trip(graph))


def attention_graph() -> Graph:
    """attn.sdpa with a mask operand, symbolic shapes, placements, notes and a loc."""
    sp = (("sp", Shard(2)),)
    q = Value("q", TensorType.of((2, 4, S0, 16), torch.bfloat16, sp))
    k = Value("k", TensorType.of((2, 2, S0, 16), torch.bfloat16, sp))
    v = Value("v", TensorType.of((2, 2, S0, 16), torch.bfloat16, sp))
    seg = Value("seg", TensorType.of((2, S0), torch.int64, (("sp", Shard(1)),)))
    out = Value("out", TensorType.of((2, 4, S0, 16), torch.bfloat16, sp))
    lse = Value("lse", TensorType.of((2, 4, S0), torch.float32, sp))
    wide = Value("wide", TensorType.of((2, 4, S0, 16), torch.float64, sp))
    flat = Value("flat", TensorType.of((8 * S0, 16), torch.float64, (("sp", Replicate()),)))
    attrs = {"mask": "causal & document($0)", "score_mod": "softcap(30.0)", "scale": 0.25, "kv_heads": 2}
    nodes = [
        make_node("attn.sdpa", (q, k, v, [seg]), attrs, [out, lse], loc="model.layers.0.self_attn"),
        make_node("core._to_copy", (out,), {"dtype": torch.float64, "layout": torch.strided,
                                            "device": torch.device("cpu"),
                                            "memory_format": torch.contiguous_format}, [wide]),
        make_node("core.view", (wide, [8 * S0, -1]), {}, [flat]),
    ]
    notes = ["captured by dynamo", "after canonicalize: 3 rewrites, 0.4 ms"]
    return Graph("forward", [q, k, v, seg], nodes, (flat, None, [out, lse]), notes)


def test_attention_graph_round_trip() -> None:
    graph = attention_graph()
    verify(graph)
    text = print_graph(graph)
    assert 'attn.sdpa(%q, %k, %v, [%seg], mask="causal & document($0)", score_mod="softcap(30.0)"' in text
    assert "bf16[2, 4, s0, 16]{sp: S(2)}" in text and 'loc("model.layers.0.self_attn")' in text
    assert "core.view(%wide, [sym(\"8*s0\"), -1])" in text and "f64[8*s0, 16]{sp: R}" in text
    parsed = assert_round_trip(graph)
    verify(parsed)
    assert parsed.nodes[2].args[1][0] == 8 * S0


def test_literals_of_every_kind_round_trip() -> None:
    x = Value("x", TensorType.of((S0, 3 * S0 + 1), torch.float16, (("dp", Replicate()), ("tp", Partial()))))
    y = Value("y", TensorType.of((2,), torch.complex64))
    zoo = {"i": -7, "f": 1e-05, "neg_zero": -0.0, "inf": math.inf, "ninf": -math.inf, "nan": math.nan,
           "t": True, "f_": False, "none": None, "s": 'say "%x" \\ \n \u00e9 $0', "empty": "",
           "lst": [1, [2.0, (3,)], ()], "tup": (1, "a"), "one": (None,), "dtype": torch.int8,
           "layout": torch.sparse_coo, "fmt": torch.channels_last, "cuda": torch.device("cuda:1"),
           "sym": sympy.Max(S0, 3) * 2, "big": 2**70, "vals": [x, (x,)]}
    graph = Graph("zoo", [x], [make_node("core.foo", (x, [x]), zoo, [y])], y)
    parsed = assert_round_trip(graph)
    assert parsed.nodes[0].kwargs["vals"][1][0] is parsed.inputs[0]


def test_scalar_inputs_and_no_result_nodes_round_trip() -> None:
    text = ("graph g(%n: int, %t: i1[]) {\n  core._assert_async.msg(%t, \"boom\")\n"
            "  return %n\n}\n")
    assert print_graph(parse_graph(text)) == text


@pytest.mark.parametrize("text, line, needle", [
    ("graph g(%x: f32[2]) {\n  %y = core.relu(%z) : f32[2]\n  return %y\n}", 2, "undefined value %z"),
    ("graph g(%x: f32[2]) {\n  %x = core.relu(%x) : f32[2]\n  return %x\n}", 2, "defined twice"),
    ("graph g(%x: f32[2]) {\n  %y = core.relu(%x, open(\"f\")) : f32[2]\n  return %y\n}", 2, "open"),
    ("graph g(%x: f32[2]) {\n  %y = core.relu(%x) : q32[2]\n  return %y\n}", 2, "unknown dtype"),
    ("graph g(%x: f32[2]) {\n  %y, %z = core.relu(%x) : f32[2]\n  return %y\n}", 2, "2 results but 1 types"),
    ("graph g(%x: f32[2]) {\n  %y = core.relu(%x : f32[2]\n  return %y\n}", 2, "missing closing"),
    ("graph g(%x: f32[2]) {\n  %y = core.relu(%x) : f32[2]\n}", 3, "missing return"),
    ("graph g(%x: f32[2]) {\n  return %x\n", 2, "not closed"),
    ("graph g(%x f32[2]) {\n  return %x\n}", 1, "bad graph input"),
    ("graph g(%x: f32[2]{sp: X}) {\n  return %x\n}", 1, "unknown placement"),
    ("graph g(%x: f32[2]) {\n  return (%x, sym(\"exit(0)\"))\n}", 2, "not sympy functions"),
    ("graph g(%x: f32[2]) {\n  return (%x, 'single')\n}", 2, "not a double-quoted JSON string"),
    ("graph g(%x: f32[2.5]) {\n  return %x\n}", 1, "non-integer size"),
])
def test_parse_errors_name_line_and_fragment(text: str, line: int, needle: str) -> None:
    with pytest.raises(ParseError) as info:
        parse_graph(text)
    assert info.value.line == line
    assert f"line {line}:" in str(info.value) and needle in str(info.value)


# ------------------------------------------------------------------ property tests

_UNARY = ("relu", "neg", "mul_scalar", "add_scalar", "transpose", "reshape", "view", "sum", "unsqueeze")
_BINARY = ("add", "mul", "sub")


def _divisor_shape(numel: int, seed: int) -> list[int]:
    divisors = [d for d in range(1, numel + 1) if numel % d == 0]
    first = divisors[seed % len(divisors)]
    return [numel] if seed % 3 == 0 else [first, numel // first]


def _step_call(op: str, seed: int, cur: Value, meta: torch.Tensor, earlier: list[Value],
               metas: dict[str, torch.Tensor]) -> tuple[str, tuple, dict]:
    """The (op, args, kwargs) of one chain step reading `cur`."""
    rank = meta.dim()
    if op in _BINARY:
        same = [v for v in earlier if metas[v.name].shape == meta.shape]
        other = same[seed % len(same)]
        kwargs = {"alpha": (2, 0.5)[seed % 2]} if op != "mul" else {}
        return f"core.{op}.Tensor", (cur, other), kwargs
    if op in ("mul_scalar", "add_scalar"):
        return f"core.{op[:3]}.Scalar", (cur, (1.5, -2, 0.25)[seed % 3]), {}
    if op == "transpose" and rank >= 2:
        return "core.transpose.int", (cur, seed % rank, -1 - (seed // 7) % rank), {}
    if op in ("reshape", "view") and rank >= 1:
        name = "core.view" if op == "view" and meta.is_contiguous() else "core.reshape"
        return name, (cur, _divisor_shape(meta.numel(), seed)), {}
    if op == "sum" and rank >= 2:
        return "core.sum.dim_IntList", (cur, [seed % rank]), {"keepdim": bool(seed % 2)}
    if op == "unsqueeze" and rank < 4:
        return "core.unsqueeze", (cur, seed % (rank + 1)), {}
    return ("core.relu" if op != "neg" else "core.neg"), (cur,), {}


def build_chain(shape: list[int], dtype: torch.dtype, steps: list[tuple[str, int]]) -> Graph:
    """A straight-line graph of elementwise / shape ops; types come from running them on meta tensors."""
    x = Value("x", TensorType.of(shape, dtype))
    metas = {"x": torch.empty(shape, dtype=dtype, device="meta")}
    nodes, values = [], [x]
    for index, (op, seed) in enumerate(steps):
        cur = values[-1]
        name, args, kwargs = _step_call(op, seed, cur, metas[cur.name], values, metas)
        result = core_op(name).overload(*[metas[a.name] if isinstance(a, Value) else a for a in args], **kwargs)
        value = Value(f"v{index}" if index % 2 else f"layer.{index}", TensorType.from_tensor(result))
        metas[value.name] = result
        nodes.append(make_node(name, args, kwargs, [value]))
        values.append(value)
    return Graph("chain", [x], nodes, (values[-1], [values[len(values) // 2]]))


@settings(max_examples=30, deadline=None)
@given(shape=st.lists(st.integers(1, 4), min_size=1, max_size=3),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
       steps=st.lists(st.tuples(st.sampled_from(_UNARY + _BINARY), st.integers(0, 10**6)), min_size=1, max_size=8))
def test_random_chains_round_trip_and_verify(shape: list[int], dtype: torch.dtype,
                                             steps: list[tuple[str, int]]) -> None:
    graph = build_chain(shape, dtype, steps)
    verify(graph)
    verify(assert_round_trip(graph))


_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40), st.floats(), st.text(max_size=8),
                     st.sampled_from([torch.float32, torch.bfloat16, torch.strided, torch.preserve_format]))
_LITERALS = st.recursive(_SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                           st.lists(inner, max_size=3).map(tuple)), max_leaves=8)


@settings(max_examples=30, deadline=None)
@given(literal=_LITERALS)
def test_random_literals_round_trip(literal: Any) -> None:
    x = Value("x", TensorType.of((2,), torch.float32))
    y = Value("y", TensorType.of((2,), torch.float32))
    graph = Graph("lit", [x], [make_node("core.add.Tensor", (x, literal), {"alpha": literal}, [y])], [y, literal])
    assert_round_trip(graph)
