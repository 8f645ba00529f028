"""Ranks fail together: before the first collective of a graph, every rank says whether it
compiled it, so one rank's error stops all of them at once instead of leaving the others
waiting in their first collective until the timeout."""
from __future__ import annotations

from typing import Callable, TypeVar

import torch.distributed as dist

from seqweave.errors import PeerFailedError

T = TypeVar("T")


def _failure_text(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def agreed(what: str, work: Callable[[], T]) -> T:
    """Run `work` on every rank of the default group; if any rank raises, all raise: the failing
    rank its own error, the others a PeerFailedError naming that rank and quoting its message."""
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return work()
    error: BaseException | None = None
    try:
        result = work()
    except PeerFailedError:
        raise  # already agreed on further down: every rank knows
    except Exception as raised:  # noqa: BLE001 (any failure must reach the other ranks)
        error = raised
    failures: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(failures, None if error is None else _failure_text(error))
    if error is not None:
        raise error
    failed = [(rank, text) for rank, text in enumerate(failures) if text]
    if failed:
        rank, text = failed[0]
        raise PeerFailedError(f"rank {rank} failed {what}: {text}",
                              hint=f"see rank {rank}'s error; this rank stopped with it instead of waiting for it")
    return result
