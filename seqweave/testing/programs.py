"""Whole IR programs valid by construction, for checking passes (NNSmith-style).

Each op kind of the generator is a row of `OP_RULES`: the constraint its operand must meet
(`applies`: which of the values built so far it can take) and how it builds its nodes, whose
result types come from each op's own `infer()` (`GraphBuilder`). A program is drawn op by op
from the rows whose constraints some value meets, so it verifies and runs in the interpreter
without repair. Programs look like what the frontend captures: token ids or hidden states
[B, S, H]; RMSNorm / LayerNorm as the core ops the frontend produces; projections as `mm` /
`addmm` over the merged [B*S, H] view; attention with MaskSpec masks (causal, windows, sinks,
chunks, packed documents, padding), GQA / MQA, odd lengths and rotary (lifted into the op as a
PositionSpec, or written out as `x * cos + rotate_half(x) * sin`); losses over the sequence;
and backward programs (`attn.sdpa_backward` with the projections' backward, `mm` with
transposes, whose weight gradients contract over the sequence).

Every program keeps the sequence findable by `shard-sequence` (it walks back from attention).

Two engines drive the same builder: `generate_programs(seed, count)` (a seeded
`random.Random`, fast, for bulk runs and `seqweave fuzz`) and the hypothesis strategy
`programs()` (draws, so failures shrink). Inputs are derived from the graph alone
(`program_inputs(graph, seed)`: each integer input's role is read from what consumes it), so
a program printed as IR text and parsed back runs on the same inputs.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Protocol, Sequence, TypeVar

import torch
from hypothesis import strategies as st

from seqweave.ir.graph import Graph, Value
from seqweave.ir.positions import Rope, parse_positions
from seqweave.ir.types import TensorType
from seqweave.testing.graph_builder import GraphBuilder

T = TypeVar("T")

VOCAB = 11
IGNORE_INDEX = -100
HIDDEN_SIZES = (4, 6, 8)
HEAD_DIMS = (2, 4, 6, 8)
KV_HEADS = (1, 2)
GROUPS = (1, 2, 3, 4)          # q heads per KV head: 1 (MHA), 2-4 (GQA; MQA when kv_heads == 1)
ROPE_BASE = 10000.0


# ------------------------------------------------------------------ what the generator is asked for


@dataclass(frozen=True)
class ProgramSpec:
    """Constraints a generated program meets, so the passes under test accept it.

    `head_multiple`: every attention's heads split over this many ranks (Ulysses: the world,
    hybrid: U). `rope`: "never", "sometimes" or "always" (every attention's rotary lifted into
    it, as the position rewrites need). `backward`: chance (0-1) of a backward program.
    """

    max_seq: int = 24
    min_seq: int = 2
    max_steps: int = 4
    max_batch: int = 2
    head_multiple: int = 1
    rope: str = "sometimes"
    backward: float = 0.35
    data_masks: bool = True     # masks reading operands (documents, padding)

    def heads_ok(self, q_heads: int, kv_heads: int) -> bool:
        g = self.head_multiple
        return q_heads % g == 0 and (kv_heads % g == 0 or g % kv_heads == 0)


class Choices(Protocol):
    """Where the generator's decisions come from (a seeded Random or hypothesis draws)."""

    def integer(self, low: int, high: int) -> int: ...
    def pick(self, options: Sequence[T]) -> T: ...
    def chance(self, probability: float) -> bool: ...


@dataclass
class RandomChoices:
    rng: random.Random

    def integer(self, low: int, high: int) -> int:
        return self.rng.randint(low, high)

    def pick(self, options: Sequence[T]) -> T:
        return options[self.rng.randrange(len(options))]

    def chance(self, probability: float) -> bool:
        return self.rng.random() < probability


@dataclass
class DrawChoices:
    """Hypothesis draws: each decision shrinks towards the first option / the low end / False."""

    draw: Callable[[st.SearchStrategy], Any]

    def integer(self, low: int, high: int) -> int:
        return self.draw(st.integers(low, high))

    def pick(self, options: Sequence[T]) -> T:
        return self.draw(st.sampled_from(list(options)))

    def chance(self, probability: float) -> bool:
        return probability >= 1.0 or (probability > 0.0 and self.draw(st.booleans()))


