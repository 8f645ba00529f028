"""`seqweave explain`: capture a model and say, per layer, what the frontend found."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

from seqweave.compiler import SeqweaveBackend
from seqweave.targets import call_model


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
        "pass_ms": {run.name: round(run.millis, 2) for compiled in backend.graphs for run in compiled.passes},
    }


def explain(model: torch.nn.Module, inputs: Any) -> Explanation:
    """Compile (inference graph only) and run once so that dynamo hands us the graph."""
    backend = SeqweaveBackend()
    compiled = torch.compile(model, backend=backend, fullgraph=True, dynamic=False)
    with torch.no_grad():
        call_model(compiled, inputs)
    return Explanation([report.as_dict() for report in backend.reports], _totals(backend, model))
