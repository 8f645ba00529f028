"""`torch.ops.seqweave.attention` / `attention_backward`: registration checks (opcheck), and
forward, lse and gradients in fp32 against an independent dense float64 reference whose mask
is written out element by element from a plain Python predicate."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pytest
import torch

import seqweave.frontend.custom_ops  # noqa: F401  (registers torch.ops.seqweave.*)

ATTENTION = torch.ops.seqweave.attention.default
ATTENTION_BACKWARD = torch.ops.seqweave.attention_backward.default
B, HQ, SEQ, D = 2, 4, 37, 16  # odd length: no tile boundary lines up with it
SCALE = 0.25
PADDED = 5  # leading padding keys of batch row 0: its first PADDED queries see no key at all
FP32_ATOL, FP32_RTOL = 2e-6, 1e-5
Predicate = Callable[[int, int, int, list[list[int]]], bool]  # (batch, query, key, valid) -> visible


@dataclass(frozen=True)
class MaskCase:
    """A mask as the op spells it, and the same mask as an independent Python predicate."""

    text: str
    allows: Predicate
    needs_valid: bool = False


MASKS = {
    "causal": MaskCase("causal", lambda b, i, j, valid: j <= i),
    "causal_padding": MaskCase("causal & padding($0)", lambda b, i, j, valid: j <= i and valid[b][j] != 0, True),
    "sliding_window": MaskCase("sliding_window(3, 2)", lambda b, i, j, valid: i - 3 <= j <= i + 2),
}


def valid_keys() -> torch.Tensor:
    """int64 [B, SEQ]: row 0 left-padded by PADDED keys, row 1 right-padded by 3."""
    valid = torch.ones(B, SEQ, dtype=torch.int64)
    valid[0, :PADDED] = 0
    valid[1, SEQ - 3:] = 0
    return valid


def operands_for(case: MaskCase) -> list[torch.Tensor]:
    return [valid_keys()] if case.needs_valid else []


def dense_allowed(case: MaskCase, operands: list[torch.Tensor]) -> torch.Tensor:
    """bool [B, SEQ, SEQ], one predicate call per element."""
    valid = operands[0].tolist() if operands else [[1] * SEQ] * B
    return torch.tensor([[[case.allows(b, i, j, valid) for j in range(SEQ)] for i in range(SEQ)]
                         for b in range(B)])


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor,
              cap: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense softmax attention (GQA by repeating K/V heads); rows that see no key give 0 and -inf."""
    group = q.shape[1] // k.shape[1]
    k_full, v_full = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = (q @ k_full.transpose(-1, -2)) * SCALE
    if cap is not None:
        scores = cap * torch.tanh(scores / cap)
    allowed = allowed[:, None]
    visible = allowed.any(-1, keepdim=True)
    scores = scores.masked_fill(~allowed, float("-inf")).masked_fill(~visible, 0.0)
    probs = torch.softmax(scores, dim=-1) * visible
    lse = torch.where(visible[..., 0], torch.logsumexp(scores, dim=-1), float("-inf"))
    return probs @ v_full, lse


def random_qkv(kv_heads: int, seed: int, spread: float = 1.0) -> list[torch.Tensor]:
    """fp32 q, k, v leaves that require grad, and an upstream gradient dout."""
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(B, HQ, SEQ, D, generator=generator) * spread
    k, v = (torch.randn(B, kv_heads, SEQ, D, generator=generator) for _ in range(2))
    dout = torch.randn(B, HQ, SEQ, D, generator=generator)
    return [t.requires_grad_(True) for t in (q, k, v)] + [dout]


def run_op(q, k, v, dout, operands, mask: str, score_mod: str = "none"):
    """(out, lse, dq, dk, dv) from the custom op and autograd."""
    out, lse = torch.ops.seqweave.attention(q, k, v, operands, mask, score_mod, SCALE)
    return (out, lse, *torch.autograd.grad(out, (q, k, v), dout))


def run_reference(q, k, v, dout, allowed, cap: float | None = None):
    """The same five tensors from the float64 reference."""
    leaves = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    out, lse = reference(*leaves, allowed, cap)
    return (out, lse, *torch.autograd.grad(out, leaves, dout.double()))


