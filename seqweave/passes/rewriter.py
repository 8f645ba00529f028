"""A small pattern rewriter, so that a pass states what it matches and what it builds instead of
editing node lists by hand (rewrite rules as data, as in tinygrad).

    rsqrt_mul = Rule(Op("core.mul.Tensor", Var("x"), Op("core.rsqrt", Var("y"))),
                     lambda b, m: b.op("core.div.Tensor", m["x"], b.op("core.sqrt", m["y"])))
    count = rewrite(graph, [rsqrt_mul])

A pattern is an `Op` (an op name or several, operand patterns, an optional predicate on the
node), a `Var` (any value or literal, bound by name; the same name twice must bind the same
thing) or a literal that must be equal. A match is rooted at a node's only result. The rule's
`build` gets a `Builder` and the `Match`, and returns the value that replaces the root: new
nodes go just before the root and carry its `loc` (the provenance of what they replace), their
result types are inferred by their ops, the root's readers are pointed at the replacement, and
matched nodes nobody reads any more are removed. `rewrite` sweeps until no rule fires.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from seqweave.errors import PassError
from seqweave.ir.graph import Graph, Node, Value, values_in
from seqweave.ir.ops import op_def
from seqweave.ir.types import ValueType

MAX_SWEEPS = 100  # a rule set that keeps firing (a rule that rebuilds its own pattern) is a bug


@dataclass(frozen=True)
class Var:
    """Matches any operand (a value or a literal), bound as `name`; `where` may restrict it."""

    name: str = ""
    where: Callable[[Any], bool] | None = None


@dataclass(frozen=True, init=False)
class Op:
    """Matches a value produced by one of `ops`, whose positional operands match `args` (all of
    them, one pattern each); `where` may look at the node (its kwargs, its result type)."""

    ops: str | tuple[str, ...]
    args: tuple = ()
    where: Callable[[Node], bool] | None = None
    name: str = ""  # bind the matched value under this name too

    def __init__(self, ops: str | tuple[str, ...], *args: Any, where: Callable[[Node], bool] | None = None,
                 name: str = "") -> None:
        object.__setattr__(self, "ops", (ops,) if isinstance(ops, str) else tuple(ops))
        object.__setattr__(self, "args", args)
        object.__setattr__(self, "where", where)
        object.__setattr__(self, "name", name)


@dataclass
class Match:
    """What a pattern bound (`match["x"]`) and the nodes it matched, the root first."""

    bindings: dict[str, Any] = field(default_factory=dict)
    nodes: list[Node] = field(default_factory=list)

    def __getitem__(self, name: str) -> Any:
        return self.bindings[name]


@dataclass(frozen=True)
class Rule:
    pattern: Op
    build: Callable[["Builder", Match], Value]


def match(pattern: Any, operand: Any) -> Match | None:
    """The match of `pattern` against `operand` (a Value or literal), or None."""
    found = Match()
    return found if _match(pattern, operand, found) else None


def _match(pattern: Any, operand: Any, found: Match) -> bool:
    if isinstance(pattern, Var):
        return _bind(pattern.name, operand, found) and (pattern.where is None or pattern.where(operand))
    if not isinstance(pattern, Op):
        return not isinstance(operand, Value) and type(operand) is type(pattern) and operand == pattern
    node = operand.producer if isinstance(operand, Value) else None
    if node is None or node.op not in pattern.ops or len(node.results) != 1 or len(node.args) != len(pattern.args):
        return False
    if pattern.where is not None and not pattern.where(node):
        return False
    found.nodes.append(node)
    return _bind(pattern.name, operand, found) and \
        all(_match(sub, arg, found) for sub, arg in zip(pattern.args, node.args))


def _bind(name: str, operand: Any, found: Match) -> bool:
    if not name:
        return True
    if name in found.bindings:
        held = found.bindings[name]
        return held is operand if isinstance(held, Value) or isinstance(operand, Value) else held == operand
    found.bindings[name] = operand
    return True


class Builder:
    """Makes the replacement's nodes: typed by their ops' inference, placed before the root, with its loc."""

    def __init__(self, graph: Graph, root: Node) -> None:
        self.graph, self.root, self.nodes = graph, root, []

    def op(self, op: str, *args: Any, types: Sequence[ValueType] | None = None, **kwargs: Any) -> Value:
        """A new node `op(*args, **kwargs)` with one result; `types` only where the op cannot infer them."""
        node = Node(op, args, kwargs, [], self.root.loc)
        inferred = op_def(op).infer(node) or types
        if not inferred or len(inferred) != 1:
            raise PassError(f"the rewriter cannot type a new {op} node", op=op, layer=self.root.loc,
                            hint="give its result type: builder.op(..., types=[TensorType(...)])")
        node.results = [Value(self._fresh_name(), inferred[0], node)]
        self.nodes.append(node)
        return node.results[0]


    def _fresh_name(self) -> str:
        """A name no value of the graph nor of this replacement has, after the root's."""
        stem = self.root.results[0].name
        taken = {value.name for value in self.graph.values()} | {node.results[0].name for node in self.nodes}
        index = 1
        while f"{stem}_{index}" in taken:
            index += 1
        return f"{stem}_{index}"


def rewrite(graph: Graph, rules: Sequence[Rule]) -> int:
    """Apply `rules` wherever they match, sweep after sweep until none fires; the number of rewrites."""
    total = 0
    for _ in range(MAX_SWEEPS):
        fired = _sweep(graph, rules)
        if not fired:
            return total
        total += fired
    raise PassError(f"rewrite rules still fire after {MAX_SWEEPS} sweeps", hint="a rule rebuilds its own pattern")


def _sweep(graph: Graph, rules: Sequence[Rule]) -> int:
    fired = 0
    for root in list(graph.nodes):
        if root not in graph.nodes or len(root.results) != 1:
            continue  # removed by an earlier rewrite in this sweep
        for rule in rules:
            found = match(rule.pattern, root.results[0])
            if found is not None and _apply(graph, root, rule, found):
                fired += 1
                break
    return fired


def _apply(graph: Graph, root: Node, rule: Rule, found: Match) -> bool:
    builder = Builder(graph, root)
    replacement = rule.build(builder, found)
    if replacement is root.results[0]:
        return False  # the rule declined
    at = graph.nodes.index(root)
    graph.nodes[at:at] = builder.nodes
    graph.replace_all_uses(root.results[0], replacement)
    _remove_dead(graph, found.nodes)
    return True


def _remove_dead(graph: Graph, matched: list[Node]) -> None:
    """Drop matched nodes (root first, then its operands' producers) that nothing reads any more."""
    for node in matched:
        readers = {operand for other in graph.nodes for operand in other.operands}
        outputs = set(values_in(graph.outputs))
        if node in graph.nodes and op_def(node.op).pure and \
                not any(value in readers or value in outputs for value in node.results):
            graph.nodes.remove(node)
