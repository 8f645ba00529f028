"""Lift the rotary embedding applied to q and k before an attention into a `Rope` spec.

What we read is HF's `apply_rotary_pos_emb` as dynamo records it, full or partial:

    x_rot = x * cos + cat(-x[..., h:], x[..., :h]) * sin
    x_out = x_rot                        (or cat(x_rot(x[..., :R]), x[..., R:]) for partial rotary)

where q and k are [B, H, S, D], both rotated by the *same* tables, and each table serves every
head: [B, 1, S, D] (HF's `unsqueeze(1)`), `[None, None]` of an [S, D] table, or the [S, D]
table itself. The tables are then explained as a function of
two graph values, the token positions and the inverse frequencies: we evaluate the captured
tables on the example inputs and accept the spec only if `ir.positions.tables` gives them bit
for bit (the rule, the base, the attention scaling and the dtype all have to agree). The
application itself is matched op for op, so the lifted attention computes what was captured.
Anything else stays in the graph, with the reason in the attention's report.
"""
from __future__ import annotations

import operator
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from seqweave.frontend.patterns import arg, example, is_call
from seqweave.ir.positions import Rope, default_frequencies, tables

ADD_TARGETS = (operator.add, torch.add)
MUL_TARGETS = (operator.mul, torch.mul)
NEG_TARGETS = (operator.neg, torch.neg)
CAT_TARGETS = (torch.cat, torch.concat, torch.concatenate)
_DTYPE_NAMES = {torch.float64: "float64", torch.bfloat16: "bfloat16", torch.float16: "float16"}


class NotRotary(Exception):
    """Not (or not provably) a rotary embedding; the message says why."""


@dataclass
class Application:
    """`x` rotated by (cos, sin) tables over its first `dims` channels."""

    x: fx.Node
    cos: fx.Node
    sin: fx.Node
    dims: int


@dataclass
class LiftedRotary:
    """The spec (operand indices from 0: positions, then frequencies when captured) and its operands."""

    spec: Rope
    operands: list[fx.Node]
    q: fx.Node
    k: fx.Node


def _last_dim_slice(node: Any) -> tuple[fx.Node, int | None, int | None] | None:
    """`x[..., a:b]` -> (x, a, b)."""
    if not is_call(node, (operator.getitem,)):
        return None
    index = node.args[1]
    if not isinstance(index, tuple) or len(index) != 2 or index[0] is not Ellipsis or not isinstance(index[1], slice):
        return None
    cut = index[1]
    return (node.args[0], cut.start, cut.stop) if cut.step in (None, 1) else None


def _cat_parts(node: Any) -> list | None:
    if not is_call(node, CAT_TARGETS):
        return None
    dim = arg(node, 1, "dim", 0)
    rank = example(node).dim() if example(node) is not None else 0
    parts = node.args[0]
    return list(parts) if dim in (-1, rank - 1) and isinstance(parts, (list, tuple)) else None


def _rotate_half_source(node: Any) -> fx.Node | None:
    """`cat(-x[..., h:], x[..., :h])` -> x (HF's rotate_half)."""
    parts = _cat_parts(node)
    if parts is None or len(parts) != 2 or not is_call(parts[0], NEG_TARGETS, "neg"):
        return None
    upper, lower = _last_dim_slice(parts[0].args[0]), _last_dim_slice(parts[1])
    if upper is None or lower is None or upper[0] is not lower[0]:
        return None
    half = example(upper[0]).shape[-1] // 2
    if upper[1:] != (half, None) or lower[1] not in (None, 0) or lower[2] != half:
        return None
    return upper[0]


def _mul_operands(node: Any) -> tuple[Any, Any] | None:
    return tuple(node.args[:2]) if is_call(node, MUL_TARGETS, "mul") and len(node.args) == 2 else None


def _broadcast_table(node: Any, x: fx.Node) -> bool:
    """Does `node` broadcast against x [B, H, S, D] as one table for every head: [B or 1, 1, S, D]
    (HF's `cos.unsqueeze(1)`), [1, 1, S, D] (`cos[None, None]`) or [S, D]?"""
    value, rows = example(node), example(x)
    if value is None or value.dim() > 4:
        return False
    shape = (1,) * (4 - value.dim()) + tuple(value.shape)
    return shape[1] == 1 and shape[0] in (1, rows.shape[0]) and shape[2:] == tuple(rows.shape[2:])


