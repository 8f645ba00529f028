"""Hypothesis strategies for pass authors (`seqweave.testing.strategies`).

Every node's result types come from the op's own `infer()`, so a generated graph
verifies by construction.

* `meshes()`: 1-8 simulated ranks, flat (`Mesh(4)`) and hybrid (`Mesh(4, ulysses=2)`);
* `attention_shapes()`: batch, KV heads, GQA / MQA ratios, head dims, odd lengths;
* `structured_masks()` / `attention_masks()` (MaskSpec text) and `mask_specs()` (MaskSpec
  values: windows, sinks, chunks, documents, padding and their `&` / `|` combinations);
* `programs(spec)`: whole IR programs (attention, projections, norms, rotary, losses, views
  over merged dims, backward programs) from `seqweave.testing.programs`, each a `Program`
  with its graph, sequence length, description and `inputs()`;

* `elementwise_graphs()`: chains of core ops (arithmetic, identity-like copies and
  views, expand, dtype casts, transpose, reductions) with dead branches, identity
  ops that a canonicaliser may fold, and ones it must not fold;
* `attention_graphs()`: one `attn.sdpa` with GQA, odd sequence lengths and masks
  built from the MaskSpec algebra (structured and data-dependent).

Graph inputs are float64 (attention operands int64), so `random_inputs` feeds them as is.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from hypothesis import strategies as st

from seqweave.ir.graph import Graph, Value
from seqweave.ir.mask import MaskSpec
from seqweave.ir.mask_parser import parse_mask
from seqweave.testing.graph_builder import GraphBuilder
from seqweave.testing.programs import Program, ProgramSpec, generate_programs, programs

__all__ = ["AttentionShape", "GraphBuilder", "Mesh", "Program", "ProgramSpec", "attention_graph", "attention_graphs",
           "attention_masks", "attention_shapes", "elementwise_graphs", "generate_programs", "mask_specs", "meshes",
           "programs", "rotary_attention_graph", "static_shapes", "structured_masks"]

MAX_RANK = 3
MAX_SIDE = 4
MAX_EXPAND = 3          # an expanded size-1 dim grows to at most this
MAX_NODES = 12
MAX_INPUTS = 3
MAX_EXTRA_OUTPUTS = 2
MAX_SEQ = 71            # odd lengths 1, 3, ..., 71 (not multiples of any tile size)
GQA_RATIOS = (1, 2, 4)
HEAD_DIMS = (4, 8, 16)
FLOAT_DTYPES = (torch.float64, torch.float32)
Draw = Callable[[st.SearchStrategy], Any]


def static_shapes(min_rank: int = 1, max_rank: int = MAX_RANK, max_side: int = MAX_SIDE) -> st.SearchStrategy:
    """Concrete tensor shapes: tuples of `min_rank..max_rank` sizes in `1..max_side`."""
    return st.lists(st.integers(1, max_side), min_size=min_rank, max_size=max_rank).map(tuple)


# ------------------------------------------------------------------ building graphs


def _shape(value: Value) -> tuple[int, ...]:
    return value.type.concrete_shape()


# ------------------------------------------------------------------ one generator per op family


def _binary(draw: Draw, builder: GraphBuilder, source: Value) -> Value:
    """add / mul with a same-shaped partner (possibly `source` itself)."""
    partners = [value for value in builder.tensors() if _shape(value) == _shape(source)]
    other = draw(st.sampled_from(partners))
    op = draw(st.sampled_from(["core.add.Tensor", "core.mul.Tensor"]))
    return builder.one(op, (source, other))


def _unary(draw: Draw, builder: GraphBuilder, source: Value) -> Value:
    return builder.one(draw(st.sampled_from(["core.relu", "core.neg"])), (source,))


def _clone(draw: Draw, builder: GraphBuilder, source: Value) -> Value:
    """A plain clone (foldable) or one that asks for a memory format (must stay)."""
    if draw(st.booleans()):
        return builder.one("core.clone", (source,), {"memory_format": torch.contiguous_format})
    return builder.one("core.clone", (source,))


def _to_copy(draw: Draw, builder: GraphBuilder, source: Value) -> Value:
    """A cast to the same dtype (foldable) or to another float dtype (must stay)."""
    return builder.one("core._to_copy", (source,), {"dtype": draw(st.sampled_from(FLOAT_DTYPES))})


def _new_shapes(shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Shapes with the same number of elements: itself, flattened, a leading 1, last two merged."""
    numel = 1
    for size in shape:
        numel *= size
    shapes = [shape, (numel,), (1, *shape)]
    if len(shape) >= 2:
        shapes.append((*shape[:-2], shape[-2] * shape[-1]))
    return [s for s in shapes if len(s) <= MAX_RANK + 1]


