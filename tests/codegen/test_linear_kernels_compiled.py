"""A compiled linear-attention model runs the generated Triton kernels (under the interpreter
on CPU) for its `attn.linear` ops, forward and backward, for decay, GLA and delta-rule
layers, and stays within 1e-5 of float64 eager."""
from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("triton")

import seqweave  # noqa: E402
from seqweave.codegen.triton import gated_linear_attention, linear_attention  # noqa: E402
from seqweave.codegen.triton.jit import interpreter_active  # noqa: E402
from seqweave.testing.linear_models import DecayAttention, DeltaAttention, GatedAttention  # noqa: E402

if not torch.cuda.is_available() and not interpreter_active():
    pytest.skip("no GPU and Triton's interpreter is off (set TRITON_INTERPRET=1)", allow_module_level=True)

KERNELS = {DecayAttention: (linear_attention, "linear_attention"),
           GatedAttention: (gated_linear_attention, "gla"),
           DeltaAttention: (gated_linear_attention, "delta_rule")}


@pytest.mark.parametrize("mixer", list(KERNELS), ids=lambda m: m.__name__)
def test_compiled_linear_layers_run_the_generated_kernels(mixer, monkeypatch):
    monkeypatch.setenv("SEQWEAVE_TRITON_INTERPRET", "1")
    module, prefix = KERNELS[mixer]
    calls = []
    for phase in ("forward", "backward"):
        name = f"{prefix}_{phase}"
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _o=original, _n=name, **k: calls.append(_n) or _o(*a, **k))
    torch.manual_seed(0)
    model = mixer(32, 2)
    reference = copy.deepcopy(model).double()
    x = torch.randn(1, 21, 32)
    got = torch.compile(model, backend=seqweave.backend(), fullgraph=True)(x)
    want = reference(x.double())
    dout = torch.randn_like(want)
    got.backward(dout.float())
    want.backward(dout)
    assert sorted(set(calls)) == [f"{prefix}_backward", f"{prefix}_forward"]
    assert float((got.detach().double() - want.detach()).abs().max() / want.detach().abs().max()) < 1e-5
    for p, q in zip(model.parameters(), reference.parameters()):
        assert float((p.grad.double() - q.grad).abs().max() / q.grad.abs().max()) < 1e-5
