"""Verifier: valid graphs pass; each broken invariant gives a message naming node, problem and fix."""
from __future__ import annotations

import pytest
import torch

from seqweave.ir.graph import Graph, Node, Value
from seqweave.ir.ops import VerificationError
from seqweave.ir.parser import parse_graph
from seqweave.ir.types import Replicate, Shard, TensorType
from seqweave.ir.verifier import verify

F32_2x8 = TensorType.of((2, 8), torch.float32)

ATTN = """\
graph attn(%q: f32[1, {hq}, 130, 16], %k: f32[1, {hk}, 130, 16], %v: f32[1, {hk}, 130, 16], %seg: i64[1, 130]) {{
  %out, %lse = attn.sdpa(%q, %k, %v, [%seg], mask="{mask}", score_mod="none", scale=0.25, kv_heads={kvh}) \
: f32[1, {hq}, 130, 16], f32[1, {hq}, 130] loc("layers.3.attn")
  return (%out, %lse)
}}
"""


def attention(hq: int = 4, hk: int = 2, kvh: int = 2, mask: str = "causal & document($0)") -> Graph:
    return parse_graph(ATTN.format(hq=hq, hk=hk, kvh=kvh, mask=mask))


def one_op(line: str, inputs: str = "%x: f32[2, 8], %w: f32[8, 8]") -> Graph:
    return parse_graph(f"graph g({inputs}) {{\n  {line}\n  return %y\n}}\n")


def verify_error(graph: Graph) -> str:
    with pytest.raises(VerificationError) as info:
        verify(graph)
    return str(info.value)


def test_valid_graphs_pass() -> None:
    verify(one_op("%y = core.mm(%x, %w) : f32[2, 8]"))
    verify(one_op("%y = core.sum.dim_IntList(%x, [1], True) : f32[2, 1]"))
    verify(attention())
    verify(parse_graph("graph empty() {\n  return ()\n}\n"))


def test_use_before_def() -> None:
    x = Value("x", F32_2x8)
    y, z = Value("y", F32_2x8), Value("z", F32_2x8)
    nodes = [Node("core.relu", (z,), {}, [y]), Node("core.relu", (x,), {}, [z])]
    message = verify_error(Graph("g", [x], nodes, y))
    assert "%y = core.relu" in message and "reads %z" in message and "not defined before" in message
    assert "define it" in message


def test_output_of_undefined_value() -> None:
    x, ghost = Value("x", F32_2x8), Value("ghost", F32_2x8)
    message = verify_error(Graph("g", [x], [], (x, ghost)))
    assert "graph g" in message and "the return reads %ghost" in message


def test_duplicate_name() -> None:
    x = Value("x", F32_2x8)
    first, second = Value("y", F32_2x8), Value("y", F32_2x8)
    nodes = [Node("core.relu", (x,), {}, [first]), Node("core.neg", (first,), {}, [second])]
    message = verify_error(Graph("g", [x], nodes, second))
    assert "%y = core.neg" in message and "%y is defined twice" in message and "rename" in message


def test_stale_value_with_a_defined_name() -> None:
    x, impostor = Value("x", F32_2x8), Value("x", F32_2x8)
    y = Value("y", F32_2x8)
    message = verify_error(Graph("g", [x], [Node("core.relu", (impostor,), {}, [y])], y))
    assert "different Value" in message


def test_unknown_op() -> None:
    message = verify_error(one_op("%y = core.no_such_op(%x) : f32[2, 8]"))
    assert "%y = core.no_such_op" in message and "no ATen op" in message
    message = verify_error(one_op("%y = attn.flash(%x) : f32[2, 8]"))
    assert "unknown op 'attn.flash'" in message and "register the op" in message


def test_wrong_recorded_shape() -> None:
    message = verify_error(one_op('%y = core.mm(%x, %w) : f32[2, 9] loc("mlp.up")'))
    assert "%y = core.mm at mlp.up" in message
    assert "expected f32[2, 8], found f32[2, 9]" in message and "fix the recorded type" in message


def test_wrong_recorded_dtype() -> None:
    message = verify_error(one_op("%y = core.mm(%x, %w) : bf16[2, 8]"))
    assert "%y = core.mm" in message and "dtype torch.bfloat16" in message
    assert "expected f32[2, 8], found bf16[2, 8]" in message


def test_wrong_result_count() -> None:
    graph = parse_graph("graph g(%x: f32[2, 8]) {\n  %a, %b = core.relu(%x) : f32[2, 8], f32[2, 8]\n"
                        "  return %a\n}\n")
    assert "records 2 results but the op produces 1" in verify_error(graph)


def test_attention_k_heads_differ_from_kv_heads() -> None:
    message = verify_error(attention(hq=4, hk=4, kvh=2))
    assert "%out = attn.sdpa at layers.3.attn" in message and "kv_heads=2" in message and "got 4 and 4" in message


def test_attention_q_heads_not_multiple_of_kv_heads() -> None:
    message = verify_error(attention(hq=3, hk=2, kvh=2))
    assert "%out = attn.sdpa" in message and "3 query heads are not a multiple of kv_heads=2" in message


def test_attention_mask_operand_out_of_range() -> None:
    message = verify_error(attention(mask="causal & document($2)"))
    assert "%out = attn.sdpa" in message and "operands [2]" in message and "only 1 are given" in message


def test_attention_wrong_recorded_lse_dtype() -> None:
    text = ATTN.format(hq=4, hk=2, kvh=2, mask="causal")
    graph = parse_graph(text.replace("f32[1, 4, 130] loc", "f64[1, 4, 130] loc"))
    message = verify_error(graph)
    assert "result %lse" in message and "expected f32[1, 4, 130], found f64[1, 4, 130]" in message


def test_mixed_placement_axes_in_a_node() -> None:
    graph = one_op("%y = core.add.Tensor(%x, %w) : f32[2, 8]{sp: S(1)}",
                   inputs="%x: f32[2, 8]{sp: S(1)}, %w: f32[2, 8]{sp: S(1), tp: R}")
    message = verify_error(graph)
    assert "graph g: the inputs" in message and "mixes mesh axis sets" in message
    assert "%x: {sp}" in message and "%w: {sp, tp}" in message


def test_mixed_placement_axes_between_operand_and_result() -> None:
    sharded = TensorType.of((2, 8), torch.float32, (("sp", Shard(0)),))
    x, y = Value("x", sharded), Value("y", TensorType.of((2, 8), torch.float32, (("ring", Replicate()),)))
    message = verify_error(Graph("g", [x], [Node("core.relu", (x,), {}, [y], loc="mlp")], y))
    assert "%y = core.relu at mlp" in message and "%x: {sp}, %y: {ring}" in message
    assert "insert a redistribution" in message


def test_shard_dim_out_of_range() -> None:
    graph = parse_graph("graph g(%x: f32[2, 8]{sp: S(2)}) {\n  return %x\n}\n")
    assert "sharded on dim 2 over 'sp' but has rank 2" in verify_error(graph)


def test_single_device_and_sharded_values_do_not_mix() -> None:
    graph = one_op("%y = core.add.Tensor(%x, %w) : f32[2, 8]",
                   inputs="%x: f32[2, 8]{sp: S(1)}, %w: f32[2, 8]")
    assert "%w: {}" in verify_error(graph)
