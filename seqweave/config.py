"""Frozen option objects, built once from `backend(...)` keywords, `options=` dicts or the CLI."""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any

from seqweave.errors import OptionError

DEFAULT_PIPELINE = "canonicalize"
DUMP_ENV = "SEQWEAVE_DUMP"
INNER_BACKEND_ENV = "SEQWEAVE_INNER_BACKEND"


BALANCES = ("zigzag", "striped", "none")
ATTENTION_STRATEGIES = ("auto", "ring", "ulysses", "hybrid")
OUTPUTS = ("gathered", "sharded")
INNER_BACKENDS = ("eager", "inductor")


@dataclass(frozen=True)
class Mesh:
    """The device mesh: `sp` ranks share the sequence (1 = single device). `Mesh(ulysses=U, ring=R)`
    is a hybrid mesh of U*R ranks: Ulysses inside groups of U consecutive ranks, ring across groups."""

    sp: int = 0
    ulysses: int = 1
    ring: int = 1

    def __post_init__(self) -> None:
        for name in ("ulysses", "ring"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise OptionError(f"Mesh({name}={getattr(self, name)!r}) must be a positive number of ranks")
        if self.sp == 0:
            object.__setattr__(self, "sp", self.ulysses * self.ring)
        if not isinstance(self.sp, int) or self.sp < 1:
            raise OptionError(f"Mesh(sp={self.sp!r}): sp must be a positive number of ranks",
                              hint="use Mesh(sp=1) for one device, Mesh(sp=P) for P sequence-parallel ranks")
        if self.sp != self.ulysses * self.ring and (self.ulysses, self.ring) != (1, 1):
            raise OptionError(f"Mesh(sp={self.sp}, ulysses={self.ulysses}, ring={self.ring}): sp must be ulysses*ring",
                              hint="give either sp or ulysses and ring")

    @property
    def hybrid(self) -> bool:
        return self.ulysses > 1 and self.ring > 1


@dataclass(frozen=True)
class CompileOptions:
    """Everything the backend needs to know; every field has a sane default."""

    mesh: Mesh = field(default_factory=Mesh)
    attention: str = "auto"
    #: how the sequence is split over ranks: zigzag balances causal work, striped interleaves, none is contiguous
    balance: str = "zigzag"
    #: "gathered": every output whole on every rank; "sharded": outputs with a sequence dim come
    #: back as DTensors, Shard(dim) over the sp ranks, in the layout's row order (see docs)
    outputs: str = "gathered"
    #: "replicated": every rank passes the whole batch (taking its rows costs nothing)
    inputs: str = "replicated"
    #: seconds a rank waits for a peer before failing with the rank, step and op named
    timeout: float = 300.0
    pipeline: str = DEFAULT_PIPELINE
    #: recognise linear attention written in plain torch (parallel, cumulative-sum and loop
    #: forms) and run it chunkwise as `attn.linear`; False keeps the model's own computation
    linear_attention: bool = True
    #: device-memory budget for the activations a training step saves: bytes ("12GB", an int) or a
    #: fraction of the step's plan-free peak (0.25); None plans nothing (passes.activation_memory)
    memory_budget: str | float | int | None = None
    #: let the memory plan store activations in 8 bits (an approximation within a stated bound)
    memory_quantize: bool = False
    verify: bool = True
    #: what runs each rank's program: "eager" runs the IR op by op; "inductor" lowers it to FX with
    #: seqweave's attention and collectives as extern calls and compiles the rest
    #: with Inductor (fused pointwise, norm and matmul regions); SEQWEAVE_INNER_BACKEND sets the default
    inner_backend: str = field(default_factory=lambda: os.environ.get(INNER_BACKEND_ENV) or "eager")
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
                              hint=f"use one of {ATTENTION_STRATEGIES}")
        if options.get("balance", "zigzag") not in BALANCES:
            raise OptionError(f"balance={options['balance']!r} is not a sequence layout", hint=f"use one of {BALANCES}")
        if options.get("outputs", "gathered") not in OUTPUTS:
            raise OptionError(f"outputs={options['outputs']!r} is not an output placement", hint=f"use one of {OUTPUTS}")
        if options.get("inner_backend", "eager") not in INNER_BACKENDS:
            raise OptionError(f"inner_backend={options['inner_backend']!r} is not a way to run programs",
                              hint=f"use one of {INNER_BACKENDS}")
        if options.get("inputs", "replicated") != "replicated":
            raise OptionError(f"inputs={options['inputs']!r} is not offered yet: torch.compile traces the shapes it is "
                              "called with, so a rank's rows would be compiled as the whole sequence",
                              hint="pass the whole batch on every rank (inputs='replicated'; each rank takes its rows "
                                   "for free) and keep big outputs sharded with outputs='sharded'")
        if options.get("memory_budget") is not None:  # a bad budget is said now, not at the first compile
            from seqweave.passes.activation_memory import parse_budget
            parse_budget(options["memory_budget"])
        built = CompileOptions(**options)
        if built.inner_backend not in INNER_BACKENDS:  # from the environment
            raise OptionError(f"{INNER_BACKEND_ENV}={built.inner_backend!r} is not a way to run programs",
                              hint=f"use one of {INNER_BACKENDS}")
        if built.attention == "hybrid" and not built.mesh.hybrid:
            raise OptionError("attention='hybrid' needs a hybrid mesh", hint="use Mesh(ulysses=U, ring=R) with U, R > 1")
        return built
