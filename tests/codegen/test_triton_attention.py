"""Generated Triton flash attention under the CPU interpreter, against float64 references.

Every MaskSpec kind and combination, GQA ratios 1/2/4, lengths that are not multiples of the
16-wide interpreter tiles, and nonzero global offsets: out, lse, dq, dk and dv against the
blockwise reference run in float64 (itself checked against dense attention elsewhere). fp16
must stay within 2x the error of plain PyTorch eager attention at fp16. Tile visits counted by
the kernels must equal the non-EMPTY tiles that `block_class` predicts.
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

pytest.importorskip("triton")

from seqweave.codegen.triton import attention as triton_attention  # noqa: E402
from seqweave.codegen.triton.jit import interpreter_active  # noqa: E402
from seqweave.ir.mask import BlockClass, MaskSpec, dense_mask  # noqa: E402
from seqweave.ir.mask_parser import parse_mask, parse_score_mod  # noqa: E402
from seqweave.ir.ops.attn_reference import attention_backward, attention_forward  # noqa: E402

pytestmark = pytest.mark.skipif(not interpreter_active(), reason="needs TRITON_INTERPRET=1 (set by conftest on CPU)")

B, HQ, D, SCALE = 2, 4, 16, 0.3
BLOCK = 16  # the interpreter's tile size (specs.INTERPRETER_BLOCK)


@dataclass(frozen=True)
class Case:
    mask: str
    group: int = 1
    q_len: int = 40
    kv_len: int = 40
    q_offset: int = 0
    kv_offset: int = 0
    score_mod: str = "none"
    head_dim: int = D

    def __str__(self) -> str:
        return (f"{self.mask}-g{self.group}-{self.q_len}x{self.kv_len}-at{self.q_offset},{self.kv_offset}"
                f"-{self.score_mod}-d{self.head_dim}")


CASES = [
    Case("full", group=1),
    Case("causal", group=2),
    Case("causal", group=4, q_len=37, kv_len=53, q_offset=16, kv_offset=0),
    Case("sliding_window(7, 0)", group=1, q_len=45, kv_len=45),
    Case("sliding_window(5, 3)", group=2, q_len=33, kv_len=50, q_offset=20, kv_offset=3),
    Case("sinks(3) | sliding_window(6, 0)", group=4, q_len=50, kv_len=50),
    Case("causal & document($0)", group=2),
    Case("causal & padding($0)", group=1, q_len=39, kv_len=39),
    Case("chunked(12)", group=4),
    Case("causal", group=1, score_mod="softcap(2.5)"),
    Case("causal & (sliding_window(4, 0) | sinks(2)) & document($0)", group=2, q_len=35, kv_len=51,
         q_offset=10, kv_offset=2),
    Case("dense($0) | causal", group=2, q_len=29, kv_len=29),
    Case("causal", group=1, q_len=70, kv_len=70, head_dim=24),  # head dim padded to 32
]


def operands_for(case: Case) -> list[torch.Tensor]:
    """Global-length operands: document ids [B, S], padding valid [B, S], or a dense [B, 1, S, S] mask."""
    length = max(case.q_offset + case.q_len, case.kv_offset + case.kv_len)
    generator = torch.Generator().manual_seed(7)
    if "document" in case.mask:
        return [torch.sort(torch.randint(0, 4, (B, length), generator=generator), dim=1).values]
    if "padding" in case.mask:
        valid = torch.ones(B, length, dtype=torch.bool)
        valid[1, length - 9:] = False  # right padding on the second sequence
        return [valid]
    if "dense" in case.mask:
        return [torch.rand(B, 1, length, length, generator=generator) < 0.3]
    return []


def inputs(case: Case, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(hash(str(case)) % 2**31)
    kv_heads = HQ // case.group

    def draw(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype)
    return {"q": draw(B, HQ, case.q_len, case.head_dim), "k": draw(B, kv_heads, case.kv_len, case.head_dim),
            "v": draw(B, kv_heads, case.kv_len, case.head_dim), "dout": draw(B, HQ, case.q_len, case.head_dim)}


def positions(case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.arange(case.q_offset, case.q_offset + case.q_len),
            torch.arange(case.kv_offset, case.kv_offset + case.kv_len))


def reference(case: Case) -> dict[str, torch.Tensor]:
    """The float64 blockwise reference at the case's global positions."""
    t = inputs(case, torch.float64)
    mask, score_mod, ops = parse_mask(case.mask), parse_score_mod(case.score_mod), operands_for(case)
    out, lse = attention_forward(t["q"], t["k"], t["v"], mask, score_mod, SCALE, ops, *positions(case))
    dq, dk, dv = attention_backward(t["dout"], t["q"], t["k"], t["v"], out, lse, mask, score_mod, SCALE, ops,
                                    *positions(case))
    return {"out": out, "lse": lse, "dq": dq, "dk": dk, "dv": dv}


def run_kernels(case: Case, dtype: torch.dtype, count_visits: bool = False) -> tuple[dict, tuple]:
    t = inputs(case, dtype)
    call = triton_attention.make_call(t["q"], t["k"], t["v"], parse_mask(case.mask), parse_score_mod(case.score_mod),
                                      SCALE, operands_for(case), case.q_offset, case.kv_offset)
    out, lse, fwd_visits = triton_attention.forward(call, count_visits=count_visits)
    dq, dk, dv, kv_visits, dq_visits = triton_attention.backward(call, t["dout"], out, lse, count_visits=count_visits)
    return {"out": out, "lse": lse, "dq": dq, "dk": dk, "dv": dv}, (fwd_visits, kv_visits, dq_visits)


