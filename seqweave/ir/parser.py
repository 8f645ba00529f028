"""Reads the text form written by `seqweave.ir.printer.print_graph` back into a `Graph`.

Operand lists are parsed with `ast` (never evaluated): `%name` is first rewritten to
`__v__("name")` outside string literals, then the syntax tree is walked and only literal
forms the printer writes are accepted. Size symbols in types and `sym("...")` are sympy
symbols with torch's size assumptions (integer, positive), so `s0` parses to the symbol
a torch ShapeEnv creates for a dynamic size.
"""
from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass
from typing import Any, Callable

import sympy
import torch

from seqweave.ir.graph import Graph, Node, Value
from seqweave.ir.mask_parser import parse_mask, parse_score_mod
from seqweave.ir.positions import parse_positions
from seqweave.ir.printer import NAME_PATTERN
from seqweave.ir.types import DTYPES_BY_NAME, ScalarType, TensorType, ValueType, parse_placement

SIZE_SYMBOL_ASSUMPTIONS: dict[str, bool] = {"integer": True, "positive": True}
_VALUE_REF = "__v__"
_NAME_RE = re.compile(NAME_PATTERN)
_HEADER_RE = re.compile(rf"graph\s+({NAME_PATTERN})\s*\((.*)\)\s*\{{")
_RESULTS_RE = re.compile(rf"(%{NAME_PATTERN}(?:\s*,\s*%{NAME_PATTERN})*)\s*=\s*")
_OP_RE = re.compile(r"([A-Za-z_][A-Za-z0-9_.]*)\s*\(")
_LOC_RE = re.compile(r"\s+loc\((\"(?:[^\"\\]|\\.)*\")\)\s*$")
_TYPE_RE = re.compile(r"([A-Za-z0-9_.]+)\[(.*?)\](?:\{(.*)\})?")
_SYM_TEXT_RE = re.compile(r"[\w\s+\-*/().,]*")
_IDENT_RE = re.compile(r"[A-Za-z_]\w*")
_ATTRIBUTE_RE = re.compile(r"\.\s*[A-Za-z_]")
_SCALAR_KINDS = ("int", "float", "bool", "none")
_NUMBER_NAMES = {"inf": float("inf"), "nan": float("nan")}
_CLOSERS = {"(": ")", "[": "]", "{": "}"}
#: `name("text")` literals that are typed attribute values (see printer.TYPED_ATTRIBUTES)
_TYPED_ATTRIBUTES: dict[str, Callable[[str], Any]] = {"mask": parse_mask, "score_mod": parse_score_mod,
                                                      "positions": parse_positions}


class ParseError(ValueError):
    """The text is not a valid graph; says which line, what text and how to fix it."""

    def __init__(self, line: int, fragment: str, problem: str, hint: str) -> None:
        super().__init__(f"line {line}: {problem}: {fragment.strip()!r}; {hint}")
        self.line = line
        self.fragment = fragment
        self.hint = hint


@dataclass
class _Line:
    """One source line and its 1-based number, for error messages."""

    number: int
    text: str

    def error(self, problem: str, hint: str, fragment: str | None = None) -> ParseError:
        return ParseError(self.number, self.text if fragment is None else fragment, problem, hint)


def _skip_string(text: str, start: int) -> int:
    """Index just past the double-quoted string literal that opens at `start`."""
    index = start + 1
    while index < len(text):
        if text[index] == "\\":
            index += 2
        elif text[index] == '"':
            return index + 1
        else:
            index += 1
    raise ValueError("unterminated string literal")


def split_top_level(text: str, sep: str = ",") -> list[str]:
    """Split on `sep` outside brackets and string literals; empty text gives []."""
    parts, depth, start, index = [], 0, 0, 0
    while index < len(text):
        char = text[index]
        if char == '"':
            index = _skip_string(text, index)
            continue
        depth += (char in "([{") - (char in ")]}")
        if char == sep and depth == 0:
            parts.append(text[start:index])
            start = index + 1
        index += 1
    tail = text[start:]
    return parts + [tail] if parts or tail.strip() else []


