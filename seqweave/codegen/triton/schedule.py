"""Which tiles each program visits: the per-block kv (or q) ranges, from `MaskSpec.block_class`.

A kernel program owns one q block (forward, dq) or one kv block (dk/dv) and walks two lists:
FULL tiles, where no mask arithmetic is done, and PARTIAL tiles, where the generated predicate
runs. EMPTY tiles are in neither list, so they are never visited. A tile that sticks out past
the end of either sequence is treated as PARTIAL, because the predicate's path also does the
bounds checks. Classification uses global positions (`q_offset`, `kv_offset`), so ring steps
skip exactly the tiles the mask hides.
"""
from __future__ import annotations

import functools
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from seqweave.codegen.triton.tile_grid import EMPTY, FULL, PARTIAL, make_blocks, tile_grid
from seqweave.ir.mask import BlockClass, MaskSpec
from seqweave.ir.mask_parser import parse_mask

_CODES = {BlockClass.EMPTY: EMPTY, BlockClass.FULL: FULL, BlockClass.PARTIAL: PARTIAL}


@dataclass(frozen=True)
class TileLists:
    """For each owning block, the tiles it visits: kind 0 = FULL, kind 1 = PARTIAL (int32)."""

    count: torch.Tensor  # [2, num_owners]
    index: torch.Tensor  # [2, num_owners, max(1, longest list)]; past `count` never read

    @property
    def owners(self) -> int:
        return self.count.shape[1]

    def to(self, device: torch.device) -> "TileLists":
        return TileLists(self.count.to(device), self.index.to(device))

    def tiles(self, owner: int, kind: int) -> list[int]:
        """The tile indices `owner` visits with kind 0 (FULL) or 1 (PARTIAL)."""
        return self.index[kind, owner, : int(self.count[kind, owner])].tolist()

    def kernel_arguments(self) -> list:
        """Counts, Indices, stride_count_kind, stride_index_kind, stride_index_owner."""
        return [self.count, self.index, self.count.stride(0), self.index.stride(0), self.index.stride(1)]


@dataclass(frozen=True)
class Schedule:
    """Tile classes of one attention call and the lists the kernels walk."""

    classes: torch.Tensor  # [num_q_blocks, num_kv_blocks] of EMPTY / FULL / PARTIAL
    by_q_block: TileLists  # forward and dq: kv tiles per q block
    by_kv_block: TileLists  # dk / dv: q tiles per kv block

    def to(self, device: torch.device) -> "Schedule":
        return Schedule(self.classes, self.by_q_block.to(device), self.by_kv_block.to(device))


def _block_range(index: int, block: int, length: int, offset: int) -> tuple[int, int]:
    return offset + index * block, offset + min((index + 1) * block, length)