def assert_matches_reference(got: tuple, want: tuple) -> None:
    for name, actual, expected in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        assert not actual.isnan().any(), f"{name} has NaN"
        torch.testing.assert_close(actual.double(), expected.detach(), atol=FP32_ATOL, rtol=FP32_RTOL,
                                   msg=lambda message, name=name: f"{name}: {message}")


# ------------------------------------------------------------------ registration


@pytest.mark.parametrize("kv_heads", [2, 1])
@pytest.mark.parametrize("mask", sorted(MASKS))
def test_opcheck_forward(mask: str, kv_heads: int) -> None:
    case = MASKS[mask]
    q, k, v, _ = random_qkv(kv_heads, seed=0)
    torch.library.opcheck(ATTENTION, (q, k, v, operands_for(case), case.text, "none", SCALE))


@pytest.mark.parametrize("mask", ["causal", "causal_padding"])
def test_opcheck_backward(mask: str) -> None:
    case = MASKS[mask]
    q, k, v, dout = random_qkv(2, seed=1)
    operands = operands_for(case)
    with torch.no_grad():
        out, lse = ATTENTION(q, k, v, operands, case.text, "none", SCALE)
    args = (dout, q.detach(), k.detach(), v.detach(), out, lse, operands, case.text, "none", SCALE)
    torch.library.opcheck(ATTENTION_BACKWARD, args)


# ------------------------------------------------------------------ numerics


@pytest.mark.parametrize("kv_heads", [4, 2, 1])  # GQA ratios 1, 2, 4
@pytest.mark.parametrize("mask", sorted(MASKS))
def test_forward_and_backward_match_float64_reference(mask: str, kv_heads: int) -> None:
    case = MASKS[mask]
    q, k, v, dout = random_qkv(kv_heads, seed=kv_heads)
    operands = operands_for(case)
    got = run_op(q, k, v, dout, operands, case.text)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    assert_matches_reference(got, run_reference(q, k, v, dout, dense_allowed(case, operands)))


def test_fully_masked_rows_give_zero_out_minus_inf_lse_and_no_gradient() -> None:
    case = MASKS["causal_padding"]
    q, k, v, dout = random_qkv(2, seed=7)
    operands = operands_for(case)
    out, lse, dq, dk, dv = got = run_op(q, k, v, dout, operands, case.text)
    for name, tensor in zip(("out", "lse", "dq", "dk", "dv"), got):
        assert not tensor.isnan().any(), f"{name} has NaN"
    blind = slice(0, PADDED)  # batch 0: queries (and keys) before the first valid key
    assert torch.equal(out[0, :, blind], torch.zeros_like(out[0, :, blind]))
    assert torch.equal(lse[0, :, blind], torch.full_like(lse[0, :, blind], float("-inf")))
    assert torch.isfinite(lse[0, :, PADDED:]).all()
    assert torch.equal(dq[0, :, blind], torch.zeros_like(dq[0, :, blind]))
    for grad in (dk, dv):  # padding keys are seen by nobody
        assert torch.equal(grad[0, :, blind], torch.zeros_like(grad[0, :, blind]))
        assert torch.equal(grad[1, :, SEQ - 3:], torch.zeros_like(grad[1, :, SEQ - 3:]))
    assert_matches_reference(got, run_reference(q, k, v, dout, dense_allowed(case, operands)))


def test_softcap_matches_reference_and_changes_the_result() -> None:
    cap = 5.0
    case = MASKS["causal"]
    q, k, v, dout = random_qkv(2, seed=3, spread=8.0)  # scores well beyond the cap
    allowed = dense_allowed(case, [])
    got = run_op(q, k, v, dout, [], case.text, score_mod=f"softcap({cap})")
    assert_matches_reference(got, run_reference(q, k, v, dout, allowed, cap=cap))
    uncapped = run_reference(q, k, v, dout, allowed)
    assert (got[0].double() - uncapped[0]).abs().max() > 0.1, "the cap should change the output"


def test_lse_is_not_differentiable() -> None:
    """The backward has no dlse term, so lse must not pretend to carry a gradient."""
    q, k, v, _ = random_qkv(2, seed=0)
    out, lse = torch.ops.seqweave.attention(q, k, v, [], "causal", "none", SCALE)
    assert out.requires_grad and not lse.requires_grad