def max_error(got: torch.Tensor, want: torch.Tensor) -> float:
    finite = torch.isfinite(want)
    assert torch.equal(finite, torch.isfinite(got.double())), "rows with no visible key must match (-inf lse)"
    return float((got.double() - want)[finite].abs().max()) if finite.any() else 0.0


@pytest.fixture(scope="module")
def references() -> dict[str, dict[str, torch.Tensor]]:
    return {str(case): reference(case) for case in CASES}


@pytest.mark.parametrize("case", CASES, ids=str)
def test_fp32_forward_and_gradients_match_float64(case: Case, references):
    got, _ = run_kernels(case, torch.float32)
    want = references[str(case)]
    for name in want:
        scale = float(want[name][torch.isfinite(want[name])].abs().max().clamp_min(1.0))
        assert max_error(got[name], want[name]) <= 2e-5 * scale, name


def eager_attention(case: Case, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Plain PyTorch attention at `dtype`: scores, mask, softmax, @ v, autograd for gradients."""
    t = {name: x.requires_grad_(name != "dout") for name, x in inputs(case, dtype).items()}
    k, v = (t[n].repeat_interleave(case.group, 1) for n in "kv")
    scores = parse_score_mod(case.score_mod).apply(t["q"] @ k.transpose(-1, -2) * SCALE)
    allowed = dense_mask(parse_mask(case.mask), case.q_len, case.kv_len, operands_for(case),
                         case.q_offset, case.kv_offset)
    out = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1) @ v
    out.backward(t["dout"])
    return {"out": out.detach(), "dq": t["q"].grad, "dk": t["k"].grad, "dv": t["v"].grad}


FP16_CASES = [c for c in CASES if c.mask in ("causal", "sliding_window(7, 0)", "causal & document($0)",
                                             "chunked(12)", "sinks(3) | sliding_window(6, 0)")][:5]


@pytest.mark.parametrize("case", FP16_CASES, ids=str)
def test_fp16_within_twice_plain_pytorch_error(case: Case, references):
    got, _ = run_kernels(case, torch.float16)
    eager = eager_attention(case, torch.float16)
    want = references[str(case)]
    for name in ("out", "dq", "dk", "dv"):
        ours, plain = max_error(got[name], want[name]), max_error(eager[name], want[name])
        assert ours <= 2 * plain + 1e-3, f"{name}: kernel {ours:.2e} vs plain fp16 {plain:.2e}"


def predicted_tiles(mask: MaskSpec, case: Case, operands: list[torch.Tensor]) -> int:
    """Non-EMPTY BLOCK x BLOCK tiles, by calling block_class tile by tile."""
    count = 0
    for q0 in range(0, case.q_len, BLOCK):
        for k0 in range(0, case.kv_len, BLOCK):
            q = (case.q_offset + q0, case.q_offset + min(q0 + BLOCK, case.q_len))
            kv = (case.kv_offset + k0, case.kv_offset + min(k0 + BLOCK, case.kv_len))
            count += mask.block_class(q, kv, operands) is not BlockClass.EMPTY
    return count


@pytest.mark.parametrize("case", [CASES[2], CASES[4], CASES[5], CASES[6], CASES[8]], ids=str)
def test_visited_tiles_equal_non_empty_tiles(case: Case):
    _, (fwd, dkdv, dq) = run_kernels(case, torch.float32, count_visits=True)
    expected = predicted_tiles(parse_mask(case.mask), case, operands_for(case))
    all_tiles = -(-case.q_len // BLOCK) * -(-case.kv_len // BLOCK)
    assert expected < all_tiles  # each case skips something, so the count means something
    assert fwd.sum(1).tolist() == [expected] * B * HQ
    assert dq.sum(1).tolist() == [expected] * B * HQ
    assert dkdv.sum(1).tolist() == [expected * case.group] * (B * HQ // case.group)


def test_generated_source_holds_the_mask_predicate():
    t = inputs(CASES[6], torch.float32)
    call = triton_attention.make_call(t["q"], t["k"], t["v"], parse_mask("causal & document($0)"),
                                      parse_score_mod("none"), SCALE, operands_for(CASES[6]), 0, 0)
    source = triton_attention.attention_source(call.spec)
    assert "return ((kv <= q) & (tl.load(op0 + off_b * stride_op0_b" in source
    assert call.spec.key() in source.splitlines()[0]


def test_float64_and_unknown_score_mods_are_refused_with_a_reason():
    q = torch.zeros(1, 2, 8, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match="float16, bfloat16 and float32"):
        triton_attention.make_call(q, q, q, parse_mask("causal"), parse_score_mod("none"), 1.0, (), 0, 0)
    wide = torch.zeros(1, 2, 8, 320)
    with pytest.raises(ValueError, match="head dims up to 256"):
        triton_attention.make_call(wide, wide, wide, parse_mask("causal"), parse_score_mod("none"), 1.0, (), 0, 0)
    with pytest.raises(ValueError, match="q_offset and kv_offset"):
        triton_attention.make_call(q.float(), q.float(), q.float(), parse_mask("causal"), parse_score_mod("none"),
                                   1.0, (), -1, 0)


def test_views_whose_offsets_would_overflow_32_bits_are_copied():
    small = torch.zeros(1, 2, 8, 16).transpose(1, 2)  # a [B, S, H, D] view: strides fit, kept as is
    assert triton_attention.addressable(small) is small
    far = 2**31  # two rows 2^31 elements apart (virtual memory only: two pages are touched)
    huge = torch.empty_strided((1, 1, 2, 16), (far + 16, far + 16, far, 1))
    copy = triton_attention.addressable(huge)
    assert copy.is_contiguous() and torch.equal(copy, huge)
