"""`Communicator` delivers what was sent, from whom it was sent, once the transfer has finished.

The real `Communicator` runs over a stand-in for torch.distributed's point-to-point calls with
their documented semantics (an `irecv` buffer holds the data only once its work is waited), on
three ranks in threads of this process: no processes to spawn, and no timing luck. Three
ranks, because on two "the previous rank" and "the next rank" are the same one. Each payload
carries its sender's rank, so what arrives says where it came from. The same transfers on
real gloo ranks are tested end to end by test_sequence_parallel.py.
"""
from __future__ import annotations

import queue
import threading
import types
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
import torch

import seqweave.runtime.comm as comm_module
from seqweave.runtime.comm import Communicator

WORLD, SIZE = 3, 8


class _Mailboxes:
    """One FIFO per (source, destination, tag), shared by the ranks."""

    def __init__(self) -> None:
        self._lock, self._boxes = threading.Lock(), {}

    def box(self, src: int, dst: int, tag: int) -> queue.Queue:
        with self._lock:
            return self._boxes.setdefault((src, dst, tag), queue.Queue())


class _Group:
    def __init__(self, rank: int, world: int, mail: _Mailboxes) -> None:
        self.rank, self.world, self.mail = rank, world, mail


class _SendWork:
    def wait(self, timeout: timedelta | None = None) -> bool:
        return True  # buffered: the payload was copied when the send was posted


class _RecvWork:
    """Fills the receive buffer when waited, as a backend may: before that it holds nothing sent."""

    def __init__(self, box: queue.Queue, buffer: torch.Tensor) -> None:
        self.box, self.buffer = box, buffer

    def wait(self, timeout: timedelta | None = None) -> bool:
        try:
            payload = self.box.get(timeout=timeout.total_seconds() if timeout else 5.0)
        except queue.Empty:
            raise RuntimeError("Timed out waiting for a message") from None
        self.buffer.copy_(payload)
        return True


def _fake_dist() -> types.SimpleNamespace:
    def isend(tensor, dst, group, tag):
        group.mail.box(group.rank, dst, tag).put(tensor.clone())
        return _SendWork()

    def irecv(tensor, src, group, tag):
        return _RecvWork(group.mail.box(src, group.rank, tag), tensor)

    return types.SimpleNamespace(
        get_rank=lambda group: group.rank, get_world_size=lambda group: group.world,
        get_global_rank=lambda group, peer: peer, isend=isend, irecv=irecv,
        distributed_c10d=types.SimpleNamespace(), group=types.SimpleNamespace(WORLD=None))


def _payload(rank: int, step: int) -> torch.Tensor:
    return torch.full((SIZE,), 100.0 * step + rank, dtype=torch.float64)


def _run_ranks(monkeypatch, worker) -> list:
    monkeypatch.setattr(comm_module, "dist", _fake_dist())
    mail = _Mailboxes()
    comms = [Communicator(_Group(rank, WORLD, mail), timeout_s=5) for rank in range(WORLD)]
    with ThreadPoolExecutor(WORLD) as pool:
        return list(pool.map(worker, comms))


def test_a_shift_receives_from_the_previous_rank(monkeypatch):
    def shifts(comm: Communicator) -> list[torch.Tensor]:
        like = torch.zeros(SIZE, dtype=torch.float64)
        return [comm.shift(_payload(comm.rank, step), step, "test shift", recv_like=like, channel=step).wait_one()
                for step in range(2)]

    for rank, received in enumerate(_run_ranks(monkeypatch, shifts)):
        for step, got in enumerate(received):
            torch.testing.assert_close(got, _payload((rank - 1) % WORLD, step),
                                       msg=f"rank {rank}, shift {step}: not rank {(rank - 1) % WORLD}'s payload")


@pytest.mark.parametrize("call", ["shift", "exchange"])
def test_a_receive_waits_for_a_late_send(monkeypatch, call):
    """Rank 0 sends only after rank 1 has started its receive; rank 1 must get the payload."""
    started = threading.Event()

    def late(comm: Communicator):
        like = torch.zeros(SIZE, dtype=torch.float64)
        if comm.rank == 0:
            started.wait(5)
            comm.exchange([(1, _payload(0, 7))], [], 5, "late send").wait()
        elif comm.rank == 1:
            if call == "shift":
                pending = comm.shift(None, 5, "late receive", recv_like=like)
                started.set()
                return pending.wait_one()
            pending = comm.exchange([], [(0, like)], 5, "late receive")
            started.set()
            return pending.wait()[0]

    received = _run_ranks(monkeypatch, late)[1]
    torch.testing.assert_close(received, _payload(0, 7), msg="rank 1 read its receive buffer before it was waited")
