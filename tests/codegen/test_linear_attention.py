"""Chunked linear attention kernels against the float64 token-by-token recurrence.

Without a GPU the kernels run under Triton's interpreter (tests/conftest.py turns it on), so
shapes are small: chunk 16, N in {7, 16, 40, 67} (most not multiples of the chunk).
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from seqweave.codegen.triton.jit import interpreter_active  # noqa: E402
from seqweave.codegen.triton.linear_attention import (linear_attention, linear_attention_backward,  # noqa: E402
                                                      linear_attention_forward)
from seqweave.ir.ops.linear_attn_reference import (linear_attention_chunked,  # noqa: E402
                                                   linear_attention_recurrent)

DEVICE = "cuda" if torch.cuda.is_available() and not interpreter_active() else "cpu"
if DEVICE == "cpu" and not interpreter_active():
    pytest.skip("no GPU and Triton's interpreter is off (set TRITON_INTERPRET=1)", allow_module_level=True)

CHUNK = 16
FP32_TOL = 1e-5           # max error / max |reference|, against fp64
LOW_PRECISION_FACTOR = 2  # kernels within 2x the error of plain PyTorch at the same precision
LOW_PRECISION_FLOOR = 1e-4  # relative; only matters where plain PyTorch is exact
NAMES = ("o", "final_state", "dq", "dk", "dv", "d_initial_state")


def _problem(b, h, n, d, dv, *, decay, state, seed=0, strided=False):
    """fp32 operands on DEVICE: q, k, v, decay (or None), initial state (or None), d_o, d_final_state."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    if strided:  # [B, N, H, D] memory viewed as [B, H, N, D], as projections produce it
        q, k, v = (rand(b, n, h, x).transpose(1, 2) for x in (d, d, dv))
    else:
        q, k, v = rand(b, h, n, d) * d ** -0.5, rand(b, h, n, d), rand(b, h, n, dv)
    log_decay = torch.linspace(0.02, 3.0, h) if decay else None  # one gentle, one steep head
    s0 = rand(b, h, d, dv) if state else None
    tensors = (q, k, v, log_decay, s0, rand(b, h, n, dv), rand(b, h, d, dv))
    return tuple(None if t is None else t.to(DEVICE) for t in tensors)


def _with_grads(fn, q, k, v, decay, s0, do, dsn, dtype):
    """Forward and backward of `fn` (an autograd-differentiable implementation) in `dtype`."""
    leaves = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
    state = None if s0 is None else s0.detach().to(dtype).requires_grad_()
    o, final = fn(*leaves, None if decay is None else decay.to(dtype), state)
    torch.autograd.backward((o, final), (do.to(o.dtype), dsn.to(final.dtype)))
    return o, final, *(x.grad for x in leaves), None if state is None else state.grad


def _reference(q, k, v, decay, s0, do, dsn):
    """The independent truth: autograd through the fp64 recurrence."""
    return _with_grads(linear_attention_recurrent, q, k, v, decay, s0, do, dsn, torch.float64)


def _kernel(q, k, v, decay, s0, do, dsn, **knobs):
    o, final = linear_attention_forward(q, k, v, decay, s0, chunk=CHUNK, **knobs)
    return (o, final) + linear_attention_backward(do.to(q.dtype), q, k, v, decay, s0, dsn, chunk=CHUNK, **knobs)


def _errors(got, want) -> dict[str, float]:
    """Max abs error of each output relative to the reference's largest magnitude."""
    errors = {}
    for name, a, b in zip(NAMES, got, want):
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.shape == b.shape, name
            errors[name] = ((a.double() - b).abs().max() / b.abs().max().clamp(min=1.0)).item()
    return errors