def _view(draw: Draw, builder: GraphBuilder, source: Value) -> Value:
    """view / _unsafe_view (where the strides allow) or reshape, to the same or a new shape."""
    target = draw(st.sampled_from(_new_shapes(_shape(source))))
    ops = ["core.reshape"] + (["core.view", "core._unsafe_view"] if builder.viewable(source, target) else [])
    return builder.one(draw(st.sampled_from(ops)), (source, list(target)))


def _expand(draw: Draw, builder: GraphBuilder, source: Value) -> Value:
    """Grow size-1 dims and maybe add a leading dim; unchanged shapes are foldable."""
    shape = [draw(st.integers(1, MAX_EXPAND)) if size == 1 else size for size in _shape(source)]
    if len(shape) < MAX_RANK and draw(st.booleans()):
        shape.insert(0, draw(st.integers(1, MAX_EXPAND)))
    return builder.one("core.expand", (source, shape))


def _transpose(draw: Draw, builder: GraphBuilder, source: Value) -> Value:
    rank = len(_shape(source))
    if rank == 0:
        return _unary(draw, builder, source)
    dim0, dim1 = draw(st.integers(0, rank - 1)), draw(st.integers(0, rank - 1))
    return builder.one("core.transpose.int", (source, dim0, dim1))


def _sum(draw: Draw, builder: GraphBuilder, source: Value) -> Value:
    rank = len(_shape(source))
    if rank == 0:
        return _unary(draw, builder, source)
    dim = draw(st.integers(-rank, rank - 1))
    return builder.one("core.sum.dim_IntList", (source, [dim], draw(st.booleans())))


ELEMENTWISE_STEPS: dict[str, Callable[[Draw, GraphBuilder, Value], Value]] = {
    "binary": _binary, "unary": _unary, "clone": _clone, "to_copy": _to_copy, "view": _view,
    "expand": _expand, "transpose": _transpose, "sum": _sum,
}


#: identity candidates twice as often as the rest, so most graphs give a canonicaliser work
STEP_WEIGHTS = tuple(sorted(ELEMENTWISE_STEPS)) + ("clone", "to_copy", "view", "expand")


@st.composite
def elementwise_graphs(draw: Draw, max_nodes: int = MAX_NODES) -> Graph:
    """A random verifying graph of core ops over float64 inputs, with dead branches.

    Outputs are the last value plus a few random earlier ones (inputs and foldable
    identity results included), so some nodes are dead and some outputs are aliases.
    """
    builder = GraphBuilder.new("elementwise")
    shape = draw(static_shapes())
    for _ in range(draw(st.integers(1, MAX_INPUTS))):
        builder.input(shape, torch.float64)
    for _ in range(draw(st.integers(1, max_nodes))):
        values = builder.tensors()
        source = values[-1] if draw(st.booleans()) else draw(st.sampled_from(values))  # mostly chains
        step = draw(st.sampled_from(STEP_WEIGHTS))
        ELEMENTWISE_STEPS[step](draw, builder, source)
    values = builder.tensors()
    extra = draw(st.lists(st.sampled_from(values), max_size=MAX_EXTRA_OUTPUTS))
    builder.graph.outputs = tuple([values[-1], *extra])
    return builder.graph


