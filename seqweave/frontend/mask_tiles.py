"""Evaluate a mask subgraph one tile at a time, so that lifting never builds the N×N mask.

Each value of the subgraph is either `Whole` (small: per-token data, index vectors, scalars;
computed as torch computes it) or `Lazy`: a function from one index vector per dim to the
values at their cartesian product. Lazy values come from the ops masks are written with:
comparisons, logic and arithmetic, `where`/`masked_fill`, `expand`, basic indexing and
size-1 reshapes, `tril`/`triu`, and constant fills. So HF's `kv_idx <= q_idx`, a
`torch.ones(N, N).tril()` and doc-id equality can be read row by row at 1M tokens. A large
value built by any other op is computed whole only below `MAX_WHOLE_ELEMENTS`; above, lifting
says which op stopped it.
"""
from __future__ import annotations

import operator
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, fx

#: Values up to this many elements are computed whole (per-token tensors at 1M tokens are 4M).
SMALL_ELEMENTS = 1 << 22
#: A value no rule can tile is computed whole only up to this size (the mask at 8k tokens, batch 2).
MAX_WHOLE_ELEMENTS = 1 << 27

Index = Sequence[Tensor]  # one 1-D long tensor per dim


class Untileable(ValueError):
    """The mask is built by an op that has no tile rule, at a size too large to compute whole."""


@dataclass
class Tiled(ABC):
    shape: tuple[int, ...]

    @abstractmethod
    def tile(self, index: Index) -> Tensor:
        """Values at the cartesian product of `index`, broadcastable to its shape (same ndim)."""

    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())


@dataclass
class Whole(Tiled):
    value: Tensor

    def tile(self, index: Index) -> Tensor:
        out = self.value
        for dim, positions in enumerate(index):
            out = out.index_select(dim, positions)
        return out


@dataclass
class Lazy(Tiled):
    fn: Callable[[Index], Tensor]

    def tile(self, index: Index) -> Tensor:
        return self.fn(index)


def project(index: Index, shape: Sequence[int]) -> list[Tensor]:
    """The index an operand of `shape` sees under broadcasting: trailing dims, size-1 dims read 0."""
    trailing = list(index[len(index) - len(shape):]) if shape else []
    return [positions if size != 1 else positions.new_zeros(1) for positions, size in zip(trailing, shape)]


def full_index(shape: Sequence[int]) -> list[Tensor]:
    return [torch.arange(size) for size in shape]


def materialise(value: Tiled, why: str) -> Tensor:
    if isinstance(value, Whole):
        return value.value
    if value.numel() > MAX_WHOLE_ELEMENTS:
        raise Untileable(f"{why} needs the whole {list(value.shape)} value")
    return value.tile(full_index(value.shape)).expand(value.shape)


_POINTWISE_FUNCTIONS = {operator.le, operator.lt, operator.ge, operator.gt, operator.eq, operator.ne,
                        operator.and_, operator.or_, operator.xor, operator.invert, operator.not_,
                        operator.add, operator.sub, operator.mul, operator.floordiv, operator.mod,
                        operator.neg, torch.le, torch.lt, torch.ge, torch.gt, torch.eq, torch.ne,
                        torch.logical_and, torch.logical_or, torch.logical_xor, torch.logical_not,
                        torch.bitwise_and, torch.bitwise_or, torch.bitwise_xor, torch.bitwise_not,
                        torch.where, torch.add, torch.sub, torch.mul, torch.remainder, torch.floor_divide,
                        torch.abs, torch.maximum, torch.minimum, torch.masked_fill,
                        # decay masks of linear attention: lambda ** (i - j), exp(-s * (i - j)), ...
                        operator.pow, operator.truediv, torch.pow, torch.exp, torch.exp2, torch.clamp,
                        torch.div, torch.neg, torch.float_power}
_POINTWISE_METHODS = {"le", "lt", "ge", "gt", "eq", "ne", "__and__", "__or__", "__xor__", "__invert__",
                      "logical_and", "logical_or", "logical_xor", "logical_not", "bitwise_and", "bitwise_or",
                      "bitwise_not", "bitwise_xor", "to", "bool", "long", "int", "float", "double", "half",
                      "type", "type_as", "masked_fill", "where", "add", "sub", "mul", "abs", "clone",
                      "contiguous", "remainder", "floor_divide",
                      # decay masks of linear attention: lambda ** (i - j), exp(-s * (i - j)), ...
                      "pow", "exp", "exp2", "clamp", "clamp_min", "div", "neg", "sqrt", "log", "log2"}
_FILL_FUNCTIONS = {torch.ones: 1, torch.zeros: 0, torch.full: None, torch.ones_like: 1, torch.zeros_like: 0,
                   torch.full_like: None}
