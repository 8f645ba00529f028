"""`seqweave run --nproc N script.py [args]`: start N local ranks the way torchrun does.

Each rank gets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT. Output lines are
prefixed with the rank. If any rank fails, the others are stopped and the launcher exits
with that rank's status, naming it: a dead rank never leaves the rest hanging.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Sequence, TextIO

POLL_S = 0.1
#: After one rank fails, the others get this long to exit on their own before being killed.
GRACE_S = 5.0


@dataclass(frozen=True)
class LaunchResult:
    """How the job ended: 0 if every rank exited cleanly, else the first failing rank and its status."""

    returncode: int
    failed_rank: int | None = None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rank_environment(rank: int, world: int, port: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    return env


def _pump(stream: TextIO, rank: int, sink: Callable[[str], None]) -> None:
    for line in stream:
        sink(f"[rank {rank}] {line}")


def _start(rank: int, world: int, port: int, command: Sequence[str], sink: Callable[[str], None]):
    process = subprocess.Popen(command, env=rank_environment(rank, world, port), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, bufsize=1)
    threading.Thread(target=_pump, args=(process.stdout, rank, sink), daemon=True).start()
    return process


def _stop(processes: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + GRACE_S
    while time.monotonic() < deadline and any(p.poll() is None for p in processes):
        time.sleep(POLL_S)
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait()


def launch(nproc: int, script: str, args: Sequence[str] = (), sink: Callable[[str], None] = sys.stdout.write,
           python: str = sys.executable) -> LaunchResult:
    """Run `python script args...` on `nproc` local ranks and wait for all of them."""
    if nproc < 1:
        raise ValueError(f"--nproc must be at least 1, got {nproc}")
    port = free_port()
    processes = [_start(rank, nproc, port, [python, script, *args], sink) for rank in range(nproc)]
    while True:
        codes = [p.poll() for p in processes]
        failed = [rank for rank, code in enumerate(codes) if code not in (None, 0)]
        if failed:
            _stop(processes)
            return LaunchResult(codes[failed[0]], failed[0])
        if all(code == 0 for code in codes):
            return LaunchResult(0)
        time.sleep(POLL_S)
