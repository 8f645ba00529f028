"""Run a pipeline of named passes: `"canonicalize,other{key=value}"`.

After each pass the IR is verified (when asked), the graph is stamped with what the
pass did, and with a dump directory the IR text is written there (atomically).
"""
from __future__ import annotations

import logging
import os
import re
import tempfile
import time
from dataclasses import dataclass
from typing import Sequence

from seqweave.errors import OptionError, PassError
from seqweave.ir.graph import Graph
from seqweave.ir.ops import VerificationError
from seqweave.ir.parser import split_top_level
from seqweave.ir.printer import print_graph
from seqweave.ir.verifier import verify
from seqweave.passes.base import Pass, PassResult
from seqweave.passes.options import convert_options
from seqweave.passes.registry import PASSES, known_names, lookup, register_builtins

__all__ = ["PASSES", "PassRun", "parse_pipeline", "run_pipeline"]
LOG = logging.getLogger("seqweave")
register_builtins()  # so that a built-in pass constructed from Python checks its options too
_STEP = re.compile(r"^\s*([a-z][a-z0-9-]*)\s*(?:\{(.*)\})?\s*$")


@dataclass(frozen=True)
class PassRun:
    name: str
    result: PassResult
    millis: float


def _build(step: str) -> Pass:
    found = _STEP.match(step)
    cls = lookup(found.group(1)) if found else None
    if cls is None:
        raise OptionError(f"unknown pass {step.strip()!r} in pipeline", hint=f"known passes: {known_names()}")
    return cls(**convert_options(cls.name, cls, _options(cls.name, found.group(2) or "")))


def _options(pass_name: str, text: str) -> dict[str, str]:
    """`"k=v, k2 = (1, 2)"` -> {"k": "v", "k2": "(1, 2)"}, names and values stripped (commas inside
    brackets belong to the value)."""
    options = {}
    for item in split_top_level(text):
        key, sep, value = item.partition("=")
        if not sep and item.strip():
            raise OptionError(f"option {item.strip()!r} of pass {pass_name} has no value",
                              hint=f"write options as name=value, e.g. {pass_name}{{name=value}}")
        if sep:
            options[key.strip()] = value.strip()
    return options


def parse_pipeline(text: str) -> list[Pass]:
    """`"a,b{k=v,k2=v2}"` -> pass objects (commas inside braces belong to the options)."""
    steps = re.findall(r"[^,{]+(?:\{[^}]*\})?", text)
    return [_build(step) for step in steps if step.strip()]


def _dump(graph: Graph, directory: str, index: int, name: str) -> None:
    os.makedirs(directory, exist_ok=True)
    target = os.path.join(directory, f"{graph.name}.{index:02d}.{name}.ir")
    with tempfile.NamedTemporaryFile("w", dir=directory, delete=False, suffix=".tmp") as handle:
        handle.write(print_graph(graph))
    os.replace(handle.name, target)


def run_pipeline(graph: Graph, pipeline: str | Sequence[Pass], *, check: bool = True,
                 dump_dir: str | None = None, log_warnings: bool = True) -> list[PassRun]:
    """Run every pass of `pipeline` (a pipeline string or pass objects) on `graph` in place;
    raises PassError naming the pass that broke it. Pass warnings are logged unless
    `log_warnings` is off (they stay in the returned runs either way)."""
    passes = parse_pipeline(pipeline) if isinstance(pipeline, str) else list(pipeline)
    runs = []
    if dump_dir:
        _dump(graph, dump_dir, 0, "input")
    for index, pass_ in enumerate(passes, start=1):
        start = time.perf_counter()
        result = pass_.run(graph)
        millis = (time.perf_counter() - start) * 1e3
        graph.notes.append(f"after {pass_.name}: {result.rewrites} rewrites, {millis:.1f} ms")
        if check:
            try:
                verify(graph)
            except VerificationError as error:
                raise PassError(f"the IR does not verify: {error}", pass_name=pass_.name, hint="this is a bug in "
                                "the pass; rerun with SEQWEAVE_DUMP=dir to see its input") from error
        if dump_dir:
            _dump(graph, dump_dir, index, pass_.name)
        for warning in result.warnings if log_warnings else ():
            LOG.warning("%s: %s", pass_.name, warning)
        runs.append(PassRun(pass_.name, result, millis))
    return runs