FP32_CASES = [  # b, h, n, d, dv, decay, state, knobs
    pytest.param(1, 2, 16, 16, 16, False, False, {}, id="one-chunk"),
    pytest.param(2, 2, 40, 24, 32, True, True, {"block_dv": CHUNK}, id="decay-state-dv-split"),
    pytest.param(1, 2, 67, 16, 16, True, False, {}, id="decay-ragged"),
    pytest.param(1, 2, 67, 24, 16, False, True, {}, id="state-ragged"),
    pytest.param(1, 2, 7, 16, 32, True, True, {}, id="shorter-than-chunk"),
]


@pytest.mark.parametrize("b,h,n,d,dv,decay,state,knobs", FP32_CASES)
def test_fp32_matches_fp64_recurrence(b, h, n, d, dv, decay, state, knobs):
    problem = _problem(b, h, n, d, dv, decay=decay, state=state)
    errors = _errors(_kernel(*problem, **knobs), _reference(*problem))
    assert len(errors) == (6 if state else 5)
    assert max(errors.values()) < FP32_TOL, errors


def test_fp32_strided_inputs():
    problem = _problem(1, 2, 40, 16, 16, decay=True, state=True, strided=True)
    assert not problem[0].is_contiguous()
    errors = _errors(_kernel(*problem), _reference(*problem))
    assert max(errors.values()) < FP32_TOL, errors


def _low_precision_check(dtype, problem):
    q, k, v, decay, s0, do, dsn = problem
    rounded = (q.to(dtype), k.to(dtype), v.to(dtype), decay, s0, do.to(dtype), dsn)
    want = _reference(*rounded)  # same rounded inputs: only the arithmetic differs
    plain = _errors(_with_grads(linear_attention_recurrent, *rounded, dtype), want)
    got = _errors(_kernel(*rounded), want)
    for name, error in got.items():
        assert error <= LOW_PRECISION_FACTOR * plain[name] + LOW_PRECISION_FLOOR, (name, got, plain)
    return got


@pytest.mark.parametrize("decay,state,n", [(True, True, 67), (False, False, 40)])
def test_fp16_within_twice_plain_pytorch(decay, state, n):
    got = _low_precision_check(torch.float16, _problem(1, 2, n, 24, 16, decay=decay, state=state, seed=1))
    assert got["o"] > 0  # the fp16 path really ran in fp16


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="bf16 is wrong under the interpreter; GPU only")
def test_bf16_within_twice_plain_pytorch():
    _low_precision_check(torch.bfloat16, _problem(2, 4, 300, 64, 64, decay=True, state=True, seed=2))


def _halves(q, k, v, decay, split):
    return [tuple(x[:, :, part] for x in (q, k, v)) + (decay,) for part in (slice(None, split), slice(split, None))]


def test_state_passing_composes():
    """Two segments chained through (initial_state, final_state) equal one run: forward
    states go right, d_initial_state goes left, as sequence parallelism (LASP-2) chains ranks."""
    q, k, v, decay, s0, do, dsn = _problem(1, 2, 40, 16, 16, decay=True, state=True, seed=3)
    split = 19
    (q1, k1, v1, _), (q2, k2, v2, _) = _halves(q, k, v, decay, split)
    o1, mid = linear_attention_forward(q1, k1, v1, decay, s0, chunk=CHUNK)
    o2, final = linear_attention_forward(q2, k2, v2, decay, mid, chunk=CHUNK)
    grads2 = linear_attention_backward(do[:, :, split:], q2, k2, v2, decay, mid, dsn, chunk=CHUNK)
    grads1 = linear_attention_backward(do[:, :, :split], q1, k1, v1, decay, s0, grads2[3], chunk=CHUNK)
    chained = (torch.cat([o1, o2], 2), final, *(torch.cat([a, b], 2) for a, b in zip(grads1[:3], grads2[:3])),
               grads1[3])
    whole = _kernel(q, k, v, decay, s0, do, dsn)
    for name, a, b in zip(NAMES, chained, whole):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
    assert max(_errors(chained, _reference(q, k, v, decay, s0, do, dsn)).values()) < FP32_TOL


