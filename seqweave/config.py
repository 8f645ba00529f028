"""Frozen option objects, built once from `backend(...)` keywords, `options=` dicts or the CLI."""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any

from seqweave.errors import OptionError

DEFAULT_PIPELINE = "canonicalize"
DUMP_ENV = "SEQWEAVE_DUMP"


@dataclass(frozen=True)
class Mesh:
    """The device mesh. Single device for now (sp=1); later issues add ulysses/ring axes."""

    sp: int = 1

    def __post_init__(self) -> None:
        if self.sp != 1:
            raise OptionError(f"Mesh(sp={self.sp}): sequence parallelism is not available yet",
                              hint="use Mesh(sp=1) (the default)")


@dataclass(frozen=True)
class CompileOptions:
    """Everything the backend needs to know; every field has a sane default."""

    mesh: Mesh = field(default_factory=Mesh)
    attention: str = "auto"
    pipeline: str = DEFAULT_PIPELINE
    verify: bool = True
    #: SEQWEAVE_DUMP=dir writes the IR before and after every pass there.
    dump_dir: str | None = field(default_factory=lambda: os.environ.get(DUMP_ENV) or None)

    @staticmethod
    def from_kwargs(options: dict[str, Any] | None) -> "CompileOptions":
        """Build from keywords, rejecting unknown names with the list of valid ones."""
        options = dict(options or {})
        known = {f.name for f in fields(CompileOptions)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise OptionError(f"unknown seqweave option(s) {unknown}", hint=f"valid options: {sorted(known)}")
        if isinstance(options.get("mesh"), dict):
            options["mesh"] = Mesh(**options["mesh"])
        if options.get("attention", "auto") not in ("auto",):
            raise OptionError(f"attention={options['attention']!r} needs sequence parallelism, not available yet",
                              hint="use attention='auto'")
        return CompileOptions(**options)