def _closing_paren(text: str, open_index: int) -> int:
    """Index of the bracket that closes the one at `open_index` (string literals skipped)."""
    stack, index = [], open_index
    while index < len(text):
        char = text[index]
        if char == '"':
            index = _skip_string(text, index)
            continue
        if char in _CLOSERS:
            stack.append(_CLOSERS[char])
        elif char in ")]}":
            if not stack or stack.pop() != char:
                raise ValueError(f"unbalanced {char!r}")
            if not stack:
                return index
        index += 1
    raise ValueError("missing closing parenthesis")


def _substitute_values(text: str) -> str:
    """Rewrite `%name` as `__v__("name")` outside string literals."""
    out, index = [], 0
    while index < len(text):
        char = text[index]
        if char == '"':
            end = _skip_string(text, index)
            out.append(text[index:end])
            index = end
        elif char == "%":
            match = _NAME_RE.match(text, index + 1)
            if match is None:
                raise ValueError("'%' must be followed by a value name")
            out.append(f'{_VALUE_REF}("{match.group()}")')
            index = match.end()
        else:
            out.append(char)
            index += 1
    return "".join(out)


def size_symbol(name: str) -> sympy.Symbol:
    """The sympy symbol the parser uses for a size named `name`."""
    return sympy.Symbol(name, **SIZE_SYMBOL_ASSUMPTIONS)


def _is_sympy_function(name: str) -> bool:
    candidate = getattr(sympy, name, None)
    return isinstance(candidate, type) and issubclass(candidate, sympy.Basic)


def parse_sym(text: str) -> sympy.Expr:
    """A sympy size expression such as `2*s0`; free names become size symbols."""
    if not _SYM_TEXT_RE.fullmatch(text) or "__" in text or _ATTRIBUTE_RE.search(text):
        raise ValueError(f"{text!r} is not a size expression (only names, numbers, + - * / and calls)")
    calls = {m.group() for m in _IDENT_RE.finditer(text) if text[m.end():].lstrip().startswith("(")}
    unknown = sorted(name for name in calls if not _is_sympy_function(name))
    if unknown:
        raise ValueError(f"{text!r} calls {unknown}, which are not sympy functions (e.g. floor, Max, Mod)")
    names = {m.group(): size_symbol(m.group()) for m in _IDENT_RE.finditer(text) if m.group() not in calls}
    try:
        expr = sympy.parse_expr(text, local_dict=names)
    except Exception as error:  # sympy raises SyntaxError, TokenError, TypeError, ... for bad text
        raise ValueError(f"{text!r} is not a size expression ({type(error).__name__}: {error})") from error
    if not isinstance(expr, sympy.Expr):
        raise ValueError(f"{text!r} is not a sympy expression")
    return expr


def _parse_dtype(name: str) -> torch.dtype:
    if name in DTYPES_BY_NAME:
        return DTYPES_BY_NAME[name]
    dtype = getattr(torch, name[len("torch."):], None) if name.startswith("torch.") else None
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(DTYPES_BY_NAME)}")
    return dtype


def _parse_placements(text: str | None) -> tuple:
    placements = []
    for part in split_top_level(text or ""):
        axis, sep, placement = part.partition(":")
        if not sep or not axis.strip():
            raise ValueError(f"placement {part.strip()!r} must read '<axis>: <R|S(d)|P(sum)>'")
        placements.append((axis.strip(), parse_placement(placement)))
    return tuple(placements)


def parse_type(text: str) -> ValueType:
    """Inverse of `str(type)`: `f32[2, s0]{sp: S(1)}`, `int`, `float`, `bool`."""
    text = text.strip()
    if text in _SCALAR_KINDS:
        return ScalarType(text)
    match = _TYPE_RE.fullmatch(text)
    if match is None:
        raise ValueError(f"{text!r} is not a type: expected e.g. f32[2, 8] or int")
    dims = tuple(parse_sym(dim.strip()) for dim in split_top_level(match.group(2)))
    if any(dim.is_number and not dim.is_Integer for dim in dims):
        raise ValueError(f"{text!r} has a non-integer size; sizes are integers or size expressions")
    return TensorType(dims, _parse_dtype(match.group(1)), _parse_placements(match.group(3)))