_FILL_METHODS = {"new_ones": 1, "new_zeros": 0, "new_full": None}


def _op_name(node: fx.Node) -> str:
    return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))


def _is_pointwise(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _POINTWISE_METHODS
    return node.target in _POINTWISE_FUNCTIONS


def _lazy_args(args: Any, index: Index) -> Any:
    """Replace each Tiled in (nested) args by its tile at `index`, broadcast-projected."""
    if isinstance(args, Tiled):
        return args.tile(project(index, args.shape))
    if isinstance(args, (list, tuple)):
        return type(args)(_lazy_args(a, index) for a in args)
    if isinstance(args, dict):
        return {key: _lazy_args(a, index) for key, a in args.items()}
    return args


def _call(node: fx.Node, args: Any, kwargs: Any) -> Any:
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    return node.target(*args, **kwargs)


def _pointwise(node: fx.Node, args: tuple, kwargs: dict, shape: tuple[int, ...]) -> Lazy:
    return Lazy(shape, lambda index: _call(node, _lazy_args(args, index), _lazy_args(kwargs, index)))


def _fill(node: fx.Node, args: tuple, kwargs: dict, shape: tuple[int, ...], dtype: torch.dtype) -> Lazy | None:
    table = _FILL_METHODS if node.op == "call_method" else _FILL_FUNCTIONS
    if node.target not in table:
        return None
    value = table[node.target]
    if value is None:  # full(size, v) / full_like(x, v) / x.new_full(size, v)
        value = kwargs.get("fill_value", args[1] if len(args) > 1 else None)
    if not isinstance(value, (int, float, bool)):
        return None
    return Lazy(shape, lambda index: torch.full((1,) * len(shape), value, dtype=dtype))


def _reindexed(source: Tiled, shape: tuple[int, ...], mapping: Callable[[Index], list[Tensor]]) -> Lazy:
    return Lazy(shape, lambda index: source.tile(mapping(index)))


def _size_one_reshape(source: Tiled, shape: tuple[int, ...]) -> Lazy | None:
    """view/reshape/unsqueeze/squeeze/expand that only add, drop or broadcast size-1 dims."""
    kept_in = [d for d, size in enumerate(source.shape) if size != 1]
    kept_out = [d for d, size in enumerate(shape) if size != 1]
    if [source.shape[d] for d in kept_in] != [shape[d] for d in kept_out]:
        return None

    def mapping(index: Index) -> list[Tensor]:
        out = [index[0].new_zeros(1)] * len(source.shape)
        for d_in, d_out in zip(kept_in, kept_out):
            out[d_in] = index[d_out]
        return out
    return _reindexed(source, shape, mapping)


def _expand(source: Tiled, shape: tuple[int, ...]) -> Lazy:
    return _reindexed(source, shape, lambda index: project(index, source.shape))


def _basic_getitem(source: Tiled, key: Any, shape: tuple[int, ...]) -> Lazy | None:
    """x[slices, None, ints, ...]: each output dim reads an affine function of one source dim."""
    key = key if isinstance(key, tuple) else (key,)
    if not all(k is None or k is Ellipsis or isinstance(k, (int, slice)) for k in key):
        return None
    consumed = sum(isinstance(k, (int, slice)) for k in key)
    if Ellipsis in key:
        at = key.index(Ellipsis)
        key = key[:at] + (slice(None),) * (len(source.shape) - consumed) + key[at + 1:]
    key = key + (slice(None),) * (len(source.shape) - sum(isinstance(k, (int, slice)) for k in key))
    steps: list[tuple[str, Any]] = []  # per key item: ("new", None) | ("slice", (dim, start, step)) | ("int", (dim, i))
    dim = 0
    for item in key:
        if item is None:
            steps.append(("new", None))
        elif isinstance(item, int):
            steps.append(("int", (dim, item % source.shape[dim])))
            dim += 1
        else:
            start, _, step = item.indices(source.shape[dim])
            steps.append(("slice", (dim, start, step)))
            dim += 1

    int_dims = [payload[0] for kind, payload in steps if kind == "int"]
    new_dims = [at for at, (kind, _) in enumerate(s for s in steps if s[0] != "int") if kind == "new"]

    def mapping(index: Index) -> list[Tensor]:
        out: list[Tensor] = [index[0]] * len(source.shape)
        out_dim = 0
        for kind, payload in steps:
            if kind == "new":
                out_dim += 1
            elif kind == "int":
                out[payload[0]] = index[0].new_full((1,), payload[1])
            else:
                src, start, step = payload
                out[src] = start + index[out_dim] * step
                out_dim += 1
        return [positions if size != 1 else positions.new_zeros(1) for positions, size in zip(out, source.shape)]

    def fn(index: Index) -> Tensor:
        values = source.tile(mapping(index))
        for dim in sorted(int_dims, reverse=True):  # an int index removes its dim
            values = values.squeeze(dim)
        for dim in new_dims:  # None inserts one
            values = values.unsqueeze(dim)
        return values
    return Lazy(shape, fn)


def _permute(source: Tiled, dims: Sequence[int], shape: tuple[int, ...]) -> Lazy:
    order = [d % len(source.shape) for d in dims]
    inverse = [order.index(d) for d in range(len(order))]
    # Read the tile in the source's dim order, then move its dims where the output has them.
    return Lazy(shape, lambda index: source.tile(project([index[i] for i in inverse], source.shape)).permute(order))


def _triangle(source: Tiled, upper: bool, diagonal: int, shape: tuple[int, ...]) -> Lazy:
    def fn(index: Index) -> Tensor:
        values = source.tile(project(index, source.shape))
        offset = index[-1][None, :] - index[-2][:, None]
        keep = offset >= diagonal if upper else offset <= diagonal
        return torch.where(keep, values, torch.zeros((), dtype=values.dtype))
    return Lazy(shape, fn)


def _structural(node: fx.Node, args: tuple, kwargs: dict, shape: tuple[int, ...]) -> Lazy | None:
    """Rules that move or select values (expand, indexing, reshapes, permute, tril/triu)."""
    name, source = _op_name(node), args[0] if args else None
    if not isinstance(source, Tiled):
        return None
    if name in ("expand", "expand_as", "broadcast_to"):
        return _expand(source, shape)
    if name == "getitem":
        return _basic_getitem(source, args[1], shape)
    if name in ("view", "reshape", "unsqueeze", "squeeze", "flatten", "unflatten"):
        return _size_one_reshape(source, shape)
    if name in ("permute", "transpose", "t") and len(shape) == len(source.shape):
        dims = _permutation(name, args[1:], kwargs, len(shape))
        return _permute(source, dims, shape)
    if name in ("tril", "triu"):
        diagonal = kwargs.get("diagonal", args[1] if len(args) > 1 else 0)
        return _triangle(source, name == "triu", int(diagonal), shape)
    return None


def _permutation(name: str, rest: tuple, kwargs: dict, ndim: int) -> list[int]:
    if name == "permute":
        dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest
        return [int(d) for d in dims]
    first, second = (rest + (0, 1))[:2] if name == "transpose" else (0, 1)
    dims = list(range(ndim))
    dims[int(first) % ndim], dims[int(second) % ndim] = dims[int(second) % ndim], dims[int(first) % ndim]
    return dims


def _example(node: fx.Node) -> Any:
    return node.meta.get("example_value")


def evaluate_node(node: fx.Node, args: tuple, kwargs: dict) -> Any:
    """The value of one call node, given its arguments' values (Tiled or Python objects)."""
    example = _example(node)
    if not isinstance(example, torch.Tensor):  # sizes, dtypes, Python scalars (or no recorded example)
        value = _call(node, _whole_args(args, node), _whole_args(kwargs, node))
        return Whole(tuple(value.shape), value) if isinstance(value, torch.Tensor) else value
    shape = tuple(int(size) for size in example.shape)
    numel = int(torch.Size(shape).numel())
    tiled_inputs = any(isinstance(a, Lazy) for a in _flat(args, kwargs))
    if numel <= SMALL_ELEMENTS and not tiled_inputs:
        return _whole(node, args, kwargs)
    rule = _rule(node, args, kwargs, shape, example.dtype)
    if rule is not None:
        return rule
    if numel > MAX_WHOLE_ELEMENTS:
        raise Untileable(f"`{_op_name(node)}` builds a {list(shape)} value and has no tile rule")
    return _whole(node, args, kwargs)


def _whole(node: fx.Node, args: tuple, kwargs: dict) -> Whole:
    value = _call(node, _whole_args(args, node), _whole_args(kwargs, node))
    return Whole(tuple(value.shape), value)


def _rule(node: fx.Node, args: tuple, kwargs: dict, shape: tuple[int, ...], dtype: torch.dtype) -> Lazy | None:
    if _is_pointwise(node):
        return _pointwise(node, args, kwargs, shape)
    return _fill(node, args, kwargs, shape, dtype) or _structural(node, args, kwargs, shape)


def _flat(args: tuple, kwargs: dict) -> list[Any]:
    flat: list[Any] = []
    for item in [*args, *kwargs.values()]:
        flat.extend(item if isinstance(item, (list, tuple)) else [item])
    return flat


def _whole_args(args: Any, node: fx.Node) -> Any:
    if isinstance(args, Tiled):
        return materialise(args, f"`{_op_name(node)}`")
    if isinstance(args, (list, tuple)):
        return type(args)(_whole_args(a, node) for a in args)
    if isinstance(args, dict):
        return {key: _whole_args(a, node) for key, a in args.items()}
    return args


def ancestors_in_order(output: fx.Node, stop: Sequence[fx.Node] = ()) -> list[fx.Node]:
    """`output` and every node it reads, transitively, in graph order: the subgraph to evaluate.
    Nodes in `stop` (and what only they read) are left out; they become leaves given a value."""
    nodes, stack, seen = [], [output], set(stop)
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        nodes.append(node)
        stack.extend(node.all_input_nodes)
    order = {node: index for index, node in enumerate(output.graph.nodes)}
    return sorted(nodes, key=order.__getitem__)


#: Ops whose result may share memory with their first operand: writing into it writes the operand.
_VIEW_NAMES = {"getitem", "view", "reshape", "view_as", "reshape_as", "permute", "transpose", "t", "T", "expand",
               "expand_as", "unsqueeze", "squeeze", "flatten", "unflatten", "narrow", "select", "as_strided",
               "movedim", "swapaxes", "unbind", "split", "chunk", "diagonal", "contiguous", "detach", "view_as_real"}
_IN_PLACE_OPERATORS = {"setitem", "iadd", "isub", "imul", "itruediv", "ifloordiv", "imod", "iand", "ior", "ixor",
                       "ilshift", "irshift", "ipow"}


def _writes_into(node: fx.Node, target: fx.Node) -> bool:
    """Does `node` write into `target` in place (`t[i] = v`, `t.add_(...)`, `out=t`, `t |= ...`)?"""
    name = _op_name(node)
    first = node.args[0] if node.args else None
    if node.kwargs.get("out") is target:
        return True
    if first is not target:
        return False
    if getattr(node.target, "__module__", None) in ("_operator", "operator"):  # operator.and_ is not in place
        return name in _IN_PLACE_OPERATORS
    return name.endswith("_") and not name.endswith("__")  # Tensor.add_, masked_fill_, torch.relu_


def written_in_place(nodes: Sequence[fx.Node]) -> fx.Node | None:
    """A node outside `nodes` that writes into one of them (or into a view of one), if any.

    The subgraph is read from its data dependencies alone, which do not see such a write: the
    mask `s = ones(...); s[:, 1:] = ...; cumsum(s)` would be evaluated without the write."""
    aliases, stack = set(), list(nodes)
    while stack:
        node = stack.pop()
        if node in aliases:
            continue
        aliases.add(node)
        stack.extend(user for user in node.users if _op_name(user) in _VIEW_NAMES and user.args
                     and user.args[0] is node)
    inside = set(nodes)
    for alias in aliases:
        for user in alias.users:
            if _writes_into(user, alias) and not _evaluated_in_order(user, alias, inside):
                return user
    return None


def _evaluated_in_order(writer: fx.Node, target: fx.Node, inside: set[fx.Node]) -> bool:
    """A write the subgraph evaluates itself (`zeros_like(m).masked_fill_(...)` read through its
    result) is harmless as long as no node of the subgraph reads the target after it."""
    if writer not in inside:
        return False
    return not any(reader is not writer and reader in inside and writer < reader for reader in target.users)


def leaves_of(nodes: Sequence[fx.Node]) -> list[fx.Node]:
    """The placeholders and graph attributes among `nodes` (what a cut-out subgraph reads)."""
    return [node for node in nodes if node.op in ("placeholder", "get_attr")]


def tiled_function(nodes: Sequence[fx.Node], leaves: Sequence[fx.Node], output: fx.Node,
                   preset: dict[fx.Node, Tiled] | None = None) -> Callable[[Sequence[Tensor]], Tiled]:
    """A function of the leaves' values returning `output` as a Tiled value (nodes in graph order).
    `preset` gives nodes a fixed Tiled value (e.g. a lazy tensor of ones standing for scores).
    Raises Untileable when something outside `nodes` writes into one of them in place."""
    writer = written_in_place(nodes)
    if writer is not None:
        raise Untileable(f"{output.name} is built with an in-place write ({writer.name}: {_op_name(writer)}), "
                         "which the subgraph's data dependencies do not show")
    def run(leaf_values: Sequence[Tensor]) -> Tiled:
        env: dict[fx.Node, Any] = {leaf: Whole(tuple(v.shape), v) for leaf, v in zip(leaves, leaf_values)}
        env.update(preset or {})
        for node in nodes:
            if node in env:
                continue
            args = fx.node.map_arg(node.args, env.__getitem__)
            kwargs = fx.node.map_arg(node.kwargs, env.__getitem__)
            env[node] = evaluate_node(node, args, kwargs)
        result = env[output]
        if not isinstance(result, Tiled):
            raise ValueError(f"the mask {output.name} is not a tensor")
        return result
    return run