def _application(node: fx.Node) -> Application:
    """Match `x * cos + rotate_half(x) * sin` (either operand order) at `node`."""
    if not is_call(node, ADD_TARGETS, "add") or len(node.args) != 2:
        raise NotRotary("not a sum of two products")
    for first, second in (node.args, node.args[::-1]):
        plain, rotated = _mul_operands(first), _mul_operands(second)
        if plain is None or rotated is None:
            continue
        for x, cos in (plain, plain[::-1]):
            for half, sin in (rotated, rotated[::-1]):
                if _rotate_half_source(half) is x and isinstance(x, fx.Node):
                    if not (_broadcast_table(cos, x) and _broadcast_table(sin, x)):
                        raise NotRotary("the cos / sin tables are not one [B, 1, S, D] table for every head")
                    return Application(x, cos, sin, example(x).shape[-1])
    raise NotRotary("no `x * cos + rotate_half(x) * sin` here")


def match_application(node: fx.Node) -> Application:
    """Full rotary at `node`, or partial rotary `cat(rotary(x[..., :R]), x[..., R:])`."""
    parts = _cat_parts(node)
    if parts is not None and len(parts) == 2:
        passed = _last_dim_slice(parts[1])
        inner = _application(parts[0]) if isinstance(parts[0], fx.Node) else None
        sliced = _last_dim_slice(inner.x) if inner is not None else None
        if passed is None or sliced is None or passed[0] is not sliced[0] or sliced[1] not in (None, 0) \
                or sliced[2] != passed[1] or passed[2] is not None:
            raise NotRotary("a concatenation that is not a partial rotary")
        return Application(sliced[0], inner.cos, inner.sin, inner.dims)
    return _application(node)


def looks_rotary(node: fx.Node) -> bool:
    """Does `node` read a rotate_half within a few ops (so a failure to lift is worth a note)?"""
    seen, queue = set(), deque([node])
    while queue and len(seen) < 16:  # breadth first: the tables behind cos / sin are deep
        current = queue.popleft()
        if current in seen or not isinstance(current, fx.Node):
            continue
        seen.add(current)
        if _rotate_half_source(current) is not None:
            return True
        queue.extend(current.all_input_nodes)
    return False


# ------------------------------------------------------------------ the tables


def _ancestors(node: fx.Node) -> list[fx.Node]:
    found, stack = set(), [node]
    while stack:
        current = stack.pop()
        if current not in found:
            found.add(current)
            stack.extend(current.all_input_nodes)
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    return sorted(found, key=order.__getitem__)


def evaluate(node: fx.Node, placeholder_values: dict[fx.Node, torch.Tensor]) -> torch.Tensor:
    """The value `node` had on the example inputs (its ancestors run eagerly)."""
    values: dict[fx.Node, Any] = {}
    load = lambda a: values[a] if isinstance(a, fx.Node) else a  # noqa: E731
    for current in _ancestors(node):
        if current.op == "placeholder":
            if current not in placeholder_values:
                raise NotRotary(f"the tables read {current.name}, which is not a tensor input (a symbolic size?)")
            values[current] = placeholder_values[current]
        elif current.op == "get_attr":
            values[current] = fx.graph_module._get_attr(current.graph.owning_module, current.target)
        else:
            args, kwargs = fx.node.map_arg(current.args, load), fx.node.map_arg(current.kwargs, load)
            values[current] = current.target(*args, **kwargs) if current.op == "call_function" else \
                getattr(args[0], current.target)(*args[1:], **kwargs)
    return values[node]


def _positions_node(table: fx.Node, length: int) -> fx.Node:
    """The latest integer [B, S] / [S] value the table is computed from (HF's position_ids)."""
    for node in reversed(_ancestors(table)):
        value = example(node)
        if value is not None and not value.dtype.is_floating_point and value.dim() in (1, 2) \
                and value.shape[-1] == length and value.dtype != torch.bool:
            return node
    raise NotRotary("no integer positions [B, S] found behind the tables")


def _frequencies_node(table: fx.Node, dims: int) -> fx.Node:
    """The float leaf (a buffer) of dims/2 inverse frequencies behind the tables."""
    for node in _ancestors(table):
        value = example(node)
        if node.op in ("placeholder", "get_attr") and value is not None and value.dtype.is_floating_point \
                and value.dim() == 1 and value.shape[0] == dims // 2:
            return node
    raise NotRotary(f"no [{dims // 2}] inverse-frequency buffer found behind the tables")


