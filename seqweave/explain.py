"""`seqweave explain`: capture a model and say, per layer, what the frontend found."""
from __future__ import annotations

import copy
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

from seqweave.capture_only import capture
from seqweave.compiler import SeqweaveBackend
from seqweave.config import DEFAULT_PIPELINE, CompileOptions
from seqweave.errors import SeqweaveError
from seqweave.frontend.attention import AttentionReport
from seqweave.ir.mask_parser import parse_mask
from seqweave.ir.sharding import Layout, chunks_per_rank
from seqweave.ir.types import TensorType
from seqweave.passes.cost import lasp2_bytes
from seqweave.passes.manager import parse_pipeline
from seqweave.passes.shard_sequence import ShardSequence
from seqweave.passes.strategy import LayerShape, choose_strategy


@dataclass
class Explanation:
    """Per-attention reports and totals over the compiled graphs."""

    layers: list[dict[str, Any]]
    totals: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"layers": self.layers, "totals": self.totals}


def _totals(backend: SeqweaveBackend, model: torch.nn.Module) -> dict[str, Any]:
    nodes = Counter()
    for compiled in backend.graphs:
        nodes.update(node.op for node in compiled.graph.nodes)
    return {
        "graphs": [compiled.kind for compiled in backend.graphs],
        "nodes": sum(nodes.values()),
        "attention_found": sum(report.found for report in backend.reports),
        "attention_left_alone": sum(not report.found for report in backend.reports),
        "attn.sdpa": nodes["attn.sdpa"],
        "attn.linear": nodes["attn.linear"],
        "parameters": sum(p.numel() for p in model.parameters()),
        "top_ops": dict(nodes.most_common(8)),
        "largest_tensor": _largest_tensor(backend),
        "pass_ms": {run.name: round(run.millis, 2) for compiled in backend.graphs for run in compiled.passes},
    }


def _largest_tensor(backend: SeqweaveBackend) -> list[int]:
    """The shape of the biggest tensor any compiled graph computes or reads (an N×N mask shows here)."""
    shapes = [value.type.concrete_shape() for compiled in backend.graphs for value in compiled.graph.values()
              if isinstance(value.type, TensorType) and value.type.is_static()]
    return list(max(shapes, key=math.prod, default=()))


def strategy_for(report: AttentionReport, world: int, balance: str = "zigzag") -> dict[str, Any]:
    """The pick `attention="auto"` makes for one attention on `world` sequence-parallel ranks
    (the compiler calls the same chooser with the same inputs), with predicted bytes; linear
    attention always runs LASP-2."""
    if report.form == "linear":
        return _lasp2_for(report, world, balance)
    shape = LayerShape(report.batch, report.seq_len, report.q_heads, report.kv_heads, report.head_dim, world,
                       report.element_bytes)
    choice = choose_strategy(parse_mask(report.mask), shape, Layout(balance))
    predicted = choice.estimate.evaluate(**shape.values(choice.seq_len))
    return {"strategy": choice.estimate.strategy, "forward_bytes": predicted["forward_bytes"],
            "backward_bytes": predicted["backward_bytes"], "why": choice.reason}


def _lasp2_for(report: AttentionReport, world: int, balance: str) -> dict[str, Any]:
    shape = dict(batch=report.batch, heads=report.q_heads, head_dim=report.head_dim,
                 value_dim=report.value_dim or report.head_dim, world=world,
                 runs=chunks_per_rank(Layout(balance)), state_bytes=8 if report.element_bytes == 8 else 4)
    return {"strategy": "lasp2", "forward_bytes": int(lasp2_bytes(**shape)),
            "backward_bytes": int(lasp2_bytes(**shape, backward=True)),
            "why": "linear attention: one all-gather of d x Dv states per pass, independent of N (LASP-2)"}


