"""`seqweave fuzz`: check a pipeline on generated programs, shrink what fails, write it replayable.

Programs come from `seqweave.testing.programs` under the constraints the pipeline needs
(heads that split for Ulysses, a lifted rotary for the position rewrites). Each is checked by
`check_program`: the pipeline's output verifies and, run on the mesh's simulated ranks in
float64, equals the original (or, after an approximate pass, what the pass declares it computes).
A failing program is shrunk (outputs dropped, nodes bypassed, while it fails the same way),
printed as IR text with its sequence length and inputs' seed in its leading notes, and the
command that replays it is printed. The exit status is 0 when nothing failed, 1 otherwise.
"""
from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch

from seqweave.config import Mesh
from seqweave.errors import OptionError
from seqweave.ir.graph import Graph
from seqweave.ir.ops import op_def
from seqweave.ir.parser import parse_graph
from seqweave.ir.interpreter import interpret
from seqweave.ir.printer import print_graph
from seqweave.ir.verifier import verify
from seqweave.ir.types import TensorType
from seqweave.passes.base import Pass
from seqweave.passes.manager import parse_pipeline
from seqweave.passes.options import with_options
from seqweave.passes.shard_sequence import ShardSequence
from seqweave.testing.check_pass import check_pass
from seqweave.testing.programs import Program, ProgramSpec, generate_programs, program_inputs

PROGRESS_EVERY = 25
#: passes that read the lifted rotary of every attention (and refuse one without it)
NEEDS_ROPE = frozenset({"rope-scale", "rope-fp32", "streaming", "lm-infinite"})
_NOTE = re.compile(r"^fuzz (\w[\w-]*): (.*)$")


@dataclass(frozen=True)
class MeshShape:
    """`4` (flat) or `4x2` (4 ranks, Ulysses groups of 2)."""

    world: int
    ulysses: int = 1

    @staticmethod
    def parse(text: str) -> "MeshShape":
        found = re.fullmatch(r"\s*(\d+)\s*(?:x\s*(\d+))?\s*", text)
        if not found or int(found.group(1)) < 1:
            raise OptionError(f"--mesh {text!r} is not a mesh", hint="write ranks as '4', or '4x2' for 4 ranks in "
                                                                      "Ulysses groups of 2")
        world, ulysses = int(found.group(1)), int(found.group(2) or 1)
        if world % ulysses:
            raise OptionError(f"--mesh {text!r}: Ulysses groups of {ulysses} do not divide {world} ranks")
        return MeshShape(world, ulysses)

    def __str__(self) -> str:
        return f"{self.world}x{self.ulysses}" if self.ulysses > 1 else str(self.world)

    def config(self) -> Mesh:
        return Mesh(ulysses=self.ulysses, ring=self.world // self.ulysses) if self.ulysses > 1 else Mesh(sp=self.world)


@dataclass(frozen=True)
class Failure:
    """One failing program: its (shrunk) graph, length, inputs' seed and what went wrong."""

    graph: Graph
    length: int
    seed: int
    problem: str

    @property
    def kind(self) -> str:
        return problem_kind(self.problem)


def problem_kind(problem: str) -> str:
    """What failed, without the numbers (a shrunk program may fail on another rank or output)."""
    return re.sub(r"\d+", "N", problem.split(":", 1)[0])


# ------------------------------------------------------------------ the pipeline for one program


def _mesh_of(passes: list[Pass], mesh: str | None) -> MeshShape:
    if mesh is not None:
        return MeshShape.parse(mesh)
    shard = next((p for p in passes if isinstance(p, ShardSequence)), None)
    return MeshShape(shard.world, shard.ulysses) if shard else MeshShape(1)


def _for_program(passes: list[Pass], length: int, mesh: MeshShape, attention_given: bool) -> list[Pass]:
    """The pipeline with every shard-sequence given the program's length and the mesh."""
    ready = []
    for pass_ in passes:
        if isinstance(pass_, ShardSequence):
            attention = "hybrid" if mesh.ulysses > 1 and not attention_given else pass_.attention
            pass_ = with_options(pass_, length=length, world=mesh.world, ulysses=mesh.ulysses, attention=attention)
        ready.append(pass_)
    return ready


def spec_for(passes: list[Pass], mesh: MeshShape) -> ProgramSpec:
    """Programs the pipeline accepts: heads that split over Ulysses groups, a lifted rotary on
    every attention when a position rewrite needs one."""
    shard = next((p for p in passes if isinstance(p, ShardSequence)), None)
    multiple = 1
    if shard is not None and mesh.world > 1:
        multiple = mesh.ulysses if mesh.ulysses > 1 else mesh.world if shard.attention == "ulysses" else 1
    rope = "always" if any(p.name in NEEDS_ROPE for p in passes) else "sometimes"
    return ProgramSpec(head_multiple=multiple, rope=rope)


# ------------------------------------------------------------------ checking one program


def check_program(passes: list[Pass], graph: Graph, length: int, seed: int, mesh: MeshShape) -> str | None:
    """None when the pipeline is right on this program (or refuses it, its documented answer),
    else what went wrong: `check_pass`'s checks of one program on one mesh."""
    program = Program(graph, length, "", seed)
    report = check_pass(passes, programs=[program], seed=seed, meshes=[mesh.config()])
    return report.failures[0].problem if report.failures else None


# ------------------------------------------------------------------ shrinking


def _dead_code_removed(graph: Graph) -> Graph:
    live = set(graph.output_values())
    kept = []
    for node in reversed(graph.nodes):
        if any(value in live for value in node.results) or not op_def(node.op).pure:
            kept.append(node)
            live.update(node.operands)
    graph.nodes = kept[::-1]
    graph.inputs = [value for value in graph.inputs if value in live]
    return graph


def _flat(outputs: Any) -> list:
    return list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]