class _LiteralBuilder:
    """Turns an `ast` expression back into the literal / Value template it spells."""

    def __init__(self, resolve: Callable[[str], Value], source: str) -> None:
        self.resolve = resolve
        self.source = source  # the text `ast` parsed, to decode string literals as JSON

    def build(self, node: ast.expr) -> Any:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return self._string(node)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, bool, type(None))):
            return node.value
        if isinstance(node, ast.List):
            return [self.build(item) for item in node.elts]
        if isinstance(node, ast.Tuple):
            return tuple(self.build(item) for item in node.elts)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            value = self.build(node.operand)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return -value
        if isinstance(node, ast.Name) and node.id in _NUMBER_NAMES:
            return _NUMBER_NAMES[node.id]
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "torch":
            return self._torch_enum(node)
        if isinstance(node, ast.Call):
            return self._call(node)
        raise ValueError(f"{ast.unparse(node)!r} is not a literal the IR text form allows")

    def _string(self, node: ast.Constant) -> str:
        """Strings are JSON (astral characters are escaped as surrogate pairs, which Python would keep apart)."""
        try:
            return json.loads(ast.get_source_segment(self.source, node) or "")
        except json.JSONDecodeError as error:
            raise ValueError(f"{ast.unparse(node)} is not a double-quoted JSON string") from error

    def _torch_enum(self, node: ast.Attribute) -> Any:
        value = getattr(torch, node.attr, None)
        if not isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
            raise ValueError(f"torch.{node.attr} is not a torch dtype, layout or memory format")
        return value

    def _call(self, node: ast.Call) -> Any:
        name = node.func.id if isinstance(node.func, ast.Name) else None
        arg = node.args[0] if len(node.args) == 1 and not node.keywords else None
        if not (isinstance(arg, ast.Constant) and isinstance(arg.value, str)):
            raise ValueError(f"{ast.unparse(node)!r}: expected {name}(\"...\") with one string")
        if name == _VALUE_REF:
            return self.resolve(arg.value)
        if name == "device":
            try:
                return torch.device(arg.value)
            except RuntimeError as error:
                raise ValueError(f"{arg.value!r} is not a device ({error})") from error
        if name == "sym":
            return parse_sym(arg.value)
        if name in _TYPED_ATTRIBUTES:
            return _TYPED_ATTRIBUTES[name](self._string(arg))
        raise ValueError(f"{ast.unparse(node)!r} is not a literal: only device(...), sym(...), mask(...), "
                         "score_mod(...) and positions(...) calls")