# ------------------------------------------------------------------ the program and its state


@dataclass
class Program:
    """One generated case: the graph, its sequence length (`shard-sequence{length=...}`) and a
    short description of what was drawn. `inputs(seed)` are derived from the graph alone."""

    graph: Graph
    length: int
    description: str
    seed: int = 0
    features: frozenset[str] = frozenset()

    def inputs(self, seed: int | None = None) -> list[torch.Tensor]:
        return program_inputs(self.graph, self.seed if seed is None else seed)

    def __str__(self) -> str:
        return f"program(seed={self.seed}, S={self.length}): {self.description}"


@dataclass
class _State:
    """What the builder holds while drawing: the hidden states [B, S, H] (sequence in dim 1)
    so far, the outputs chosen and what was drawn (for the description)."""

    builder: GraphBuilder
    spec: ProgramSpec
    batch: int
    length: int
    hidden: list[Value] = field(default_factory=list)
    outputs: list[Value] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    features: set[str] = field(default_factory=set)
    layers: int = 0

    def input(self, name: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float64) -> Value:
        value = self.builder.input(shape, dtype)
        value.name = self.builder.graph.fresh_name(name)
        return value

    def one(self, op: str, args: tuple, kwargs: dict | None = None) -> Value:
        return self.builder.one(op, args, kwargs)

    def node(self, op: str, args: tuple, kwargs: dict | None = None) -> list[Value]:
        return self.builder.node(op, args, kwargs)


def _shape(value: Value) -> tuple[int, ...]:
    return value.type.concrete_shape()


# ------------------------------------------------------------------ shared pieces


def _flat(state: _State, x: Value) -> Value:
    """[B, S, H] -> the merged [B*S, H] view a projection reads (reshape when not viewable)."""
    b, s, h = _shape(x)
    op = "core.view" if state.builder.viewable(x, (b * s, h)) else "core.reshape"
    return state.one(op, (x, [b * s, h]))


def _linear(c: Choices, state: _State, flat: Value, out: int, bias: bool | None = None) -> Value:
    """[M, H] @ W^T (+ b): `mm(x, t(W))` or `addmm(b, x, t(W))` with W [out, H] an input."""
    weight = state.input("w", (out, _shape(flat)[1]))
    transposed = state.one("core.t", (weight,))
    if c.chance(0.3) if bias is None else bias:
        return state.one("core.addmm", (state.input("b", (out,)), flat, transposed))
    return state.one("core.mm", (flat, transposed))


def _unflat(state: _State, flat: Value) -> Value:
    return state.one("core.view", (flat, [state.batch, state.length, _shape(flat)[1]]))


# ------------------------------------------------------------------ masks


