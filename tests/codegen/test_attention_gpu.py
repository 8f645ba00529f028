"""Triton flash attention on CUDA against the float64 reference, within 2x plain PyTorch's error.

For each case the inputs are drawn in float64, rounded once to the kernel's dtype, and the
reference (`attn_reference`, float64, on the GPU) runs on the rounded values, so only the
computation's error is measured. "Plain PyTorch" is eager math attention in the same dtype
(scores in the dtype, softmax, @ v; GQA by repeat_interleave); the kernel passes when each of out,
lse, dq, dk, dv is within LOW_PRECISION_FACTOR x plain PyTorch's error plus a small floor. Errors
are max |error| over max(|reference|, 1).

Cases cover bf16 / fp16 / fp32, d 64 / 128, GQA groups 1 / 2 / 4 and five masks (a Latin square,
not the full product: each kernel spec costs a compile), N = 1000 (not a multiple of any tile),
and ring-step offsets. Skipped without a GPU: bf16 gives wrong results under Triton's CPU
interpreter, and N = 1000 is too slow there.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

from seqweave.ir.mask import MaskSpec  # noqa: E402
from seqweave.ir.mask_parser import parse_mask, parse_score_mod  # noqa: E402
from seqweave.ir.ops.attn_reference import attention_backward, attention_forward  # noqa: E402
from seqweave.ir.score_mod import ScoreMod  # noqa: E402

LOW_PRECISION_FACTOR = 2  # kernels within 2x the error of plain PyTorch at the same precision
FLOOR = 1e-5  # relative; only matters where plain PyTorch is (nearly) exact, i.e. float32
NAMES = ("out", "lse", "dq", "dk", "dv")
KV_HEADS, BATCH, N = 2, 2, 1000
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
HEAD_DIMS = (64, 128)
GROUPS = (1, 2, 4)
MASKS = {  # name: (mask, score mod)
    "causal": ("causal", "none"),
    "window": ("sliding_window(255, 0)", "none"),
    "documents": ("causal & document($0)", "none"),
    "sinks-window": ("sinks(4) | sliding_window(127, 0)", "none"),
    "causal-softcap": ("causal", "softcap(20.0)"),
}


@dataclass(frozen=True)
class Case:
    """One kernel spec and shape; q covers [q_offset, q_offset + q_len), kv likewise."""

    mask: str  # a MASKS key
    dtype: torch.dtype
    d: int
    group: int
    q_len: int = N
    kv_len: int = N
    q_offset: int = 0
    kv_offset: int = 0

    def __str__(self) -> str:
        shape = f"q{self.q_len}@{self.q_offset}-kv{self.kv_len}@{self.kv_offset}"
        return f"{self.mask}-{str(self.dtype)[6:]}-d{self.d}-g{self.group}-{shape}"


def _latin_square() -> list[Case]:
    """Every mask with every dtype; d and the GQA group rotate so each mask and each dtype meets all."""
    return [Case(name, dtype, HEAD_DIMS[(m + t) % 2], GROUPS[(m + 2 * t) % 3])
            for m, name in enumerate(MASKS) for t, dtype in enumerate(DTYPES)]


OFFSET_CASES = [  # ring steps: q after (or overlapping) the keys, positions global
    Case("causal", torch.bfloat16, 128, 2, q_len=N, kv_len=N, q_offset=N),  # every tile FULL
    Case("causal", torch.float16, 64, 4, q_len=600, kv_len=1100, q_offset=500),
    Case("window", torch.bfloat16, 64, 2, q_len=600, kv_len=1000, q_offset=700, kv_offset=300),
    Case("documents", torch.bfloat16, 128, 1, q_len=500, kv_len=N, q_offset=500),
]
CASES = _latin_square() + OFFSET_CASES


@dataclass
class Problem:
    """float64 inputs (already rounded to `dtype`), the mask and the global positions."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    dout: torch.Tensor
    dtype: torch.dtype
    mask: MaskSpec
    score_mod: ScoreMod
    operands: tuple[torch.Tensor, ...]
    q_pos: torch.Tensor
    kv_pos: torch.Tensor

    @property
    def scale(self) -> float:
        return self.q.shape[-1] ** -0.5

    def low(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.dtype)


def document_ids(length: int, gen: torch.Generator) -> torch.Tensor:
    """[BATCH, length] int32 ids of packed documents of 1..300 tokens (a different packing per row)."""
    rows = []
    for _ in range(BATCH):
        sizes = torch.randint(1, 300, (length,), generator=gen)
        rows.append(torch.repeat_interleave(torch.arange(length), sizes)[:length])
    return torch.stack(rows).to(torch.int32)


