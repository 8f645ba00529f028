"""Blockwise attention in plain torch: the reference for `attn.sdpa` and its backward.

Tiles of BLOCK_Q x BLOCK_KV are classified by `MaskSpec.block_class`: EMPTY tiles are
skipped, FULL tiles do no mask arithmetic, PARTIAL tiles evaluate the mask on the tile
only. No N x N score or mask matrix is ever built. Grouped-query attention runs without
expanding K/V: q heads are viewed as [B, H_kv, G, S, D] (the `repeat_kv` order).
Accumulation is fp32 (fp64 for fp64 inputs); rows with no visible key give out = 0 and
lse = -inf, and contribute nothing to the gradients.
"""
from __future__ import annotations

from typing import Sequence

import torch

from seqweave.ir.mask import BlockClass, MaskSpec
from seqweave.ir.score_mod import NoScoreMod, ScoreMod

BLOCK_Q = 128
BLOCK_KV = 128


def _accum_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """lse is fp32, except fp64 for fp64 attention (so float64 references stay exact)."""
    return _accum_dtype(dtype)


def _grouped(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[B, Hq, S, D] -> [B, H_kv, G, S, D] without copying."""
    b, hq, s, d = x.shape
    return x.view(b, kv_heads, hq // kv_heads, s, d)


def _tile_mask(mask: MaskSpec, q_idx: torch.Tensor, kv_idx: torch.Tensor,
               operands: Sequence[torch.Tensor], kv_heads: int) -> torch.Tensor:
    """The mask of one tile, broadcastable to the grouped scores [B, H_kv, G, Q, K]."""
    allowed = mask.evaluate(q_idx, kv_idx, operands)
    b, h, q, k = allowed.shape
    if h == 1:
        return allowed.view(b, 1, 1, q, k)
    return allowed.view(b, kv_heads, h // kv_heads, q, k)


class _Tile:
    """Positions, index slices and the mask of one (q block, kv block) pair."""

    def __init__(self, mask: MaskSpec, rows: slice, cols: slice, positions: "_Positions",
                 operands: Sequence[torch.Tensor], kv_heads: int) -> None:
        self.q, self.kv = rows, cols
        q_pos, kv_pos = positions.q[rows], positions.kv[cols]
        self.cls = mask.block_class(_span(q_pos), _span(kv_pos), operands) \
            if _contiguous(q_pos) and _contiguous(kv_pos) else BlockClass.PARTIAL
        self.allowed = None
        if self.cls is BlockClass.PARTIAL:
            self.allowed = _tile_mask(mask, q_pos, kv_pos, operands, kv_heads)


def _contiguous(pos: torch.Tensor) -> bool:
    return pos.numel() < 2 or bool((pos[1:] - pos[:-1] == 1).all())


def _span(pos: torch.Tensor) -> tuple[int, int]:
    return int(pos[0]), int(pos[-1]) + 1


class _Positions:
    """Global positions of the local queries and keys (default: 0..S-1). Under sequence
    parallelism a shard's positions may be offset, split in chunks (zigzag) or strided."""

    def __init__(self, sq: int, skv: int, device: torch.device,
                 q: torch.Tensor | None, kv: torch.Tensor | None) -> None:
        self.q = q.to(device) if q is not None else torch.arange(sq, device=device)
        self.kv = kv.to(device) if kv is not None else torch.arange(skv, device=device)
        if self.q.shape != (sq,) or self.kv.shape != (skv,):
            raise ValueError(f"positions {tuple(self.q.shape)} / {tuple(self.kv.shape)} do not match "
                             f"{sq} queries and {skv} keys")


def _tiles(mask: MaskSpec, positions: _Positions, operands: Sequence[torch.Tensor], kv_heads: int, q0: int):
    """The non-EMPTY tiles of the query block starting at row q0."""
    rows = slice(q0, min(q0 + BLOCK_Q, positions.q.numel()))
    for k0 in range(0, positions.kv.numel(), BLOCK_KV):
        tile = _Tile(mask, rows, slice(k0, min(k0 + BLOCK_KV, positions.kv.numel())), positions, operands, kv_heads)
        if tile.cls is not BlockClass.EMPTY:
            yield tile


def _scores(q: torch.Tensor, k: torch.Tensor, scale: float, score_mod: ScoreMod) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw scaled scores and scores after the score mod, [B, H_kv, G, Q, K]."""
    raw = torch.matmul(q, k.unsqueeze(2).transpose(-1, -2)) * scale
    return raw, score_mod.apply(raw)


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: MaskSpec,
                      score_mod: ScoreMod, scale: float, operands: Sequence[torch.Tensor] = (),
                      q_positions: torch.Tensor | None = None,
                      kv_positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, Hq, Sq, D], k [B, Hkv, Skv, D], v [B, Hkv, Skv, Dv] -> out [B, Hq, Sq, Dv], lse [B, Hq, Sq] fp32 (fp64 for fp64).

    `q_positions` / `kv_positions` (1-D int64) are the global positions the mask is evaluated at.
    """
    acc_dtype = _accum_dtype(q.dtype)
    kv_heads = k.shape[1]
    qg, kc, vc = _grouped(q, kv_heads).to(acc_dtype), k.to(acc_dtype), v.to(acc_dtype)
    b, _, g, sq, _ = qg.shape
    positions = _Positions(sq, k.shape[2], q.device, q_positions, kv_positions)
    out = torch.zeros(b, kv_heads, g, sq, v.shape[-1], dtype=acc_dtype, device=q.device)
    lse = torch.full((b, kv_heads, g, sq), float("-inf"), dtype=acc_dtype, device=q.device)
    for q0 in range(0, sq, BLOCK_Q):
        rows = slice(q0, min(q0 + BLOCK_Q, sq))
        running_max = torch.full_like(lse[..., rows], float("-inf"))
        denom = torch.zeros_like(running_max)
        acc = torch.zeros_like(out[..., rows, :])
        for tile in _tiles(mask, positions, operands, kv_heads, q0):
            _, s = _scores(qg[..., rows, :], kc[:, :, tile.kv], scale, score_mod)
            if tile.allowed is not None:
                s = s.masked_fill(~tile.allowed, float("-inf"))
            new_max = torch.maximum(running_max, s.amax(-1))
            safe_max = torch.where(torch.isinf(new_max), torch.zeros_like(new_max), new_max)
            p = torch.exp(s - safe_max.unsqueeze(-1))
            del s, _  # tile-sized: dropped once used
            rescale = torch.exp(running_max - safe_max)
            denom = denom * rescale + p.sum(-1)
            acc = acc * rescale.unsqueeze(-1) + torch.matmul(p, vc[:, :, tile.kv].unsqueeze(2))
            running_max = new_max
        visible = denom > 0
        out[..., rows, :] = torch.where(visible.unsqueeze(-1), acc / denom.clamp_min(1e-30).unsqueeze(-1), 0.0)
        lse[..., rows] = torch.where(visible, running_max + torch.log(denom.clamp_min(1e-30)), float("-inf"))
    return out.reshape(q.shape[:3] + (v.shape[-1],)).to(q.dtype), lse.reshape(q.shape[:3]).to(lse_dtype(q.dtype))


def attention_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       out: torch.Tensor, lse: torch.Tensor, mask: MaskSpec, score_mod: ScoreMod,
                       scale: float, operands: Sequence[torch.Tensor] = (),
                       q_positions: torch.Tensor | None = None,
                       kv_positions: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """Gradients (dq, dk, dv) recomputed tile by tile from lse, as in FlashAttention-2.

    `out` and `lse` may come from a merge over several KV blocks (ring attention): with the
    final lse, each block's share of the gradient is exactly what this computes for it.
    """
    acc_dtype = _accum_dtype(q.dtype)
    kv_heads = k.shape[1]
    qg, dog = _grouped(q, kv_heads).to(acc_dtype), _grouped(dout, kv_heads).to(acc_dtype)
    kc, vc = k.to(acc_dtype), v.to(acc_dtype)
    lse_g = lse.view(qg.shape[:4]).to(acc_dtype)
    delta = (dog * _grouped(out, kv_heads).to(acc_dtype)).sum(-1)  # rowsum(dO * O): [B, H_kv, G, Sq]
    dq, dk, dv = torch.zeros_like(qg), torch.zeros_like(kc), torch.zeros_like(vc)
    positions = _Positions(qg.shape[3], k.shape[2], q.device, q_positions, kv_positions)
    for q0 in range(0, qg.shape[3], BLOCK_Q):
        rows = slice(q0, min(q0 + BLOCK_Q, qg.shape[3]))
        row_lse = lse_g[..., rows]
        safe_lse = torch.where(torch.isinf(row_lse), torch.full_like(row_lse, float("inf")), row_lse)
        for tile in _tiles(mask, positions, operands, kv_heads, q0):
            # tile-sized temporaries are dropped as soon as they are used: at long context the
            # rest is small, and these are what a step holds on top of its activations
            raw, s = _scores(qg[..., rows, :], kc[:, :, tile.kv], scale, score_mod)
            p = torch.exp(s - safe_lse.unsqueeze(-1))
            del s
            if tile.allowed is not None:
                p = p.masked_fill(~tile.allowed, 0.0)
            do_rows = dog[..., rows, :]
            dv[:, :, tile.kv] += torch.matmul(p.transpose(-1, -2), do_rows).sum(2)
            dp = torch.matmul(do_rows, vc[:, :, tile.kv].unsqueeze(2).transpose(-1, -2))
            ds = p * (dp - delta[..., rows].unsqueeze(-1))
            del p, dp
            if not isinstance(score_mod, NoScoreMod):
                ds = ds * score_mod.grad_factor(raw)
            del raw
            ds = ds * scale
            dq[..., rows, :] += torch.matmul(ds, kc[:, :, tile.kv].unsqueeze(2))
            dk[:, :, tile.kv] += torch.matmul(ds.transpose(-1, -2), qg[..., rows, :]).sum(2)
            del ds
    return dq.reshape(q.shape).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def merge_partials(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
                   lse_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine attention over two disjoint key sets from their (out, lse): the ring's LSE merge.

    out [B, H, S, Dv], lse [B, H, S] fp32. Accumulates in fp32 (fp64 for fp64 outputs); a row
    that sees no key in either part stays out = 0, lse = -inf (never NaN).
    """
    acc = _accum_dtype(out_a.dtype)
    lse = torch.logaddexp(lse_a.to(acc), lse_b.to(acc))
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    weight_a = torch.exp(lse_a.to(acc) - safe).unsqueeze(-1)
    weight_b = torch.exp(lse_b.to(acc) - safe).unsqueeze(-1)
    out = weight_a * out_a.to(acc) + weight_b * out_b.to(acc)
    return out.to(out_a.dtype), lse.to(lse_dtype(out_a.dtype))
