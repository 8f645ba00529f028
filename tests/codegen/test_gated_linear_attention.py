"""GLA and delta-rule kernels and chunked references against the float64 token-by-token recurrence.

Without a GPU the kernels run under Triton's interpreter (tests/conftest.py turns it on), so
shapes are small: kernel chunk 16, N in {7, 16, 40} (7 and 40 are not multiples of the chunk).
Every gradient is checked: q, k, v, the gate (log_gate / beta) and the initial state.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from seqweave.codegen.triton.gated_linear_attention import (delta_rule, delta_rule_backward,  # noqa: E402
                                                            delta_rule_forward, gla, gla_backward, gla_forward)
from seqweave.codegen.triton.jit import interpreter_active  # noqa: E402
from seqweave.ir.ops.gated_linear_reference import (delta_rule_chunked, delta_rule_recurrent,  # noqa: E402
                                                    gla_chunked, gla_recurrent)

DEVICE = "cuda" if torch.cuda.is_available() and not interpreter_active() else "cpu"
if DEVICE == "cpu" and not interpreter_active():
    pytest.skip("no GPU and Triton's interpreter is off (set TRITON_INTERPRET=1)", allow_module_level=True)

CHUNK = 16
FP32_TOL = 1e-5           # max error / max |reference|, against fp64
LOW_PRECISION_FACTOR = 2  # kernels within 2x the error of plain PyTorch at the same precision
LOW_PRECISION_FLOOR = 1e-4  # relative; only matters where plain PyTorch is exact
NAMES = ("o", "final_state", "dq", "dk", "dv", "d_gate", "d_initial_state")

# Each op: its kernels (forward, backward), the recurrence, the chunked torch form, the gate maker.
OPS = {
    "gla": (gla_forward, gla_backward, gla_recurrent, gla_chunked, gla),
    "delta": (delta_rule_forward, delta_rule_backward, delta_rule_recurrent, delta_rule_chunked, delta_rule),
}


def _gate(op, gen, b, h, n, d, strength=2.0):
    """GLA: log forget gates from logsigmoid (mild and steep channels); delta rule: beta in (0, 1)."""
    if op == "gla":
        return F.logsigmoid(torch.randn(b, h, n, d, generator=gen) * strength + 1.0)
    return torch.sigmoid(torch.randn(b, h, n, generator=gen))


def _problem(op, b, h, n, d, dv, *, state, seed=0, strided=False):
    """fp32 operands on DEVICE: q, k, v, gate (log_gate or beta), initial state (or None), d_o, d_final_state.

    The delta rule gets L2-normalised keys, as DeltaNet uses it (beta ||k||^2 < 2 keeps it stable)."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    if strided:  # [B, N, H, D] memory viewed as [B, H, N, D], as projections produce it
        q, k, v = (rand(b, n, h, x).transpose(1, 2) for x in (d, d, dv))
    else:
        q, k, v = rand(b, h, n, d) * d ** -0.5, rand(b, h, n, d), rand(b, h, n, dv)
    if op == "delta":
        k = F.normalize(k, dim=-1)
    s0 = rand(b, h, d, dv) if state else None
    tensors = (q, k, v, _gate(op, gen, b, h, n, d), s0, rand(b, h, n, dv), rand(b, h, d, dv))
    return tuple(None if t is None else t.to(DEVICE) for t in tensors)


def _with_grads(fn, q, k, v, gate, s0, do, dsn, dtype):
    """Forward and backward of `fn` (autograd-differentiable) in `dtype`: o, final, dq, dk, dv, dgate, ds0."""
    leaves = [x.detach().to(dtype).requires_grad_() for x in (q, k, v, gate)]
    state = None if s0 is None else s0.detach().to(dtype).requires_grad_()
    o, final = fn(*leaves, state)
    torch.autograd.backward((o, final), (do.to(o.dtype), dsn.to(final.dtype)))
    return o, final, *(x.grad for x in leaves), None if state is None else state.grad


def _reference(op, *problem):
    """The independent truth: autograd through the fp64 recurrence."""
    return _with_grads(OPS[op][2], *problem, torch.float64)


def _kernel(op, q, k, v, gate, s0, do, dsn, **knobs):
    forward, backward = OPS[op][:2]
    o, final = forward(q, k, v, gate, s0, chunk=CHUNK, **knobs)
    if op == "delta":  # the delta rule's backward is torch autograd: it has no Dv blocks
        knobs.pop("block_dv", None)
    return (o, final) + backward(do.to(q.dtype), q, k, v, gate, s0, dsn, chunk=CHUNK, **knobs)


def _errors(got, want) -> dict[str, float]:
    """Max abs error of each output relative to the reference's largest magnitude."""
    errors = {}
    for name, a, b in zip(NAMES, got, want, strict=True):
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.shape == b.shape, name
            errors[name] = ((a.double() - b).abs().max() / b.abs().max()).item()
    return errors


