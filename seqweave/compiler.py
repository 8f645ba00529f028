"""The torch.compile backend: capture (frontend) -> verify and pass pipeline -> lower -> run.

This module is the one place that wires the stages together; each stage imports only `ir`
and the stage before it.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import fx
from torch._subclasses.fake_tensor import unset_fake_temporarily

from seqweave.backward_variants import AbsentTangentDispatch, with_zeros
from seqweave.codegen.lower import lower
from seqweave.config import CompileOptions
from seqweave.errors import OptionError
from seqweave.frontend.attention import AttentionReport
from seqweave.frontend.dynamo import capture
from seqweave.graph_bytes import caller_output_bytes, saved_bytes
from seqweave.ir.graph import Graph
from seqweave.ir.types import TensorType
from seqweave.ir.sharding import Layout, shard_positions
from seqweave.ir.verifier import verify
from seqweave.passes.absent_tangents import AbsentTangents
from seqweave.passes.base import Pass
from seqweave.passes.manager import PassRun, parse_pipeline, run_pipeline
from seqweave.passes.shard_sequence import ShardSequence
from seqweave.runtime.agreement import agreed
from seqweave.runtime.comm import Communicator
from seqweave.runtime.hybrid import HybridCommunicator


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


class SeqweaveBackend:
    """A torch.compile backend. It keeps what it did (`reports`, `graphs`) for `explain` and tests."""

    def __init__(self, options: CompileOptions | None = None) -> None:
        self.options = options or CompileOptions()
        self.reports: list[AttentionReport] = []
        self.graphs: list[CompiledGraph] = []
        self.communicators: list[Communicator] = []  # one per sharded graph; their stats count every byte sent
        self._saved_seqs: list[list] = []  # per compiled training forward, how its saved activations are sharded

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
        if self.options.mesh.sp == 1:
            return capture(gm, example_inputs, self._compile_graph, self.reports)
        # Sequence-parallel ranks agree that each graph compiled before any of them communicates.
        return agreed("compiling a graph", lambda: capture(gm, example_inputs, self._compile_graph, self.reports))

    def _compile_graph(self, graph: Graph, user_outputs: int | None = None) -> Callable[[list], Any]:
        # aot_autograd calls compilers under fake tensors; passes and lowering compute on real ones.
        with unset_fake_temporarily():
            return self._compile_real(graph, user_outputs)

    def _compile_real(self, graph: Graph, user_outputs: int | None) -> Callable[[list], Any]:
        if self.options.verify:
            verify(graph)
        world = self.options.mesh.sp
        if world > 1 and not _static(graph):
            raise OptionError(f"sequence parallelism needs static shapes; the {graph.name} graph has symbolic sizes",
                              hint="compile with torch.compile(..., dynamic=False) (and, for generate(), "
                                   "cache_implementation='static')")
        saved = self._saved_seqs.pop() if graph.name == "backward" and world > 1 else None
        if graph.name != "backward":
            return self._compile_variant(graph, user_outputs, saved)
        # A tangent arrives as None when the caller did not differentiate that output
        # (frontend.dynamo asks autograd not to materialise zeros): each set of absent tangents
        # gets its own variant, compiled when first met (the set is the same every step).
        pristine = copy.deepcopy(graph)
        if world == 1:
            return AbsentTangentDispatch(lambda absent: self._backward_variant(pristine, absent, saved))
        return AbsentTangentDispatch(lambda absent: agreed(
            "compiling the backward", lambda: self._backward_variant(pristine, absent, saved)))

    def _backward_variant(self, pristine: Graph, absent: tuple[int, ...], saved: list | None) -> Callable[[list], Any]:
        graph = copy.deepcopy(pristine)
        absent = tuple(index for index in absent if isinstance(graph.inputs[index].type, TensorType))
        removable = AbsentTangents(absent).eliminable(graph)
        program = self._compile_variant(graph, None, saved, first=[AbsentTangents(removable)] if absent else [])
        fed = [index for index in absent if index not in removable]
        return lambda args: program(with_zeros(graph, fed, args))

    def _compile_variant(self, graph: Graph, user_outputs: int | None, saved: list | None,
                         first: Sequence[Pass] = ()) -> Callable[[list], Any]:
        world = self.options.mesh.sp
        passes = [*first, *parse_pipeline(self.options.pipeline)]
        shard = self._shard_pass(graph, world, user_outputs, saved) if world > 1 else None
        runs = run_pipeline(graph, passes + ([shard] if shard else []), check=self.options.verify,
                            dump_dir=self.options.dump_dir)
        self.graphs.append(CompiledGraph(graph.name, graph, runs, saved_bytes(graph, user_outputs),
                                         caller_output_bytes(graph, user_outputs)))
        if shard is None:
            program = lower(graph)
            return lambda args: program(args)
        if graph.name == "forward":  # the backward's first inputs are these saved activations
            self._saved_seqs.append(shard.report["output_seqs"][user_outputs:])
        return self._sharded_program(graph, world)

    def _shard_pass(self, graph: Graph, world: int, user_outputs: int | None, saved: list | None) -> ShardSequence:
        """shard-sequence for this graph: a training forward keeps its saved activations sharded,
        and the backward receives them sharded, as the forward left them."""
        length = sequence_length(graph, world, self.options.balance)
        mesh = self.options.mesh
        attention = "hybrid" if mesh.hybrid and self.options.attention == "auto" else self.options.attention
        common = dict(world=world, layout=self.options.balance, length=length, attention=attention,
                      ulysses=mesh.ulysses)
        if graph.name == "forward":
            return ShardSequence(**common, keep_sharded_from=user_outputs)
        if graph.name == "backward":
            return ShardSequence(**common, input_seqs=tuple((i, *seq) for i, seq in enumerate(saved) if seq))
        return ShardSequence(**common)

    def _sharded_program(self, graph: Graph, world: int) -> Callable[[list], Any]:
        """Run the sharded graph on this rank: its positions are appended as the last input."""
        mesh = self.options.mesh
        comm = HybridCommunicator(mesh.ulysses, self.options.timeout) if mesh.hybrid \
            else Communicator(timeout_s=self.options.timeout)
        self.communicators += [comm, comm.inner, comm.outer] if mesh.hybrid else [comm]
        if comm.world != world:
            raise OptionError(f"Mesh(sp={world}) but the process group has {comm.world} ranks",
                              hint="launch as many ranks as sp (seqweave run --nproc N / torchrun)")
        program = lower(graph, comm)
        length = int(graph.inputs[-1].type.shape[0]) * world
        positions = shard_positions(Layout(self.options.balance), comm.rank, world, length)
        return lambda args: program([*args, positions.to(_device_of(args, positions.device))])

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


def _device_of(args: list, default: torch.device) -> torch.device:
    """Where the step's tensors live (this rank's positions go there too)."""
    return next((arg.device for arg in args if isinstance(arg, torch.Tensor)), default)


def sequence_length(graph: Graph, world: int, balance: str) -> int:
    """The global sequence length N, read off the graph's attention (shard-sequence pads it to split)."""
    lengths = {int(node.args[1 if node.op == "attn.sdpa_backward" else 0].type.shape[2])
               for node in graph.nodes if node.op in ("attn.sdpa", "attn.sdpa_backward")}
    if len(lengths) != 1:
        raise OptionError(f"sequence parallelism needs one sequence length across attentions, found {sorted(lengths)}",
                          hint="compile a model whose attention layers share the sequence")
    return lengths.pop()


def seqweave_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], options: dict | None = None) -> Callable:
    """Entry point for `torch.compile(model, backend="seqweave", options={...})`."""
    return SeqweaveBackend(CompileOptions.from_kwargs(options))(gm, example_inputs)
