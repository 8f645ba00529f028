"""Launch the generated flash-attention kernels: forward (out, lse) and backward (dq, dk, dv).

`q_offset` / `kv_offset` are the global positions of the first local query and key, so a ring
step evaluates the mask exactly where the keys really are. The schedule (which tiles each
program visits) comes from `MaskSpec.block_class`; pass a prebuilt one to reuse it across
calls with the same shapes and mask operands.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from types import ModuleType
from typing import Sequence

import torch
from torch import Tensor

from seqweave.codegen.cache import KernelCache
from seqweave.codegen.triton.attention_template import attention_source
from seqweave.codegen.triton.jit import device_key, jit_decorator
from seqweave.codegen.triton.schedule import Schedule, build_schedule
from seqweave.codegen.triton.specs import KernelSpec, LaunchKnobs, kernel_constants, make_spec, next_power_of_two
from seqweave.ir.mask import MaskSpec
from seqweave.ir.score_mod import ScoreMod
from seqweave.ir.ops.attn_reference import lse_dtype


@dataclass(frozen=True)
class Call:
    """One attention call's inputs and specialisation, as the launchers need them."""

    q: Tensor
    k: Tensor
    v: Tensor
    mask: MaskSpec
    operands: tuple[Tensor, ...]
    scale: float
    q_offset: int
    kv_offset: int
    spec: KernelSpec
    interpret: bool

    @property
    def batch_heads(self) -> int:
        return self.q.shape[0] * self.q.shape[1]


def make_call(q: Tensor, k: Tensor, v: Tensor, mask: MaskSpec, score_mod: ScoreMod, scale: float,
              operands: Sequence[Tensor], q_offset: int, kv_offset: int) -> Call:
    """Validate the inputs and pick the spec; interpret exactly when the tensors are on CPU."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [B, H, S, D]; got shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q_offset < 0 or kv_offset < 0:
        raise ValueError(f"q_offset and kv_offset are global positions and must be >= 0, got {q_offset}, {kv_offset}")
    interpret = not q.is_cuda
    q, k, v = (addressable(t) for t in (q, k, v))
    spec = make_spec(q, k, v, mask, score_mod, interpret)
    return Call(q, k, v, mask, tuple(operands), float(scale), int(q_offset), int(kv_offset), spec, interpret)


INT32_LIMIT = 2**31


def addressable(t: Tensor) -> Tensor:
    """`t`, or a contiguous copy, such that the kernels' 32-bit offsets inside one (batch, head)
    slice cannot overflow (their (batch, head) bases are 64-bit). A [B, S, H, D] view at a million
    tokens needs the copy; a contiguous [B, H, S, D] tensor fits up to 16M tokens at d = 128."""
    def reach(x: Tensor) -> int:
        return sum((size - 1) * stride for size, stride in zip(x.shape[2:], x.stride()[2:]))
    if t.stride(-1) == 1 and 0 not in t.stride() and reach(t) < INT32_LIMIT:
        return t
    t = t.contiguous()
    if reach(t) >= INT32_LIMIT:
        raise ValueError(f"one (batch, head) slice of shape {tuple(t.shape[2:])} has 2^31 elements or more; "
                         f"shard the sequence (sequence parallelism) so each rank holds less")
    return t


def kernels(spec: KernelSpec, device: str, interpret: bool, cache: KernelCache | None = None) -> ModuleType:
    """The compiled-on-demand module of kernels for `spec` (through the on-disk cache)."""
    if cache is None:
        return _default_module(spec, device, interpret)
    return cache.load(attention_source(spec), device, {"jit": jit_decorator(interpret)})


@functools.lru_cache(maxsize=None)
def _default_module(spec: KernelSpec, device: str, interpret: bool) -> ModuleType:
    """Memoised per process: a call's host work is a dict lookup, not generating and hashing source."""
    return KernelCache().load(attention_source(spec), device, {"jit": jit_decorator(interpret)})


def _operand_arguments(mask: MaskSpec, operands: Sequence[Tensor]) -> list:
    """Pointer and (b, h, q, k) element strides for each `$N` the mask reads; 2-D [B, S] operands
    use the b and k strides, 4-D (dense) ones broadcast size-1 dims with stride 0."""
    arguments: list = []
    for index in sorted(mask.operand_indices()):
        tensor = operands[index]
        tensor = tensor.to(torch.int32) if tensor.dtype in (torch.bool, torch.int64) else tensor
        if tensor.dim() == 2:
            arguments += [tensor, tensor.stride(0), 0, 0, tensor.stride(1)]
        else:
            view = tensor.reshape((1,) * (4 - tensor.dim()) + tuple(tensor.shape))
            arguments += [view] + [0 if view.shape[d] == 1 else view.stride(d) for d in range(4)]
    return arguments


