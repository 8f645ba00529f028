"""The torch.compile backend: capture (frontend) -> verify and pass pipeline -> lower -> run.

This module is the one place that wires the stages together; each stage imports only `ir`
and the stage before it.
"""
from __future__ import annotations

import contextlib
import copy
import logging
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import fx
from torch._subclasses.fake_tensor import unset_fake_temporarily

from seqweave.backward_variants import AbsentTangentDispatch, with_zeros
from seqweave.codegen.fx_lower import NotLowerable
from seqweave.codegen.inductor import InductorProgram
from seqweave.codegen.lower import lower
from seqweave.config import CompileOptions
from seqweave.errors import OptionError
from seqweave.frontend.attention import AttentionReport
from seqweave.frontend.dynamo import capture
from seqweave.graph_bytes import caller_output_bytes, saved_bytes
from seqweave.ir.graph import Graph
from seqweave.ir.schedule import check_sharded_program
from seqweave.ir.types import TensorType
from seqweave.ir.sharding import Layout, padded_length, shard_positions
from seqweave.ir.verifier import verify
from seqweave.passes.absent_tangents import AbsentTangents
from seqweave.passes.activation_memory import ActivationMemory, ApplyPlan, StepPlan
from seqweave.passes.base import Pass
from seqweave.passes.manager import PassRun, parse_pipeline, run_pipeline
from seqweave.passes.saved_views import SavedViews
from seqweave.passes.shard_sequence import ShardSequence
from seqweave.runtime.agreement import agreed
from seqweave.runtime.comm import Communicator
from seqweave.runtime.hybrid import HybridCommunicator
from seqweave.runtime.program import steal
from seqweave.runtime.sharded_outputs import ShardedOutputs

log = logging.getLogger("seqweave")

#: ops whose q and k (after a backward's dout) carry the sequence in dim 2
SEQUENCE_OPS = ("attn.sdpa", "attn.sdpa_backward", "attn.linear", "attn.linear_backward")


@dataclass
class CompiledGraph:
    """One graph this backend compiled: `forward`, `backward` or `inference`."""

    kind: str
    graph: Graph
    passes: list[PassRun]
    #: training forward: bytes of the activations it saves for the backward (this rank's share)
    saved_bytes: int = 0
    #: bytes of the outputs the caller receives (gathered outputs are whole on every rank)
    output_bytes: int = 0
    #: what runs it: "eager" (the step list) or "inductor", and the program itself (its `stats`)
    runner: str = "eager"
    program: Any = None


