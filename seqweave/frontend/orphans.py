"""Remove what replacing attention left unread — and nothing else.

FX's `eliminate_dead_code` treats a `call_method` such as `buffer.index_copy_(...)` or
`counter.add_(1)` as pure, so a whole-graph DCE silently drops the in-place writes a model
makes to its buffers and inputs. We only ever need to remove the subgraphs our rewrite
orphaned (a lifted mask, the eager attention chain), so we walk back from those nodes and
stop at anything that may write memory.
"""
from __future__ import annotations

import operator
from typing import Iterable

from torch import fx

#: Python-level calls that write their first operand (dynamo records `x[i] = v` as setitem).
_WRITING_FUNCTIONS = frozenset({operator.setitem, operator.delitem, operator.iadd, operator.isub,
                                operator.imul, operator.itruediv, operator.ifloordiv, operator.imod,
                                operator.ipow, operator.iand, operator.ior, operator.ixor,
                                operator.ilshift, operator.irshift, operator.imatmul})


def _target_name(node: fx.Node) -> str:
    target = node.target
    return target if isinstance(target, str) else getattr(target, "__name__", "")


def may_write(node: fx.Node) -> bool:
    """True unless `node` certainly writes no memory: in-place methods and functions (`add_`,
    `index_copy_`, `out=`), setitem, modules and FX's own impure ops all count as writes."""
    if node.op in ("placeholder", "output", "call_module"):
        return True
    if node.op not in ("call_function", "call_method"):
        return False
    name = _target_name(node)
    if name.endswith("_") and not name.startswith("__"):
        return True
    if node.target in _WRITING_FUNCTIONS or "out" in node.kwargs:
        return True
    return node.op == "call_function" and node.is_impure()


def remove_orphans(graph: fx.Graph, starts: Iterable[fx.Node]) -> int:
    """Erase the nodes among `starts` (and, transitively, their inputs) that nobody reads any
    more and that write nothing. Returns how many were erased."""
    pending, erased = list(starts), set()
    while pending:
        node = pending.pop()
        if node in erased or node.users or may_write(node):
            continue
        inputs = list(node.all_input_nodes)
        graph.erase_node(node)
        erased.add(node)
        pending.extend(inputs)
    return len(erased)
