"""Deterministic live-bytes accounting at the dispatch level.

`with LiveBytes() as live: step()` sees every ATen op the body runs (forward, the autograd
engine's backward, seqweave's programs alike) and keeps, for every storage an op produced, a
weak reference and its size. Before each op's outputs are counted, storages that died are
dropped, so `live.device_now` is exactly what the step holds at that op, and `device_peak` the
most it ever held. Nothing here is sampled or timed: the same step gives the same numbers.

Only storages created inside the body count: parameters, inputs and anything allocated
before are not activations. Storages of the host pool (`runtime.host_pool`) are accounted
apart, as `host_now` / `host_peak`: on CUDA they are pinned host memory, and on CPU they are a
separate arena, so a plan that moves activations there is testable on either.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from seqweave.runtime import host_pool


@dataclass(frozen=True)
class LiveStorage:
    """One storage alive at some point: who made it, its size, and the shape it was made with."""

    op: str
    nbytes: int
    shape: tuple[int, ...]


class LiveBytes(TorchDispatchMode):
    """Live device bytes after every op of the body, their peak, and what was live at the peak."""

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, tuple[StorageWeakRef, LiveStorage]] = {}
        self.device_now = 0
        self.device_peak = 0
        self.host_peak = 0
        self.ops = 0
        #: the storages live when the device peak was reached, largest first
        self.at_peak: list[LiveStorage] = []

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        # Without this, torch.compile runs the model eagerly under the mode (it cannot trace
        # through it); with it, compiling happens outside the mode and the compiled programs
        # run inside it, so what is counted is what seqweave runs.
        return True

    @property
    def host_now(self) -> int:
        return host_pool.bytes_in_use()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._drop_dead()
        # A result sharing an operand's memory (a view, an in-place op) allocated nothing: it is
        # counted already, or it views memory from before the body (a parameter), never counted.
        operands = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                    if isinstance(t, torch.Tensor) and not t.is_meta}
        for value in tree_leaves(out):
            if isinstance(value, torch.Tensor) and not value.is_meta and \
                    value.untyped_storage().data_ptr() not in operands:
                self._count(func, value)
        self.ops += 1
        self.host_peak = max(self.host_peak, self.host_now)
        if self.device_now > self.device_peak:
            self.device_peak = self.device_now
            self.at_peak = sorted((entry for _, entry in self._live.values()), key=lambda e: -e.nbytes)
        return out

    def _drop_dead(self) -> None:
        dead = [key for key, (ref, _) in self._live.items() if ref.expired()]
        for key in dead:
            self.device_now -= self._live.pop(key)[1].nbytes

    def _count(self, func: Any, tensor: torch.Tensor) -> None:
        if tensor.is_meta or type(tensor) is not torch.Tensor and not isinstance(tensor, torch.nn.Parameter):
            return  # fake or wrapper tensors own no memory of their own
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key == 0 or storage.nbytes() == 0 or key in self._live or host_pool.owns(storage):
            return  # empty, already counted (a view, an in-place result) or host pool memory
        entry = LiveStorage(getattr(func, "__name__", str(func)), storage.nbytes(), tuple(tensor.shape))
        self._live[key] = (StorageWeakRef(storage), entry)
        self.device_now += entry.nbytes

    def summary(self, top: int = 8) -> str:
        """The peak and the largest storages live at it, one per line (for finding where bytes go)."""
        lines = [f"device peak {self.device_peak / 2**20:.1f} MiB over {self.ops} ops; host peak "
                 f"{self.host_peak / 2**20:.1f} MiB; largest live at the device peak:"]
        lines += [f"  {e.nbytes / 2**20:9.1f} MiB  {e.op:<28} {list(e.shape)}" for e in self.at_peak[:top]]
        return "\n".join(lines)
