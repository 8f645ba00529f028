"""Pass options typed by their dataclass fields: text from a pipeline string is converted to the
field's type, and a value given from Python is checked against it.

A field is an option when it is set by `__init__` and takes part in comparison (`report`-like
fields with `compare=False` or `init=False` are results, not options). The supported types are
what a pipeline can spell: `int`, `float`, `bool`, `str`, `None`, `Literal[...]`, enums, unions
of these and tuples of them (`1+2` or `(1, 2)` in a pipeline); `object` / `Any` accept anything
(and a pipeline value is then read as a number, a bool or a string, whichever fits first).
"""
from __future__ import annotations

import ast
import enum
import numbers
import types
import typing
from dataclasses import fields, is_dataclass
from functools import lru_cache
from typing import Any, Literal, Union

from seqweave.errors import OptionError

_BOOLS = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}
_ANY = (Any, object)


class _Mismatch(Exception):
    """A value does not fit a type (caught and reported as an OptionError naming the pass)."""


@lru_cache(maxsize=None)
def option_types(cls: type) -> dict[str, Any]:
    """{option name: its type} of a pass class, in field order."""
    if not is_dataclass(cls):
        return {}
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, Any) for f in fields(cls) if f.init and f.compare}


def describe(hint: Any) -> str:
    """A type as a user reads it: `int`, `'ring' | 'ulysses'`, `tuple[int, ...]`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint in _ANY:
        return "any value"
    if origin is Literal:
        return " | ".join(repr(arg) for arg in args)
    if origin in (Union, types.UnionType):
        return " | ".join(describe(arg) for arg in args)
    if hint is type(None):
        return "None"
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return " | ".join(repr(member.value) for member in hint)
    if origin is tuple:
        inner = f"{describe(args[0])}, ..." if len(args) == 2 and args[1] is Ellipsis else \
            ", ".join(describe(arg) for arg in args)
        return f"tuple[{inner}]"
    return getattr(hint, "__name__", str(hint))


# ------------------------------------------------------------------ checking Python values


def fits(value: Any, hint: Any) -> bool:
    """Whether `value` is a valid value of type `hint` (an int is a valid float, a bool is not an int)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint in _ANY:
        return True
    if origin is Literal:
        return any(value == arg and type(value) is type(arg) for arg in args)
    if origin in (Union, types.UnionType):
        return any(fits(value, arg) for arg in args)
    if origin in (tuple, list):
        return isinstance(value, origin) and _items_fit(value, args)
    if origin is not None:
        return isinstance(value, origin)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if hint is type(None):
        return value is None
    return isinstance(value, hint) if isinstance(hint, type) else True


def _items_fit(items: Any, args: tuple) -> bool:
    if not args:
        return True
    if len(args) == 2 and args[1] is Ellipsis:
        return all(fits(item, args[0]) for item in items)
    return len(items) == len(args) and all(fits(item, arg) for item, arg in zip(items, args))


def check_options(pass_name: str, cls: type, values: dict[str, Any]) -> None:
    """OptionError for an option `cls` does not have, or a value that does not fit its type."""
    known = option_types(cls)
    for option, value in values.items():
        if option not in known:
            raise OptionError(f"pass {pass_name} has no option(s) [{option!r}]",
                              hint=f"its options: {sorted(known) or 'none'}")
        if not fits(value, known[option]):
            raise _error(pass_name, option, value, known[option])


def _error(pass_name: str, option: str, given: Any, hint: Any) -> OptionError:
    return OptionError(f"option {option}={given!r} of pass {pass_name}: expected {describe(hint)}",
                       hint=f"give {option} as {describe(hint)}, e.g. {pass_name}{{{option}=...}}")


# ------------------------------------------------------------------ converting pipeline text


def convert_options(pass_name: str, cls: type, texts: dict[str, str]) -> dict[str, Any]:
    """{option: text} from a pipeline string -> {option: typed value}; OptionError when one does not fit."""
    known = option_types(cls)
    unknown = sorted(set(texts) - set(known))
    if unknown:
        raise OptionError(f"pass {pass_name} has no option(s) {unknown}",
                          hint=f"its options: {sorted(known) or 'none'}")
    converted = {}
    for option, text in texts.items():
        try:
            converted[option] = from_text(text, known[option])
        except _Mismatch:
            raise _error(pass_name, option, text, known[option]) from None
    return converted


def from_text(text: str, hint: Any) -> Any:
    """The value of type `hint` that `text` spells; raises _Mismatch when there is none."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint in _ANY:
        return _guess(text)
    if origin is Literal:
        return _choice(text, args)
    if origin in (Union, types.UnionType):
        return _first_fit(text, args)
    if origin is tuple:
        return _tuple(text, hint)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return _member(text, hint)
    return _scalar(text, hint)


def _scalar(text: str, hint: Any) -> Any:
    if hint is str:
        return text
    if hint is bool:
        if text.lower() in _BOOLS:
            return _BOOLS[text.lower()]
        raise _Mismatch
    if hint is type(None) and text.lower() == "none":
        return None
    if hint in (int, float):
        try:
            return hint(text)
        except ValueError:
            raise _Mismatch from None
    raise _Mismatch  # a type a pipeline string cannot spell (give it from Python)


def _guess(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def _choice(text: str, choices: tuple) -> Any:
    for choice in choices:
        try:
            if from_text(text, type(choice)) == choice:
                return choice
        except _Mismatch:
            pass
    raise _Mismatch


def _first_fit(text: str, members: tuple) -> Any:
    """Narrowest member first and `str` last, so `int | str` reads "3" as 3 and "all" as "all", and
    `float | int` reads "2" as 2 (a count) but "0.5" as 0.5."""
    for member in sorted(members, key=_narrowness):
        try:
            return from_text(text, member)
        except _Mismatch:
            pass
    raise _Mismatch


def _narrowness(member: Any) -> int:
    order = {type(None): 0, bool: 1, int: 2, float: 3, str: 5}
    return order.get(member, 4)


def _tuple(text: str, hint: Any) -> tuple:
    stripped = text.strip()
    if stripped[:1] in ("(", "["):
        try:
            value = _tuples(ast.literal_eval(stripped))
        except (ValueError, SyntaxError):
            raise _Mismatch from None
        if not fits(value, hint):
            raise _Mismatch
        return value
    args = typing.get_args(hint)
    items = [item.strip() for item in stripped.split("+")] if stripped else []
    item_types = [args[0]] * len(items) if len(args) == 2 and args[1] is Ellipsis else list(args)
    if len(item_types) != len(items):
        raise _Mismatch
    return tuple(from_text(item, item_type) for item, item_type in zip(items, item_types))


def _tuples(value: Any) -> Any:
    return tuple(_tuples(item) for item in value) if isinstance(value, (list, tuple)) else value


def _member(text: str, hint: type[enum.Enum]) -> enum.Enum:
    for member in hint:
        if text in (member.name, str(member.value)):
            return member
    raise _Mismatch


def with_options(pass_: Any, **changes: Any) -> Any:
    """A new pass like `pass_` with some options changed. Unlike `dataclasses.replace` it does not
    hand over result fields (`compare=False`, e.g. ShardSequence.report), so the copy gets its own."""
    options = {f.name: getattr(pass_, f.name) for f in fields(pass_) if f.init and f.compare}
    return type(pass_)(**{**options, **changes})
