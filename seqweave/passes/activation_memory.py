"""`activation-memory{budget=...}`: keep, offload, recompute or 8-bit-store each saved activation.

A training step holds what its forward saves for its backward; at long context that, not
the weights, decides whether the step fits. This pass reads a step as one timeline (the
forward's nodes, then the backward's, each rank's share after `shard-sequence`), lists the
activations the forward saves with their bytes and where each is made and read
(`passes.liveness`), and lets an exact solver (`passes.memory_plan`, a MILP) choose for each:

- keep it on the device;
- offload it to a host arena after its last forward use and prefetch it back one attention
  layer before its first backward use (the copies overlap that compute);
- recompute it in the backward from kept values (one op: the cheap pointwise and norm results
  a layer saves next to their inputs);
- store it in 8 bits (`ir.ops.quantize8`, only with `quantize=true`: it is an approximation
  with a stated bound, so the user asks for it).

The choice minimises the predicted extra step time (copies not hidden behind compute,
recomputed FLOPs, quantisation passes) with the device bytes at every node of the timeline
within the budget. `budget` is bytes (`12GB`, `512MiB`, an int) or a fraction of the step's
plan-free peak (`0.25`). A budget no plan meets is an error that says the least it can be.

The pass needs the forward and the backward at once, so the backend runs it (the pipeline
string form only carries its options): `plan_step` when the forward is compiled, then
`StepPlan.apply_forward` and, for each backward variant, `StepPlan.apply_backward`.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

from seqweave.errors import OptionError
from seqweave.graph_bytes import tensor_bytes
from seqweave.ir.aliasing import storage_root
from seqweave.ir.graph import Graph, Node, Value
from seqweave.ir.ops import op_def
from seqweave.ir.ops.quantize8 import DEFAULT_GROUP, packed_nbytes
from seqweave.passes import memory_plan
from seqweave.passes.base import Pass, PassResult
from seqweave.passes.liveness import profile, readers_by_storage, storage_lifetimes
from seqweave.passes.memory_rewrite import BackwardRewrite, Choice, prefetch_anchor, rewrite_forward, view_chain
from seqweave.passes.node_flops import is_attention, node_flops

#: activations smaller than this are kept: moving them costs more than it frees
MIN_BYTES = 16 * 1024
#: ops a backward may recompute: pure and deterministic (no random numbers, no collectives)
NOT_RECOMPUTABLE = re.compile(r"rand|dropout|bernoulli|normal|uniform|multinomial|empty")
_BLOCK = re.compile(r"^(.*?\.\d+)(?:\.|$)")
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_budget(budget: str | float | int) -> tuple[int | None, float | None]:
    """(bytes, None) or (None, fraction of the plan-free peak)."""
    if isinstance(budget, str):
        found = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", budget)
        if not found or found.group(2).lower() not in _UNITS:
            raise OptionError(f"activation-memory budget {budget!r} is not a size",
                              hint="write bytes ('12GB', '512MiB', 1000000) or a fraction of the plan-free peak (0.25)")
        if not found.group(2):
            return parse_budget(float(found.group(1)))
        return int(float(found.group(1)) * _UNITS[found.group(2).lower()]), None
    if isinstance(budget, float) and 0 < budget <= 1:
        return None, budget
    if isinstance(budget, (int, float)) and budget > 1:
        return int(budget), None
    raise OptionError(f"activation-memory budget {budget!r} is neither bytes nor a fraction in (0, 1]",
                      hint="write bytes ('12GB', 1000000) or a fraction of the plan-free peak (0.25)")


@dataclass
class StepPlan:
    """What the solver chose for one training step, and how to write it into both graphs."""

    saved_from: int
    budget: int
    plan_free_peak: int
    plan: memory_plan.Plan
    candidates: list[memory_plan.Candidate]
    #: what moves, one storage each (with the saved values that view it)
    choices: list[Choice] = field(default_factory=list)
    #: Candidate.layer -> the model block it names
    layer_names: list[str] = field(default_factory=list)

    def apply_forward(self, forward: Graph) -> PassResult:
        moved = rewrite_forward(forward, self.saved_from, self.choices)
        return PassResult(moved, self.summary())

    def apply_backward(self, backward: Graph) -> PassResult:
        rewrites = BackwardRewrite(backward, self.choices).run()
        return PassResult(rewrites, self.summary())

    def summary(self) -> str:
        counts = {option: len(self.plan.of(option)) for option in memory_plan.OPTIONS}
        return (f"budget {self.budget / 2**20:.1f} MiB, plan-free peak {self.plan_free_peak / 2**20:.1f} MiB -> "
                f"{self.plan.peak_bytes / 2**20:.1f} MiB; " + ", ".join(f"{n} {o}" for o, n in counts.items()) +
                f"; {self.plan.bytes_moved / 2**20:.1f} MiB moved, {self.plan.recompute_flops:.3g} FLOPs recomputed,"
                f" +{self.plan.predicted_seconds * 1e3:.3f} ms predicted")


@dataclass(frozen=True)
class ActivationMemory(Pass):
    """Plan a training step's saved activations under a device-memory budget (see module doc)."""

    name = "activation-memory"
    budget: str | float | int = 1.0
    quantize: bool = False
    host_bandwidth: float = 50e9
    flop_rate: float = 100e12
    memory_bandwidth: float = 2e12

    def run(self, graph: Graph) -> PassResult:
        return PassResult(0, "plans a training forward together with its backward: the backend runs it "
                             "(backend(memory_budget=...) or this pass in the pipeline)")

    def machine(self) -> memory_plan.Machine:
        return memory_plan.Machine(self.host_bandwidth, self.flop_rate, self.memory_bandwidth)

    def plan_step(self, forward: Graph, backward: Graph, saved_from: int) -> StepPlan:
        timeline = _Timeline(forward, backward, saved_from, self.quantize, self.flop_rate)
        keep_all = memory_plan.fixed_policy(timeline.candidates, memory_plan.KEEP)
        plan_free = max(memory_plan.device_bytes(timeline.candidates, timeline.base, keep_all), default=0)
        budget_bytes, fraction = parse_budget(self.budget)
        budget = budget_bytes if budget_bytes is not None else int(plan_free * fraction)
        plan = memory_plan.solve(timeline.candidates, timeline.base, budget, timeline.windows, self.machine())
        step = StepPlan(saved_from, budget, plan_free, plan, timeline.candidates)
        step.choices = timeline.choices(plan)
        step.layer_names = timeline.layer_names
        return step