def _strides(*tensors: Tensor) -> list[int]:
    return [s for t in tensors for s in t.stride()]


def _constants(call: Call, knobs: LaunchKnobs, count_visits: bool) -> dict:
    constants = kernel_constants(call.spec, knobs, count_visits)
    if not call.interpret:
        constants.update(num_warps=knobs.num_warps, num_stages=knobs.num_stages)
    return constants


def schedule_for(call: Call, knobs: LaunchKnobs) -> Schedule:
    """The tile schedule for this call at these block sizes, on the call's device."""
    return build_schedule(call.mask, call.q.shape[2], call.k.shape[2], knobs.block_m, knobs.block_n,
                          call.q_offset, call.kv_offset, call.operands, call.q.device)


def _visits_buffer(programs: int, batch_heads: int, device: torch.device, count: bool) -> Tensor:
    return torch.zeros((batch_heads, programs) if count else (1,), dtype=torch.int32, device=device)


def forward(call: Call, schedule: Schedule | None = None, count_visits: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """(out [B, Hq, Sq, Dv], lse [B, Hq, Sq] fp32, visits [B*Hq, q blocks]) for one call."""
    q, k, v = call.q, call.k, call.v
    knobs = call.spec.forward
    schedule = schedule or schedule_for(call, knobs)
    out = torch.empty(q.shape[:3] + v.shape[3:], dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:3], dtype=lse_dtype(q.dtype), device=q.device)
    lists = schedule.by_q_block
    visits = _visits_buffer(lists.owners, call.batch_heads, q.device, count_visits)
    module = kernels(call.spec, device_key(q), call.interpret)
    module.attention_forward[(lists.owners, call.batch_heads)](
        q, k, v, out, lse, *lists.kernel_arguments(), visits, *_operand_arguments(call.mask, call.operands),
        *_strides(q, k, v, out), *_sizes(call), **_constants(call, knobs, count_visits))
    return out, lse, visits


def _delta(call: Call, out: Tensor, dout: Tensor) -> Tensor:
    """rowsum(dO * O) per query row, fp32 [B, Hq, Sq] (FlashAttention-2's backward preprocess)."""
    delta = torch.empty(out.shape[:3], dtype=torch.float32, device=out.device)
    block = call.spec.backward.block_m
    grid = (-(-out.shape[2] // block), call.batch_heads)
    module = kernels(call.spec, device_key(out), call.interpret)
    launch = {} if call.interpret else dict(num_warps=call.spec.backward.num_warps)
    module.attention_backward_preprocess[grid](out, dout, delta, *_strides(out, dout), out.shape[1], out.shape[2],
                                               HEAD_DIM_V=call.spec.head_dim_v,
                                               BLOCK_DV=next_power_of_two(call.spec.head_dim_v), BLOCK_M=block,
                                               **launch)
    return delta


def backward(call: Call, dout: Tensor, out: Tensor, lse: Tensor, schedule: Schedule | None = None,
             count_visits: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dkdv visits [B*Hkv, kv blocks], dq visits [B*Hq, q blocks]) recomputed from lse."""
    q, k, v = (t.contiguous() for t in (call.q, call.k, call.v))  # dq, dk, dv are stored with these strides
    knobs = call.spec.backward
    schedule = schedule or schedule_for(call, knobs)
    dout, out = dout.contiguous(), addressable(out)
    lse = lse.to(torch.float32).contiguous()
    delta = _delta(call, out, dout)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    module = kernels(call.spec, device_key(q), call.interpret)
    common = dict(operands=_operand_arguments(call.mask, call.operands), constants=_constants(call, knobs, count_visits))
    kv_lists, q_lists = schedule.by_kv_block, schedule.by_q_block
    kv_visits = _visits_buffer(kv_lists.owners, k.shape[0] * k.shape[1], q.device, count_visits)
    module.attention_backward_dkdv[(kv_lists.owners, k.shape[0] * k.shape[1])](
        q, k, v, dout, lse, delta, dk, dv, *kv_lists.kernel_arguments(), kv_visits, *common["operands"],
        *_strides(q, k, v, dout), *_sizes(call), **common["constants"])
    q_visits = _visits_buffer(q_lists.owners, call.batch_heads, q.device, count_visits)
    module.attention_backward_dq[(q_lists.owners, call.batch_heads)](
        q, k, v, dout, lse, delta, dq, *q_lists.kernel_arguments(), q_visits, *common["operands"],
        *_strides(q, k, v, dout), *_sizes(call), **common["constants"])
    return dq, dk, dv, kv_visits, q_visits


def _sizes(call: Call) -> list:
    return [call.q.shape[1], call.q.shape[2], call.k.shape[2], call.q_offset, call.kv_offset, call.scale]