def make_problem(case: Case, device: str, seed: int = 0) -> Problem:
    gen = torch.Generator().manual_seed(seed)
    heads = KV_HEADS * case.group

    def draw(h: int, s: int) -> torch.Tensor:  # rounded to the dtype once, held in float64
        return torch.randn(BATCH, h, s, case.d, generator=gen, dtype=torch.float64).to(case.dtype).double().to(device)

    q, k, v, dout = draw(heads, case.q_len), draw(KV_HEADS, case.kv_len), draw(KV_HEADS, case.kv_len), \
        draw(heads, case.q_len)
    mask_text, score_mod_text = MASKS[case.mask]
    mask = parse_mask(mask_text)
    span = max(case.q_offset + case.q_len, case.kv_offset + case.kv_len)
    operands = (document_ids(span, gen).to(device),) if mask.operand_indices() else ()
    q_pos = torch.arange(case.q_offset, case.q_offset + case.q_len, device=device)
    kv_pos = torch.arange(case.kv_offset, case.kv_offset + case.kv_len, device=device)
    return Problem(q, k, v, dout, case.dtype, mask, parse_score_mod(score_mod_text), operands, q_pos, kv_pos)


Results = tuple[torch.Tensor, ...]  # out, lse, dq, dk, dv


def reference(p: Problem) -> Results:
    """float64 blockwise reference at the problem's global positions."""
    args = (p.mask, p.score_mod, p.scale, p.operands, p.q_pos, p.kv_pos)
    out, lse = attention_forward(p.q, p.k, p.v, *args)
    return (out, lse, *attention_backward(p.dout, p.q, p.k, p.v, out, lse, *args))


def plain_pytorch(p: Problem) -> Results:
    """Eager math attention in the problem's dtype, differentiated by autograd."""
    leaves = [p.low(t).requires_grad_() for t in (p.q, p.k, p.v)]
    group = p.q.shape[1] // p.k.shape[1]
    k, v = (t.repeat_interleave(group, dim=1) for t in leaves[1:])
    allowed = p.mask.evaluate(p.q_pos, p.kv_pos, p.operands)
    scores = p.score_mod.apply(leaves[0] @ k.transpose(-1, -2) * p.scale).masked_fill(~allowed, float("-inf"))
    out = torch.softmax(scores, dim=-1) @ v
    return (out, torch.logsumexp(scores, dim=-1), *torch.autograd.grad(out, leaves, p.low(p.dout)))


def triton_kernels(p: Problem) -> Results:
    """The generated kernels through their launcher (`make_call` / `forward` / `backward`)."""
    from seqweave.codegen.triton.attention import backward, forward, make_call
    call = make_call(p.low(p.q), p.low(p.k), p.low(p.v), p.mask, p.score_mod, p.scale, p.operands,
                     int(p.q_pos[0]), int(p.kv_pos[0]))
    out, lse, _ = forward(call)
    dq, dk, dv, _, _ = backward(call, p.low(p.dout), out, lse)
    return out, lse, dq, dk, dv


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    assert got.shape == want.shape, (tuple(got.shape), tuple(want.shape))
    return ((got.double() - want).abs().max() / want.abs().max().clamp(min=1.0)).item()


def excess_errors(p: Problem, run: Callable[[Problem], Results]) -> dict[str, tuple[float, float]]:
    """{name: (kernel error, plain PyTorch error)} for every output over the allowed bound."""
    want = reference(p)
    got, plain = run(p), plain_pytorch(p)
    found = {}
    for name, a, b, c in zip(NAMES, got, plain, want):
        kernel_error, plain_error = relative_error(a, c), relative_error(b.detach(), c)
        if not kernel_error <= LOW_PRECISION_FACTOR * plain_error + FLOOR:  # NaN fails too
            found[name] = (kernel_error, plain_error)
    return found


@pytest.mark.parametrize("case", CASES, ids=str)
def test_kernels_within_twice_plain_pytorch(case: Case) -> None:
    problem = make_problem(case, "cuda")
    excess = excess_errors(problem, triton_kernels)
    assert not excess, (f"{case}: (kernel, plain PyTorch) error above {LOW_PRECISION_FACTOR}x plain + {FLOOR}: "
                        f"{excess}")


def test_dispatch_runs_triton_on_cuda_and_merges_position_runs() -> None:
    """`attention_kernels.forward/backward` on CUDA: Triton, not the reference, and two-run (zigzag-like)
    positions on both sides are split into launches, merged by LSE and summed as the reference says."""
    from seqweave.codegen import attention_kernels
    case = Case("causal", torch.bfloat16, 128, 2, q_len=512, kv_len=512)
    p = make_problem(case, "cuda", seed=1)
    p.q_pos = p.kv_pos = torch.cat([torch.arange(0, 256), torch.arange(768, 1024)]).cuda()
    assert attention_kernels.triton_handles(p.low(p.q), p.low(p.k), p.low(p.v), p.score_mod)

    def dispatch(problem: Problem) -> Results:
        q, k, v, dout = (problem.low(t) for t in (problem.q, problem.k, problem.v, problem.dout))
        args = (problem.mask, problem.score_mod, problem.scale, problem.operands, problem.q_pos, problem.kv_pos)
        out, lse = attention_kernels.forward(q, k, v, *args)
        return (out, lse, *attention_kernels.backward(dout, q, k, v, out, lse, *args))
    excess = excess_errors(p, dispatch)
    assert not excess, f"dispatch: (kernel, plain PyTorch) error above the bound: {excess}"
