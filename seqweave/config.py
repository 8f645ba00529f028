"""Frozen option objects, built once from `backend(...)` keywords, `options=` dicts or the CLI."""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any

from seqweave.errors import OptionError

DEFAULT_PIPELINE = "canonicalize"
DUMP_ENV = "SEQWEAVE_DUMP"


BALANCES = ("zigzag", "striped", "none")
ATTENTION_STRATEGIES = ("auto", "ring", "ulysses")


@dataclass(frozen=True)
class Mesh:
    """The device mesh: `sp` ranks share the sequence (1 = single device)."""

    sp: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.sp, int) or self.sp < 1:
            raise OptionError(f"Mesh(sp={self.sp!r}): sp must be a positive number of ranks",
                              hint="use Mesh(sp=1) for one device, Mesh(sp=P) for P sequence-parallel ranks")


@dataclass(frozen=True)
class CompileOptions:
    """Everything the backend needs to know; every field has a sane default."""

    mesh: Mesh = field(default_factory=Mesh)
    attention: str = "auto"
    #: how the sequence is split over ranks: zigzag balances causal work, striped interleaves, none is contiguous
    balance: str = "zigzag"
    #: seconds a rank waits for a peer before failing with the rank, step and op named
    timeout: float = 300.0
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
        if options.get("attention", "auto") not in ATTENTION_STRATEGIES:
            raise OptionError(f"attention={options['attention']!r} is not available",
                              hint=f"use one of {ATTENTION_STRATEGIES} (hybrid is not wired in yet)")
        if options.get("balance", "zigzag") not in BALANCES:
            raise OptionError(f"balance={options['balance']!r} is not a sequence layout", hint=f"use one of {BALANCES}")
        return CompileOptions(**options)