FP32_CASES = [  # b, h, n, d, dv, state, knobs
    pytest.param(1, 2, 16, 16, 16, False, {}, id="one-chunk"),
    pytest.param(2, 1, 40, 24, 32, True, {"block_dv": 16}, id="ragged-state-dv-split"),
    pytest.param(1, 2, 7, 16, 24, True, {}, id="shorter-than-chunk"),
]


@pytest.mark.parametrize("op", ["gla", "delta"])
@pytest.mark.parametrize("b,h,n,d,dv,state,knobs", FP32_CASES)
def test_fp32_kernels_match_fp64_recurrence(op, b, h, n, d, dv, state, knobs):
    problem = _problem(op, b, h, n, d, dv, state=state)
    errors = _errors(_kernel(op, *problem, **knobs), _reference(op, *problem))
    assert len(errors) == (7 if state else 6)
    assert max(errors.values()) < FP32_TOL, errors


@pytest.mark.parametrize("op", ["gla", "delta"])
def test_fp32_strided_inputs(op):
    problem = _problem(op, 1, 2, 40, 16, 16, state=True, strided=True, seed=1)
    assert not problem[0].is_contiguous()
    errors = _errors(_kernel(op, *problem), _reference(op, *problem))
    assert max(errors.values()) < FP32_TOL, errors


def test_gla_steep_gates_do_not_overflow():
    """log gates of -30 to -60 per token: e^-G over a chunk would be e^960 (inf in fp32, NaN
    after 0 * inf). The kernels and the chunked form only ever exponentiate differences <= 0.

    The tolerance is not FP32_TOL: G_i - G_j is a difference of fp32 cumulative sums of up to
    chunk * 60, so it carries an absolute error of about |G| eps, and so does e^(G_i - G_j) relatively.
    """
    q, k, v, _, s0, do, dsn = _problem("gla", 1, 2, 40, 16, 16, state=True, seed=2)
    gate = -torch.rand(q.shape, generator=torch.Generator().manual_seed(2)).to(DEVICE) * 30 - 30
    gate[:, :, ::5] = -1e-3  # some near-1 gates, so the state still carries something across tokens
    problem = (q, k, v, gate, s0, do, dsn)
    want = _reference("gla", *problem)
    chunked = lambda *args: gla_chunked(*args, chunk=CHUNK)  # noqa: E731
    cumulative_error = CHUNK * gate.abs().max().item() * torch.finfo(torch.float32).eps
    for got in (_kernel("gla", *problem), _with_grads(chunked, *problem, torch.float32)):
        assert all(bool(torch.isfinite(x).all()) for x in got), "overflow"
        errors = _errors(got, want)
        assert max(errors.values()) < 2 * cumulative_error, (errors, cumulative_error)
    mild = _problem("gla", 1, 2, 40, 16, 16, state=True, seed=2)  # the same check can fail: FP32_TOL there
    assert max(_errors(_kernel("gla", *mild), _reference("gla", *mild)).values()) < FP32_TOL


def _low_precision_check(op, dtype, problem):
    q, k, v, gate, s0, do, dsn = problem
    rounded = (q.to(dtype), k.to(dtype), v.to(dtype), gate.to(dtype), s0, do.to(dtype), dsn)
    want = _reference(op, *rounded)  # same rounded inputs: only the arithmetic differs
    plain = _errors(_with_grads(OPS[op][2], *rounded, dtype), want)
    got = _errors(_kernel(op, *rounded), want)
    for name, error in got.items():
        assert error <= LOW_PRECISION_FACTOR * plain[name] + LOW_PRECISION_FLOOR, (name, got, plain)
    return got


@pytest.mark.parametrize("op", ["gla", "delta"])
def test_fp16_within_twice_plain_pytorch(op):
    got = _low_precision_check(op, torch.float16, _problem(op, 1, 2, 40, 24, 16, state=True, seed=3))
    assert got["o"] > 0  # the fp16 path really ran in fp16


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="bf16 is wrong under the interpreter; GPU only")
@pytest.mark.parametrize("op", ["gla", "delta"])
def test_bf16_within_twice_plain_pytorch(op):
    _low_precision_check(op, torch.bfloat16, _problem(op, 2, 4, 300, 64, 64, state=True, seed=4))


@pytest.mark.parametrize("op", ["gla", "delta"])
@pytest.mark.parametrize("state,chunk", [(True, 16), (False, 7), (True, 64)])
def test_torch_chunked_matches_recurrence(op, state, chunk):
    problem = _problem(op, 2, 2, 40, 24, 16, state=state, seed=5)
    chunked = lambda *args: OPS[op][3](*args, chunk=chunk)  # noqa: E731
    errors = _errors(_with_grads(chunked, *problem, torch.float64), _reference(op, *problem))
    assert max(errors.values()) < 1e-12, errors


