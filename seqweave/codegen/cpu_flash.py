"""CPU attention on PyTorch's fused flash kernel, with the reference's signature and semantics.

`torch.ops.aten._scaled_dot_product_flash_attention_for_cpu` (and its backward) is what
`F.scaled_dot_product_attention` runs on CPU: vectorised, threaded, several times faster than
the blockwise torch reference. It knows no MaskSpec, so `cpu_flash_plan` turns each call into
kernel calls over the keys each query block can see (no mask, `is_causal`, or a small dense
mask per block), and this module launches them, merges the partial (out, lse) exactly and
accumulates the gradients. Positions are split first into runs of one stride (`strided_runs`:
a zigzag shard is two runs, a striped one a single run of stride P); positions with no such
pattern (more than MAX_RUN_PAIRS run pairs) run the blockwise reference instead of a launch
per pair (a launch per position pair is what made `seqweave demo --sp 4`'s striped ring crawl).

What the kernel does differently from the contract, and how it is mended here:
- a row that sees no key gets lse 0 (the contract: -inf, out 0): such rows are known from the
  evaluated mask and set; in the backward their lse is passed as +inf, so they add nothing;
- its mask must be an additive float mask of the input dtype (a bool one is refused);
- it needs v's head dim equal to q's: other shapes run the reference;
- GQA (fewer kv heads) is taken natively where this torch's kernel accepts it (probed once),
  else K/V heads are repeated and their gradients summed over each group.

The backward reads the `out` and `lse` it is given (D = rowsum(dout * out), P = exp(S - lse)),
so with the out/lse of the whole attention (merged over ring steps) each call adds exactly
its share of dq, dk, dv.

SEQWEAVE_CPU_ATTENTION=reference forces the blockwise reference (to compare, or to rule this
kernel out when debugging); `launches` counts kernel calls, for tests and reports.
"""
from __future__ import annotations

import functools
import os
from collections import Counter
from typing import Sequence

import torch
from torch import Tensor

from seqweave.codegen.cpu_flash_plan import CAUSAL, Piece, Span, plan
from seqweave.codegen.runs import MAX_RUN_PAIRS, StridedRun, strided_runs
from seqweave.ir.mask import MaskSpec
from seqweave.ir.ops import attn_reference
from seqweave.ir.ops.attn_reference import lse_dtype, merge_partials
from seqweave.ir.score_mod import NoScoreMod, ScoreMod

ENV = "SEQWEAVE_CPU_ATTENTION"
FORCE_REFERENCE = "reference"
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)  # what the kernel accepts
NAME = "PyTorch's fused CPU flash kernel"

launches: Counter = Counter()  # "forward" / "backward" kernel calls made by this module


def _forward_op(*args, **kwargs) -> tuple[Tensor, Tensor]:
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(*args, **kwargs)


def _backward_op(*args, **kwargs) -> tuple[Tensor, Tensor, Tensor]:
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(*args, **kwargs)


def enabled() -> bool:
    """False when SEQWEAVE_CPU_ATTENTION=reference asks for the blockwise reference."""
    return os.environ.get(ENV, "").strip().lower() != FORCE_REFERENCE


def handles(q: Tensor, k: Tensor, v: Tensor, score_mod: ScoreMod) -> bool:
    """True when this call can run on the fused CPU kernel (any MaskSpec, no score mod)."""
    on_cpu = all(t.device.type == "cpu" for t in (q, k, v))
    shapes = q.shape[-1] == k.shape[-1] == v.shape[-1] and q.shape[1] % k.shape[1] == 0
    return (enabled() and on_cpu and shapes and isinstance(score_mod, NoScoreMod)
            and q.dtype in DTYPES and k.dtype == v.dtype == q.dtype)


@functools.cache
def kernel_takes_gqa() -> bool:
    """Whether this torch's kernel reads kv head h // G itself (it does from some 2.x on)."""
    q, kv = torch.randn(1, 2, 3, 4), torch.randn(1, 1, 3, 4)
    try:
        out, _ = _forward_op(q, kv, kv, 0.0, False)
    except RuntimeError:
        return False
    want, _ = _forward_op(q, kv.expand(1, 2, 3, 4), kv.expand(1, 2, 3, 4), 0.0, False)
    return torch.allclose(out, want)


def _kv_heads_for(q: Tensor, kv: Tensor) -> Tensor:
    """kv with as many heads as q when the kernel cannot do GQA itself (the `repeat_kv` order)."""
    group = q.shape[1] // kv.shape[1]
    return kv if group == 1 or kernel_takes_gqa() else kv.repeat_interleave(group, dim=1)


