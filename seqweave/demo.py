"""`seqweave demo`: built-in models through the backend, forward and backward, against eager."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from seqweave.compiler import SeqweaveBackend
from seqweave.testing.compare import Comparison, compare_with_eager
from seqweave.testing.models import SampleSpec, build_sample

#: fp32 agreement the foundation promises (max |Δ| for logits, max |Δ|/max|grad| per parameter).
TOLERANCE = 1e-5

DEMO_CASES: tuple[SampleSpec, ...] = (
    SampleSpec("llama-tiny"),
    SampleSpec("llama-tiny", attn_implementation="eager", padded=True),
    SampleSpec("llama-tiny", packed=True),
    SampleSpec("qwen2-tiny", padded=True),
    SampleSpec("mistral-tiny"),
    SampleSpec("gpt2-tiny", attn_implementation="eager"),
)


@dataclass(frozen=True)
class DemoRow:
    spec: SampleSpec
    attention: str            # "found/total"
    mask: str
    comparison: Comparison

    @property
    def passed(self) -> bool:
        c = self.comparison
        return c.logits_max_abs <= TOLERANCE and c.grad_max_rel <= TOLERANCE and self.attention.split("/")[0] != "0"

    @property
    def variant(self) -> str:
        extras = [flag for flag, on in (("padded", self.spec.padded), ("packed", self.spec.packed)) if on]
        return " ".join([self.spec.attn_implementation, *extras])


def run_case(spec: SampleSpec) -> DemoRow:
    torch._dynamo.reset()  # every case compiles from scratch (and stays under dynamo's recompile limit)
    model, inputs = build_sample(spec)
    backend = SeqweaveBackend()
    comparison = compare_with_eager(model, inputs, backend)
    found = sum(report.found for report in backend.reports)
    masks = sorted({report.mask for report in backend.reports if report.found})
    return DemoRow(spec, f"{found}/{len(backend.reports)}", ", ".join(masks), comparison)