class _GraphParser:
    """Parses one graph, keeping the values defined so far for operand lookups."""

    def __init__(self) -> None:
        self.values: dict[str, Value] = {}
        self.line = _Line(0, "")
        self.source = ""

    def resolve(self, name: str) -> Value:
        if name not in self.values:
            raise self.line.error(f"use of undefined value %{name}",
                                  "define it as a graph input or an earlier node result", f"%{name}")
        return self.values[name]

    def define(self, name: str, value_type: ValueType) -> Value:
        if name in self.values:
            raise self.line.error(f"value %{name} is defined twice", "give every value a unique name", f"%{name}")
        self.values[name] = Value(name, value_type)
        return self.values[name]

    def expression(self, text: str) -> ast.expr:
        try:
            self.source = _substitute_values(text.strip())
            return ast.parse(self.source, mode="eval").body
        except (SyntaxError, ValueError) as error:
            raise self.line.error(f"malformed expression ({error})", "check brackets, quotes and commas",
                                  text) from error

    def literal(self, node: ast.expr) -> Any:
        try:
            return _LiteralBuilder(self.resolve, self.source).build(node)
        except ParseError:
            raise
        except ValueError as error:
            fragment = re.sub(rf"{_VALUE_REF}\((['\"])(.*?)\1\)", r"%\2", ast.unparse(node))
            raise self.line.error(str(error), "write the literal as the printer does (see seqweave.ir.printer)",
                                  fragment) from error

    def typ(self, text: str) -> ValueType:
        try:
            return parse_type(text)
        except ValueError as error:
            raise self.line.error(f"bad type ({error})", "write types like f32[2, s0]{sp: S(1)} or int",
                                  text) from error

    def header(self, line: _Line) -> tuple[str, list[Value]]:
        self.line = line
        match = _HEADER_RE.fullmatch(line.text.strip())
        if match is None:
            raise line.error("expected a graph header", "write 'graph <name>(%x: f32[2, 8], ...) {'")
        inputs = []
        for part in self._split(match.group(2)):
            name, sep, type_text = part.strip().partition(":")
            if not sep or not re.fullmatch(f"%{NAME_PATTERN}", name.strip()):
                raise line.error("bad graph input", "write inputs as '%name: type'", part)
            inputs.append(self.define(name.strip()[1:], self.typ(type_text)))
        return match.group(1), inputs

    def _split(self, text: str) -> list[str]:
        try:
            return split_top_level(text)
        except ValueError as error:
            raise self.line.error(str(error), "close every string literal", text) from error

    def node(self, line: _Line) -> Node:
        self.line = line
        text = line.text.strip()
        loc_match = _LOC_RE.search(text)
        loc = json.loads(loc_match.group(1)) if loc_match else ""
        text = text[:loc_match.start()] if loc_match else text
        results_match = _RESULTS_RE.match(text)
        names = [n.strip()[1:] for n in results_match.group(1).split(",")] if results_match else []
        rest = text[results_match.end():] if results_match else text
        op_match = _OP_RE.match(rest)
        if op_match is None:
            raise line.error("expected a node", "write '%r = dialect.op(args) : type'")
        call_end = self._call_end(rest, op_match.end() - 1)
        call = self.expression("__op__" + rest[op_match.end() - 1:call_end + 1])
        args = tuple(self.literal(arg) for arg in call.args)
        kwargs = self._kwargs(call)
        results = self._results(names, rest[call_end + 1:])
        node = Node(op_match.group(1), args, kwargs, results, loc)
        for value in results:
            value.producer = node
        return node

    def _call_end(self, text: str, open_index: int) -> int:
        try:
            return _closing_paren(text, open_index)
        except ValueError as error:
            raise self.line.error(str(error), "balance the brackets of the operand list", text) from error

    def _kwargs(self, call: ast.expr) -> dict:
        if not isinstance(call, ast.Call) or any(kw.arg is None for kw in call.keywords):
            raise self.line.error("malformed operand list", "write 'op(args, key=value)' without '**'")
        return {kw.arg: self.literal(kw.value) for kw in call.keywords}

    def _results(self, names: list[str], tail: str) -> list[Value]:
        tail = tail.strip()
        if not names:
            if tail:
                raise self.line.error("unexpected text after a node without results", "remove it", tail)
            return []
        if not tail.startswith(":"):
            raise self.line.error("missing result types", "append ' : <type>, ...' after the call", tail)
        types = [self.typ(part) for part in self._split(tail[1:])]
        if len(types) != len(names):
            raise self.line.error(f"{len(names)} results but {len(types)} types",
                                  "give exactly one type per result", tail)
        return [self.define(name, value_type) for name, value_type in zip(names, types)]

    def outputs(self, line: _Line) -> Any:
        self.line = line
        return self.literal(self.expression(line.text.strip()[len("return"):]))


def _numbered_lines(text: str) -> list[_Line]:
    return [_Line(number, line) for number, line in enumerate(text.splitlines(), 1) if line.strip()]


def _split_notes(lines: list[_Line]) -> tuple[list[str], list[_Line]]:
    notes = []
    while lines and lines[0].text.lstrip().startswith("#"):
        note = lines.pop(0).text.lstrip()[1:]
        notes.append(note[1:] if note.startswith(" ") else note)
    return notes, lines


def parse_graph(text: str) -> Graph:
    """Inverse of `print_graph`: the graph spelled by `text`; raises ParseError on malformed text."""
    notes, lines = _split_notes(_numbered_lines(text))
    if not lines:
        raise ParseError(1, text[:40], "no graph found", "start with 'graph <name>(<inputs>) {'")
    parser = _GraphParser()
    name, inputs = parser.header(lines[0])
    body = [line for line in lines[1:] if not line.text.lstrip().startswith("#")]
    if not body or body[-1].text.strip() != "}":
        last = body[-1] if body else lines[0]
        raise last.error("graph is not closed", "end the graph with a line holding only '}'")
    if len(body) < 2 or not re.match(r"return\b", body[-2].text.strip()):
        raise body[-1].error("missing return", "add '  return <outputs>' before the closing '}'")
    nodes = [parser.node(line) for line in body[:-2]]
    return Graph(name, inputs, nodes, parser.outputs(body[-2]), notes)
