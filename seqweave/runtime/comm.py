"""Communication for sequence parallelism: ring shifts, point-to-point, all-to-all, all-reduce.

`Communicator` wraps a torch.distributed process group (gloo on CPU, NCCL on GPU). Every
transfer starts asynchronously and is waited with a deadline of `timeout_s`, so a dead or
stalled peer makes the waiting ranks raise `CommError` (naming rank, step and op) instead
of hanging. Create the process group with the same timeout
(`init_process_group(..., timeout=timedelta(seconds=timeout_s))`) so that collectives
issued outside this class are bounded too (the constructor also sets it where torch allows).

Measured on gloo (torch 2.13, CPU): `work.wait(timeout=...)` is honoured for send, recv and
collectives and raises RuntimeError("Timed out waiting ...") at the deadline; a peer that
exits makes pending and later transfers to it raise "Connection closed by peer" at once.
A timed-out wait closes the gloo pair, so after a CommError the group is unusable: the
caller should tear the job down, not retry.
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from seqweave.errors import SeqweaveError
from seqweave.ir.sharding import MAX_CHANNELS, message_tag

#: Collective kinds counted in `Communicator.stats`.
#: gather: outputs put back together; states: LASP-2's all-gather of linear-attention states.
KINDS = ("shift", "p2p", "all_to_all", "all_reduce", "gather", "states")


class CommError(SeqweaveError):
    """A transfer failed or passed its deadline: a peer died, stalled, or runs another schedule."""


@dataclass(frozen=True)
class _Transfer:
    """One started isend/irecv/collective; `peer` is a group rank, or None for a collective."""

    work: Any
    peer: int | None
    outgoing: bool


class Pending:
    """The transfers one call started. `wait()` blocks until all finish (or raises CommError)
    and returns the received tensors, in the order the receives were asked for."""

    def __init__(self, comm: "Communicator", transfers: list[_Transfer], received: list[torch.Tensor],
                 step: int, op: str) -> None:
        self._comm, self._transfers, self._received = comm, transfers, received
        self._step, self._op = step, op

    def wait(self) -> list[torch.Tensor]:
        """Wait for every transfer; the whole call shares one deadline of `timeout_s` from now."""
        deadline = time.monotonic() + self._comm.timeout_s
        for transfer in self._transfers:
            self._comm._await(transfer, deadline, self._step, self._op)
        return self._received

    def wait_one(self) -> torch.Tensor | None:
        """wait(), for calls with at most one receive: that tensor, or None if nothing was received."""
        received = self.wait()
        return received[0] if received else None


class Communicator:
    """Deadline-bounded transfers over `group` (default: the world group), with byte counters.

    `stats[kind]` counts, per kind in KINDS, the `calls` that moved data and the payload
    `bytes_sent` by this rank (for all_reduce the tensor's size, not the algorithm's traffic).
    """

    def __init__(self, group: dist.ProcessGroup | None = None, timeout_s: float = 60.0) -> None:
        if timeout_s <= 0:
            raise ValueError(f"Communicator: timeout_s must be > 0, got {timeout_s!r}")
        self.group = group if group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        self.world = dist.get_world_size(self.group)
        self.timeout_s = float(timeout_s)
        _set_group_timeout(self.group, self.timeout_s)
        self.stats = {kind: {"calls": 0, "bytes_sent": 0} for kind in KINDS}

    @property
    def bytes_sent(self) -> int:
        """Payload bytes this rank has sent, over every kind."""
        return sum(entry["bytes_sent"] for entry in self.stats.values())

    def shift(self, tensor: torch.Tensor | None, step: int, op: str, *,
              recv_like: torch.Tensor | None = None, channel: int = 0) -> Pending:
        """Ring shift: send `tensor` to rank+1 and receive a tensor like `recv_like` from rank-1.

        Either side may be None (a mask-aware schedule skips a send on the sender and the
        matching receive on the receiver). Returns at once; `wait_one()` gives the received tensor.
        """
        sends = [] if tensor is None else [((self.rank + 1) % self.world, tensor)]
        recvs = [] if recv_like is None else [((self.rank - 1) % self.world, recv_like)]
        return self.exchange(sends, recvs, step, op, channel=channel, kind="shift")

    def exchange(self, sends: Sequence[tuple[int, torch.Tensor]], recvs: Sequence[tuple[int, torch.Tensor]],
                 step: int, op: str, *, channel: int = 0, kind: str = "p2p") -> Pending:
        """Start point-to-point sends [(peer, tensor)] and receives [(peer, like)] (group ranks).

        Receives land in fresh tensors shaped like `like`. At most one message per peer and
        direction per (step, channel): they share a tag.
        """
        if not 0 <= channel < MAX_CHANNELS or step < 0:
            raise ValueError(f"rank {self.rank}: {op}: need step >= 0 and 0 <= channel < {MAX_CHANNELS}, "
                             f"got step {step}, channel {channel}")
        tag = message_tag(step, channel)
        transfers, received = [], []
        for peer, tensor in sends:
            payload = tensor.contiguous()
            start = functools.partial(dist.isend, payload, dst=self._global(peer), group=self.group, tag=tag)
            transfers.append(self._start(start, peer, True, step, op))
            self.stats[kind]["bytes_sent"] += payload.numel() * payload.element_size()
        for peer, like in recvs:
            buffer = torch.empty_like(like, memory_format=torch.contiguous_format)
            start = functools.partial(dist.irecv, buffer, src=self._global(peer), group=self.group, tag=tag)
            transfers.append(self._start(start, peer, False, step, op))
            received.append(buffer)
        self.stats[kind]["calls"] += bool(transfers)
        return Pending(self, transfers, received, step, op)

    def all_to_all(self, chunks: Sequence[torch.Tensor], step: int, op: str,
                   kind: str = "all_to_all") -> list[torch.Tensor]:
        """Send chunks[j] to rank j; return what each rank i sent here (same shape as chunks[i]).

        Every chunk must have one shape and dtype (Ulysses' equal head/sequence splits).
        """
        if len(chunks) != self.world or len({(c.shape, c.dtype) for c in chunks}) != 1:
            raise ValueError(f"rank {self.rank}: step {step}, {op}: all_to_all needs {self.world} chunks of one "
                             f"shape and dtype, got {[(tuple(c.shape), c.dtype) for c in chunks]}")
        stacked = torch.stack(list(chunks))  # [world, *chunk]: row j goes to rank j
        output = torch.empty_like(stacked)
        start = functools.partial(dist.all_to_all_single, output, stacked, group=self.group, async_op=True)
        transfer = self._start(start, None, True, step, op)
        self._await(transfer, time.monotonic() + self.timeout_s, step, op)
        self.stats[kind]["calls"] += 1
        self.stats[kind]["bytes_sent"] += (self.world - 1) * chunks[0].numel() * chunks[0].element_size()
        return list(output.unbind(0))

    def all_gather(self, tensor: torch.Tensor, step: int, op: str, kind: str = "gather") -> torch.Tensor:
        """Every rank's `tensor` (one shape and dtype), stacked in rank order: [world, *tensor.shape].

        One `all_gather_into_tensor` into one buffer: the only full-size tensor this call allocates.
        """
        payload = tensor.contiguous().reshape(1, *tensor.shape)  # gloo concatenates along dim 0
        output = payload.new_empty((self.world, *tensor.shape))
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.13
        start = functools.partial(gather, output, payload, group=self.group, async_op=True)
        transfer = self._start(start, None, True, step, op)
        self._await(transfer, time.monotonic() + self.timeout_s, step, op)
        self.stats[kind]["calls"] += 1
        self.stats[kind]["bytes_sent"] += (self.world - 1) * payload.numel() * payload.element_size()
        return output

    def all_reduce(self, tensor: torch.Tensor, step: int, op: str,
                   reduce_op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> torch.Tensor:
        """Reduce `tensor` over the group in place (and return it)."""
        start = functools.partial(dist.all_reduce, tensor, op=reduce_op, group=self.group, async_op=True)
        transfer = self._start(start, None, True, step, op)
        self._await(transfer, time.monotonic() + self.timeout_s, step, op)
        self.stats["all_reduce"]["calls"] += 1
        self.stats["all_reduce"]["bytes_sent"] += tensor.numel() * tensor.element_size()
        return tensor

    def _global(self, peer: int) -> int:
        """The global rank of group rank `peer` (isend/irecv address global ranks)."""
        if not 0 <= peer < self.world:
            raise ValueError(f"rank {self.rank}: peer {peer} is outside the group of {self.world} ranks")
        return dist.get_global_rank(self.group, peer)

    def _start(self, start: Callable[[], Any], peer: int | None, outgoing: bool, step: int, op: str) -> _Transfer:
        """Start one async transfer; a backend that fails at once (a pair already closed) raises CommError."""
        try:
            return _Transfer(start(), peer, outgoing)
        except RuntimeError as error:
            raise self._error(_Transfer(None, peer, outgoing), step, op, error) from error

    def _await(self, transfer: _Transfer, deadline: float, step: int, op: str) -> None:
        """Wait for one transfer until `deadline` (time.monotonic); raise CommError past it or on failure."""
        remaining = max(deadline - time.monotonic(), 1e-3)
        try:
            finished = transfer.work.wait(timeout=timedelta(seconds=remaining))
        except RuntimeError as error:
            raise self._error(transfer, step, op, error) from error
        if finished is False:  # some backends report a timeout by returning False
            raise self._error(transfer, step, op, None)

    def _error(self, transfer: _Transfer, step: int, op: str, cause: RuntimeError | None) -> CommError:
        """The CommError for a failed or timed-out transfer: who, which step, which op, what to do."""
        text = "" if cause is None else str(cause)
        timed_out = cause is None or "timed out" in text.lower() or "timeout" in text.lower()
        reason = f"timed out after {self.timeout_s:g} s" if timed_out else f"failed: {_first_line(text)}"
        if transfer.peer is None:
            where, hint = "", "a peer died or stalled — check the other ranks' logs"
        else:
            where = f" {'to' if transfer.outgoing else 'from'} rank {transfer.peer}"
            hint = f"a peer died or stalled — check rank {transfer.peer}'s log"
        hint += f"; if it is only slow, raise timeout_s (now {self.timeout_s:g} s)"
        return CommError(f"rank {self.rank}: step {step}, {op}{where} {reason}", hint=hint)


def _set_group_timeout(group: dist.ProcessGroup, timeout_s: float) -> None:
    """Bound collectives issued outside this class too. Uses torch's private setter where it
    exists (torch >= 2.4); elsewhere the group keeps the timeout it was created with."""
    setter = getattr(dist.distributed_c10d, "_set_pg_timeout", None)
    if setter is not None:
        setter(timedelta(seconds=timeout_s), group)


def _first_line(text: str, limit: int = 200) -> str:
    """The first sentence of a backend error, without gloo's source-location prefix."""
    line = text.strip().splitlines()[0] if text.strip() else "unknown error"
    if line.startswith("[") and "] " in line:
        line = line.split("] ", 1)[1]
    return line.split(". ", 1)[0][:limit]