def gathered_outputs(backend: SeqweaveBackend, seq_len: int, world: int) -> list[dict[str, Any]]:
    """Outputs with a sequence dim, which outputs="gathered" (the default) puts whole on every
    rank: their bytes, and whether one is the largest tensor a rank then holds (logits usually
    are: [B, N, vocab] against [B, N/P, hidden] activations)."""
    graph = next((c.graph for c in backend.graphs if c.kind == "inference"), None)
    if graph is None or world < 2:
        return []
    def per_rank(value: Any) -> int:
        shape = value.type.concrete_shape()
        whole = math.prod(shape) * value.type.dtype.itemsize
        return whole // world if seq_len in shape else whole
    outputs = [(index, v) for index, v in enumerate(graph.output_values())
               if isinstance(v.type, TensorType) and v.type.is_static() and seq_len in v.type.concrete_shape()]
    others = [per_rank(v) for v in graph.values() if isinstance(v.type, TensorType) and v.type.is_static()
              and all(v is not out for _, out in outputs)]
    largest = max(others, default=0)
    found = []
    for index, value in outputs:
        size = math.prod(value.type.concrete_shape()) * value.type.dtype.itemsize
        found.append({"output": index, "shape": list(value.type.concrete_shape()), "bytes": size,
                      "largest_per_rank": size >= largest})
    return found


def sharding_warnings(backend: SeqweaveBackend, seq_len: int, world: int, balance: str) -> list[str]:
    """What `shard-sequence` would say of the inference graph on `world` ranks: ops that would
    run on operands gathered whole (no rule for them), outputs gathered whole. Runs the pass on
    a copy; nothing is executed."""
    graph = next((c.graph for c in backend.graphs if c.kind == "inference"), None)
    if graph is None:
        return []
    try:
        result = ShardSequence(world=world, layout=balance, length=seq_len, attention="auto").run(copy.deepcopy(graph))
    except SeqweaveError as error:
        return [f"refused: {error}"]
    return list(result.warnings)


def rewritten_attention(backend: SeqweaveBackend) -> dict[int, dict[str, str]]:
    """Per attention layer index: the mask and positions it runs with after the pipeline."""
    graph = next((c.graph for c in backend.graphs if c.kind == "inference"), None)
    found = {}
    for node in graph.nodes if graph is not None else ():
        if node.op == "attn.sdpa":
            found[node.kwargs.get("layer", -1)] = {"mask": str(node.kwargs["mask"]),  # text, typed or not
                                                   "positions": str(node.kwargs.get("positions", "none"))}
    return found


def pipeline_semantics(pipeline: str) -> list[dict[str, str]]:
    """Each pass of `pipeline` with its options and what it declares it does (its docstring)."""
    return [{"pass": str(step), "semantics": " ".join((type(step).__doc__ or "").split())}
            for step in parse_pipeline(pipeline)]


def explain(model: torch.nn.Module, inputs: Any, world: int = 1, balance: str = "zigzag",
            pipeline: str = DEFAULT_PIPELINE) -> Explanation:
    """Capture (inference graph only) and compile without running; with `world` > 1, add the
    per-layer sequence-parallel strategy the cost model would choose. Each found attention
    says what it runs with after `pipeline` (`after`: mask and positions)."""
    backend = capture(model, inputs, CompileOptions(pipeline=pipeline))
    after = rewritten_attention(backend)
    layers, found = [], 0
    for report in backend.reports:
        layer = report.as_dict()
        layer["after"] = after.get(found) if report.found else None  # layer indices count found attentions
        found += report.found
        if world > 1 and report.found:
            layer["sp"] = strategy_for(report, world, balance)
        layers.append(layer)
    totals = _totals(backend, model)
    totals["pipeline"] = pipeline_semantics(pipeline)
    if world > 1 and backend.reports:
        seq_len = max(r.seq_len for r in backend.reports)
        totals["gathered_outputs"] = gathered_outputs(backend, seq_len, world)
        totals["sp_warnings"] = sharding_warnings(backend, seq_len, world, balance)
    return Explanation(layers, totals)