@pytest.mark.parametrize("decay,state,chunk", [(True, True, 16), (False, True, 7), (True, False, 64)])
def test_torch_chunked_matches_recurrence(decay, state, chunk):
    problem = _problem(2, 2, 67, 24, 16, decay=decay, state=state, seed=4)
    chunked = lambda *args: linear_attention_chunked(*args, chunk=chunk)  # noqa: E731
    errors = _errors(_with_grads(chunked, *problem, torch.float64), _reference(*problem))
    assert max(errors.values()) < 1e-12, errors


def test_linear_attention_uses_the_kernels_when_asked(monkeypatch):
    problem = _problem(1, 2, 40, 16, 16, decay=True, state=True, seed=5)
    want = _reference(*problem)
    monkeypatch.setenv("SEQWEAVE_TRITON_INTERPRET", "1")
    got = _with_grads(linear_attention, *problem, torch.float32)
    assert type(got[0].grad_fn).__name__ == "_LinearAttentionBackward"
    assert max(_errors(got, want).values()) < FP32_TOL
    doubles = _with_grads(linear_attention, *problem, torch.float64)  # no fp64 kernel: torch path
    assert type(doubles[0].grad_fn).__name__ != "_LinearAttentionBackward"
    assert max(_errors(doubles, want).values()) < 1e-12


def test_linear_attention_without_interpreter_runs_torch(monkeypatch):
    if DEVICE == "cuda":
        pytest.skip("CUDA tensors always use the kernels")
    monkeypatch.delenv("SEQWEAVE_TRITON_INTERPRET", raising=False)
    problem = _problem(1, 2, 20, 16, 16, decay=False, state=False, seed=6)
    got = _with_grads(linear_attention, *problem, torch.float32)
    assert type(got[0].grad_fn).__name__ != "_LinearAttentionBackward"
    assert max(_errors(got, _reference(*problem)).values()) < FP32_TOL


def _bad(name):
    q, k, v, decay, s0, _, _ = _problem(1, 2, 20, 16, 16, decay=True, state=True)
    cases = {
        "q-k-shape": ((q, k[:, :, :10], v, decay, s0), "same shape"),
        "v-tokens": ((q, k, v[:, :, :10], decay, s0), "v .* must share"),
        "rank": ((q[0], k[0], v[0], decay, s0), "4-D"),
        "dtype": ((q, k.double(), v, decay, s0), "dtype"),
        "decay-shape": ((q, k, v, decay[:1], s0), r"shape \[H\] = \(2,\)"),
        "negative-decay": ((q, k, v, -decay, s0), ">= 0"),
        "state-shape": ((q, k, v, decay, s0[..., :8]), r"initial_state must be .*\[B, H, D, Dv\]"),
    }
    return cases[name]


@pytest.mark.parametrize("name", ["q-k-shape", "v-tokens", "rank", "dtype", "decay-shape", "negative-decay",
                                  "state-shape"])
@pytest.mark.parametrize("fn", [linear_attention_recurrent, linear_attention_chunked, linear_attention_forward,
                                linear_attention])
def test_bad_inputs_name_the_problem(fn, name):
    args, message = _bad(name)
    with pytest.raises(ValueError, match=message):
        fn(*args)


def test_kernel_limits_are_clear():
    q, k, v, decay, s0, do, dsn = _problem(1, 2, 20, 16, 16, decay=True, state=True)
    with pytest.raises(ValueError, match="chunk must be a power of two"):
        linear_attention_forward(q, k, v, chunk=24)
    with pytest.raises(ValueError, match="fp32, fp16 or bf16"):
        linear_attention_forward(q.double(), k.double(), v.double())
    with pytest.raises(ValueError, match="d_final_state"):
        linear_attention_backward(do, q, k, v, decay, s0, dsn[..., :8])
    with pytest.raises(ValueError, match="d_o .* must match v"):
        linear_attention_backward(do.half(), q, k, v, decay, s0, dsn)
    with pytest.raises(ValueError, match="decay requires grad"):
        linear_attention(q, k, v, decay.clone().requires_grad_())
