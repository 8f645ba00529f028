"""Parse the text form of MaskSpecs and score mods: `causal & (sinks(4) | sliding_window(1023, 0))`.

A small recursive-descent parser; `&` binds tighter than `|`. It never evaluates the text.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Callable, Mapping

from seqweave.ir.mask import (_ARG_DESCRIPTIONS, _END, _IDENT, _PUNCT, _TOKEN_RE, ARG_FLOAT, ARG_INT, ARG_OPERAND,
                              OPERAND_SIGIL, Causal, Chunked, Dense, DistanceAtLeast, Document, Full, MaskSpec,
                              Padding, QueriesBefore, QueriesFrom, Sinks, SlidingWindow, _TextForm)
from seqweave.ir.score_mod import NoScoreMod, ScoreMod, Softcap

_MASK_KINDS: Mapping[str, type[MaskSpec]] = MappingProxyType(
    {c.KIND: c for c in (Full, Causal, SlidingWindow, Sinks, Chunked, Document, Padding, Dense, QueriesFrom,
                        QueriesBefore, DistanceAtLeast)})
_SCORE_MOD_KINDS: Mapping[str, type[ScoreMod]] = MappingProxyType({c.KIND: c for c in (NoScoreMod, Softcap)})


@dataclass(frozen=True)
class _Token:
    kind: str  # a _TOKEN_RE group name, or _END
    text: str
    pos: int


@dataclass(frozen=True)
class _Grammar:
    """Text, tokens and vocabulary of one parse; parse functions thread a token index through it."""

    what: str  # "mask" or "score mod", for messages
    kinds: Mapping[str, type[_TextForm]]
    text: str
    tokens: tuple[_Token, ...] = ()

    def error(self, tok: _Token, expected: str) -> ValueError:
        """A ValueError naming the bad token, its position and the valid kinds."""
        shown = tok.text if tok.kind == _END else repr(tok.text)
        kinds = ", ".join(c.signature() for c in self.kinds.values())
        extra = ", combined with '&', '|' and parentheses" if self.what == "mask" else ""
        return ValueError(f"cannot parse {self.what} {self.text!r}: unexpected {shown} at position "
                          f"{tok.pos}; expected {expected}. Valid {self.what} kinds: {kinds}{extra}")

    def at(self, i: int, punct: str) -> bool:
        return self.tokens[i].kind == _PUNCT and self.tokens[i].text == punct

    def expect(self, i: int, punct: str) -> int:
        """Index after the punctuation ``punct`` at ``i`` (else raise)."""
        if not self.at(i, punct):
            raise self.error(self.tokens[i], repr(punct))
        return i + 1


def _grammar(what: str, kinds: Mapping[str, type[_TextForm]], text: str) -> _Grammar:
    """Tokenize ``text`` into a grammar ready for parsing."""
    if not isinstance(text, str):
        raise ValueError(f"expected the text form of a {what} (a str), got {text!r}")
    base, tokens, pos = _Grammar(what, kinds, text), [], 0
    while pos < len(text):
        if text[pos].isspace():
            pos += 1
            continue
        match = _TOKEN_RE.match(text, pos)
        if match is None:
            raise base.error(_Token("char", text[pos], pos), "a name, number, $N, '(', ')', ',', '&' or '|'")
        tokens.append(_Token(str(match.lastgroup), match.group(), pos))
        pos = match.end()
    return replace(base, tokens=(*tokens, _Token(_END, "end of input", len(text))))


def _parse_arg(g: _Grammar, i: int, kind: str) -> tuple[object, int]:
    """One constructor argument of the given ARG_* kind."""
    tok = g.tokens[i]
    if kind == ARG_INT and tok.kind == "int":
        return int(tok.text), i + 1
    if kind == ARG_FLOAT and tok.kind in ("int", "float"):
        return float(tok.text), i + 1
    if kind == ARG_OPERAND and tok.kind == "operand":
        return int(tok.text[len(OPERAND_SIGIL):]), i + 1
    raise g.error(tok, _ARG_DESCRIPTIONS[kind])


def _parse_call(g: _Grammar, i: int) -> tuple[_TextForm, int]:
    """``kind``, ``kind()`` or ``kind(arg, ...)``."""
    tok = g.tokens[i]
    cls = g.kinds.get(tok.text) if tok.kind == _IDENT else None
    if cls is None:
        raise g.error(tok, f"a {g.what} kind" + (" or '('" if g.what == "mask" else ""))
    i += 1
    if not cls.ARG_KINDS and not g.at(i, "("):
        return cls(), i
    i, args = g.expect(i, "("), []
    for n, kind in enumerate(cls.ARG_KINDS):
        value, i = _parse_arg(g, g.expect(i, ",") if n else i, kind)
        args.append(value)
    return cls(*args), g.expect(i, ")")


def _parse_atom(g: _Grammar, i: int) -> tuple[MaskSpec, int]:
    """``( expr )`` or a mask kind."""
    if g.at(i, "("):
        node, i = _parse_expr(g, i + 1)
        return node, g.expect(i, ")")
    return _parse_call(g, i)  # type: ignore[return-value]


def _parse_expr(g: _Grammar, i: int, op: str = "|") -> tuple[MaskSpec, int]:
    """``sub (op sub)*``: '|' over '&' over atoms, so '&' binds tighter."""
    sub = _parse_atom if op == "&" else functools.partial(_parse_expr, op="&")
    node, i = sub(g, i)
    while g.at(i, op):
        rhs, i = sub(g, i + 1)
        node = node & rhs if op == "&" else node | rhs
    return node, i


def _parse_all(g: _Grammar, start: Callable[[_Grammar, int], tuple[object, int]]) -> object:
    """Run a start rule over the whole text and require end of input."""
    node, i = start(g, 0)
    if g.tokens[i].kind != _END:
        raise g.error(g.tokens[i], "'&', '|' or end of input" if g.what == "mask" else "end of input")
    return node


def parse_mask(text: str | MaskSpec) -> MaskSpec:
    """Parse the text form of a MaskSpec (inverse of ``str``), e.g. ``causal & sinks(4)``; a MaskSpec
    (an IR attribute holds the typed value) is returned as it is."""
    if isinstance(text, MaskSpec):
        return text
    return _parse_all(_grammar("mask", _MASK_KINDS, text), _parse_expr)  # type: ignore[return-value]


def parse_score_mod(text: str | ScoreMod) -> ScoreMod:
    """Parse the text form of a ScoreMod, e.g. ``none`` or ``softcap(50.0)``; a ScoreMod is returned as it is."""
    if isinstance(text, ScoreMod):
        return text
    grammar = _grammar("score mod", _SCORE_MOD_KINDS, text)
    return _parse_all(grammar, _parse_call)  # type: ignore[return-value]
