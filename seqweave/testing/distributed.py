"""Run a function on N real gloo ranks on localhost, for tests.

`run_ranks(world, fn, *args)` spawns `world` processes, initialises a gloo process group in
each (MASTER_ADDR=127.0.0.1, a free port), calls `fn(rank, world, *args)` and returns every
rank's result. `fn` must be importable (a module-level function) and its result picklable
by `torch.save`. Nothing here can hang: processes are joined against one deadline and
stragglers are killed. Results travel through files, not queues, so a rank that dies
mid-way (os._exit) cannot wedge the parent. A rank still running near the deadline writes
every thread's Python stack first (faulthandler), and its outcome carries that stack: a rank
that is merely very slow looks exactly like a hung one from outside, and the stack tells them
apart.
"""
from __future__ import annotations

import faulthandler
import os
import socket
import tempfile
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

POLL_S = 0.05  # how often the parent checks on its children
STACK_LEAD_S = 2.0  # a rank dumps its stacks this long before the deadline (capped at a tenth of it)


@dataclass(frozen=True)
class RankOutcome:
    """What one rank did: its return value, or the error it raised / how it died."""

    rank: int
    value: Any = None
    error: str | None = None  # "ExceptionType: message", or how the process ended without a result
    traceback: str | None = None
    exitcode: int | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class RankFailure(RuntimeError):
    """A rank raised, died or overran; the message carries that rank's traceback."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _save(path: Path, outcome: dict) -> None:
    """Write atomically, so the parent never reads half a result."""
    partial = path.with_suffix(".partial")
    torch.save(outcome, partial)
    os.replace(partial, path)


def _stack_path(result: Path) -> Path:
    return result.with_suffix(".stacks")


def _rank_main(rank: int, world: int, port: int, result_dir: str, pg_timeout_s: float, dump_at: float,
               fn: Callable[..., Any], args: tuple) -> None:
    """Child entry point: join the group, run fn, record the outcome, leave without cleanup hangs."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)  # N ranks share the machine's cores
    path = Path(result_dir) / f"rank{rank}.pt"
    stacks = open(_stack_path(path), "w")  # left open: faulthandler writes to it until the process ends
    faulthandler.dump_traceback_later(max(dump_at - time.time(), 0.1), file=stacks)  # wall clock: the parent's
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=pg_timeout_s))
        _save(path, {"value": fn(rank, world, *args)})
    except BaseException as error:  # noqa: BLE001 - report everything, including SystemExit
        _save(path, {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()})
        os._exit(1)  # a failed group can block in its destructor; the outcome is already on disk
    try:
        dist.barrier()  # nobody tears its connections down while a peer still reads from them
    finally:
        os._exit(0)


def _join(procs: list, deadline: float) -> None:
    """Wait until every process has exited or the deadline passes; kill what is left."""
    while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
        time.sleep(POLL_S)
    for p in procs:
        if p.is_alive():
            p.kill()
        p.join(5)


def _outcome(rank: int, path: Path, exitcode: int | None, timeout_s: float) -> RankOutcome:
    """Read one rank's result file, or describe how it ended without one."""
    if path.exists():
        saved = torch.load(path, weights_only=False)
        return RankOutcome(rank, saved.get("value"), saved.get("error"), saved.get("traceback"), exitcode)
    if exitcode is None or exitcode < 0:
        why = f"was killed (still running after {timeout_s:g} s)" if exitcode in (None, -9) else \
            f"died from signal {-exitcode}"
    else:
        why = f"exited with code {exitcode} before returning"
    stacks = _read_stacks(_stack_path(path))
    return RankOutcome(rank, error=f"rank {rank} {why}" + ("; its stacks just before are in the traceback"
                                                           if stacks else ""), traceback=stacks, exitcode=exitcode)


def _read_stacks(path: Path) -> str | None:
    """What faulthandler wrote near the deadline (None when the rank ended before it)."""
    text = path.read_text(errors="replace").strip() if path.exists() else ""
    return f"rank stacks just before the deadline (most recent call first):\n{text}" if text else None


def run_ranks_outcomes(world: int, fn: Callable[..., Any], *args: Any, timeout_s: float = 60.0,
                       pg_timeout_s: float | None = None) -> list[RankOutcome]:
    """Run fn(rank, world, *args) on `world` gloo ranks; every rank's outcome, failures included.

    `timeout_s` bounds the whole run (stragglers are killed); `pg_timeout_s` (default
    `timeout_s`) is the process group's own collective timeout.
    """
    if world < 1:
        raise ValueError(f"run_ranks: world must be >= 1, got {world}")
    context = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="seqweave-ranks-") as result_dir:
        port, pg_timeout = free_port(), pg_timeout_s or timeout_s
        dump_at = time.time() + timeout_s - min(STACK_LEAD_S, timeout_s / 10)
        procs = [context.Process(target=_rank_main, args=(rank, world, port, result_dir, pg_timeout, dump_at,
                                                          fn, args), daemon=True) for rank in range(world)]
        for p in procs:
            p.start()
        _join(procs, time.monotonic() + timeout_s)
        return [_outcome(rank, Path(result_dir) / f"rank{rank}.pt", p.exitcode, timeout_s)
                for rank, p in enumerate(procs)]


def run_ranks(world: int, fn: Callable[..., Any], *args: Any, timeout_s: float = 60.0,
              pg_timeout_s: float | None = None) -> list[Any]:
    """Each rank's return value of fn(rank, world, *args); raises RankFailure if any rank failed."""
    outcomes = run_ranks_outcomes(world, fn, *args, timeout_s=timeout_s, pg_timeout_s=pg_timeout_s)
    # A rank's own error first: the CommErrors of its peers are only the echo of it.
    failed = sorted((o for o in outcomes if not o.ok), key=lambda o: ((o.error or "").startswith("CommError"), o.rank))
    if failed:
        first = failed[0]
        others = "".join(f"\n  rank {o.rank}: {o.error}" for o in failed[1:])
        raise RankFailure(f"{len(failed)} of {world} ranks failed running {getattr(fn, '__name__', fn)}; "
                          f"rank {first.rank}: {first.error}{others}\n{first.traceback or ''}")
    return [o.value for o in outcomes]
