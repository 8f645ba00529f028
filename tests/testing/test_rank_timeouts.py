"""`run_ranks`: a rank still running at the deadline is killed, and its outcome says where it was.

From outside, a rank that is only very slow looks like a hung one; the stack each rank writes
just before the deadline tells them apart (a slow striped ring once passed for a gloo hang).
"""
from __future__ import annotations

import time

import pytest

from seqweave.testing.distributed import RankFailure, run_ranks


def slow_on_rank_one(rank: int, world: int) -> int:
    if rank == 1:
        _stuck_in_a_named_place()
    return rank


def _stuck_in_a_named_place() -> None:
    time.sleep(60)


def test_a_rank_past_the_deadline_is_killed_and_reports_its_stack():
    with pytest.raises(RankFailure, match="(?s)1 of 2 ranks failed.*rank 1 was killed \\(still running after 8 s\\)"
                                          ".*_stuck_in_a_named_place.*slow_on_rank_one"):
        run_ranks(2, slow_on_rank_one, timeout_s=8)  # rank 0 returned: its result stands
