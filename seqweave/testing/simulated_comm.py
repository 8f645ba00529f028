"""An in-memory `Communicator` for P ranks running as threads of one process.

`SimulatedCommunicator` has the public surface, argument checks and byte counting of
`runtime.comm.Communicator`, so the runtime's distributed ops run on it unchanged. What the
ranks share lives in one `Fabric`: mailboxes keyed by (group, source, destination, tag) for
point-to-point messages, a rendezvous per collective (matched, as a real backend does, by the
order each rank issues them in its group), and who failed or finished.

A wait never hangs: it raises `CommError` (naming rank, step and op) at its deadline, at once
when another rank has failed, when the rank it waits for has finished its program without
sending, or when every running rank waits (a deadlock). Received tensors are copies; a receive
buffer holds NaN until its wait, so reading one before waiting shows in the numbers. Each rank
records a trace of what it sent and joined (`TraceEntry`), and the fabric lists transfers that
were started but never waited, and messages nobody received (`Fabric.leftovers`).
"""
from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from seqweave.ir.sharding import hybrid_groups
from seqweave.runtime.comm import KINDS, MAX_CHANNELS, CommError, Communicator, Pending
from seqweave.runtime.hybrid import HybridCommunicator

Group = tuple[int, ...]  # world ranks of a group, in group-rank order

_REDUCE: dict[Any, Callable[[torch.Tensor], torch.Tensor]] = {
    dist.ReduceOp.SUM: lambda stacked: stacked.sum(0),
    dist.ReduceOp.PRODUCT: lambda stacked: stacked.prod(0),
    dist.ReduceOp.MIN: lambda stacked: stacked.amin(0),
    dist.ReduceOp.MAX: lambda stacked: stacked.amax(0),
}


@dataclass(frozen=True)
class TraceEntry:
    """One thing a rank did on the wire: a `send`/`recv` (peer = world rank) or a collective
    (`all_to_all`, `all_gather`, `all_reduce`; peer None), with its counted kind (KINDS)."""

    action: str
    kind: str
    op: str
    step: int
    group: Group
    peer: int | None
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass
class _Message:
    tensor: torch.Tensor
    step: int
    op: str


@dataclass
class _Meeting:
    """One collective's rendezvous: what each group rank brought, and how many took their result."""

    deposits: dict[int, tuple[tuple, torch.Tensor, int, str]] = field(default_factory=dict)
    taken: int = 0


