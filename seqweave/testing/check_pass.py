"""`check_pass`: property-based testing of a pass (or a pipeline) over many programs.

    from seqweave.testing.check_pass import check_pass

    report = check_pass("canonicalize,shard-sequence{attention=ulysses}", examples=200, seed=0)
    report.raise_if_failed()   # AssertionError with the first failing program's IR text

For every program, the pipeline runs on a copy, and these must hold:

- **verifies**: the IR verifies after each pass (`ir.verifier.verify`);
- **idempotent**: a pass that claims it (`Pass.idempotent`, True unless the pass says
  otherwise) rewrites nothing, and changes no text, when run again on its own output;
- **same numbers**: in float64, the rewritten program computes what the original does,
  interpreted whole (`ir.interpreter.interpret`). After `shard-sequence` the program runs on
  its mesh's ranks under `testing.simulate.simulate`, and every rank's outputs must equal the
  whole ones. An approximate pass declares what it computes instead
  (`Pass.declared_semantics`), and later passes are held to that;
- **bytes as modelled**: on simulated ranks, the bytes the attentions send (all ranks
  together) equal `passes.cost`'s model, and every gather and all-reduce sends what its
  shape says (float64 programs, where a run moves what the types say);
- **no dead or duplicated collective**: no collective whose result nobody reads, none twice
  on the same values (`ir.schedule` where it exists), and the schedule checks out.

`programs`: Graphs, `(graph, inputs)` pairs, objects with `.graph` (and `.inputs`, a list or
a seeded method; `.length`, the sequence length), or a hypothesis strategy drawing any of
these (drawn reproducibly from `seed`; call check_pass outside @given tests). None generates
`examples` programs with `testing.programs.generate_programs`. `shard-sequence` runs on each
mesh of `meshes` in turn, one mesh per program (`every_mesh=True`: every program on every
mesh); its `length=0` is filled from the program. A pass that refuses a program (PassError)
skips it: the refusal is the pass's documented answer, and `report.skipped` says why.

`PROGRAMS_CHECKED` counts the programs checked in this process, for the test run's summary.
"""
from __future__ import annotations

import collections
import copy
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch

from seqweave.config import Mesh
from seqweave.errors import PassError
from seqweave.ir.graph import Graph
from seqweave.ir.interpreter import interpret
from seqweave.ir.printer import print_graph
from seqweave.ir.verifier import verify
from seqweave.passes.base import Pass
from seqweave.passes.manager import parse_pipeline
from seqweave.passes.options import with_options
from seqweave.passes.shard_sequence import POSITIONS_INPUT, ShardSequence
from seqweave.testing.collective_checks import byte_problems, collective_problems
from seqweave.testing.equivalence import random_inputs
from seqweave.testing.simulate import simulate

#: programs checked by every check_pass call in this process
PROGRAMS_CHECKED = 0
DEFAULT_MESHES = (Mesh(sp=2), Mesh(sp=3), Mesh(sp=4), Mesh(ulysses=2, ring=2))
#: float64 tolerance: rounding of a reordered sum of small values, far below any real bug
ATOL = RTOL = 1e-9
#: passes whose programs need every attention's rotary lifted into it
NEEDS_ROTARY = frozenset({"rope-scale", "rope-fp32", "streaming", "lm-infinite"})
SEQUENCE_OPS = ("attn.sdpa", "attn.sdpa_backward", "attn.linear", "attn.linear_backward")


@dataclass(frozen=True)
class Failure:
    """One program that broke a property: what failed, on which mesh, and the program as IR text."""

    problem: str
    program: str
    mesh: str
    pipeline: str

    def __str__(self) -> str:
        return f"{self.problem}\n  pipeline: {self.pipeline}\n  mesh: {self.mesh}\n  program:\n{self.program}"


@dataclass
class CheckReport:
    """What check_pass found. `by_pass[name]`: programs each pass ran on; `fired[name]`: those
    it rewrote; `skipped`: programs a pass refused, and why."""

    checked: int = 0
    failures: list[Failure] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    by_pass: collections.Counter = field(default_factory=collections.Counter)
    fired: collections.Counter = field(default_factory=collections.Counter)
    #: attention ops in the rewritten programs (which strategy ran: attn.ring, attn.ulysses, ...)
    attention_ops: collections.Counter = field(default_factory=collections.Counter)
    seconds: float = 0.0

    def raise_if_failed(self) -> None:
        if self.failures:
            raise AssertionError(f"check_pass: {len(self.failures)} of {self.checked} programs failed; the first:\n"
                                 f"{self.failures[0]}")

    def summary(self) -> str:
        per = self.seconds / self.checked * 1e3 if self.checked else 0.0
        return (f"{self.checked} programs checked, {len(self.failures)} failed, {len(self.skipped)} skipped "
                f"({per:.1f} ms each); rewrites by pass: {dict(self.fired)}")