def tile_classes_per_tile(mask: MaskSpec, q_len: int, kv_len: int, block_m: int, block_n: int, q_offset: int = 0,
                          kv_offset: int = 0, operands: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """[num_q_blocks, num_kv_blocks] int8 classes from `block_class`, one call per tile (the slow, plain way)."""
    num_m, num_n = -(-q_len // block_m), -(-kv_len // block_n)
    rows = [[_CODES[mask.block_class(_block_range(m, block_m, q_len, q_offset),
                                     _block_range(n, block_n, kv_len, kv_offset), operands)]
             for n in range(num_n)] for m in range(num_m)]
    return torch.tensor(rows, dtype=torch.int8).reshape(num_m, num_n)


def _mark_ragged(classes: torch.Tensor, q_len: int, kv_len: int, block_m: int, block_n: int) -> torch.Tensor:
    """FULL tiles that stick out past a sequence end become PARTIAL (that path does the bounds checks)."""
    classes = classes.clone()
    for edge, ragged in ((classes[-1:, :], q_len % block_m), (classes[:, -1:], kv_len % block_n)):
        if ragged:
            edge[edge == FULL] = PARTIAL
    return classes


def tile_classes(mask: MaskSpec, q_len: int, kv_len: int, block_m: int, block_n: int, q_offset: int = 0,
                 kv_offset: int = 0, operands: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """[num_q_blocks, num_kv_blocks] int8 tile classes (ragged FULL tiles count as PARTIAL).

    Uses the whole-grid rules of `tile_grid` where every part of the mask has one, else
    `block_class` tile by tile.
    """
    grid = None
    if operands is not None or not mask.is_data_dependent():
        blocks = make_blocks(q_len, kv_len, block_m, block_n, q_offset, kv_offset)
        grid = tile_grid(mask, blocks, operands or ())
    shape = (-(-q_len // block_m), -(-kv_len // block_n))
    if grid is None:
        grid = tile_classes_per_tile(mask, q_len, kv_len, block_m, block_n, q_offset, kv_offset, operands)
    return _mark_ragged(torch.broadcast_to(grid, shape), q_len, kv_len, block_m, block_n)


def _lists(classes: torch.Tensor) -> TileLists:
    """Per row of `classes`: the column indices of its FULL and of its PARTIAL tiles."""
    hits = torch.stack([classes == FULL, classes == PARTIAL])
    count = hits.sum(2).to(torch.int32)
    width = max(1, int(count.max()) if count.numel() else 1)
    # A stable sort puts each row's hit columns first, in order; the tail is never read.
    order = torch.sort((~hits).to(torch.int8), dim=2, stable=True).indices[..., :width]
    return TileLists(count.contiguous(), order.to(torch.int32).contiguous())


def schedule_from_classes(classes: torch.Tensor) -> Schedule:
    """Both walking orders from one tile-class grid."""
    return Schedule(classes, _lists(classes), _lists(classes.t()))


@functools.lru_cache(maxsize=256)
def _structured_schedule(mask_text: str, q_len: int, kv_len: int, block_m: int, block_n: int,
                         q_offset: int, kv_offset: int, device: str) -> Schedule:
    """Memoised per device too: a ring step or a layer reuses the lists already on the GPU
    instead of copying them from the host on every call."""
    classes = tile_classes(parse_mask(mask_text), q_len, kv_len, block_m, block_n, q_offset, kv_offset)
    return schedule_from_classes(classes).to(torch.device(device))


@dataclass(frozen=True)
class _HeldSchedule:
    operands: tuple[torch.Tensor, ...]  # held, so their memory (and ids) cannot be reused while cached
    versions: tuple[int, ...]
    schedule: Schedule


class OperandSchedules:
    """Schedules of data-dependent masks, reused while the very same operand tensors are unchanged.

    A training step passes one document-id tensor to every layer and ring step; classifying it
    once per (shape, offsets, tiles) saves a device-to-host copy, and so a GPU sync, per layer.
    An entry matches only the same tensor objects (held here, so their ids cannot be reused) at
    the same version counters (bumped by any in-place write). Inference tensors have no version
    counter and are classified on every call.
    """

    def __init__(self, capacity: int = 64) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[tuple, _HeldSchedule] = OrderedDict()

    def get(self, key: tuple, operands: Sequence[torch.Tensor], build: Callable[[], Schedule]) -> Schedule:
        """The held schedule for `key` if its operands are unchanged, else `build()` (then held)."""
        versions = _versions(operands)
        if versions is None:
            return build()
        key = key + tuple(id(t) for t in operands)
        held = self._entries.get(key)
        if held and held.versions == versions and all(a is b for a, b in zip(held.operands, operands)):
            self._entries.move_to_end(key)
            return held.schedule
        self._entries[key] = _HeldSchedule(tuple(operands), versions, build())
        if len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
        return self._entries[key].schedule


def _versions(operands: Sequence[torch.Tensor]) -> tuple[int, ...] | None:
    try:
        return tuple(t._version for t in operands)
    except RuntimeError:  # inference tensors do not track versions
        return None


@functools.cache
def operand_schedules() -> OperandSchedules:
    """The process's cache of data-dependent schedules."""
    return OperandSchedules()


def build_schedule(mask: MaskSpec, q_len: int, kv_len: int, block_m: int, block_n: int, q_offset: int = 0,
                   kv_offset: int = 0, operands: Sequence[torch.Tensor] = (),
                   device: torch.device | str = "cpu") -> Schedule:
    """The schedule for one call, its lists on `device`. Masks of positions alone are memoised;
    masks that read operands are classified from the operands' values, once per unchanged operand."""
    device = str(torch.device(device))
    if not mask.is_data_dependent():
        return _structured_schedule(str(mask), q_len, kv_len, block_m, block_n, q_offset, kv_offset, device)

    def build() -> Schedule:
        host = [t.detach().cpu() for t in operands]  # one copy, not a device sync per tile
        classes = tile_classes(mask, q_len, kv_len, block_m, block_n, q_offset, kv_offset, host)
        return schedule_from_classes(classes).to(torch.device(device))
    key = (str(mask), q_len, kv_len, block_m, block_n, q_offset, kv_offset, device)
    return operand_schedules().get(key, operands, build)
