"""`seqweave explain`: capture a model and say, per layer, what the frontend found."""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

from seqweave.capture_only import capture
from seqweave.compiler import SeqweaveBackend
from seqweave.frontend.attention import AttentionReport
from seqweave.ir.mask_parser import parse_mask
from seqweave.ir.sharding import Layout
from seqweave.ir.types import TensorType
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
    (the compiler calls the same chooser with the same inputs), with predicted bytes."""
    shape = LayerShape(report.batch, report.seq_len, report.q_heads, report.kv_heads, report.head_dim, world,
                       report.element_bytes)
    choice = choose_strategy(parse_mask(report.mask), shape, Layout(balance))
    predicted = choice.estimate.evaluate(**shape.values(choice.seq_len))
    return {"strategy": choice.estimate.strategy, "forward_bytes": predicted["forward_bytes"],
            "backward_bytes": predicted["backward_bytes"], "why": choice.reason}


def explain(model: torch.nn.Module, inputs: Any, world: int = 1, balance: str = "zigzag") -> Explanation:
    """Capture (inference graph only) and compile without running; with `world` > 1, add the
    per-layer sequence-parallel strategy the cost model would choose."""
    backend = capture(model, inputs)
    layers = []
    for report in backend.reports:
        layer = report.as_dict()
        if world > 1 and report.found:
            layer["sp"] = strategy_for(report, world, balance)
        layers.append(layer)
    return Explanation(layers, _totals(backend, model))