class _Timeline:
    """The step as the solver sees it: candidates, the bytes nothing can change, overlap windows."""

    def __init__(self, forward: Graph, backward: Graph, saved_from: int, quantize: bool, flop_rate: float) -> None:
        self.forward, self.backward, self.quantize, self.flop_rate = forward, backward, quantize, flop_rate
        self.saved = forward.output_values()[saved_from:]
        if len(backward.inputs) < len(self.saved):
            raise ValueError(f"the backward takes {len(backward.inputs)} inputs, fewer than the "
                             f"{len(self.saved)} activations the forward saves")
        self.offset = len(forward.nodes)
        self.forward_readers = readers_by_storage(forward)
        self.backward_readers = readers_by_storage(backward)
        self.forward_layer = _layers(forward)
        #: names of the model's numbered blocks ("model.layers.3"), in the order met; Candidate.layer indexes it
        self.layer_names: list[str] = []
        #: candidate name -> (its storage root, the saved values viewing it: (index, view chain))
        self.groups: dict[str, tuple[Value, tuple]] = {}
        self.candidates = self._candidates(set(forward.output_values()[:saved_from]))
        self.base = self._base(saved_from)
        self.windows = self._windows()

    # -- candidates: storages the forward makes and saves, each with every saved view of it
    def _candidates(self, user: set[Value]) -> list[memory_plan.Candidate]:
        user_roots = {storage_root(value) for value in user}
        members: dict[Value, list[int]] = {}
        for index, value in enumerate(self.saved):
            members.setdefault(storage_root(value), []).append(index)
        found = []
        for root, indices in members.items():
            if root.producer is None or root in user_roots or tensor_bytes(root) < MIN_BYTES:
                continue  # an input or parameter, something the caller holds, or too small to bother
            chains = [view_chain(self.saved[index], root) for index in indices]
            uses = sorted(i for index in indices for i in self.backward_readers.get(self.backward.inputs[index], []))
            if any(chain is None for chain in chains) or not uses:
                continue
            self.groups[root.name] = (root, tuple(zip(indices, chains)))
            found.append(self._candidate(root, uses))
        return [self._with_recompute(c) for c in found]

    def _candidate(self, root: Value, backward_uses: list[int]) -> memory_plan.Candidate:
        produced = self.forward.nodes.index(root.producer)
        forward_uses = self.forward_readers.get(root, [])
        first, last = backward_uses[0], backward_uses[-1]
        anchor = prefetch_anchor(self.backward, first)
        quantized = packed_nbytes(tuple(root.type.concrete_shape()), DEFAULT_GROUP) \
            if self.quantize and root.type.dtype.is_floating_point and root.type.dtype.itemsize >= 2 else None
        last_forward = max(forward_uses[-1] if forward_uses else produced, produced)
        return memory_plan.Candidate(
            name=root.name, nbytes=tensor_bytes(root), layer=self._module_layer(root.producer), produced=produced,
            last_forward_use=last_forward, first_backward_use=self.offset + first,
            last_backward_use=self.offset + last, prefetch_at=self.offset + anchor,
            quantized_nbytes=quantized, offload_window=self.forward_layer[last_forward],
            prefetch_window=-1 - anchor)

    def _module_layer(self, node: Node) -> int:
        """The numbered block of the model (`model.layers.3`, `h.0`) a node comes from, by its location."""
        found = _BLOCK.match(node.loc or "")
        name = found.group(1) if found else "(outside numbered blocks)"
        if name not in self.layer_names:
            self.layer_names.append(name)
        return self.layer_names.index(name)

    def _with_recompute(self, candidate: memory_plan.Candidate) -> memory_plan.Candidate:
        """The candidate with its recomputation, if its storage is made by one pure op over saved
        values that the backward still holds when it first needs this one."""
        root = self.groups[candidate.name][0]
        producer = root.producer
        if not producer.op.startswith("core.") or NOT_RECOMPUTABLE.search(producer.op) or not op_def(producer.op).pure:
            return candidate
        needs = []
        for operand in producer.operands:
            if operand not in self.saved:
                return candidate
            readers = self.backward_readers.get(self.backward.inputs[self.saved.index(operand)], [])
            if storage_root(operand).producer is not None and \
                    (not readers or self.offset + readers[-1] < candidate.first_backward_use):
                return candidate  # recomputing would hold it longer than the backward does
            if storage_root(operand).name in self.groups:
                needs.append(storage_root(operand).name)
        return dataclasses.replace(candidate, recompute_flops=node_flops(producer), recompute_needs=tuple(needs))

    # -- what the plan cannot change
    def _base(self, saved_from: int) -> list[int]:
        candidate_roots = {root for root, _ in self.groups.values()}
        forward = profile(self.forward, storage_lifetimes(self.forward, inputs=False), candidate_roots)
        held = _caller_held_bytes(self.forward, saved_from)
        lifetimes = storage_lifetimes(self.backward)
        outside = {self.backward.inputs[index] for _, members in self.groups.values() for index, _ in members}
        # saved parameters and inputs were not made by the step: the accounting does not count them
        outside |= {self.backward.inputs[i] for i, value in enumerate(self.saved) if storage_root(value).producer is None}
        backward = [live + held for live in profile(self.backward, lifetimes, outside)]
        return forward + backward

    def _windows(self) -> dict[int, float]:
        """Compute seconds each copy can hide behind: an offload's forward layer, and the backward
        from a prefetch's anchor to the next anchor."""
        windows: dict[int, float] = {}
        for index, node in enumerate(self.forward.nodes):
            windows[self.forward_layer[index]] = windows.get(self.forward_layer[index], 0.0) + node_flops(node)
        anchors = [i for i, node in enumerate(self.backward.nodes) if is_attention(node)]
        for start, end in zip([0] + anchors, anchors + [len(self.backward.nodes)]):
            windows[-1 - start] = sum(node_flops(node) for node in self.backward.nodes[start:end])
        return {window: flops / self.flop_rate for window, flops in windows.items()}

    def choices(self, plan: memory_plan.Plan) -> list[Choice]:
        chosen = []
        for candidate in self.candidates:
            option = plan.choice[candidate.name]
            if option != memory_plan.KEEP:
                root, members = self.groups[candidate.name]
                chosen.append(Choice.build(option, root, members, self.saved))
        return chosen


def _layers(graph: Graph) -> list[int]:
    """Per node, how many attention ops come before it (the layer it belongs to, roughly)."""
    layers, seen = [], 0
    for node in graph.nodes:
        layers.append(seen)
        seen += is_attention(node)
    return layers


def _caller_held_bytes(forward: Graph, saved_from: int) -> int:
    """Bytes of the forward's user outputs, which the caller holds through the backward."""
    roots = {id(r): r for r in map(storage_root, forward.output_values()[:saved_from]) if r.producer is not None}
    return sum(tensor_bytes(root) for root in roots.values())


@dataclass(frozen=True)
class ApplyPlan(Pass):
    """Writes one half of a `StepPlan` (`half` = forward or backward), so the pipeline verifies,
    stamps and dumps it like any pass."""

    name = "activation-memory"
    step: StepPlan = None  # type: ignore[assignment]
    half: str = "forward"

    def run(self, graph: Graph) -> PassResult:
        return self.step.apply_forward(graph) if self.half == "forward" else self.step.apply_backward(graph)