class Fabric:
    """What the simulated ranks share. All state changes under one condition variable."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.cond = threading.Condition()
        self.mailboxes: dict[tuple, collections.deque[_Message]] = collections.defaultdict(collections.deque)
        self.meetings: dict[tuple[Group, int], _Meeting] = {}
        self.failure: tuple[int, BaseException] | None = None
        self.finished: set[int] = set()
        self.waiting: dict[int, tuple[Callable[[], bool], str]] = {}  # world rank -> (ready?, what it waits for)
        self.traces: list[list[TraceEntry]] = [[] for _ in range(world)]
        self.unwaited: list[dict[int, "SimulatedPending"]] = [{} for _ in range(world)]

    def fail(self, rank: int, error: BaseException) -> None:
        """Record the first failure (the cause; later ones are its consequences) and wake every waiter."""
        with self.cond:
            if self.failure is None:
                self.failure = (rank, error)
            self.cond.notify_all()

    def finish(self, rank: int) -> None:
        with self.cond:
            self.finished.add(rank)
            self.cond.notify_all()

    def check_alive(self, me: int, where: str) -> None:
        """Raise at once if another rank failed: this rank would wait for it forever."""
        if self.failure is not None and self.failure[0] != me:
            rank, error = self.failure
            raise CommError(f"{where}: rank {rank} failed ({type(error).__name__}: {_first_line(error)})",
                            hint=f"see rank {rank}'s error, the cause of this one")

    def wait_for(self, me: int, ready: Callable[[], bool], deadline: float, where: str, waits_for: str,
                 gone: Callable[[], str | None], timeout_s: float) -> None:
        """Block (holding `cond`) until ready(); CommError past `deadline`, when another rank failed,
        when `gone()` names a rank that finished without doing its part, or on a deadlock."""
        while not ready():
            self.check_alive(me, where)
            missing = gone()
            if missing is not None:
                raise CommError(f"{where}: {missing} finished its program without its part of this transfer",
                                hint="the ranks ran different schedules: compare their traces")
            self.waiting[me] = (ready, f"rank {me}: {where} ({waits_for})")
            try:
                self._check_deadlock(me, where)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise CommError(f"{where} timed out after {timeout_s:g} s ({waits_for})",
                                    hint="a peer stalled or runs another schedule; if it is only slow, "
                                         f"raise timeout_s (now {timeout_s:g} s)")
                self.cond.wait(remaining)
            finally:
                del self.waiting[me]

    def _check_deadlock(self, me: int, where: str) -> None:
        if len(self.waiting) + len(self.finished) < self.world:
            return
        if any(ready() for ready, _ in self.waiting.values()):
            return
        others = "; ".join(text for rank, (_, text) in sorted(self.waiting.items()) if rank != me)
        raise CommError(f"{where}: deadlock, every running rank waits ({others or 'no other rank runs'})",
                        hint="the ranks' sends and receives do not pair up: compare their traces")

    def leftovers(self) -> list[str]:
        """Transfers started but never waited, and messages sent but never received: schedule bugs."""
        found = []
        for rank, pendings in enumerate(self.unwaited):
            for pending in pendings.values():
                found.append(f"rank {rank}: step {pending.step}, {pending.op}: {pending.describe()} started but "
                             "never waited")
        for (group, src, dst, tag), box in sorted(self.mailboxes.items(), key=lambda item: item[0][1:]):
            for message in box:
                found.append(f"rank {src}: step {message.step}, {message.op}: a message to rank {dst} (tag {tag}) "
                             "was never received")
        return found


class SimulatedPending(Pending):
    """The transfers one `exchange` started; as `runtime.comm.Pending`, whose `wait_one` it keeps
    (so the runtime's own code between a receive and its use is what the simulation runs)."""

    def __init__(self, comm: "SimulatedCommunicator", sends: list[int], recvs: list[tuple[int, torch.Tensor]],
                 tag: int, step: int, op: str) -> None:
        self._comm, self._sends, self._recvs, self._tag = comm, sends, recvs, tag
        self.step, self.op = step, op
        self._received = [buffer for _, buffer in recvs]
        self._done = False

    def describe(self) -> str:
        parts = [f"a send to rank {self._comm.group[p]}" for p in self._sends]
        parts += [f"a receive from rank {self._comm.group[p]}" for p, _ in self._recvs]
        return ", ".join(parts)

    def wait(self) -> list[torch.Tensor]:
        """Wait for every receive (sends complete when started); one deadline of `timeout_s` from now."""
        if not self._done:
            deadline = time.monotonic() + self._comm.timeout_s
            for peer, buffer in self._recvs:
                self._comm._receive(peer, buffer, self._tag, deadline, self.step, self.op)
            self._done = True
            self._comm._fabric.unwaited[self._comm.world_rank].pop(id(self), None)
        return self._received


class SimulatedCommunicator(Communicator):
    """`Communicator` over a `Fabric` for the group `group` (world ranks); this rank is `world_rank`."""

    def __init__(self, fabric: Fabric, group: Sequence[int], world_rank: int, timeout_s: float = 60.0) -> None:
        if timeout_s <= 0:
            raise ValueError(f"Communicator: timeout_s must be > 0, got {timeout_s!r}")
        self._fabric, self.group, self.world_rank = fabric, tuple(group), world_rank
        self.rank, self.world = self.group.index(world_rank), len(self.group)
        self.timeout_s = float(timeout_s)
        self.stats = {kind: {"calls": 0, "bytes_sent": 0} for kind in KINDS}
        self._collectives = 0  # collectives this rank issued in the group: the rendezvous key

    # -- point to point
    def exchange(self, sends: Sequence[tuple[int, torch.Tensor]], recvs: Sequence[tuple[int, torch.Tensor]],
                 step: int, op: str, *, channel: int = 0, kind: str = "p2p") -> SimulatedPending:
        if not 0 <= channel < MAX_CHANNELS or step < 0:
            raise ValueError(f"rank {self.rank}: {op}: need step >= 0 and 0 <= channel < {MAX_CHANNELS}, "
                             f"got step {step}, channel {channel}")
        tag = step * MAX_CHANNELS + channel  # as the real Communicator tags messages
        for peer, _ in [*sends, *recvs]:
            self._global(peer)
        fabric = self._fabric
        with fabric.cond:
            fabric.check_alive(self.world_rank, self._where(step, op))
            for peer, tensor in sends:
                payload = tensor.contiguous()
                key = (self.group, self.world_rank, self.group[peer], tag)
                fabric.mailboxes[key].append(_Message(payload.clone(), step, op))
                self._trace("send", kind, op, step, self.group[peer], payload)
                self.stats[kind]["bytes_sent"] += payload.numel() * payload.element_size()
            fabric.cond.notify_all()
        buffers = [(peer, _poisoned(like)) for peer, like in recvs]
        for peer, buffer in buffers:
            self._trace("recv", kind, op, step, self.group[peer], buffer)
        self.stats[kind]["calls"] += bool(sends or recvs)
        pending = SimulatedPending(self, [peer for peer, _ in sends], buffers, tag, step, op)
        if sends or recvs:
            fabric.unwaited[self.world_rank][id(pending)] = pending
        return pending

    def _receive(self, peer: int, buffer: torch.Tensor, tag: int, deadline: float, step: int, op: str) -> None:
        fabric, src = self._fabric, self.group[peer]
        key = (self.group, src, self.world_rank, tag)
        where = self._where(step, op)
        with fabric.cond:
            fabric.wait_for(self.world_rank, lambda: bool(fabric.mailboxes.get(key)), deadline, where,
                            f"a message from rank {src}", lambda: f"rank {src}" if src in fabric.finished else None,
                            self.timeout_s)
            message = fabric.mailboxes[key].popleft()
            if not fabric.mailboxes[key]:
                del fabric.mailboxes[key]
        if message.tensor.shape != buffer.shape or message.tensor.dtype != buffer.dtype:
            raise CommError(f"{where} from rank {src}: expected {_described(buffer)} but rank {src} sent "
                            f"{_described(message.tensor)} (its step {message.step}, {message.op})",
                            hint="the ranks ran different schedules: compare their traces")
        buffer.copy_(message.tensor)

    # -- collectives
    def all_to_all(self, chunks: Sequence[torch.Tensor], step: int, op: str,
                   kind: str = "all_to_all") -> list[torch.Tensor]:
        if len(chunks) != self.world or len({(c.shape, c.dtype) for c in chunks}) != 1:
            raise ValueError(f"rank {self.rank}: step {step}, {op}: all_to_all needs {self.world} chunks of one "
                             f"shape and dtype, got {[(tuple(c.shape), c.dtype) for c in chunks]}")
        stacked = torch.stack(list(chunks))
        deposits = self._meet("all_to_all", kind, stacked, step, op)
        self.stats[kind]["calls"] += 1
        self.stats[kind]["bytes_sent"] += (self.world - 1) * chunks[0].numel() * chunks[0].element_size()
        return [deposits[src][self.rank].clone() for src in range(self.world)]

    def all_gather(self, tensor: torch.Tensor, step: int, op: str, kind: str = "gather") -> torch.Tensor:
        payload = tensor.contiguous().reshape(1, *tensor.shape)
        deposits = self._meet("all_gather", kind, payload[0], step, op)
        self.stats[kind]["calls"] += 1
        self.stats[kind]["bytes_sent"] += (self.world - 1) * payload.numel() * payload.element_size()
        return torch.stack(deposits)

    def all_reduce(self, tensor: torch.Tensor, step: int, op: str,
                   reduce_op: Any = dist.ReduceOp.SUM) -> torch.Tensor:
        if reduce_op not in _REDUCE:
            raise ValueError(f"rank {self.rank}: step {step}, {op}: the simulation reduces with "
                             f"{sorted(map(str, _REDUCE))}, not {reduce_op}")
        deposits = self._meet("all_reduce", "all_reduce", tensor, step, op, reduce_op)
        tensor.copy_(_REDUCE[reduce_op](torch.stack(deposits)))  # rank order: every rank gets the same bits
        self.stats["all_reduce"]["calls"] += 1
        self.stats["all_reduce"]["bytes_sent"] += tensor.numel() * tensor.element_size()
        return tensor

    def _meet(self, action: str, kind: str, tensor: torch.Tensor, step: int, op: str,
              reduce_op: Any = None) -> list[torch.Tensor]:
        """Join this group's next collective: every member's tensor, in group-rank order (each a copy its
        member made; readers copy what they return)."""
        fabric, where = self._fabric, self._where(step, op)
        key = (self.group, self._collectives)
        self._collectives += 1
        signature = (action, str(reduce_op), tuple(tensor.shape), tensor.dtype)
        self._trace(action, kind, op, step, None, tensor)
        with fabric.cond:
            fabric.check_alive(self.world_rank, where)
            meeting = fabric.meetings.setdefault(key, _Meeting())
            meeting.deposits[self.rank] = (signature, tensor.detach().clone(), step, op)
            fabric.cond.notify_all()
            fabric.wait_for(self.world_rank, lambda: len(meeting.deposits) == self.world, time.monotonic()
                            + self.timeout_s, where, f"the group {list(self.group)} to join {action}",
                            lambda: self._absent(meeting), self.timeout_s)
            self._check_same(meeting, signature, where)
            meeting.taken += 1
            if meeting.taken == self.world:
                del fabric.meetings[key]
        return [meeting.deposits[member][1] for member in range(self.world)]  # private copies; read only

    def _absent(self, meeting: _Meeting) -> str | None:
        gone = [self.group[m] for m in range(self.world) if m not in meeting.deposits
                and self.group[m] in self._fabric.finished]
        return f"rank {gone[0]}" if gone else None

    def _check_same(self, meeting: _Meeting, signature: tuple, where: str) -> None:
        for member, (theirs, _, step, op) in sorted(meeting.deposits.items()):
            if theirs != signature:
                raise CommError(f"{where}: joined {signature[0]} of {_shape_text(signature)} while rank "
                                f"{self.group[member]} joined {theirs[0]} of {_shape_text(theirs)} (its step {step}, "
                                f"{op})", hint="the ranks ran different schedules: compare their traces")

    # -- helpers
    def _global(self, peer: int) -> int:
        if not 0 <= peer < self.world:
            raise ValueError(f"rank {self.rank}: peer {peer} is outside the group of {self.world} ranks")
        return self.group[peer]

    def _where(self, step: int, op: str) -> str:
        world = "" if self.rank == self.world_rank and len(self.group) == self._fabric.world else \
            f" (world rank {self.world_rank})"
        return f"rank {self.rank}{world}: step {step}, {op}"

    def _trace(self, action: str, kind: str, op: str, step: int, peer: int | None, tensor: torch.Tensor) -> None:
        self._fabric.traces[self.world_rank].append(
            TraceEntry(action, kind, op, step, self.group, peer, tuple(tensor.shape), tensor.dtype))


class SimulatedHybridCommunicator(SimulatedCommunicator, HybridCommunicator):
    """The world's simulated communicator carrying this rank's Ulysses-group (`inner`) and ring-group
    (`outer`) communicators, grouped as `runtime.hybrid.hybrid_groups` groups real ranks."""

    def __init__(self, fabric: Fabric, world_rank: int, ulysses: int, timeout_s: float = 60.0) -> None:
        SimulatedCommunicator.__init__(self, fabric, range(fabric.world), world_rank, timeout_s)
        inner_groups, outer_groups = hybrid_groups(fabric.world, ulysses)
        mine = lambda groups: next(g for g in groups if world_rank in g)  # noqa: E731
        self.inner = SimulatedCommunicator(fabric, mine(inner_groups), world_rank, timeout_s)
        self.outer = SimulatedCommunicator(fabric, mine(outer_groups), world_rank, timeout_s)

    def communicators(self) -> list[SimulatedCommunicator]:
        return [self, self.inner, self.outer]


def _poisoned(like: torch.Tensor) -> torch.Tensor:
    """A receive buffer shaped like `like`, NaN (floating) until its wait fills it."""
    buffer = torch.empty_like(like, memory_format=torch.contiguous_format)
    return buffer.fill_(float("nan")) if buffer.is_floating_point() or buffer.is_complex() else buffer.fill_(-1)


def _described(tensor: torch.Tensor) -> str:
    return f"{str(tensor.dtype).removeprefix('torch.')}{list(tensor.shape)}"


def _shape_text(signature: tuple) -> str:
    return f"{str(signature[3]).removeprefix('torch.')}{list(signature[2])}"


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else ""
