"""Which kernels run an attention call: generated Triton kernels, PyTorch's fused CPU kernel, or the reference.

On CUDA, float16 / bfloat16 / float32 attention runs the Triton kernels. On CPU, attention
without a score mod runs PyTorch's fused CPU flash kernel (`cpu_flash`, any dtype it takes,
float64 included); SEQWEAVE_TRITON_INTERPRET=1 routes fp16/bf16/fp32 to the Triton kernels under
the interpreter instead (for tests and debugging), and SEQWEAVE_CPU_ATTENTION=reference forces
the blockwise torch reference. Everything else (score mods on CPU, float64 on CUDA) runs the
reference.

The kernels take one global offset per side, so positions that are not one contiguous range
(a zigzag shard holds two chunks) are split into contiguous runs: each (q run, kv run) pair is
one launch, partial results are merged by their LSE, and gradients are summed. Positions that
would take more than MAX_RUN_PAIRS launches (a striped shard is a run per position) run the
reference on CUDA; the CPU kernel takes strided runs and needs no such escape.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from seqweave.codegen import cpu_flash
from seqweave.codegen.runs import MAX_RUN_PAIRS, Run, runs_of
from seqweave.codegen.triton import attention as triton_attention
from seqweave.codegen.triton.jit import use_triton
from seqweave.codegen.triton.specs import MAX_HEAD_DIM, SUPPORTED_DTYPES
from seqweave.ir.mask import MaskSpec
from seqweave.ir.ops import attn_reference
from seqweave.ir.ops.attn_reference import merge_partials
from seqweave.ir.score_mod import NoScoreMod, ScoreMod, Softcap
from seqweave.runtime.local_attention import LocalAttention


def triton_handles(q: Tensor, k: Tensor, v: Tensor, score_mod: ScoreMod) -> bool:
    """True when this call runs on generated kernels."""
    supported = q.dtype in SUPPORTED_DTYPES and isinstance(score_mod, (NoScoreMod, Softcap))
    narrow = max(q.shape[-1], v.shape[-1]) <= MAX_HEAD_DIM
    return supported and narrow and use_triton(q, k, v)


def kernels_in_use(device: torch.device | str = "cpu") -> str:
    """Which kernels fp32/fp16/bf16 attention runs on `device`, in words (for reports)."""
    probe = torch.empty(0, device=device)
    if not use_triton(probe):
        probe = torch.empty(1, 1, 1, 1, device=device)  # one head, one position
        if cpu_flash.handles(probe, probe, probe, NoScoreMod()):
            return cpu_flash.NAME + " (score mods: the blockwise torch reference)"
        return "blockwise torch reference"
    return "generated Triton kernels" + ("" if probe.is_cuda else " under Triton's CPU interpreter")


def _rows(x: Tensor, run: Run) -> Tensor:
    return x.narrow(2, run[0], run[1])


def _call(q: Tensor, k: Tensor, v: Tensor, mask: MaskSpec, score_mod: ScoreMod, scale: float,
          operands: Sequence[Tensor], q_run: Run, kv_run: Run) -> triton_attention.Call:
    return triton_attention.make_call(_rows(q, q_run), _rows(k, kv_run), _rows(v, kv_run), mask, score_mod,
                                      scale, operands, q_run[2], kv_run[2])


def _triton_runs(q: Tensor, k: Tensor, v: Tensor, score_mod: ScoreMod, q_positions: Tensor | None,
                 kv_positions: Tensor | None) -> tuple[list[Run], list[Run]] | None:
    """The contiguous (q, kv) runs when the generated kernels take this call, else None. They
    launch once per run pair, so a striped shard (a run per position) is left to the others."""
    if not triton_handles(q, k, v, score_mod):
        return None  # positions are not even looked at: the CPU kernels cut their own runs
    q_runs, kv_runs = runs_of(q_positions, q.shape[2]), runs_of(kv_positions, k.shape[2])
    return (q_runs, kv_runs) if len(q_runs) * len(kv_runs) <= MAX_RUN_PAIRS else None


def forward(q: Tensor, k: Tensor, v: Tensor, mask: MaskSpec, score_mod: ScoreMod, scale: float,
            operands: Sequence[Tensor] = (), q_positions: Tensor | None = None,
            kv_positions: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(out, lse), with the reference's signature and semantics."""
    runs = _triton_runs(q, k, v, score_mod, q_positions, kv_positions)
    if runs is None:
        if cpu_flash.handles(q, k, v, score_mod):
            return cpu_flash.forward(q, k, v, mask, score_mod, scale, operands, q_positions, kv_positions)
        return attn_reference.attention_forward(q, k, v, mask, score_mod, scale, operands, q_positions, kv_positions)
    q_runs, kv_runs = runs
    outs, lses = [], []
    for q_run in q_runs:
        out = lse = None
        for kv_run in kv_runs:
            part_out, part_lse, _ = triton_attention.forward(_call(q, k, v, mask, score_mod, scale, operands,
                                                                   q_run, kv_run))
            out, lse = (part_out, part_lse) if out is None else merge_partials(out, lse, part_out, part_lse)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs, 2), torch.cat(lses, 2)


def backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, mask: MaskSpec,
             score_mod: ScoreMod, scale: float, operands: Sequence[Tensor] = (),
             q_positions: Tensor | None = None, kv_positions: Tensor | None = None) -> tuple[Tensor, ...]:
    """(dq, dk, dv), with the reference's signature; `out`/`lse` may be merged over other keys."""
    runs = _triton_runs(q, k, v, score_mod, q_positions, kv_positions)
    if runs is None:
        if cpu_flash.handles(q, k, v, score_mod):
            return cpu_flash.backward(dout, q, k, v, out, lse, mask, score_mod, scale, operands,
                                      q_positions, kv_positions)
        return attn_reference.attention_backward(dout, q, k, v, out, lse, mask, score_mod, scale, operands,
                                                 q_positions, kv_positions)
    q_runs, kv_runs = runs
    if len(q_runs) == len(kv_runs) == 1:  # the common case: no accumulation buffers
        dq, dk, dv, _, _ = triton_attention.backward(_call(q, k, v, mask, score_mod, scale, operands,
                                                           q_runs[0], kv_runs[0]), dout, out, lse)
        return dq, dk, dv
    grads = [torch.zeros(t.shape, dtype=torch.float32, device=t.device) for t in (q, k, v)]
    for q_run in q_runs:
        for kv_run in kv_runs:
            call = _call(q, k, v, mask, score_mod, scale, operands, q_run, kv_run)
            dq, dk, dv, _, _ = triton_attention.backward(call, _rows(dout, q_run), _rows(out, q_run),
                                                         lse.narrow(2, q_run[0], q_run[1]))
            _rows(grads[0], q_run).add_(dq)
            _rows(grads[1], kv_run).add_(dk)
            _rows(grads[2], kv_run).add_(dv)
    return tuple(g.to(t.dtype) for g, t in zip(grads, (q, k, v)))


GENERATED = LocalAttention("generated kernels or the fused CPU kernel where they run, else the reference",
                           forward, backward)
