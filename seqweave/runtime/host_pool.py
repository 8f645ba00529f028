"""Host arenas for offloaded activations, allocated once and reused every step.

A training step that offloads takes one arena for all of its offloaded values (each at the
offset the plan gave it) when its forward starts. The arena is busy while any tensor that
views it is alive (the backward drops them as it prefetches them back), and is reused by a
later step once free; two steps alive at once (two forwards before one backward) get two
arenas, never one written twice. On CUDA arenas are pinned, allocated up front: allocating
pinned memory on the fly synchronises the device and would kill the overlap the plan counts
on. Arenas are made outside any dispatch mode and accounted apart from the device
(`runtime.live_bytes`).
"""
from __future__ import annotations

import threading

import torch
from torch.utils._mode_utils import no_dispatch

_LOCK = threading.Lock()
#: (nbytes, device served) -> arenas of that size
_ARENAS: dict[tuple[int, torch.device], list[torch.Tensor]] = {}
#: data pointer of every arena -> the device whose steps it serves
_POINTERS: dict[int, torch.device] = {}


def _use_count(arena: torch.Tensor) -> int:
    return torch._C._storage_Use_Count(arena.untyped_storage()._cdata)


#: the use count of an arena nobody views: the pool's own reference (plus the one `_use_count` takes)
_IDLE = 2


def acquire(nbytes: int, device: torch.device) -> torch.Tensor:
    """A free uint8 arena of `nbytes` on the host for a step whose tensors live on `device`."""
    pinned = device.type == "cuda"
    with _LOCK:
        arenas = _ARENAS.setdefault((nbytes, device), [])
        free = [arena for arena in arenas if _use_count(arena) <= _IDLE]
        if free:
            arena = free[0]
        else:
            with no_dispatch():
                arena = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
            arenas.append(arena)
            _POINTERS[arena.data_ptr()] = device
        with no_dispatch():
            return arena[:]  # a view of its own: the arena is busy from now until the step lets go


def owns(storage: torch.UntypedStorage) -> bool:
    """Is `storage` one of the pool's arenas?"""
    return storage.data_ptr() in _POINTERS


def device_of(host: torch.Tensor) -> torch.device:
    """The device whose step offloaded `host` (a view of one of the pool's arenas)."""
    device = _POINTERS.get(host.untyped_storage().data_ptr())
    if device is None:
        raise ValueError("this tensor is not in the host pool: mem.prefetch reads what mem.offload wrote")
    return device


def bytes_in_use() -> int:
    """Bytes of the arenas some step is using now."""
    with _LOCK:
        return sum(arena.numel() for arenas in _ARENAS.values() for arena in arenas if _use_count(arena) > _IDLE)


def bytes_reserved() -> int:
    """Bytes of every arena the pool holds, busy or free."""
    with _LOCK:
        return sum(arena.numel() for arenas in _ARENAS.values() for arena in arenas)


def release_all() -> None:
    """Forget every arena (tests; arenas still viewed stay valid, they are just not reused)."""
    with _LOCK:
        _ARENAS.clear()
        _POINTERS.clear()