def _fewer_outputs(graph: Graph) -> list[Graph]:
    outputs = _flat(graph.outputs)
    smaller = []
    for index in range(len(outputs)) if len(outputs) > 1 else ():
        candidate = copy.deepcopy(graph)
        kept = _flat(candidate.outputs)
        candidate.outputs = tuple(kept[:index] + kept[index + 1:])
        smaller.append(_dead_code_removed(candidate))
    return smaller


def _bypassed(graph: Graph) -> list[Graph]:
    """Each node whose result has the type of one of its operands, replaced by that operand."""
    smaller = []
    for index, node in enumerate(graph.nodes):
        if len(node.results) != 1:
            continue
        same = [v for v in node.operands if isinstance(v.type, TensorType) and v.type == node.results[0].type]
        if not same:
            continue
        candidate = copy.deepcopy(graph)
        twin = candidate.nodes[index]
        source = next(v for v in twin.operands if v.type == twin.results[0].type)
        candidate.replace_all_uses(twin.results[0], source)
        smaller.append(_dead_code_removed(candidate))
    return smaller


#: simpler attention attributes, tried one at a time (the rotary's and the mask's operands then fall dead)
SIMPLER_ATTENTION = ({"score_mod": "none"}, {"positions": None}, {"mask": "causal"}, {"mask": "full"})


def _simpler_attention(graph: Graph) -> list[Graph]:
    """Each attention (forward and backward alike) with one attribute made plain."""
    smaller = []
    for change in SIMPLER_ATTENTION:
        candidate = copy.deepcopy(graph)
        touched = False
        for node in candidate.nodes:
            if node.op in ("attn.sdpa", "attn.sdpa_backward"):
                kwargs = {**node.kwargs, **change}
                kwargs = {key: value for key, value in kwargs.items() if value is not None}
                touched |= kwargs != node.kwargs
                node.kwargs = kwargs
                if "$" not in str(kwargs["mask"]) + str(kwargs.get("positions", "")):
                    node.args = (*node.args[:-1], [])
        if touched:
            smaller.append(_dead_code_removed(candidate))
    return smaller


def _size(graph: Graph) -> int:
    """Nodes first, then inputs, then attribute text (a plain mask is smaller than a combination)."""
    text = sum(len(str(node.kwargs)) for node in graph.nodes if node.op.startswith("attn."))
    return len(graph.nodes) * 10 ** 6 + len(graph.inputs) * 10 ** 4 + text


def shrink(failure: Failure, still_fails: Callable[[Graph], str | None], budget: int = 200) -> Failure:
    """Greedy: take any smaller graph that fails the same way, until none does (or `budget` checks)."""
    best, checks = failure, 0
    improved = True
    while improved and checks < budget:
        improved = False
        for candidate in _fewer_outputs(best.graph) + _bypassed(best.graph) + _simpler_attention(best.graph):
            if checks >= budget:
                break
            checks += 1
            problem = _still_valid_failure(candidate, failure.seed, still_fails)
            if problem and problem_kind(problem) == best.kind and _size(candidate) < _size(best.graph):
                best, improved = replace(failure, graph=candidate, problem=problem), True
                break
    return best


