"""Where pipeline names find their passes: `@register_pass` and the `seqweave.passes` entry-point group.

    @register_pass
    @dataclass(frozen=True)
    class FoldScale(Pass):
        name = "fold-scale"
        limit: int = 4

A user's package declares its passes in its metadata, and they are found by name::

    [project.entry-points."seqweave.passes"]
    fold-scale = "my_package.passes:FoldScale"

Entry points load lazily, the first time a pipeline names a pass that is not registered yet.
A registered class checks its options when constructed from Python too: a wrong type or an
unknown option is an OptionError naming the pass, never a TypeError from deep inside it.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import inspect
from typing import Any, Callable, TypeVar

from seqweave.errors import OptionError
from seqweave.passes.base import Pass
from seqweave.passes.options import check_options, option_types

ENTRY_POINT_GROUP = "seqweave.passes"
#: name -> pass class: the built-ins, those registered by decorator and those loaded by entry point
PASSES: dict[str, type[Pass]] = {}
PassClass = TypeVar("PassClass", bound=type)


def register_pass(cls: PassClass) -> PassClass:
    """Register a Pass dataclass under its `name` (OptionError if another class has that name)."""
    if not (isinstance(cls, type) and issubclass(cls, Pass)) or not cls.name:
        raise OptionError(f"{cls!r} is not a Pass subclass with a name",
                          hint="subclass seqweave.passes.base.Pass as a frozen dataclass and set `name = \"my-pass\"`")
    held = PASSES.get(cls.name)
    if held is not None and _where(held) != _where(cls):
        raise OptionError(f"two passes are named {cls.name!r}: {_where(held)} and {_where(cls)}",
                          hint="rename one of them (pass names are global across installed packages)")
    _check_on_construction(cls)
    PASSES[cls.name] = cls
    return cls


def _where(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _check_on_construction(cls: type) -> None:
    """Wrap the dataclass `__init__` so that options are checked before the pass's own code sees them."""
    original: Callable[..., None] = cls.__init__
    if getattr(original, "_checks_options_of", None) is cls:
        return  # registered again (a module reloaded under the same name)
    signature = inspect.signature(original)

    @functools.wraps(original)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        # `report` and the like are init fields but results, not options (dataclasses.replace passes them)
        results = _result_fields(cls)
        check_options(cls.name, cls, {name: kwargs[name] for name in kwargs
                                      if name not in option_types(cls) and name not in results})
        try:
            bound = signature.bind(self, *args, **kwargs)
        except TypeError as error:
            raise OptionError(f"pass {cls.name}: {error}", hint=_options_hint(cls)) from None
        given = {name: value for name, value in bound.arguments.items() if name != "self" and name not in results}
        check_options(cls.name, cls, given)
        original(self, *args, **kwargs)

    __init__._checks_options_of = cls  # type: ignore[attr-defined]
    cls.__init__ = __init__  # type: ignore[misc]


def _result_fields(cls: type) -> set[str]:
    """Fields a caller may pass to `__init__` that are not options (`compare=False`: a pass's results)."""
    if not dataclasses.is_dataclass(cls):
        return set()
    return {f.name for f in dataclasses.fields(cls) if f.init and not f.compare}


def _options_hint(cls: type) -> str:
    return f"its options: {sorted(option_types(cls)) or 'none'}"


def lookup(name: str) -> type[Pass] | None:
    """The pass registered as `name`, loading it from its entry point on first use; None if unknown."""
    register_builtins()
    if name not in PASSES:
        for entry in _entry_points():
            if entry.name == name:
                _load(entry)
    return PASSES.get(name)


def known_names() -> list[str]:
    """Every pass name a pipeline may use (entry points listed without loading them)."""
    register_builtins()
    return sorted(set(PASSES) | {entry.name for entry in _entry_points()})


def _entry_points() -> list[importlib.metadata.EntryPoint]:
    return list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))


def _load(entry: importlib.metadata.EntryPoint) -> None:
    distribution = entry.dist.name if entry.dist is not None else "an unknown distribution"
    where = f"entry point {entry.name} = {entry.value!r} of {distribution} (group {ENTRY_POINT_GROUP})"
    try:
        loaded = entry.load()
    except Exception as error:  # any import failure of a third-party module is reported the same way
        raise OptionError(f"{where} cannot be loaded: {type(error).__name__}: {error}",
                          hint=f"fix or reinstall {distribution}, or leave its pass out of the pipeline") from error
    if not (isinstance(loaded, type) and issubclass(loaded, Pass)):
        raise OptionError(f"{where} is {loaded!r}, not a Pass subclass",
                          hint=f"point the entry point at a Pass dataclass in {distribution}")
    if loaded.name != entry.name:
        raise OptionError(f"{where} loads pass {loaded.name!r}, not {entry.name!r}",
                          hint="name the entry point as the pass's `name`")
    register_pass(loaded)


@functools.cache
def register_builtins() -> None:
    """The shipped passes, registered like any other (on first lookup, or when the pass manager is imported)."""
    from seqweave.passes.activation_memory import ActivationMemory
    from seqweave.passes.canonicalize import Canonicalize
    from seqweave.passes.double_sparsity import DoubleSparsityPass
    from seqweave.passes.position_rewrites import LmInfinite, MixedSpans, RopeFp32, RopeScale, Streaming
    from seqweave.passes.shard_sequence import ShardSequence

    for cls in (Canonicalize, ShardSequence, RopeScale, RopeFp32, Streaming, LmInfinite, MixedSpans,
                DoubleSparsityPass, ActivationMemory):
        register_pass(cls)