class SeqweaveBackend:
    """A torch.compile backend. It keeps what it did (`reports`, `graphs`) for `explain` and tests."""

    def __init__(self, options: CompileOptions | None = None) -> None:
        self.options = options or CompileOptions()
        self.reports: list[AttentionReport] = []
        self.graphs: list[CompiledGraph] = []
        self.communicators: list[Communicator] = []  # one per sharded graph; their stats count every byte sent
        #: per compiled training forward: how its saved activations are sharded, and its outputs'
        #: (type, sharding) in order (the backward's tangents arrive sharded as those are)
        self._saved_seqs: list[tuple[list, list]] = []
        self._length = 0  # the global sequence length of the graphs compiled last
        #: per compiled training forward with a memory plan: the plan its backward writes in
        self._memory_plans: list[StepPlan | None] = []
        self.memory_plans: list[StepPlan] = []  # every plan made, for explain and tests

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
        run = lambda: capture(gm, example_inputs, self._compile_graph, self.reports,  # noqa: E731
                              self.options.linear_attention)
        if self.options.mesh.sp == 1:
            return run()
        # Sequence-parallel ranks agree that each graph compiled before any of them communicates.
        if self.options.outputs != "sharded":
            return agreed("compiling a graph", run)
        with _tangents_of_any_shape():
            compiled = agreed("compiling a graph", run)
        return ShardedOutputs(_traced_output_shapes(gm), self._length, self.options.balance).wrap(compiled)

    def _compile_graph(self, graph: Graph, user_outputs: int | None = None,
                       backward: Callable[[], Graph] | None = None) -> Callable[[list], Any]:
        # aot_autograd calls compilers under fake tensors; passes and lowering compute on real ones.
        with unset_fake_temporarily():
            return self._compile_real(graph, user_outputs, backward)

    def _compile_real(self, graph: Graph, user_outputs: int | None,
                      backward: Callable[[], Graph] | None = None) -> Callable[[list], Any]:
        if self.options.verify:
            verify(graph)
        world = self.options.mesh.sp
        if world > 1 and not _static(graph):
            raise OptionError(f"sequence parallelism needs static shapes; the {graph.name} graph has symbolic sizes",
                              hint="compile with torch.compile(..., dynamic=False) (and, for generate(), "
                                   "cache_implementation='static')")
        saved = self._saved_seqs.pop() if graph.name == "backward" and world > 1 else None
        if graph.name != "backward":
            return self._compile_variant(graph, user_outputs, saved, backward=backward)
        memory = self._memory_plans.pop() if self._memory_plans else None
        # A tangent arrives as None when the caller did not differentiate that output
        # (frontend.dynamo asks autograd not to materialise zeros): each set of absent tangents
        # gets its own variant, compiled when first met (the set is the same every step).
        pristine = copy.deepcopy(graph)
        if world == 1:
            return AbsentTangentDispatch(lambda absent: self._backward_variant(pristine, absent, saved, memory))
        return AbsentTangentDispatch(lambda absent: agreed(
            "compiling the backward", lambda: self._backward_variant(pristine, absent, saved, memory)))

    def _backward_variant(self, pristine: Graph, absent: tuple[int, ...], saved: list | None,
                          memory: StepPlan | None) -> Callable[[list], Any]:
        graph = copy.deepcopy(pristine)
        absent = tuple(index for index in absent if isinstance(graph.inputs[index].type, TensorType))
        removable = AbsentTangents(absent).eliminable(graph)
        program = self._compile_variant(graph, None, saved, first=[AbsentTangents(removable)] if absent else [],
                                        memory=memory)
        fed = [index for index in absent if index not in removable]
        return lambda args: program(with_zeros(graph, fed, args))

    def _compile_variant(self, graph: Graph, user_outputs: int | None, saved: list | None,
                         first: Sequence[Pass] = (), backward: Callable[[], Graph] | None = None,
                         memory: StepPlan | None = None) -> Callable[[list], Any]:
        world = self.options.mesh.sp
        passes = [*first, *self._pipeline()]
        if graph.name == "forward" and user_outputs is not None:
            passes.append(SavedViews(saved_from=user_outputs))
        shard = self._shard_pass(graph, world, user_outputs, saved) if world > 1 else None
        outputs = graph.outputs if isinstance(graph.outputs, (tuple, list)) else [graph.outputs]
        global_types = [getattr(value, "type", None) for value in outputs]  # before the pass makes them local
        # every rank compiles the same graph: its warnings are said once, by rank 0
        runs = run_pipeline(graph, passes + ([shard] if shard else []), check=self.options.verify,
                            dump_dir=self.options.dump_dir, log_warnings=world == 1 or _rank() == 0)
        if graph.name == "forward" and user_outputs is not None and world > 1:
            seqs = shard.report["output_seqs"]
            placed = list(zip(global_types[:user_outputs], seqs[:user_outputs]))
            self._saved_seqs.append((seqs[user_outputs:], placed))
        if graph.name == "forward" and user_outputs is not None:
            memory = self._plan_memory(graph, user_outputs, backward)
            self._memory_plans.append(memory)
        if memory is not None:
            runs += run_pipeline(graph, [ApplyPlan(memory, graph.name)], check=self.options.verify,
                                 dump_dir=self.options.dump_dir, log_warnings=False)
        compiled = CompiledGraph(graph.name, graph, runs, saved_bytes(graph, user_outputs),
                                 caller_output_bytes(graph, user_outputs))
        self.graphs.append(compiled)
        if shard is None:
            program = self._lower(compiled, None)
            return lambda args: program(args)
        if self.options.verify:  # every rank checks every rank's schedule: a mismatch fails all of them here
            check_sharded_program(graph, world, self.options.mesh.ulysses)
        return self._sharded_program(compiled, world)

    def _lower(self, compiled: CompiledGraph, comm: Communicator | None) -> Callable[[list], Any]:
        """The graph's program on the inner backend asked for; a graph Inductor cannot take (symbolic
        sizes, scalar operands of an extern call) runs eager, said once per graph."""
        if self.options.inner_backend == "inductor":
            try:
                compiled.program, compiled.runner = InductorProgram(compiled.graph, comm), "inductor"
                return compiled.program
            except NotLowerable as why:
                if comm is None or comm.rank == 0:
                    log.warning("inner_backend='inductor': the %s graph runs eager (%s)", compiled.graph.name, why)
        compiled.program = lower(compiled.graph, comm)
        return compiled.program

    def _pipeline(self) -> list[Pass]:
        """The user's passes; activation-memory is taken out (it runs on the forward/backward pair)."""
        return [p for p in parse_pipeline(self.options.pipeline) if not isinstance(p, ActivationMemory)]

    def _memory_pass(self) -> ActivationMemory | None:
        named = [p for p in parse_pipeline(self.options.pipeline) if isinstance(p, ActivationMemory)]
        if named:
            return named[-1]
        if self.options.memory_budget is None:
            return None
        return ActivationMemory(budget=self.options.memory_budget, quantize=self.options.memory_quantize)

    def _plan_memory(self, forward: Graph, user_outputs: int, backward: Callable[[], Graph] | None) -> StepPlan | None:
        """Plan this training step's saved activations (the forward is final here; its backward
        is prepared as it will be compiled, to read where each activation is used)."""
        memory = self._memory_pass()
        if memory is None or backward is None:
            return None
        local_backward = backward()
        world = self.options.mesh.sp
        shard = self._shard_pass(local_backward, world, None, self._saved_seqs[-1]) if world > 1 else None
        run_pipeline(local_backward, self._pipeline() + ([shard] if shard else []), check=False, log_warnings=False)
        plan = memory.plan_step(forward, local_backward, user_outputs)
        self.memory_plans.append(plan)
        return plan

    def _shard_pass(self, graph: Graph, world: int, user_outputs: int | None, saved: tuple | None) -> ShardSequence:
        """shard-sequence for this graph: a training forward keeps its saved activations sharded,
        and the backward receives them sharded, as the forward left them (its tangents too, for
        outputs the caller got sharded)."""
        length = self._length = sequence_length(graph, self.reports)
        mesh, options = self.options.mesh, self.options
        _check_sharded_outputs(options, length, world)
        attention = "hybrid" if mesh.hybrid and options.attention == "auto" else options.attention
        common = dict(world=world, layout=options.balance, length=length, attention=attention,
                      ulysses=mesh.ulysses, outputs=options.outputs)
        if graph.name == "forward":
            return ShardSequence(**common, keep_sharded_from=user_outputs)
        if graph.name == "backward":
            saved_seqs, user_outputs_placed = saved
            inputs = [(i, *seq) for i, seq in enumerate(saved_seqs) if seq]
            inputs += _tangent_seqs(graph, len(saved_seqs), user_outputs_placed)
            # gradients of whole inputs are whole: outputs="sharded" is about what forward returns
            return ShardSequence(**{**common, "outputs": "gathered"}, input_seqs=tuple(inputs))
        return ShardSequence(**common)

    def _sharded_program(self, compiled: CompiledGraph, world: int) -> Callable[[list], Any]:
        """Run the sharded graph on this rank: its positions are appended as the last input."""
        graph, mesh = compiled.graph, self.options.mesh
        comm = HybridCommunicator(mesh.ulysses, self.options.timeout) if mesh.hybrid \
            else Communicator(timeout_s=self.options.timeout)
        self.communicators += [comm, comm.inner, comm.outer] if mesh.hybrid else [comm]
        if comm.world != world:
            raise OptionError(f"Mesh(sp={world}) but the process group has {comm.world} ranks",
                              hint="launch as many ranks as sp (seqweave run --nproc N / torchrun)")
        program = self._lower(compiled, comm)
        length = int(graph.inputs[-1].type.shape[0]) * world
        positions = shard_positions(Layout(self.options.balance), comm.rank, world, length)

        def run(args: list) -> Any:
            here = positions.to(_device_of(args, positions.device))
            return program([*steal(args), here])
        return run

    def comm_stats(self) -> dict[str, dict[str, int]]:
        """Calls and bytes this rank sent, per collective kind, over every graph run so far."""
        total: dict[str, dict[str, int]] = {}
        for comm in self.communicators:
            for kind, entry in comm.stats.items():
                slot = total.setdefault(kind, {"calls": 0, "bytes_sent": 0})
                slot["calls"] += entry["calls"]
                slot["bytes_sent"] += entry["bytes_sent"]
        return total

    def attention_count(self, kind: str = "forward") -> int:
        """attn.sdpa nodes in forward graphs (training `forward` or `inference`), or sdpa_backward in `backward`."""
        if kind == "backward":
            return sum(c.graph.count("attn.sdpa_backward") for c in self.graphs if c.kind == "backward")
        return sum(c.graph.count("attn.sdpa") for c in self.graphs if c.kind in ("forward", "inference"))


