"""`seqweave explain --budget`: the activation-memory plan of one training step, per layer.

The step is captured (compiled, not run: `capture_only`) with the budget, on `world` ranks,
and the plan the backend made is read back: per layer, the bytes kept, offloaded,
recomputed and stored in 8 bits, and for the step the bytes moved, the FLOPs recomputed,
the predicted extra time and the peak against the plan-free one.
"""
from __future__ import annotations

from typing import Any

import torch

from seqweave.capture_only import capture
from seqweave.config import CompileOptions, Mesh
from seqweave.errors import OptionError, find_seqweave_error
from seqweave.passes import memory_plan
from seqweave.passes.activation_memory import StepPlan


def plan_by_layer(step: StepPlan) -> list[dict[str, Any]]:
    """One row per layer that saves something: bytes under each option and FLOPs recomputed."""
    rows: dict[int, dict[str, Any]] = {}
    for candidate in step.candidates:
        option = step.plan.choice[candidate.name]
        row = rows.setdefault(candidate.layer, {"layer": step.layer_names[candidate.layer],
                                                **{o: 0 for o in memory_plan.OPTIONS}, "recompute_flops": 0.0})
        row[option] += candidate.nbytes
        if option == memory_plan.RECOMPUTE:
            row["recompute_flops"] += candidate.recompute_flops or 0.0
    return [rows[layer] for layer in sorted(rows)]


def step_totals(step: StepPlan) -> dict[str, Any]:
    return {"budget_bytes": step.budget, "plan_free_peak_bytes": step.plan_free_peak,
            "planned_peak_bytes": step.plan.peak_bytes, "bytes_moved": step.plan.bytes_moved,
            "recompute_flops": step.plan.recompute_flops, "predicted_extra_seconds": step.plan.predicted_seconds}


def explain_memory(model: torch.nn.Module, inputs: Any, budget: str | float | int, world: int = 1,
                   quantize: bool = False) -> dict[str, Any]:
    """Capture a training step of `model(**inputs)` under `budget` and report its plan."""
    options = CompileOptions(mesh=Mesh(sp=world), memory_budget=budget, memory_quantize=quantize)
    try:
        backend = capture(model, inputs, options, training=True)
    except Exception as error:  # dynamo wraps the backend's errors: say ours as they are
        found = find_seqweave_error(error)
        if found is None:
            raise
        raise found from None
    if not backend.memory_plans:
        raise OptionError("no training step was planned: the model's forward saves nothing for a backward",
                          hint="explain --budget needs a model whose output has a gradient (e.g. inputs with labels)")
    step = backend.memory_plans[0]
    return {"world": world, "layers": plan_by_layer(step), "totals": step_totals(step)}