@dataclass(frozen=True)
class _Case:
    graph: Graph
    inputs: list | None
    length: int | None


def check_pass(pass_or_pipeline: Pass | Sequence[Pass] | str, programs: Any = None, *, examples: int = 100,
               seed: int = 0, meshes: Sequence[Mesh | int] = DEFAULT_MESHES, every_mesh: bool = False,
               timeout_s: float = 30.0) -> CheckReport:
    """Check `pass_or_pipeline` on `programs` (see the module docstring); returns a CheckReport."""
    global PROGRAMS_CHECKED
    passes = _passes(pass_or_pipeline)
    meshes = [m if isinstance(m, Mesh) else Mesh(sp=int(m)) for m in meshes] or [None]
    sharded = any(isinstance(p, ShardSequence) for p in passes)
    report, start = CheckReport(), time.perf_counter()
    for index, case in enumerate(_cases(programs, passes, meshes, examples, seed)):
        chosen = meshes if every_mesh else [meshes[index % len(meshes)]]
        for mesh in chosen if sharded else [None]:
            _check_case(passes, case, mesh, seed + index, report, timeout_s)
        report.checked += 1
        PROGRAMS_CHECKED += 1
    report.seconds = time.perf_counter() - start
    return report


def _passes(pass_or_pipeline: Pass | Sequence[Pass] | str) -> list[Pass]:
    if isinstance(pass_or_pipeline, str):
        return parse_pipeline(pass_or_pipeline)  # OptionError for an unknown pass or option
    if isinstance(pass_or_pipeline, Pass):
        return [pass_or_pipeline]
    return list(pass_or_pipeline)


# ------------------------------------------------------------------ programs


def _cases(programs: Any, passes: list[Pass], meshes: list, examples: int, seed: int) -> Iterable[_Case]:
    if programs is None:
        return (_case(item) for item in _generated(passes, meshes, examples, seed))
    if _is_strategy(programs):
        return (_case(item) for item in _drawn(programs, examples, seed))
    return (_case(item) for item in programs)


def _is_strategy(programs: Any) -> bool:
    from hypothesis.strategies import SearchStrategy
    return isinstance(programs, SearchStrategy)


def _drawn(strategy: Any, examples: int, seed: int) -> list:
    """`examples` values of a hypothesis strategy, the same ones for the same seed."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as seeded
    drawn: list = []

    @settings(max_examples=examples, database=None, derandomize=False, phases=[Phase.generate], deadline=None,
              suppress_health_check=list(HealthCheck))
    @seeded(seed)
    @given(strategy)
    def collect(value: Any) -> None:
        drawn.append(value)

    collect()
    return drawn


def _generated(passes: list[Pass], meshes: list, examples: int, seed: int) -> Iterable[Any]:
    """Generated programs whose heads split over the mesh each will run on."""
    from seqweave.testing.programs import ProgramSpec, generate_program
    rope = "always" if any(p.name in NEEDS_ROTARY for p in passes) else "sometimes"
    for index in range(examples):
        mesh = meshes[index % len(meshes)]
        yield generate_program(seed + index, ProgramSpec(head_multiple=_head_multiple(passes, mesh), rope=rope))


def _head_multiple(passes: list[Pass], mesh: Mesh | None) -> int:
    shard = next((p for p in passes if isinstance(p, ShardSequence)), None)
    if shard is None or mesh is None:
        return 1
    attention = _attention_for(shard, mesh)
    return mesh.sp if attention == "ulysses" else mesh.ulysses if attention == "hybrid" else 1


def _case(item: Any) -> _Case:
    if isinstance(item, Graph):
        return _Case(item, None, None)
    if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], Graph):
        return _Case(item[0], list(item[1]), None)
    inputs = getattr(item, "inputs", None)
    inputs = inputs() if callable(inputs) else inputs
    return _Case(item.graph, None if inputs is None else list(inputs), getattr(item, "length", None))


# ------------------------------------------------------------------ one program on one mesh


def _check_case(passes: list[Pass], case: _Case, mesh: Mesh | None, seed: int, report: CheckReport,
                timeout_s: float) -> None:
    pipeline = ",".join(p.name for p in passes)

    def fail(problem: str) -> None:  # the program's text is printed only for a failure: printing costs
        report.failures.append(Failure(problem, print_graph(case.graph), _mesh_text(mesh), pipeline))

    try:
        configured = _configured(passes, case, mesh)
    except _Skip as why:
        report.skipped.append(f"{why}: graph {case.graph.name}")
        return
    try:
        inputs = case.inputs if case.inputs is not None else random_inputs(case.graph, torch.float64, seed)
    except ValueError as error:
        report.skipped.append(f"no inputs ({error})")
        return
    rewritten, reference = _run_pipeline(configured, case.graph, report, fail)
    if rewritten is None:
        return
    report.attention_ops.update(node.op for node in rewritten.nodes if node.op.startswith("attn."))
    _compare_numbers(reference, rewritten, inputs, mesh, timeout_s, fail)


class _Skip(Exception):
    pass


def _configured(passes: list[Pass], case: _Case, mesh: Mesh | None) -> list[Pass]:
    """The pipeline for this program and mesh: shard-sequence on the mesh, with the program's length."""
    return [_shard_for(p, case, mesh) if isinstance(p, ShardSequence) else p for p in passes]


