"""Text form of a graph: `print_graph` writes what `seqweave.ir.parser.parse_graph` reads back.

The format is line based so that diffs between pass stages stay readable::

    # after canonicalize: 3 rewrites, 0.4 ms
    graph forward(%x: f32[2, 8], %n: i64[s0, 8]) {
      %mm = core.mm(%x, %w) : f32[2, 8]
      %out, %lse = attn.sdpa(%q, %k, %v, [%seg], mask="causal & document($0)", ...) : f32[2, 4, 8, 16], ...
      return (%mm, None, [%out, %lse])
    }

Operands print as `%name`; literals as Python-like text (strings via json, dtypes as
`torch.float32`, devices as `device("cpu")`, sympy sizes as `sym("2*s0")`). Typed attributes
print their text form the same way: `mask("causal & sinks(4)")`, `score_mod("softcap(50.0)")`,
`positions("rope(dims=16, positions=$3)")`, and parse back to the typed value.
"""
from __future__ import annotations

import json
import math
import re
from typing import Any

import sympy
import torch

from seqweave.ir.graph import Graph, Node, Value
from seqweave.ir.mask import MaskSpec
from seqweave.ir.positions import PositionSpec
from seqweave.ir.score_mod import ScoreMod
from seqweave.ir.types import ValueType

NAME_PATTERN = r"[A-Za-z0-9_.]+"
_NAME_RE = re.compile(NAME_PATTERN)
_KWARG_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_TORCH_ENUMS = (torch.dtype, torch.layout, torch.memory_format)
#: typed attribute values and the name their text form is wrapped in (`mask("causal")`)
TYPED_ATTRIBUTES: tuple[tuple[type, str], ...] = ((MaskSpec, "mask"), (ScoreMod, "score_mod"),
                                                  (PositionSpec, "positions"))


def format_name(value: Value) -> str:
    """`%name`; raises ValueError when the name could not be parsed back."""
    if not _NAME_RE.fullmatch(value.name):
        raise ValueError(f"value name {value.name!r} cannot be printed: use only letters, digits, '_' and '.'")
    return f"%{value.name}"


def _format_float(value: float) -> str:
    if math.isnan(value):
        return "nan"
    return repr(value)  # repr gives 'inf' / '-inf' for infinities


def _format_sequence(items: list[Any] | tuple[Any, ...]) -> str:
    inner = ", ".join(format_literal(item) for item in items)
    if isinstance(items, list):
        return f"[{inner}]"
    return f"({inner},)" if len(items) == 1 else f"({inner})"


def format_literal(value: Any) -> str:
    """One operand or literal of an args template as text; raises TypeError for unsupported kinds."""
    if isinstance(value, Value):
        return format_name(value)
    if value is None or isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return _format_float(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return _format_sequence(value)
    if isinstance(value, _TORCH_ENUMS):
        return str(value)  # 'torch.float32', 'torch.strided', 'torch.contiguous_format'
    if isinstance(value, torch.device):
        return f"device({json.dumps(str(value))})"
    if isinstance(value, sympy.Expr):
        return f"sym({json.dumps(str(value))})"
    for kind, wrapper in TYPED_ATTRIBUTES:
        if isinstance(value, kind):
            return f"{wrapper}({json.dumps(str(value))})"
    raise TypeError(
        f"cannot print a literal of type {type(value).__name__} ({value!r}); the text form supports "
        "values, None, bool, int, float, str, list, tuple, torch dtype/layout/memory_format, device, "
        "sympy expressions, MaskSpecs, ScoreMods and PositionSpecs: convert the literal to one of these before printing"
    )


def format_type(value_type: ValueType) -> str:
    """`f32[2, s0]{sp: S(1)}` for tensors, `int` / `float` / `bool` for scalars."""
    return str(value_type)


def format_call(node: Node) -> str:
    """`op(arg, ..., key=value, ...)`."""
    parts = [format_literal(arg) for arg in node.args]
    for key, value in node.kwargs.items():
        if not isinstance(key, str) or not _KWARG_RE.fullmatch(key):
            raise ValueError(f"{node.op}: keyword {key!r} is not an identifier; rename the attribute")
        parts.append(f"{key}={format_literal(value)}")
    return f"{node.op}({', '.join(parts)})"


def format_node(node: Node) -> str:
    """One node line without indentation: `%a, %b = op(...) : t1, t2 loc("...")`."""
    text = format_call(node)
    if node.results:
        names = ", ".join(format_name(value) for value in node.results)
        types = ", ".join(format_type(value.type) for value in node.results)
        text = f"{names} = {text} : {types}"
    if node.loc:
        text += f" loc({json.dumps(node.loc)})"
    return text


def _format_header(graph: Graph) -> str:
    if not _NAME_RE.fullmatch(graph.name):
        raise ValueError(f"graph name {graph.name!r} cannot be printed: use only letters, digits, '_' and '.'")
    inputs = ", ".join(f"{format_name(value)}: {format_type(value.type)}" for value in graph.inputs)
    return f"graph {graph.name}({inputs}) {{"


def _format_note(note: str) -> str:
    if "\n" in note or "\r" in note:
        raise ValueError(f"graph note {note!r} spans several lines; add one note per line instead")
    return f"# {note}"


def print_graph(graph: Graph) -> str:
    """The whole graph as text (notes, header, one line per node, return, closing brace), newline-terminated."""
    lines = [_format_note(note) for note in graph.notes]
    lines.append(_format_header(graph))
    lines.extend(f"  {format_node(node)}" for node in graph.nodes)
    lines.append(f"  return {format_literal(graph.outputs)}")
    lines.append("}")
    return "\n".join(lines) + "\n"
