"""Check a compiled model against eager: logits, loss and every parameter gradient.

Errors are measured where the output is defined: padded query positions (attention_mask
== 0) have no visible key, so eager's value there is an artefact of its mask arithmetic.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch


@dataclass(frozen=True)
class Comparison:
    """Numbers from one compiled-vs-eager run (fp32 unless the model says otherwise)."""

    logits_max_abs: float
    loss_abs: float
    grad_max_rel: float       # max over parameters of max|Δgrad| / max|grad|
    worst_param: str
    compile_s: float          # first compiled call: capture, passes, lowering and one run
    time_ratio: float         # steady-state compiled step time / eager step time


def _valid_positions(inputs: dict[str, Any], logits: torch.Tensor) -> torch.Tensor:
    mask = inputs.get("attention_mask")
    return mask.bool() if mask is not None else torch.ones(logits.shape[:2], dtype=torch.bool)


def _step(model: Callable, inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, float]:
    start = time.perf_counter()
    output = model(**inputs)
    output.loss.backward()
    return output.logits.detach(), output.loss.detach(), time.perf_counter() - start


def grad_errors(model: torch.nn.Module, reference: torch.nn.Module) -> tuple[float, str]:
    """The worst relative gradient error over all parameters, and which parameter it was; a
    gradient present on one side only is an infinite error."""
    worst, name = 0.0, ""
    reference_params = dict(reference.named_parameters())
    for param_name, param in model.named_parameters():
        expected = reference_params[param_name].grad
        if expected is None and param.grad is None:
            continue
        if expected is None or param.grad is None:  # a gradient on one side only is a wrong answer
            return float("inf"), f"{param_name} (grad is None on one side only)"
        scale = expected.abs().max().clamp_min(1e-30)
        error = float((param.grad - expected).abs().max() / scale)
        if error > worst:
            worst, name = error, param_name
    return worst, name


def compare_with_eager(model: torch.nn.Module, inputs: dict[str, Any], backend: Any) -> Comparison:
    """Compile `model` with `backend` (fullgraph) and run one training step beside an eager copy."""
    reference = copy.deepcopy(model)
    compiled = torch.compile(model, backend=backend, fullgraph=True, dynamic=False)
    logits, loss, compile_s = _step(compiled, inputs)
    ref_logits, ref_loss, _ = _step(reference, inputs)
    valid = _valid_positions(inputs, logits)
    grad_max_rel, worst = grad_errors(model, reference)
    steady, eager = _best_of(compiled, model, inputs), _best_of(reference, reference, inputs)
    return Comparison(float((logits - ref_logits)[valid].abs().max()), float((loss - ref_loss).abs()),
                      grad_max_rel, worst, compile_s, steady / eager)


def _best_of(step_model: Callable, params_of: torch.nn.Module, inputs: dict[str, Any], repeats: int = 5) -> float:
    """Fastest of a few extra steps (gradients are zeroed first; the comparison is already taken)."""
    times = []
    for _ in range(repeats):
        params_of.zero_grad(set_to_none=True)
        times.append(_step(step_model, inputs)[2])
    return min(times)