def _attention_for(shard: ShardSequence, mesh: Mesh) -> str:
    return "hybrid" if mesh.hybrid and shard.attention == "auto" else shard.attention


def _shard_for(shard: ShardSequence, case: _Case, mesh: Mesh | None) -> ShardSequence:
    changes: dict[str, Any] = {}
    if mesh is not None:
        changes.update(world=mesh.sp, ulysses=mesh.ulysses, attention=_attention_for(shard, mesh))
    if shard.length == 0:
        length = case.length or sequence_length(case.graph)
        if length is None:
            raise _Skip("shard-sequence{length=0} and no attention to read the sequence length from")
        changes["length"] = length
    return with_options(shard, **changes)


def sequence_length(graph: Graph) -> int | None:
    """The sequence length of the program's first attention (its q's dim 2), or None without one."""
    for node in graph.nodes:
        if node.op in SEQUENCE_OPS:
            q = node.args[1 if node.op.endswith("_backward") else 0].type
            return int(q.shape[2])
    return None


def _run_pipeline(passes: list[Pass], original: Graph, report: CheckReport, fail) -> tuple[Graph | None, Graph]:
    """(the rewritten graph, the graph it must equal), checking each pass's output as it goes;
    (None, _) when a pass refused the program or a check failed."""
    current, reference = copy.deepcopy(original), original
    for pass_ in passes:
        reference = _declared(pass_, reference)
        report.by_pass[pass_.name] += 1
        try:
            rewrites = pass_.run(current).rewrites
        except PassError as refusal:
            report.skipped.append(f"{pass_.name} refused: {str(refusal).splitlines()[0]}")
            return None, reference
        except Exception as error:  # noqa: BLE001 (a crash is a finding, reported with the program)
            fail(f"{pass_.name} raised {type(error).__name__}: {error}")
            return None, reference
        report.fired[pass_.name] += bool(rewrites)
        problem = _verifies(current, pass_) or _idempotent(current, pass_)
        if problem:
            fail(problem)
            return None, reference
    problems = collective_problems(current)
    for problem in problems:
        fail(problem)
    return (None if problems else current), reference


def _declared(pass_: Pass, reference: Graph) -> Graph:
    """What the program must compute after `pass_`: its declared semantics of `reference`, or
    `reference` itself for an exact pass (the default method: no copy needed to ask it)."""
    if type(pass_).declared_semantics is Pass.declared_semantics:
        return reference
    declared = pass_.declared_semantics(copy.deepcopy(reference))
    return declared if declared is not None else reference


def _verifies(graph: Graph, pass_: Pass) -> str | None:
    try:
        verify(graph)
    except Exception as error:  # noqa: BLE001
        return f"after {pass_.name} the IR does not verify: {error}\n  output:\n{print_graph(graph)}"
    return None