@pytest.mark.parametrize("op", ["gla", "delta"])
def test_state_passing_composes(op):
    """Two segments chained through (initial_state, final_state) equal one run, forward and backward."""
    problem = _problem(op, 1, 2, 40, 16, 16, state=True, seed=6)
    split, whole = 19, _reference(op, *problem)
    q, k, v, gate, s0, do, dsn = problem
    first, second = (tuple(x[:, :, part] for x in (q, k, v, gate)) for part in (slice(None, split),
                                                                                  slice(split, None)))
    forward, backward = OPS[op][:2]
    o1, mid = forward(*first, s0, chunk=CHUNK)
    o2, final = forward(*second, mid, chunk=CHUNK)
    grads2 = backward(do[:, :, split:], *second, mid, dsn, chunk=CHUNK)
    grads1 = backward(do[:, :, :split], *first, s0, grads2[4], chunk=CHUNK)
    chained = (torch.cat([o1, o2], 2), final, *(torch.cat([a, b], 2) for a, b in zip(grads1[:4], grads2[:4])),
               grads1[4])
    errors = _errors(chained, whole)  # d log_gate of the first segment reaches it through d_mid too
    assert len(errors) == 7 and max(errors.values()) < FP32_TOL, errors


@pytest.mark.parametrize("op", ["gla", "delta"])
def test_uses_the_kernels_when_asked(op, monkeypatch):
    problem = _problem(op, 1, 2, 40, 16, 16, state=True, seed=7)
    want, kernel_grad = _reference(op, *problem), {"gla": "_GatedLinearAttentionBackward",
                                                   "delta": "_DeltaRuleBackward"}[op]
    monkeypatch.setenv("SEQWEAVE_TRITON_INTERPRET", "1")
    got = _with_grads(OPS[op][4], *problem, torch.float32)
    assert type(got[0].grad_fn).__name__ == kernel_grad
    assert max(_errors(got, want).values()) < FP32_TOL
    doubles = _with_grads(OPS[op][4], *problem, torch.float64)  # no fp64 kernel: torch path
    assert type(doubles[0].grad_fn).__name__ != kernel_grad
    assert max(_errors(doubles, want).values()) < 1e-12


@pytest.mark.parametrize("op", ["gla", "delta"])
def test_without_interpreter_runs_torch(op, monkeypatch):
    if DEVICE == "cuda":
        pytest.skip("CUDA tensors always use the kernels")
    monkeypatch.delenv("SEQWEAVE_TRITON_INTERPRET", raising=False)
    problem = _problem(op, 1, 2, 20, 16, 16, state=False, seed=8)
    got = _with_grads(OPS[op][4], *problem, torch.float32)
    assert type(got[0].grad_fn).__name__ not in ("_GatedLinearAttentionBackward", "_DeltaRuleBackward")
    assert max(_errors(got, _reference(op, *problem)).values()) < FP32_TOL


def _bad(op, name):
    q, k, v, gate, s0, _, _ = _problem(op, 1, 2, 20, 16, 16, state=True)
    cases = {
        "q-k-shape": ((q, k[:, :, :10], v, gate, s0), "same shape"),
        "rank": ((q[0], k[0], v[0], gate, s0), "4-D"),
        "state-shape": ((q, k, v, gate, s0[..., :8]), r"initial_state must be .*\[B, H, D, Dv\]"),
        "gate-shape": ((q, k, v, gate[:, :, :10], s0),
                       r"log_gate must be .*shaped like q" if op == "gla" else r"beta must be .*\[B, H, N\]"),
        "gate-device": ((q, k, v, gate.to("meta"), s0), "is on meta but q is on"),
    }
    if op == "gla":
        cases["positive-gate"] = ((q, k, v, -gate, s0), "finite and <= 0")
        cases["infinite-gate"] = ((q, k, v, gate.masked_fill(gate < -1, -torch.inf), s0), "finite and <= 0")
    return cases[name]


BAD_CASES = [(op, name) for op in OPS for name in ("q-k-shape", "rank", "state-shape", "gate-shape", "gate-device")]
BAD_CASES += [("gla", "positive-gate"), ("gla", "infinite-gate")]


@pytest.mark.parametrize("op,name", BAD_CASES)
@pytest.mark.parametrize("which", [2, 3, 0, 4])  # recurrent, chunked, kernel forward, differentiable op
def test_bad_inputs_name_the_problem(op, name, which):
    args, message = _bad(op, name)
    with pytest.raises(ValueError, match=message):
        OPS[op][which](*args)


@pytest.mark.parametrize("op", ["gla", "delta"])
def test_kernel_limits_are_clear(op):
    forward, backward = OPS[op][:2]
    q, k, v, gate, s0, do, dsn = _problem(op, 1, 2, 20, 16, 16, state=True)
    with pytest.raises(ValueError, match="chunk must be a power of two"):
        forward(q, k, v, gate, chunk=24)
    with pytest.raises(ValueError, match="fp32, fp16 or bf16"):
        forward(q.double(), k.double(), v.double(), gate)
    with pytest.raises(ValueError, match="d_final_state"):
        backward(do, q, k, v, gate, s0, dsn[..., :8])
    with pytest.raises(ValueError, match="d_o .* must match v"):
        backward(do.half(), q, k, v, gate, s0, dsn)