def _group_sum(grad: Tensor, kv_heads: int) -> Tensor:
    """A gradient over repeated kv heads summed back to one per kv head."""
    b, h, s, d = grad.shape
    return grad if h == kv_heads else grad.view(b, kv_heads, h // kv_heads, s, d).sum(2)


def _rows(x: Tensor, start: int, stop: int) -> Tensor:
    return x.narrow(2, start, stop - start)


def _bias(piece: Piece, like: Tensor) -> Tensor | None:
    """The piece's dense mask broadcast to the kernel's [B, H, Q, K] (None when unmasked)."""
    if piece.bias is None:
        return None
    return piece.bias.expand(like.shape[0], like.shape[1], -1, -1)


def _forward_piece(q: Tensor, k: Tensor, v: Tensor, piece: Piece, scale: float) -> tuple[Tensor, Tensor]:
    """(out, lse) of one piece, rows that see nothing set to out 0, lse -inf."""
    qs = _rows(q, piece.q0, piece.q1)
    ks, vs = (_kv_heads_for(q, _rows(t, piece.k0, piece.k1)) for t in (k, v))
    launches["forward"] += 1
    out, lse = _forward_op(qs, ks, vs, 0.0, piece.kind == CAUSAL, attn_mask=_bias(piece, qs), scale=scale)
    if piece.hidden is not None:
        out = out.masked_fill(piece.hidden.unsqueeze(-1), 0.0)
        lse = lse.masked_fill(piece.hidden, float("-inf"))
    return out, lse


class _Rows:
    """out / lse under construction: a piece's rows are copied in the first time, merged by
    their LSE after that, and rows no piece reached end as out 0, lse -inf."""

    def __init__(self, q: Tensor, dv: int) -> None:
        self.out = torch.empty(q.shape[:3] + (dv,), dtype=q.dtype)
        self.lse = torch.empty(q.shape[:3], dtype=lse_dtype(q.dtype))
        self.written = torch.zeros(q.shape[2], dtype=torch.bool)

    def add(self, start: int, stop: int, out: Tensor, lse: Tensor) -> None:
        rows_out, rows_lse, written = _rows(self.out, start, stop), self.lse[..., start:stop], self.written[start:stop]
        if not bool(written.any()):
            rows_out.copy_(out)
            rows_lse.copy_(lse)
            written.fill_(True)
            return
        if not bool(written.all()):
            self._blank(start, stop, ~written)
        merged_out, merged_lse = merge_partials(rows_out, rows_lse, out, lse)
        rows_out.copy_(merged_out)
        rows_lse.copy_(merged_lse)
        written.fill_(True)

    def finish(self) -> tuple[Tensor, Tensor]:
        if not bool(self.written.all()):
            self._blank(0, self.written.numel(), ~self.written)
        return self.out, self.lse

    def _blank(self, start: int, stop: int, rows: Tensor) -> None:
        """Rows that see nothing yet: out 0, lse -inf."""
        index = rows.nonzero().flatten() + start
        self.out.index_fill_(2, index, 0.0)
        self.lse.index_fill_(2, index, float("-inf"))
        self.written[index] = True


def _span(q_run: StridedRun, kv_run: StridedRun) -> Span:
    return Span(q_run[1], kv_run[1], q_run[2], kv_run[2], q_run[3], kv_run[3])


def _runs(q: Tensor, k: Tensor, q_positions: Tensor | None,
          kv_positions: Tensor | None) -> tuple[list[StridedRun], list[StridedRun]] | None:
    """The (q, kv) runs of a call, or None when there are so many pairs (positions with no
    stride pattern) that launching a kernel per pair would cost more than the reference."""
    q_runs, kv_runs = strided_runs(q_positions, q.shape[2]), strided_runs(kv_positions, k.shape[2])
    return (q_runs, kv_runs) if len(q_runs) * len(kv_runs) <= MAX_RUN_PAIRS else None


def _only_piece(q_runs: list[StridedRun], kv_runs: list[StridedRun], mask: MaskSpec, operands: Sequence[Tensor],
                dtype: torch.dtype) -> list[Piece] | None:
    """The pieces when the whole call is one run pair (None otherwise)."""
    if len(q_runs) == len(kv_runs) == 1:
        return plan(mask, _span(q_runs[0], kv_runs[0]), operands, dtype)
    return None


def forward(q: Tensor, k: Tensor, v: Tensor, mask: MaskSpec, score_mod: ScoreMod, scale: float,
            operands: Sequence[Tensor] = (), q_positions: Tensor | None = None,
            kv_positions: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(out, lse) exactly as `attn_reference.attention_forward` returns them."""
    _require(q, k, v, score_mod)
    runs = _runs(q, k, q_positions, kv_positions)
    if runs is None:
        return attn_reference.attention_forward(q, k, v, mask, score_mod, scale, operands, q_positions, kv_positions)
    q_runs, kv_runs = runs
    pieces = _only_piece(q_runs, kv_runs, mask, operands, q.dtype)
    if _is_whole(q, pieces):  # one kernel call covers everything: no buffers, no merge
        out, lse = _forward_piece(q, k, v, pieces[0], scale)  # laid out like q: made contiguous like the reference's
        return out.contiguous(), lse.contiguous().to(lse_dtype(q.dtype))
    rows = _Rows(q, v.shape[-1])
    for q_run in q_runs:
        for kv_run in kv_runs:
            run_pieces = pieces if pieces is not None else plan(mask, _span(q_run, kv_run), operands, q.dtype)
            q_rows = q.narrow(2, q_run[0], q_run[1])
            k_rows, v_rows = (t.narrow(2, kv_run[0], kv_run[1]) for t in (k, v))
            for piece in run_pieces:
                out, lse = _forward_piece(q_rows, k_rows, v_rows, piece, scale)
                rows.add(q_run[0] + piece.q0, q_run[0] + piece.q1, out, lse)
    return rows.finish()


def _backward_piece(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, safe_lse: Tensor,
                    piece: Piece, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """One piece's share of (dq for its rows, dk and dv for its keys)."""
    rows = [_rows(x, piece.q0, piece.q1) for x in (dout, q, out)]
    ks, vs = (_kv_heads_for(q, _rows(t, piece.k0, piece.k1)) for t in (k, v))
    launches["backward"] += 1
    dq, dk, dv = _backward_op(rows[0], rows[1], ks, vs, rows[2], safe_lse[..., piece.q0:piece.q1], 0.0,
                              piece.kind == CAUSAL, attn_mask=_bias(piece, rows[1]), scale=scale)
    return dq, _group_sum(dk, k.shape[1]), _group_sum(dv, k.shape[1])


def backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, mask: MaskSpec,
             score_mod: ScoreMod, scale: float, operands: Sequence[Tensor] = (),
             q_positions: Tensor | None = None, kv_positions: Tensor | None = None) -> tuple[Tensor, ...]:
    """(dq, dk, dv) as `attn_reference.attention_backward`: `out` / `lse` may be merged over other keys."""
    _require(q, k, v, score_mod)
    runs = _runs(q, k, q_positions, kv_positions)
    if runs is None:
        return attn_reference.attention_backward(dout, q, k, v, out, lse, mask, score_mod, scale, operands,
                                                 q_positions, kv_positions)
    q_runs, kv_runs = runs
    pieces = _only_piece(q_runs, kv_runs, mask, operands, q.dtype)
    # a row that sees no key anywhere has lse -inf: +inf makes every P = exp(S - lse) of it 0
    safe_lse = lse.to(lse_dtype(q.dtype)).masked_fill(torch.isneginf(lse), float("inf"))
    if _is_whole(q, pieces) and (pieces[0].k0, pieces[0].k1) == (0, k.shape[2]):  # one call: its gradients
        return tuple(g.contiguous() for g in _backward_piece(dout, q, k, v, out, safe_lse, pieces[0], scale))
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    grads = tuple(torch.zeros(t.shape, dtype=acc) for t in (q, k, v))
    for q_run in q_runs:
        q_args = [x.narrow(2, q_run[0], q_run[1]) for x in (dout, q, out, safe_lse, grads[0])]
        for kv_run in kv_runs:
            run_pieces = pieces if pieces is not None else plan(mask, _span(q_run, kv_run), operands, q.dtype)
            kv_args = [x.narrow(2, kv_run[0], kv_run[1]) for x in (k, v, grads[1], grads[2])]
            for piece in run_pieces:
                dq, dk, dv = _backward_piece(*q_args[:2], *kv_args[:2], *q_args[2:4], piece, scale)
                _rows(q_args[4], piece.q0, piece.q1).add_(dq)
                _rows(kv_args[2], piece.k0, piece.k1).add_(dk)
                _rows(kv_args[3], piece.k0, piece.k1).add_(dv)
    return tuple(g.to(t.dtype) for g, t in zip(grads, (q, k, v)))


def _is_whole(q: Tensor, pieces: list[Piece] | None) -> bool:
    """One piece over one run pair that covers every query row (the keys it skips are unseen)."""
    return pieces is not None and len(pieces) == 1 and pieces[0].q1 - pieces[0].q0 == q.shape[2]


def _require(q: Tensor, k: Tensor, v: Tensor, score_mod: ScoreMod) -> None:
    """A clear error for a call this kernel cannot run (callers check `handles` first)."""
    if not handles(q, k, v, score_mod):
        raise ValueError(f"{NAME} cannot run this attention (device {q.device}, dtype {q.dtype}, head dims "
                         f"{q.shape[-1]}/{k.shape[-1]}/{v.shape[-1]}, heads {q.shape[1]}/{k.shape[1]}, "
                         f"score mod {score_mod}, {ENV}={os.environ.get(ENV, '')!r}); "
                         "use attention_kernels.forward / backward, which fall back to the reference")
