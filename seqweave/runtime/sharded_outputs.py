"""outputs="sharded": the compiled step's sharded outputs handed to the caller as DTensors.

A sharded program returns this rank's rows of every output with a sequence dim. Here each
becomes a `DTensor` with `Shard(dim)` over a `DeviceMesh` of the sp ranks, so the caller keeps
working on shards (a loss on sharded logits, `.full_tensor()` only when asked). The rows are
in the layout's order: with balance="none" that is the global order; with "zigzag" or
"striped" it is the layout's permutation of positions, which token-wise work (a loss against
targets taken by `seqweave.shard` with the same balance) does not notice, and
`seqweave.unshard` restores. Padding rows (N that does not split) are dropped by a view whose
backward gives them a zero gradient; only balance="none" can drop them (compile refuses the rest).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from seqweave.ir.sharding import Layout, padded_length, shard_positions


def sp_mesh(device_type: str) -> DeviceMesh:
    """The mesh of every rank of the default group (the sp ranks), for this device type; built
    once per default group (a mesh over the whole world reuses that group)."""
    key = (device_type, id(dist.group.WORLD))
    if key not in _MESHES:
        _MESHES[key] = DeviceMesh(device_type, list(range(dist.get_world_size())))
    return _MESHES[key]


_MESHES: dict[tuple[str, int], DeviceMesh] = {}


def _contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride, running = [], 1
    for size in reversed(shape):
        stride.append(running)
        running *= size
    return tuple(reversed(stride))


class ShardedOutputs:
    """Wraps a compiled callable: outputs whose shape differs from the traced (global) shape in
    one dim are this rank's rows there, and come back as DTensors."""

    def __init__(self, global_shapes: list[tuple[int, ...] | None], length: int, balance: str) -> None:
        self.global_shapes, self.length, self.balance = global_shapes, length, Layout(balance)

    def wrap(self, compiled: Callable) -> Callable:
        def run(*args: Any) -> Any:
            outputs = compiled(*args)
            if isinstance(outputs, (tuple, list)):
                return type(outputs)(self._as_dtensor(out, index) for index, out in enumerate(outputs))
            return self._as_dtensor(outputs, 0)
        return run

    def _as_dtensor(self, local: Any, index: int) -> Any:
        shape = self.global_shapes[index] if index < len(self.global_shapes) else None
        if not isinstance(local, torch.Tensor) or shape is None or tuple(local.shape) == shape:
            return local
        dim = next(d for d, (have, want) in enumerate(zip(local.shape, shape)) if have != want)
        local = local.narrow(dim, 0, self._real_rows(local.shape[dim]))
        return DTensor.from_local(local, sp_mesh(local.device.type), [Shard(dim)], run_check=False,
                                  shape=torch.Size(shape), stride=_contiguous_stride(shape))

    def _real_rows(self, rows: int) -> int:
        """How many of this rank's `rows` are real positions (< N), not padding."""
        world, rank = dist.get_world_size(), dist.get_rank()
        positions = shard_positions(self.balance, rank, world, rows * world)
        return int((positions < self.length).sum())


def shard(tensor: torch.Tensor, dim: int, balance: str = "zigzag", mesh: DeviceMesh | None = None) -> DTensor:
    """This rank's rows of a whole `tensor` along `dim`, in `balance`'s layout, as a DTensor laid
    out like outputs="sharded" gives them (e.g. the targets of a loss on sharded logits).
    Lengths that do not split need balance="none"."""
    mesh = mesh or sp_mesh(tensor.device.type)
    world, rank, length = mesh.size(), mesh.get_local_rank(), tensor.shape[dim]
    layout = Layout(balance)
    padded = padded_length(length, world, layout)
    if padded != length and layout is not Layout.CONTIGUOUS:
        raise ValueError(f"seqweave.shard: {length} rows do not split over {world} ranks in the {balance} layout; "
                         f"use balance='none' or a length the layout splits ({padded - length} more rows)")
    positions = shard_positions(layout, rank, world, padded)
    rows = tensor.index_select(dim, positions[positions < length].to(tensor.device))
    return DTensor.from_local(rows, mesh, [Shard(dim)], run_check=False, shape=tensor.shape,
                              stride=_contiguous_stride(tuple(tensor.shape)))


def unshard(tensor: DTensor, balance: str = "zigzag") -> torch.Tensor:
    """The whole tensor in true position order, from a DTensor in `balance`'s row order."""
    dim = next(p.dim for p in tensor.placements if isinstance(p, Shard))
    whole = tensor.full_tensor()
    layout = Layout(balance)
    if layout is Layout.CONTIGUOUS:
        return whole
    world, length = tensor.device_mesh.size(), whole.shape[dim]
    order = torch.cat([shard_positions(layout, rank, world, length) for rank in range(world)])
    return whole.index_select(dim, torch.argsort(order).to(whole.device))