#: masks needing no operand; every row keeps at least its own key or key 0
def _structured_mask(c: Choices, length: int) -> str:
    window, sinks, chunk = c.integer(0, length), c.integer(1, 4), c.integer(1, max(1, length // 2))
    return c.pick([
        "causal", "full", f"sliding_window({window}, {c.integer(0, 3)})", f"causal & sliding_window({window}, 0)",
        f"causal & (sliding_window({window}, 0) | sinks({sinks}))", f"chunked({chunk})",
        f"causal & chunked({chunk})", f"sinks({sinks}) | causal & sliding_window({window}, 0)",
    ])


def mask_text(c: Choices, length: int, operand: int | None) -> str:
    """A MaskSpec's text. With `operand` (the index its data operand gets), packed documents
    (`document($i)`, segment ids) or right padding (`padding($i)`, key flags) may be drawn."""
    if operand is None or not c.chance(0.4):
        return _structured_mask(c, length)
    return c.pick([f"causal & document(${operand})", f"document(${operand})",
                   f"causal & padding(${operand})", f"padding(${operand})",
                   f"sliding_window({c.integer(0, 4)}, 0) & document(${operand})"])


# ------------------------------------------------------------------ attention


@dataclass(frozen=True)
class Heads:
    kv: int
    group: int
    dim: int

    @property
    def q(self) -> int:
        return self.kv * self.group


def draw_heads(c: Choices, spec: ProgramSpec) -> Heads:
    """KV heads, GQA ratio and head dim whose heads split over `spec.head_multiple` ranks."""
    options = [(kv, g) for kv in KV_HEADS + (spec.head_multiple,) for g in GROUPS if spec.heads_ok(kv * g, kv)]
    kv, group = c.pick(sorted(set(options)))
    return Heads(kv, group, c.pick(HEAD_DIMS))


def _heads_view(state: _State, flat: Value, heads: int, dim: int) -> Value:
    """[B*S, heads*dim] -> [B, heads, S, dim]: view then transpose, as the frontend captures."""
    split = state.one("core.view", (flat, [state.batch, state.length, heads, dim]))
    return state.one("core.transpose.int", (split, 1, 2))


def _qkv(c: Choices, state: _State, x: Value, heads: Heads) -> tuple[Value, Value, Value]:
    """q, k, v [B, H, S, D] from x: one fused projection split by heads, or three projections."""
    flat = _flat(state, x)
    if c.chance(0.4):
        total = heads.q + 2 * heads.kv
        fused = _heads_view(state, _linear(c, state, flat, total * heads.dim), total, heads.dim)
        q, k, v = state.node("core.split_with_sizes", (fused, [heads.q, heads.kv, heads.kv], 1))
        return q, k, v
    return tuple(_heads_view(state, _linear(c, state, flat, n * heads.dim), n, heads.dim)  # type: ignore[return-value]
                 for n in (heads.q, heads.kv, heads.kv))


def _rotate_half(state: _State, x: Value) -> Value:
    half = _shape(x)[-1] // 2
    first = state.one("core.slice.Tensor", (x, 3, 0, half))
    second = state.one("core.slice.Tensor", (x, 3, half, 2 ** 62))
    return state.one("core.cat", ([state.one("core.neg", (second,)), first], -1))


def _explicit_rotary(state: _State, q: Value, k: Value) -> tuple[Value, Value]:
    """`x * cos + rotate_half(x) * sin` with whole cos/sin tables [1, S, D] (not lifted)."""
    d = _shape(q)[-1]
    cos = state.one("core.unsqueeze", (state.input("cos", (1, state.length, d)), 1))
    sin = state.one("core.unsqueeze", (state.input("sin", (1, state.length, d)), 1))
    rotated = []
    for x in (q, k):
        plain = state.one("core.mul.Tensor", (x, cos))
        turned = state.one("core.mul.Tensor", (_rotate_half(state, x), sin))
        rotated.append(state.one("core.add.Tensor", (plain, turned)))
    return rotated[0], rotated[1]


def _attention_kwargs(c: Choices, state: _State, heads: Heads, operands: list[Value]) -> dict:
    """mask, score_mod, scale, kv_heads, layer and (maybe) a lifted rotary; appends operands."""
    data = state.spec.data_masks and c.chance(0.5)
    mask = mask_text(c, state.length, len(operands) if data else None)
    if "$" in mask:
        kind = "segments" if "document" in mask else "valid"
        operands.append(state.input(kind, (state.batch, state.length), torch.int64))
    kwargs = {"mask": mask, "score_mod": c.pick(["none", "none", "softcap(5.0)"]),
              "scale": heads.dim ** -0.5, "kv_heads": heads.kv, "layer": state.layers}
    rope = {"always": True, "never": False}.get(state.spec.rope) if state.spec.rope != "sometimes" else c.chance(0.4)
    if rope:
        dims = c.pick(sorted({heads.dim, max(2, heads.dim // 2 // 2 * 2)}))  # full or partial rotary
        kwargs["positions"] = f"rope(dims={dims}, positions=${len(operands)}, rule=default, base={ROPE_BASE!r})"
        operands.append(state.input("pos", (1, state.length), torch.int64))
        state.features.add("rope")
    extras = (" rope" if rope else "") + ("" if kwargs["score_mod"] == "none" else f" {kwargs['score_mod']}")
    state.notes.append(f"attn[{mask}; Hq={heads.q} Hkv={heads.kv} D={heads.dim}{extras}]")
    state.layers += 1
    return kwargs


def attention_step(c: Choices, state: _State, x: Value) -> Value:
    """x [B, S, H] -> projections -> attn.sdpa -> output projection -> [B, S, H]."""
    heads = draw_heads(c, state.spec)
    q, k, v = _qkv(c, state, x, heads)
    operands: list[Value] = []
    kwargs = _attention_kwargs(c, state, heads, operands)
    if "positions" not in kwargs and c.chance(0.3):
        q, k = _explicit_rotary(state, q, k)
        state.notes.append("explicit rotary")
    out, lse = state.node("attn.sdpa", (q, k, v, operands), kwargs)
    if c.chance(0.2):
        state.outputs.append(lse)
    state.features.add("attention")
    back = state.one("core.transpose.int", (out, 1, 2))
    if c.chance(0.5):
        back = state.one("core.clone", (back,), {"memory_format": torch.contiguous_format})
    merged = state.one("core.reshape" if not state.builder.viewable(back, (state.batch * state.length,
                                                                           heads.q * heads.dim)) else "core.view",
                       (back, [state.batch * state.length, heads.q * heads.dim]))
    return _unflat(state, _linear(c, state, merged, _shape(x)[2]))


# ------------------------------------------------------------------ row-wise steps on [B, S, H]


def rms_norm_step(c: Choices, state: _State, x: Value) -> Value:
    """HF's RMSNorm as captured: x * rsqrt(mean(x^2, -1) + eps) * w."""
    squared = state.one("core.pow.Tensor_Scalar", (x, 2))
    mean = state.one("core.mean.dim", (squared, [-1], True))
    scale = state.one("core.rsqrt", (state.one("core.add.Scalar", (mean, 1e-6)),))
    normed = state.one("core.mul.Tensor", (x, scale))
    state.notes.append("rmsnorm")
    return state.one("core.mul.Tensor", (state.input("norm_w", (_shape(x)[2],)), normed))


def layer_norm_step(c: Choices, state: _State, x: Value) -> Value:
    h = _shape(x)[2]
    out, _, _ = state.node("core.native_layer_norm", (x, [h], state.input("ln_w", (h,)), state.input("ln_b", (h,)),
                                                      1e-5))
    state.notes.append("layernorm")
    return out


def activation_step(c: Choices, state: _State, x: Value) -> Value:
    op = c.pick(["core.silu", "core.gelu", "core.relu", "core.tanh", "core.sigmoid"])
    state.notes.append(op[5:])
    return state.one(op, (x,))


def projection_step(c: Choices, state: _State, x: Value) -> Value:
    """A linear layer over the merged [B*S, H] view to a new hidden size."""
    out = c.pick(HIDDEN_SIZES)
    state.notes.append(f"linear->{out}")
    return _unflat(state, _linear(c, state, _flat(state, x), out))


def gated_mlp_step(c: Choices, state: _State, x: Value) -> Value:
    """silu(x W1) * (x W3), then W2: the MLP of Llama, over the merged view."""
    flat, inner = _flat(state, x), c.pick(HIDDEN_SIZES)
    gate = state.one("core.silu", (_linear(c, state, flat, inner, bias=False),))
    product = state.one("core.mul.Tensor", (gate, _linear(c, state, flat, inner, bias=False)))
    state.notes.append(f"mlp({inner})")
    return _unflat(state, _linear(c, state, product, _shape(x)[2], bias=False))


def residual_step(c: Choices, state: _State, x: Value) -> Value:
    partners = [h for h in state.hidden if _shape(h) == _shape(x)]
    state.notes.append("residual")
    return state.one("core.add.Tensor", (x, c.pick(partners)))


def scale_step(c: Choices, state: _State, x: Value) -> Value:
    state.notes.append("scale")
    return state.one(c.pick(["core.mul.Scalar", "core.div.Scalar"]), (x, c.pick([0.5, 2.0, 3.0])))


def merged_view_step(c: Choices, state: _State, x: Value) -> Value:
    """Elementwise work on a view whose dim merges batch and sequence, or splits the hidden dim."""
    b, s, h = _shape(x)
    divisors = [d for d in (2, 3) if h % d == 0]
    shape = c.pick([[b * s, h]] + [[b, s, d, h // d] for d in divisors])
    op = "core.view" if state.builder.viewable(x, tuple(shape)) else "core.reshape"
    viewed = state.one(op, (x, shape))
    other = state.one("core.neg", (viewed,)) if c.chance(0.5) else state.one("core.mul.Tensor", (viewed, viewed))
    state.notes.append(f"view{shape}")
    return state.one("core.reshape", (other, [b, s, h]))


@dataclass(frozen=True)
class OpRule:
    """One op kind: `applies` is its constraint (may this hidden state be its operand?)."""

    build: Callable[[Choices, _State, Value], Value]
    applies: Callable[[_State, Value], bool] = lambda state, x: True
    weight: int = 1


OP_RULES: dict[str, OpRule] = {
    "attention": OpRule(attention_step, weight=3),
    "rms_norm": OpRule(rms_norm_step),
    "layer_norm": OpRule(layer_norm_step),
    "activation": OpRule(activation_step),
    "projection": OpRule(projection_step),
    "mlp": OpRule(gated_mlp_step),
    "residual": OpRule(residual_step, lambda state, x: sum(_shape(h) == _shape(x) for h in state.hidden) > 1),
    "scale": OpRule(scale_step),
    "merged_view": OpRule(merged_view_step),
}


def _draw_rule(c: Choices, state: _State, x: Value) -> OpRule:
    names = [name for name, rule in OP_RULES.items() if rule.applies(state, x) for _ in range(rule.weight)]
    return OP_RULES[c.pick(names)]


# ------------------------------------------------------------------ losses and outputs


def _nll(c: Choices, state: _State, x: Value) -> Value:
    classes = c.pick((3, 5))
    logits = _linear(c, state, _flat(state, x), classes, bias=False)
    logp = state.one("core._log_softmax", (logits, 1, False))
    targets = state.input("targets", (state.batch * state.length,), torch.int64)
    loss, _ = state.node("core.nll_loss_forward", (logp, targets, None, c.pick([1, 2]), IGNORE_INDEX))
    return loss


def _mse(c: Choices, state: _State, x: Value) -> Value:
    return state.one("core.mse_loss", (x, state.input("labels", _shape(x)), c.pick([1, 2])))


def _sequence_sum(c: Choices, state: _State, x: Value) -> Value:
    return state.one(c.pick(["core.sum.dim_IntList", "core.mean.dim"]), (x, [1]))


LOSSES: dict[str, Callable[[Choices, _State, Value], Value]] = {"nll": _nll, "mse": _mse, "sequence_sum": _sequence_sum}


def _outputs(c: Choices, state: _State, last: Value) -> None:
    """The last hidden state, a loss, or both (plus any lse kept by an attention)."""
    kind = c.pick(["hidden", "loss", "both"])
    if kind != "loss":
        state.outputs.insert(0, last)
    if kind != "hidden":
        name = c.pick(sorted(LOSSES))
        state.outputs.insert(0, LOSSES[name](c, state, last))
        state.notes.append(f"loss:{name}")
        state.features.add("loss")


# ------------------------------------------------------------------ backward programs


def _projection_backward(c: Choices, state: _State, grad: Value, x_flat: Value, weight: Value) -> list[Value]:
    """For y = x @ W^T: dx = dy @ W, dW = dy^T @ x (contracts over B*S: a partial sum per rank)."""
    dx = state.one("core.mm", (grad, weight))
    dw = state.one("core.mm", (state.one("core.t", (grad,)), x_flat))
    return [dx, dw]


def _merge_heads(state: _State, grad: Value) -> Value:
    """[B, H, S, D] -> [B*S, H*D]: transpose, contiguous copy, merged view."""
    b, h, s, d = _shape(grad)
    back = state.one("core.transpose.int", (grad, 1, 2))
    dense = state.one("core.clone", (back,), {"memory_format": torch.contiguous_format})
    return state.one("core.view", (dense, [b * s, h * d]))


def joint_backward_program(c: Choices, state: _State, x: Value) -> None:
    """Forward attention and its backward in one graph, as a training step's pieces: q = x Wq^T,
    k, v projected likewise; out, lse = sdpa; dq, dk, dv = sdpa_backward(dout, ...); then the
    q projection's backward (dx and dWq) with transposed mm."""
    heads = draw_heads(c, state.spec)
    flat = _flat(state, x)
    weights, projected = [], []
    for n in (heads.q, heads.kv, heads.kv):
        weights.append(state.input("w", (n * heads.dim, _shape(x)[2])))
        projected.append(_heads_view(state, state.one("core.mm", (flat, state.one("core.t", (weights[-1],)))),
                                     n, heads.dim))
    operands: list[Value] = []
    kwargs = _attention_kwargs(c, state, heads, operands)
    out, lse = state.node("attn.sdpa", (*projected, operands), kwargs)
    dout = state.input("dout", _shape(out))
    dq, dk, dv = state.node("attn.sdpa_backward", (dout, *projected, out, lse, operands), kwargs)
    which = c.integer(0, 2)
    grad = _merge_heads(state, (dq, dk, dv)[which])
    dx, dw = _projection_backward(c, state, grad, flat, weights[which])
    state.outputs.extend([_unflat(state, dx), dw] + ([out] if c.chance(0.5) else []))
    state.notes.append(f"backward(d{'qkv'[which]} -> dx, dW)")


def saved_backward_program(c: Choices, state: _State) -> None:
    """A backward graph as aot_autograd hands it over: saved q, k, v, out, lse and the incoming
    gradient are inputs (whole); sdpa_backward, then the output projection's and q's backward."""
    heads = draw_heads(c, state.spec)
    b, s = state.batch, state.length
    q = state.input("q", (b, heads.q, s, heads.dim))
    k, v = (state.input(name, (b, heads.kv, s, heads.dim)) for name in ("k", "v"))
    out = state.input("saved_out", (b, heads.q, s, heads.dim))
    lse = state.input("saved_lse", (b, heads.q, s))
    operands: list[Value] = []
    kwargs = _attention_kwargs(c, state, heads, operands)
    hidden = heads.q * heads.dim
    dy = state.input("dy", (b * s, c.pick(HIDDEN_SIZES)))
    wo = state.input("wo", (_shape(dy)[1], hidden))
    attn_out = _merge_heads(state, out)
    d_attn, dwo = _projection_backward(c, state, dy, attn_out, wo)
    dout = _heads_view(state, d_attn, heads.q, heads.dim)
    dq, dk, dv = state.node("attn.sdpa_backward", (dout, q, k, v, out, lse, operands), kwargs)
    state.outputs.extend([dwo, dq, dk, dv])
    state.notes.append("saved backward(dWo, dq, dk, dv)")


# ------------------------------------------------------------------ the builder


def build_program(c: Choices, spec: ProgramSpec = ProgramSpec(), seed: int = 0) -> Program:
    """Draw one program under `spec` from `c`."""
    length = c.integer(spec.min_seq, spec.max_seq)
    state = _State(GraphBuilder.new("program"), spec, c.integer(1, spec.max_batch), length)
    state.notes.append(f"B={state.batch} S={length}")
    if c.chance(spec.backward):
        state.features.add("backward")
        if c.chance(0.5):
            saved_backward_program(c, state)
        else:
            joint_backward_program(c, state, _prologue(c, state))
    else:
        _forward(c, state)
    state.builder.graph.outputs = tuple(dict.fromkeys(state.outputs))
    return Program(state.builder.graph, length, ", ".join(state.notes), seed, frozenset(state.features))


def _prologue(c: Choices, state: _State) -> Value:
    """Hidden states [B, S, H]: an input, or token ids through an embedding table."""
    hidden = c.pick(HIDDEN_SIZES)
    if c.chance(0.5):
        ids = state.input("ids", (state.batch, state.length), torch.int64)
        x = state.one("core.embedding", (state.input("embed", (VOCAB, hidden)), ids))
        state.notes.append("embedding")
    else:
        x = state.input("x", (state.batch, state.length, hidden))
    state.hidden.append(x)
    return x


def _forward(c: Choices, state: _State) -> None:
    x = _prologue(c, state)
    steps = c.integer(1, state.spec.max_steps)
    attention_at = c.integer(0, steps - 1)  # every program has an attention: the sequence is found from it
    for index in range(steps):
        rule = OP_RULES["attention"] if index == attention_at else _draw_rule(c, state, x)
        x = rule.build(c, state, x)
        state.hidden.append(x)
    _outputs(c, state, x)


def generate_programs(seed: int, count: int, spec: ProgramSpec = ProgramSpec()) -> list[Program]:
    """`count` programs from one seed (program i is `generate_program(seed * 1_000_003 + i)`)."""
    return [generate_program(seed * 1_000_003 + index, spec) for index in range(count)]


def generate_program(seed: int, spec: ProgramSpec = ProgramSpec()) -> Program:
    return build_program(RandomChoices(random.Random(seed)), spec, seed)


@st.composite
def programs(draw: Callable[[st.SearchStrategy], Any], spec: ProgramSpec = ProgramSpec()) -> Program:
    """Hypothesis strategy: a `Program` drawn under `spec` (shrinks towards short, simple ones)."""
    return build_program(DrawChoices(draw), spec)


# ------------------------------------------------------------------ inputs, from the graph alone


def program_inputs(graph: Graph, seed: int = 0) -> list[torch.Tensor]:
    """One seeded tensor per input: floats standard normal (float64); integers by what reads
    them: token ids below the embedding's rows, class targets (some ignored), packed-document
    segment ids (non-decreasing), right-padding key flags (at least one key valid), rotary
    positions (0..S-1); anything else small non-negative ints."""
    generator = torch.Generator().manual_seed(seed)
    roles = integer_roles(graph)
    return [_input(value, roles.get(value, ("small", 3)), generator) for value in graph.inputs]


def _input(value: Value, role: tuple[str, int], generator: torch.Generator) -> torch.Tensor:
    shape = value.type.concrete_shape()
    if value.type.dtype.is_floating_point:
        return torch.randn(shape, generator=generator, dtype=value.type.dtype)
    kind, bound = role
    if kind == "positions":
        return torch.arange(shape[-1], dtype=value.type.dtype).expand(shape).contiguous()
    if kind == "segments":
        starts = torch.rand(shape, generator=generator) < 0.3
        return torch.cumsum(starts.to(value.type.dtype), dim=-1)
    if kind == "valid":
        keep = torch.randint(1, shape[-1] + 1, shape[:-1] + (1,), generator=generator)
        return (torch.arange(shape[-1]) < keep).to(value.type.dtype)
    drawn = torch.randint(0, bound, shape, generator=generator, dtype=value.type.dtype)
    if kind == "targets":
        drawn[torch.rand(shape, generator=generator) < 0.2] = IGNORE_INDEX
    return drawn


def integer_roles(graph: Graph) -> dict[Value, tuple[str, int]]:
    """What each integer input holds, read from its consumers."""
    roles: dict[Value, tuple[str, int]] = {}
    for node in graph.nodes:
        if node.op == "core.embedding":
            roles[node.args[1]] = ("ids", int(node.args[0].type.shape[0]))
        elif node.op in ("core.nll_loss_forward", "core.nll_loss_backward"):
            logp = node.args[0] if node.op == "core.nll_loss_forward" else node.args[1]
            target = node.args[1] if node.op == "core.nll_loss_forward" else node.args[2]
            roles[target] = ("targets", int(logp.type.shape[-1]))
        elif node.op.startswith("attn.") and isinstance(node.args[-1], list):
            roles.update(_operand_roles(node.kwargs, node.args[-1]))
    return roles


def _operand_roles(kwargs: dict, operands: list) -> dict[Value, tuple[str, int]]:
    roles: dict[Value, tuple[str, int]] = {}
    text = str(kwargs["mask"])  # text, or a MaskSpec value printing as its text
    for index, operand in enumerate(operands):
        if re.search(rf"document\(\${index}\)", text):
            roles[operand] = ("segments", 0)
        elif re.search(rf"padding\(\${index}\)", text):
            roles[operand] = ("valid", 0)
    spec = kwargs.get("positions", "none")
    spec = parse_positions(spec) if isinstance(spec, str) else spec
    if isinstance(spec, Rope):
        roles[operands[spec.positions]] = ("positions", 0)
    return roles


def with_spec(spec: ProgramSpec, **changes: Any) -> ProgramSpec:
    return replace(spec, **changes)


def tensor_outputs(graph: Graph) -> list[Value]:
    return [value for value in graph.output_values() if isinstance(value.type, TensorType)]