def _static(graph: Graph) -> bool:
    return all(value.type.is_static() for value in graph.values() if isinstance(value.type, TensorType))


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _tangent_seqs(graph: Graph, first: int, outputs: list) -> list[tuple[int, int, int]]:
    """(input index, dim, inner) of the backward's tangents that arrive sharded: tangents follow
    the saved activations, one per differentiable forward output, in order; an output that
    gets no tangent (an integer output) is skipped by matching types."""
    found, candidates = [], iter(outputs)
    for index in range(first, len(graph.inputs)):
        tangent = graph.inputs[index].type
        for out_type, seq in candidates:
            if isinstance(out_type, TensorType) and out_type.shape == tangent.shape and out_type.dtype == tangent.dtype:
                if seq:
                    found.append((index, *seq))
                break
    return found


def _check_sharded_outputs(options: CompileOptions, length: int, world: int) -> None:
    """outputs="sharded" drops padding rows by a view on each rank, which only the contiguous
    layout allows: refuse the rest before anything runs."""
    padded = padded_length(length, world, Layout(options.balance))
    if options.outputs == "sharded" and padded != length and options.balance != "none":
        raise OptionError(f"outputs='sharded' with balance={options.balance!r}: {length} tokens do not split over "
                          f"{world} ranks in that layout (it pads to {padded})",
                          hint="use balance='none', a length the layout splits, or outputs='gathered'")


