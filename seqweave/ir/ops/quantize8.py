"""8-bit storage of an activation (Mesa): int8 codes and fp32 scales packed in one byte buffer.

The last dim is cut into groups of `group` channels; every (row, group) gets its own scale
s = max|x| / 127 over the group's channels in that row, so one outlier token or channel
widens only its own group's step. Codes are round(x / s) in [-127, 127]. Error bound, per
element: |x - dequantize(quantize(x))| <= s / 2 + (x's own rounding to its dtype); the
scale is computed from the tensor itself, so nothing is ever clipped.

Packing: [codes: numel int8][pad to 4][scales: rows * groups fp32]. One buffer per value
keeps a saved activation one tensor, which is what autograd stores between the passes.
"""
from __future__ import annotations

import math

import torch

QMAX = 127.0
DEFAULT_GROUP = 64


def groups_of(shape: tuple[int, ...], group: int) -> tuple[int, int]:
    """(rows, groups per row) of a tensor of `shape` cut into `group`-channel groups."""
    channels = shape[-1] if shape else 1
    rows = math.prod(shape[:-1]) if len(shape) > 1 else 1
    return rows, math.ceil(channels / group)


def packed_nbytes(shape: tuple[int, ...], group: int = DEFAULT_GROUP) -> int:
    """Bytes of the packed buffer of a tensor of `shape`."""
    rows, groups = groups_of(shape, group)
    return _scales_offset(math.prod(shape)) + 4 * rows * groups


def _scales_offset(numel: int) -> int:
    return (numel + 3) // 4 * 4


def _grouped(x: torch.Tensor, group: int) -> torch.Tensor:
    """x as [rows, groups, group] fp32, the last group padded with zeros."""
    rows, groups = groups_of(tuple(x.shape), group)
    flat = x.reshape(rows, -1).float()
    pad = groups * group - flat.shape[1]
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    return flat.reshape(rows, groups, group)


#: elements converted at a time: the fp32 temporaries stay near 1 MiB whatever the value's size
CHUNK_ELEMENTS = 1 << 18


def _row_chunks(rows: int, channels: int) -> list[slice]:
    step = max(1, CHUNK_ELEMENTS // max(channels, 1))
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]


def quantize(x: torch.Tensor, group: int = DEFAULT_GROUP) -> torch.Tensor:
    """The packed uint8 buffer of `x` (any floating dtype, any shape)."""
    shape, numel = tuple(x.shape), x.numel()
    rows, groups = groups_of(shape, group)
    channels = shape[-1] if shape else 1
    packed = torch.empty(packed_nbytes(shape, group), dtype=torch.uint8, device=x.device)
    codes_out = packed[:numel].view(torch.int8).view(rows, channels)
    scales_out = packed[_scales_offset(numel):].view(torch.float32).view(rows, groups)
    flat = x.reshape(rows, channels)
    for chunk in _row_chunks(rows, channels):
        grouped = _grouped(flat[chunk], group)
        scales = grouped.abs().amax(dim=-1) / QMAX
        safe = torch.where(scales > 0, scales, torch.ones_like(scales))
        codes = torch.round(grouped / safe[..., None]).clamp_(-QMAX, QMAX).to(torch.int8)
        codes_out[chunk].copy_(codes.reshape(codes.shape[0], -1)[:, :channels])
        scales_out[chunk].copy_(scales)
    return packed


def dequantize(packed: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype,
               group: int = DEFAULT_GROUP) -> torch.Tensor:
    """The tensor of `shape` and `dtype` that `packed` stores (within `error_bound`)."""
    numel = math.prod(shape)
    rows, groups = groups_of(shape, group)
    channels = shape[-1] if shape else 1
    codes = packed[:numel].view(torch.int8).view(rows, channels)
    scales = packed[_scales_offset(numel):].view(torch.float32).view(rows, groups)
    out = torch.empty((rows, channels), dtype=dtype, device=packed.device)
    for chunk in _row_chunks(rows, channels):
        per_channel = scales[chunk].repeat_interleave(group, dim=1)[:, :channels]
        out[chunk].copy_(codes[chunk].float() * per_channel)
    return out.reshape(shape)


def error_bound(x: torch.Tensor, group: int = DEFAULT_GROUP) -> torch.Tensor:
    """The per-element bound on |x - dequantize(quantize(x))|, shaped like x: half a step of its
    group, plus the rounding of the product and of the cast back to x's dtype."""
    rows, groups = groups_of(tuple(x.shape), group)
    channels = x.shape[-1] if x.dim() else 1
    half_step = _grouped(x, group).abs().amax(dim=-1) / QMAX / 2
    per_channel = half_step.repeat_interleave(group, dim=1)[:, :channels].reshape(x.shape)
    eps = max(torch.finfo(x.dtype).eps, torch.finfo(torch.float32).eps)
    return per_channel + 2 * eps * (x.abs().float() + 2 * per_channel)