def _idempotent(graph: Graph, pass_: Pass) -> str | None:
    if not getattr(pass_, "idempotent", True):
        return None
    again, before = copy.deepcopy(graph), print_graph(graph)
    try:
        rewrites = pass_.run(again).rewrites
    except Exception as error:  # noqa: BLE001
        return f"{pass_.name} claims to be idempotent but refused its own output: {type(error).__name__}: {error}"
    after = print_graph(again)
    if rewrites or after != before:
        return (f"{pass_.name} claims to be idempotent but a second run made {rewrites} rewrite(s)"
                f"{'' if after == before else ' and changed the text'}:\n  first output:\n{before}\n"
                f"  second output:\n{after}")
    return None


# ------------------------------------------------------------------ numbers and bytes


def _compare_numbers(reference: Graph, rewritten: Graph, inputs: list, mesh: Mesh | None, timeout_s: float,
                     fail) -> None:
    try:
        expected = interpret(reference, _copies(inputs))
    except Exception as error:  # noqa: BLE001 (the original program must run: else the generator is wrong)
        fail(f"the original program does not run: {type(error).__name__}: {error}")
        return
    if not (rewritten.inputs and rewritten.inputs[-1].name == POSITIONS_INPUT):
        _compare_whole(expected, rewritten, inputs, fail)
        return
    try:
        simulation = simulate(rewritten, _copies(inputs), mesh.sp if mesh else _world_of(rewritten),
                              timeout_s=timeout_s)
    except Exception as error:  # noqa: BLE001
        fail(f"the sharded program failed on simulated ranks: {type(error).__name__}: {error}"
             f"{_notes(error)}\n  sharded:\n{print_graph(rewritten)}")
        return
    for rank, outputs in enumerate(simulation.outputs):
        mismatch = _mismatch(expected, outputs, "outputs")
        if mismatch:
            fail(f"rank {rank} of {simulation.world}: {mismatch}\n  sharded:\n{print_graph(rewritten)}")
            return
    for problem in byte_problems(rewritten, simulation, inputs):
        fail(f"{problem}\n  sharded:\n{print_graph(rewritten)}")


def _compare_whole(expected: Any, rewritten: Graph, inputs: list, fail) -> None:
    try:
        actual = interpret(rewritten, _copies(inputs))
    except Exception as error:  # noqa: BLE001
        fail(f"the rewritten program does not run: {type(error).__name__}: {error}\n  rewritten:\n"
             f"{print_graph(rewritten)}")
        return
    mismatch = _mismatch(expected, actual, "outputs")
    if mismatch:
        fail(f"{mismatch}\n  rewritten:\n{print_graph(rewritten)}")


def _mismatch(expected: Any, actual: Any, path: str) -> str | None:
    """Where two output templates differ (structure, shape, dtype or value), or None."""
    if isinstance(expected, torch.Tensor):
        if not isinstance(actual, torch.Tensor):
            return f"{path}: expected a tensor, got {type(actual).__name__}"
        scale = float(expected.abs().nan_to_num(posinf=0, neginf=0).max()) if expected.numel() and \
            expected.is_floating_point() else 1.0
        try:
            torch.testing.assert_close(actual, expected, atol=ATOL * max(1.0, scale), rtol=RTOL, equal_nan=False)
        except AssertionError as error:
            return f"{path}: {error}"
        return None
    if isinstance(expected, (tuple, list)):
        if not isinstance(actual, (tuple, list)) or len(actual) != len(expected):
            return f"{path}: expected {len(expected)} items, got {actual!r}"
        found = (_mismatch(e, a, f"{path}[{i}]") for i, (e, a) in enumerate(zip(expected, actual)))
        return next((m for m in found if m), None)
    return None if expected == actual else f"{path}: expected {expected!r}, got {actual!r}"


def _copies(inputs: list) -> list:
    return [item.clone() if isinstance(item, torch.Tensor) else item for item in inputs]


def _world_of(graph: Graph) -> int:
    worlds = {node.kwargs["world"] for node in graph.nodes if "world" in node.kwargs}
    return worlds.pop() if len(worlds) == 1 else 2


def _mesh_text(mesh: Mesh | None) -> str:
    if mesh is None:
        return "whole (no shard-sequence)"
    return f"{mesh.sp} ranks" + (f" (ulysses {mesh.ulysses} x ring {mesh.ring})" if mesh.hybrid else "")


def _notes(error: BaseException) -> str:
    return "".join(f" {note}" for note in getattr(error, "__notes__", ()))

