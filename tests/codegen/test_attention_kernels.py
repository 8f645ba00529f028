"""The kernel dispatch: which calls reach the generated kernels, and that split positions still add up."""
from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("triton")

from seqweave.codegen import attention_kernels  # noqa: E402
from seqweave.codegen.triton import attention as triton_attention  # noqa: E402
from seqweave.codegen.triton.jit import interpreter_active  # noqa: E402
from seqweave.compiler import SeqweaveBackend  # noqa: E402
from seqweave.ir.mask_parser import parse_mask, parse_score_mod  # noqa: E402
from seqweave.ir.ops.attn_reference import attention_backward, attention_forward  # noqa: E402
from seqweave.ir.sharding import Layout, shard_positions  # noqa: E402
from seqweave.testing.compare import grad_errors  # noqa: E402
from seqweave.testing.models import SampleSpec, build_sample  # noqa: E402

pytestmark = pytest.mark.skipif(not interpreter_active(), reason="needs TRITON_INTERPRET=1 (set by conftest on CPU)")

MASK, NONE, SCALE = parse_mask("causal & sliding_window(9, 0)"), parse_score_mod("none"), 0.3


@pytest.fixture
def launches(monkeypatch) -> dict[str, int]:
    """Count launches of the generated forward and backward kernels."""
    counts = {"forward": 0, "backward": 0}
    for name in counts:
        original = getattr(triton_attention, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            counts[_name] += 1
            return _original(*args, **kwargs)
        monkeypatch.setattr(triton_attention, name, counted)
    return counts


def test_runs_of_splits_positions_into_contiguous_runs():
    positions = torch.tensor([4, 5, 6, 20, 21, 0])
    assert attention_kernels.runs_of(positions, 6) == [(0, 3, 4), (3, 2, 20), (5, 1, 0)]
    assert attention_kernels.runs_of(None, 7) == [(0, 7, 0)]


def tensors(q_len: int, kv_len: int, dtype=torch.float64) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    shapes = [(1, 4, q_len, 16), (1, 2, kv_len, 16), (1, 2, kv_len, 16), (1, 4, q_len, 16)]
    return [torch.randn(*s, generator=generator, dtype=dtype) for s in shapes]


def test_zigzag_positions_match_the_float64_reference(monkeypatch, launches):
    """A zigzag shard (two chunks of queries, keys from two ranks) runs as run x run launches."""
    monkeypatch.setenv("SEQWEAVE_TRITON_INTERPRET", "1")
    q_pos = shard_positions(Layout.ZIGZAG, 0, 2, 64)  # chunks 0..15 and 48..63
    kv_pos = torch.cat([shard_positions(Layout.ZIGZAG, 1, 2, 64), q_pos])  # 16..47, 0..15, 48..63
    q, k, v, dout = tensors(32, 64)
    out, lse = attention_kernels.forward(q.float(), k.float(), v.float(), MASK, NONE, SCALE, (), q_pos, kv_pos)
    grads = attention_kernels.backward(dout.float(), q.float(), k.float(), v.float(), out, lse, MASK, NONE, SCALE,
                                       (), q_pos, kv_pos)
    want_out, want_lse = attention_forward(q, k, v, MASK, NONE, SCALE, (), q_pos, kv_pos)
    want = attention_backward(dout, q, k, v, want_out, want_lse, MASK, NONE, SCALE, (), q_pos, kv_pos)
    assert launches == {"forward": 2 * 3, "backward": 2 * 3}  # 2 query runs x 3 key runs
    torch.testing.assert_close(out.double(), want_out, atol=2e-5, rtol=1e-5)
    for got, expected in zip(grads, want):
        torch.testing.assert_close(got.double(), expected, atol=2e-5, rtol=1e-5)


def test_striped_positions_run_the_reference_not_a_launch_per_position(monkeypatch, launches):
    """A striped shard is a contiguous run per position: 12 x 12 launches would pass the
    MAX_RUN_PAIRS bound, so the call runs the reference (exact, no generated launch)."""
    monkeypatch.setenv("SEQWEAVE_TRITON_INTERPRET", "1")
    q_pos, kv_pos = (shard_positions(Layout.STRIPED, r, 4, 48) for r in (2, 1))
    q, k, v, dout = tensors(12, 12)
    out, lse = attention_kernels.forward(q.float(), k.float(), v.float(), MASK, NONE, SCALE, (), q_pos, kv_pos)
    grads = attention_kernels.backward(dout.float(), q.float(), k.float(), v.float(), out, lse, MASK, NONE, SCALE,
                                       (), q_pos, kv_pos)
    assert launches == {"forward": 0, "backward": 0}
    want_out, want_lse = attention_forward(q, k, v, MASK, NONE, SCALE, (), q_pos, kv_pos)
    want = attention_backward(dout, q, k, v, want_out, want_lse, MASK, NONE, SCALE, (), q_pos, kv_pos)
    torch.testing.assert_close(out.double(), want_out, atol=2e-5, rtol=1e-5)
    for got, expected in zip(grads, want):
        torch.testing.assert_close(got.double(), expected, atol=2e-5, rtol=1e-5)


def test_cpu_runs_the_reference_unless_the_interpreter_is_asked_for(monkeypatch, launches):
    monkeypatch.delenv("SEQWEAVE_TRITON_INTERPRET", raising=False)
    q, k, v, _ = tensors(20, 20, torch.float32)
    attention_kernels.forward(q, k, v, MASK, NONE, SCALE)
    monkeypatch.setenv("SEQWEAVE_TRITON_INTERPRET", "1")
    attention_kernels.forward(q.double(), k.double(), v.double(), MASK, NONE, SCALE)  # float64: reference
    assert launches["forward"] == 0
    attention_kernels.forward(q, k, v, MASK, NONE, SCALE)
    assert launches["forward"] == 1


@pytest.mark.slow
def test_compiled_llama_runs_generated_kernels_and_matches_eager(monkeypatch, launches):
    """torch.compile(backend=seqweave) on a real HF model: every attention (forward and backward)
    launches the generated kernels, and logits, loss and gradients match eager."""
    monkeypatch.setenv("SEQWEAVE_TRITON_INTERPRET", "1")
    model, inputs = build_sample(SampleSpec("llama-tiny", seq_len=40, layers=2, packed=True))
    reference = copy.deepcopy(model)
    compiled = torch.compile(model, backend=SeqweaveBackend(), fullgraph=True, dynamic=False)
    output, expected = compiled(**inputs), reference(**inputs)
    output.loss.backward()
    expected.loss.backward()
    assert launches == {"forward": 2, "backward": 2}
    torch.testing.assert_close(output.logits, expected.logits, atol=1e-4, rtol=1e-4)
    worst, name = grad_errors(model, reference)
    assert worst <= 1e-3, name


def test_asking_for_compiled_kernels_under_the_interpreter_says_what_to_change():
    from seqweave.codegen.triton.jit import jit_decorator
    with pytest.raises(RuntimeError, match="unset TRITON_INTERPRET"):
        jit_decorator(interpret=False)
