"""`seqweave run --nproc N script.py [args]`: torchrun's standalone launcher, called from Python.

The ranks are started by torch's elastic agent (`torch.distributed.launcher.api`), exactly as
`torchrun --standalone --nproc-per-node N` would: a c10d rendezvous on localhost, the
torchrun environment (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR,
MASTER_PORT, TORCHELASTIC_*), output lines prefixed "[rank R] ", and torchrun's failure
handling: the first rank to fail stops the others and is reported with its exit code.
Nothing is restarted (a failed training step is a bug to see, not to retry).
"""
from __future__ import annotations

import signal
import sys
import tempfile
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

#: How often the agent checks on its ranks (s): a failure is noticed within this long.
MONITOR_S = 0.1
#: torchrun's rank prefix is "[default0]:"; ours names the global rank.
RANK_PREFIX = "[rank ${rank}] "
#: The signals torch's agent takes over while it runs (torchrun's default set).
AGENT_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT")


@dataclass(frozen=True)
class LaunchResult:
    """How the job ended: 0 if every rank exited cleanly, else the rank that failed first, its
    exit status (negative: killed by that signal) and torchrun's report of every failure."""

    returncode: int
    failed_rank: int | None = None
    report: str = ""


def launch_config(nproc: int, log_dir: str) -> LaunchConfig:
    """torchrun --standalone --nproc-per-node nproc --max-restarts 0 --tee 3, with our rank prefix."""
    return LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                        rdzv_backend="c10d", rdzv_endpoint="localhost:0",  # port 0: the store picks a free one
                        max_restarts=0, monitor_interval=MONITOR_S,
                        logs_specs=DefaultLogsSpecs(log_dir=log_dir, tee=Std.ALL),
                        log_line_prefix_template=RANK_PREFIX)


def root_cause(error: ChildFailedError) -> tuple[int, ProcessFailure]:
    """The rank that failed first. Ranks the agent then stopped with SIGTERM may be listed as
    failures too, at the same second (newer torch lists them), so they never count first."""
    stopped = -signal.SIGTERM
    own = {rank: failure for rank, failure in error.failures.items() if failure.exitcode != stopped}
    failures = own or error.failures
    rank = min(failures, key=lambda r: (failures[r].timestamp, r))
    return rank, failures[rank]


@contextmanager
def _signal_handlers_restored() -> Iterator[None]:
    """The agent installs its own handlers and leaves them; a library call must not keep them."""
    saved = {name: signal.getsignal(getattr(signal, name)) for name in AGENT_SIGNALS if hasattr(signal, name)}
    try:
        yield
    finally:
        for name, handler in saved.items():
            try:
                signal.signal(getattr(signal, name), handler)
            except ValueError:  # not the main thread: the agent could not install its handlers either
                pass


def launch(nproc: int, script: str, args: Sequence[str] = ()) -> LaunchResult:
    """Run `python -u script args...` on `nproc` local ranks and wait for all of them (or the
    first failure). Rank output goes to this process's stdout / stderr, prefixed by rank."""
    if nproc < 1:
        raise ValueError(f"--nproc must be at least 1, got {nproc}")
    with tempfile.TemporaryDirectory(prefix="seqweave-run-") as log_dir, _signal_handlers_restored():
        try:  # -u as torchrun: lines reach the prefixer as printed, even from a rank that is then killed
            elastic_launch(launch_config(nproc, log_dir), sys.executable)("-u", script, *args)
        except ChildFailedError as error:
            rank, failure = root_cause(error)
            return LaunchResult(failure.exitcode, rank, error.format_msg())
    return LaunchResult(0)