# ------------------------------------------------------------------ attention


@dataclass(frozen=True)
class AttentionShape:
    """Sizes of one attention: q [batch, q_heads, q_len, head_dim], k/v [batch, kv_heads, kv_len, head_dim]."""

    batch: int
    kv_heads: int
    group: int
    q_len: int
    kv_len: int
    head_dim: int

    @property
    def q_heads(self) -> int:
        return self.kv_heads * self.group


@st.composite
def attention_shapes(draw: Draw, same_lengths: bool = False) -> AttentionShape:
    """Batch 1-2, 1-2 KV heads, GQA ratio 1/2/4, small head dims, odd lengths up to MAX_SEQ."""
    odd = st.integers(0, MAX_SEQ // 2).map(lambda half: 2 * half + 1)
    q_len = draw(odd)
    kv_len = q_len if same_lengths else draw(odd)
    return AttentionShape(draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.sampled_from(GQA_RATIOS)),
                          q_len, kv_len, draw(st.sampled_from(HEAD_DIMS)))


def structured_masks() -> st.SearchStrategy:
    """Text of a MaskSpec that needs no operands: full, causal, windows, sinks, chunks and combinations."""
    window, chunk, sinks = st.integers(0, 20), st.integers(1, 16), st.integers(1, 4)
    return st.one_of(
        st.just("full"),
        st.just("causal"),
        st.tuples(window, window).map(lambda lr: f"sliding_window({lr[0]}, {lr[1]})"),
        window.map(lambda w: f"causal & sliding_window({w}, 0)"),
        st.tuples(window, sinks).map(lambda ws: f"causal & (sliding_window({ws[0]}, 0) | sinks({ws[1]}))"),
        chunk.map(lambda c: f"chunked({c})"),
        chunk.map(lambda c: f"causal & chunked({c})"),
    )


#: data-dependent masks -> what their int64 operand $0 holds ([B, S] segment ids or [B, S_kv] valid flags)
OPERAND_MASKS = {
    "causal & document($0)": "segments",
    "causal & padding($0)": "valid",
    "sliding_window(8, 8) & padding($0)": "valid",
}


def attention_masks() -> st.SearchStrategy:
    """Mask text: structured or data-dependent, each half of the time."""
    return st.booleans().flatmap(lambda data: st.sampled_from(sorted(OPERAND_MASKS)) if data else structured_masks())


@st.composite
def attention_graphs(draw: Draw) -> Graph:
    """A graph with one `attn.sdpa` over float64 q/k/v (GQA, odd lengths, MaskSpec masks).

    Data-dependent masks read an int64 operand input (`segments` [B, S] or `valid` [B, S_kv]);
    `random_inputs` fills such inputs with small non-negative integers.
    """
    mask = draw(attention_masks())
    shape = draw(attention_shapes(same_lengths=OPERAND_MASKS.get(mask) == "segments"))
    score_mod = draw(st.sampled_from(["none", "softcap(5.0)"]))
    return attention_graph(shape, mask, score_mod, scale=shape.head_dim ** -0.5)


def attention_graph(shape: AttentionShape, mask: str, score_mod: str = "none", scale: float = 0.25) -> Graph:
    """The graph `out, lse = attn.sdpa(q, k, v, [operands], ...)`; returns (out, lse)."""
    builder = GraphBuilder.new("attention")
    b, d = shape.batch, shape.head_dim
    q = builder.input((b, shape.q_heads, shape.q_len, d), torch.float64)
    k = builder.input((b, shape.kv_heads, shape.kv_len, d), torch.float64)
    v = builder.input((b, shape.kv_heads, shape.kv_len, d), torch.float64)
    operands = [builder.input((b, shape.kv_len), torch.int64)] if "$0" in mask else []
    kwargs = {"mask": mask, "score_mod": score_mod, "scale": float(scale), "kv_heads": shape.kv_heads}
    out, lse = builder.node("attn.sdpa", (q, k, v, operands), kwargs)
    builder.graph.outputs = (out, lse)
    return builder.graph


