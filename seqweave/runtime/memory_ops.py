"""The runtime's `mem.*` ops: pooled host arenas and, on CUDA, copies on a side stream.

On CUDA an offload is issued on the side stream after the compute stream's work so far (the
value's producer), and the value's memory is not reused until that copy has read it
(`record_stream`). A prefetch is issued on the same side stream, so it follows the offload of
the same bytes, and records an event that `mem.wait` makes the compute stream wait for: the
copy overlaps whatever the backward computes between the two. On CPU both are plain copies
into and out of the host pool (`runtime.host_pool`), so a plan is exact and testable here.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from seqweave.ir.graph import Node
from seqweave.ir.ops import op_def
from seqweave.ir.ops.mem import host_view
from seqweave.runtime import host_pool

MEMORY_OPS = ("mem.host_arena", "mem.offload", "mem.prefetch", "mem.wait")
_SIDE_STREAMS: dict[torch.device, Any] = {}
_READY = "_seqweave_ready"  # the event a prefetched tensor's copy records, until `mem.wait` reads it


def _side_stream(device: torch.device) -> Any:
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device=device)
    return _SIDE_STREAMS[device]


def host_arena(x: torch.Tensor, *, nbytes: int, **_: Any) -> torch.Tensor:
    return host_pool.acquire(nbytes, x.device)


def offload(x: torch.Tensor, arena: torch.Tensor, *, offset: int, **_: Any) -> torch.Tensor:
    host = host_view(arena, offset, x)
    if x.device.type != "cuda":
        return host.copy_(x)
    side = _side_stream(x.device)
    side.wait_stream(torch.cuda.current_stream(x.device))
    with torch.cuda.stream(side):
        host.copy_(x, non_blocking=True)
    x.record_stream(side)  # x's memory stays until the copy has read it
    return host


def prefetch(host: torch.Tensor, **_: Any) -> torch.Tensor:
    device = host_pool.device_of(host)
    if device.type != "cuda":
        return host.to(device, copy=True)
    out = torch.empty(host.shape, dtype=host.dtype, device=device)
    side = _side_stream(device)
    side.wait_stream(torch.cuda.current_stream(device))  # `out`'s memory may have just been freed there
    with torch.cuda.stream(side):
        out.copy_(host, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record(side)
    setattr(out, _READY, ready)
    return out


def wait(x: torch.Tensor, **_: Any) -> torch.Tensor:
    ready = getattr(x, _READY, None)
    if ready is not None:
        torch.cuda.current_stream(x.device).wait_event(ready)
        delattr(x, _READY)
    return x


_IMPLEMENTATIONS: dict[str, Callable[..., Any]] = {
    "mem.host_arena": host_arena, "mem.offload": offload, "mem.prefetch": prefetch, "mem.wait": wait}


def bind(node: Node) -> Callable[..., Any]:
    """The runtime implementation of a `mem.*` node (quantize, dequantize and drop run their reference)."""
    if node.op in _IMPLEMENTATIONS:
        return _IMPLEMENTATIONS[node.op]
    definition = op_def(node.op)
    return lambda *args, **kwargs: definition.reference(node, *args, **kwargs)