def _still_valid_failure(candidate: Graph, seed: int, still_fails: Callable[[Graph], str | None]) -> str | None:
    """The candidate's problem, if it is a valid program (verifies and runs whole) that fails."""
    try:
        verify(candidate)
        interpret(candidate, program_inputs(candidate, seed))
    except Exception:  # noqa: BLE001 (a candidate the shrinker broke is just not taken)
        return None
    return still_fails(candidate)


# ------------------------------------------------------------------ files and replay


def write_failure(failure: Failure, out_dir: str, name: str, pipeline: str, mesh: MeshShape) -> str:
    """The failing program as IR text, its length / seed / pipeline / mesh / problem in its notes."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.ir")
    graph = copy.deepcopy(failure.graph)
    problem = failure.problem.replace("\n", " ")[:500]
    graph.notes = [f"fuzz length: {failure.length}", f"fuzz inputs-seed: {failure.seed}",
                   f"fuzz pipeline: {pipeline}", f"fuzz mesh: {mesh}", f"fuzz problem: {problem}"]
    with open(path, "w") as handle:
        handle.write(print_graph(graph))
    return path


def read_failure(path: str) -> tuple[Graph, dict[str, str]]:
    with open(path) as handle:
        graph = parse_graph(handle.read())
    found = {m.group(1): m.group(2) for m in (_NOTE.match(note) for note in graph.notes) if m}
    if "length" not in found:
        raise OptionError(f"{path} has no 'fuzz length' note", hint="replay a file written by `seqweave fuzz`")
    graph.notes = []
    return graph, found


def replay_command(path: str, pipeline: str, mesh: MeshShape) -> str:
    return f"seqweave fuzz --replay {path} --pipeline '{pipeline}' --mesh {mesh}"


# ------------------------------------------------------------------ the command


def fuzz(pipeline: str, examples: int, seed: int, mesh: str | None, out_dir: str,
         echo: Callable[[str], Any] = print, replay: str | None = None) -> int:
    """Check `pipeline` on `examples` programs from `seed` (or on the one program in `replay`);
    0 when nothing failed, 1 when something did (each failure shrunk and written to `out_dir`)."""
    passes = parse_pipeline(pipeline)
    shape = _mesh_of(passes, mesh)
    attention_given = "attention=" in pipeline
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only contend
    try:
        if replay is not None:
            return _replay(passes, replay, mesh, attention_given, echo)
        return _search(passes, pipeline, examples, seed, shape, attention_given, out_dir, echo)
    finally:
        torch.set_num_threads(previous_threads)


def _replay(passes: list[Pass], path: str, mesh: str | None, attention_given: bool, echo: Callable) -> int:
    """Check the one program in `path` (on --mesh, else on the mesh it was found on)."""
    graph, notes = read_failure(path)
    shape = MeshShape.parse(mesh or notes.get("mesh", "")) if mesh or "mesh" in notes else _mesh_of(passes, None)
    length, seed = int(notes["length"]), int(notes.get("inputs-seed", 0))
    problem = check_program(_for_program(passes, length, shape, attention_given), graph, length, seed, shape)
    echo(f"{path}: {problem}" if problem else f"{path}: passes")
    return 1 if problem else 0


def _search(passes: list[Pass], pipeline: str, examples: int, seed: int, shape: MeshShape, attention_given: bool,
            out_dir: str, echo: Callable) -> int:
    spec = spec_for(passes, shape)
    failing = 0
    for index, program in enumerate(generate_programs(seed, examples, spec), start=1):
        ready = _for_program(passes, program.length, shape, attention_given)
        problem = check_program(ready, program.graph, program.length, program.seed, shape)
        if problem:
            failing += 1
            _report(ready, program, problem, pipeline, shape, out_dir, echo)
        if index % PROGRESS_EVERY == 0 or index == examples:
            echo(f"{index}/{examples} checked, {failing} failing")
    return 1 if failing else 0


def _report(ready: list[Pass], program: Program, problem: str, pipeline: str, shape: MeshShape, out_dir: str,
            echo: Callable) -> None:
    echo(f"FAIL {program}: {problem.splitlines()[0][:300]}")
    failure = Failure(program.graph, program.length, program.seed, problem)
    small = shrink(failure, lambda g: check_program(ready, g, program.length, program.seed, shape))
    path = write_failure(small, out_dir, f"fuzz-{program.seed}", pipeline, shape)
    echo(f"  shrunk to {len(small.graph.nodes)} nodes (from {len(program.graph.nodes)}): {path}")
    echo(f"  replay: {replay_command(path, pipeline, shape)}")


__all__ = ["Failure", "MeshShape", "check_program", "fuzz", "shrink", "spec_for"]