def _leaves(node: fx.Node) -> set[fx.Node]:
    return {n for n in _ancestors(node) if n.op in ("placeholder", "get_attr")}


def _check_reads_only(table: fx.Node, positions: fx.Node, frequencies: fx.Node) -> None:
    """The tables must be a function of the positions and the frequencies alone: equal tables on
    the example inputs prove nothing if they also read, say, a parameter that training changes."""
    extra = _leaves(table) - _leaves(positions) - {frequencies}
    if extra:
        raise NotRotary(f"the tables also read {', '.join(sorted(n.name for n in extra))}")


def _same(ours: torch.Tensor, captured: torch.Tensor) -> bool:
    """Bit for bit equal once broadcast (one positions row may serve a whole batch)."""
    try:
        return torch.equal(ours.expand_as(captured), captured)
    except RuntimeError:  # shapes that do not broadcast: not the same table
        return False


def _as_table(value: torch.Tensor) -> torch.Tensor:
    """A captured [B|1, 1, S, D] (or [S, D]) table as [B|1, S, D], as `ir.positions.tables` makes it."""
    return value.reshape((1,) * (4 - value.dim()) + tuple(value.shape)).squeeze(1)


def _scaling(table: fx.Node) -> float:
    """HF's `attention_scaling`: the number the cos table is multiplied by (1.0 when none)."""
    for node in reversed(_ancestors(table)):
        operands = _mul_operands(node)
        if operands and any(is_call(x, (torch.cos,), "cos") for x in operands):
            numbers = [x for x in operands if isinstance(x, (int, float))]
            if numbers:
                return float(numbers[0])
    return 1.0


def _base_candidates(inv_freq: torch.Tensor, dims: int) -> list[float]:
    if inv_freq.numel() < 2 or float(inv_freq[1]) <= 0:
        return []
    estimate = float(inv_freq[1].double() ** (-dims / 2))
    return list(dict.fromkeys([float(round(estimate)), float(f"{estimate:.6g}"), float(f"{estimate:.4g}")]))


def _spec(application: Application, positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float,
          table_dtype: torch.dtype) -> Rope:
    """The spec, with a rule and base when HF's default rule gives the captured frequencies."""
    table = _DTYPE_NAMES.get(table_dtype, "")
    for base in _base_candidates(inv_freq, application.dims):
        if torch.equal(default_frequencies(base, application.dims), inv_freq.float()):
            return Rope(application.dims, 0, scaling=scaling, table=table, rule="default", base=base)
    return Rope(application.dims, 0, freqs=1, scaling=scaling, table=table)


def lift_rotary(q: fx.Node, k: fx.Node, placeholder_values: dict[fx.Node, torch.Tensor]) -> LiftedRotary:
    """Explain q's and k's rotation as one `Rope`; raises NotRotary with the reason otherwise."""
    try:
        rq = match_application(q)
    except NotRotary as why:
        raise NotRotary(f"q: {why}") from why
    try:
        rk = match_application(k)
    except NotRotary as why:
        raise NotRotary(f"k is not rotated right before the attention ({why}; a cache may hold rotated keys)") \
            from why
    if (rq.cos, rq.sin, rq.dims) != (rk.cos, rk.sin, rk.dims):
        raise NotRotary("q and k are rotated by different tables")
    length = example(q).shape[2]
    positions, frequencies = _positions_node(rq.cos, length), _frequencies_node(rq.cos, rq.dims)
    _check_reads_only(rq.cos, positions, frequencies)
    _check_reads_only(rq.sin, positions, frequencies)
    values = [evaluate(node, placeholder_values) for node in (rq.cos, rq.sin, positions, frequencies)]
    cos, sin, position_values, inv_freq = values
    cos, sin = _as_table(cos), _as_table(sin)
    if cos.dtype != example(rq.x).dtype:
        raise NotRotary(f"the tables are {cos.dtype} but q is {example(rq.x).dtype}")
    spec = _spec(rq, position_values, inv_freq, _scaling(rq.cos), cos.dtype)
    ours = tables(spec, position_values, [position_values, inv_freq])
    if not (_same(ours[0], cos) and _same(ours[1], sin)):
        raise NotRotary(f"the captured tables are not {spec} of the positions")
    operands = [positions] + ([frequencies] if spec.rule == "captured" else [])
    return LiftedRotary(spec, operands, rq.x, rk.x)