def rotary_attention_graph(shape: AttentionShape, mask: str = "causal", base: float = 10000.0,
                           layer: int = 0, backward: bool = False) -> Graph:
    """`attn.sdpa` (or its backward) whose unrotated q and k are rotated by a lifted rotary over
    every channel: `positions=$0` is an int64 input [1, S] (token indices), frequencies by
    HF's default rule from `base`. q and k have the same length."""
    builder = GraphBuilder.new("attention")
    b, d, s = shape.batch, shape.head_dim, shape.q_len
    tensors = [builder.input((b, heads, s, d), torch.float64)
               for heads in (shape.q_heads, shape.kv_heads, shape.kv_heads)]
    positions = builder.input((1, s), torch.int64)
    kwargs = {"mask": mask, "score_mod": "none", "scale": d ** -0.5, "kv_heads": shape.kv_heads,
              "positions": f"rope(dims={d}, positions=$0, rule=default, base={base!r})", "layer": layer}
    if backward:
        dout, out = builder.input((b, shape.q_heads, s, d), torch.float64), builder.input((b, shape.q_heads, s, d),
                                                                                          torch.float64)
        lse = builder.input((b, shape.q_heads, s), torch.float64)
        builder.graph.outputs = tuple(builder.node("attn.sdpa_backward", (dout, *tensors, out, lse, [positions]),
                                                   kwargs))
    else:
        builder.graph.outputs = tuple(builder.node("attn.sdpa", (*tensors, [positions]), kwargs))
    return builder.graph


# ------------------------------------------------------------------ meshes and MaskSpec values


@dataclass(frozen=True)
class Mesh:
    """Simulated ranks: `world` in all, in Ulysses groups of `ulysses` (1: a flat mesh)."""

    world: int
    ulysses: int = 1

    @property
    def hybrid(self) -> bool:
        return 1 < self.ulysses < self.world

    def __str__(self) -> str:
        return f"{self.world}x{self.ulysses}" if self.ulysses > 1 else str(self.world)


def meshes(max_world: int = 8, hybrid: bool = True) -> st.SearchStrategy:
    """Flat meshes of 1..max_world ranks and (with `hybrid`) every (world, ulysses) with
    1 < ulysses < world dividing it."""
    flat = st.integers(1, max_world).map(Mesh)
    pairs = [Mesh(world, u) for world in range(2, max_world + 1) for u in range(2, world) if world % u == 0]
    return st.one_of(flat, st.sampled_from(pairs)) if hybrid and pairs else flat


def _leaf_masks(operands: bool) -> st.SearchStrategy:
    window, sinks, chunk = st.integers(0, 20), st.integers(1, 4), st.integers(1, 16)
    leaves = [st.just("full"), st.just("causal"), st.tuples(window, window).map(lambda lr: f"sliding_window{lr}"),
              sinks.map(lambda n: f"sinks({n})"), chunk.map(lambda c: f"chunked({c})")]
    if operands:
        leaves += [st.just("document($0)"), st.just("padding($0)")]
    return st.one_of(*leaves)


def mask_specs(operands: bool = True, max_leaves: int = 4) -> st.SearchStrategy:
    """MaskSpec values: leaves (full, causal, windows, sinks, chunks and, with `operands`,
    `document($0)` / `padding($0)`) combined with `&` and `|` up to `max_leaves` leaves."""
    def combine(children: st.SearchStrategy) -> st.SearchStrategy:
        return st.tuples(children, st.sampled_from(["&", "|"]), children).map(lambda t: f"({t[0]}) {t[1]} ({t[2]})")
    texts = st.recursive(_leaf_masks(operands), combine, max_leaves=max_leaves)
    return texts.map(parse_mask)


def as_mask(spec: MaskSpec | str) -> MaskSpec:
    return parse_mask(spec) if isinstance(spec, str) else spec