def _tangents_of_any_shape() -> Any:
    """aot_autograd copies each incoming gradient into the traced output's size and strides
    unless told to check only its memory format; a sharded output's gradient has this rank's
    rows, not the traced global size."""
    config = torch._functorch.config
    if hasattr(config, "guess_tangent_strides_as_outputs"):
        return config.patch(guess_tangent_strides_as_outputs=False)
    return contextlib.nullcontext()


def _traced_output_shapes(gm: fx.GraphModule) -> list[tuple[int, ...] | None]:
    """The global shape dynamo traced for each output of `gm` (None where it is not a tensor)."""
    output = next(node for node in gm.graph.nodes if node.op == "output")
    values = output.args[0] if isinstance(output.args[0], (tuple, list)) else [output.args[0]]
    shapes = []
    for value in values:
        example = value.meta.get("example_value") if isinstance(value, fx.Node) else None
        shapes.append(tuple(int(d) for d in example.shape) if isinstance(example, torch.Tensor) else None)
    return shapes


def _device_of(args: list, default: torch.device) -> torch.device:
    """Where the step's tensors live (this rank's positions go there too)."""
    return next((arg.device for arg in args if isinstance(arg, torch.Tensor)), default)


def sequence_length(graph: Graph, reports: Sequence[AttentionReport] = ()) -> int:
    """The global sequence length N, read off the graph's attentions (shard-sequence pads it to
    split): queries and keys of every attention must share it. What cannot be split is refused
    with the reason: no attention found (with what was left alone and why), cross-attention
    between two lengths, or attentions over different lengths."""
    seen = [(int(node.args[first].type.shape[2]), int(node.args[first + 1].type.shape[2]), node.loc)
            for node in graph.nodes if node.op in SEQUENCE_OPS
            for first in [1 if node.op.endswith("_backward") else 0]]
    if not seen:
        left = "; ".join(f"{r.layer}: {r.reason}" for r in reports if not r.found) or "no attention-like pattern"
        raise OptionError(f"sequence parallelism found no attention to split the sequence of in the {graph.name} "
                          f"graph (left alone: {left})",
                          hint="see backend.reports / seqweave explain; compile without sequence parallelism")
    crossing = [(q, k, loc) for q, k, loc in seen if q != k]
    if crossing:
        q, k, loc = crossing[0]
        where = loc or "an attention"
        raise OptionError(f"sequence parallelism splits one sequence shared by queries and keys; {where}"
                          f" attends from {q} queries to {k} keys (cross-attention, or latents no input carries)",
                          hint="compile this model without sequence parallelism")
    lengths = {q for q, _, _ in seen}
    if len(lengths) != 1:
        raise OptionError(f"sequence parallelism needs one sequence length across attentions, found {sorted(lengths)}",
                          hint="compile a model whose attention layers share the sequence")
    return lengths.pop()


def seqweave_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], options: dict | None = None) -> Callable:
    """Entry point for `torch.compile(model, backend="seqweave", options={...})`."""
    return SeqweaveBackend(CompileOptions.from_kwargs(options))(gm, example_inputs)
