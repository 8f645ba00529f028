"""A dead or stalled rank makes its peers raise CommError within the timeout, never hang.

Three real gloo ranks run ring attention forward then backward; rank 1 is sabotaged when
it reaches ring step 1. Ranks 0 and 2 must fail with a CommError naming their rank, the
step and the op, within `TIMEOUT_S` of waiting, and the whole test must end well under 30 s.
"""
from __future__ import annotations

import os
import re
import time

import pytest
import torch

from seqweave.ir.mask import Causal
from seqweave.ir.score_mod import NoScoreMod
from seqweave.ir.sharding import Layout, plan_ring, shard_positions
from seqweave.runtime.comm import CommError, Communicator
from seqweave.testing.distributed import run_ranks_outcomes

WORLD, LENGTH, TIMEOUT_S, VICTIM, FAULT_STEP = 3, 24, 2.0, 1, 1
DIED_CODE = 17
ERROR = re.compile(r"rank (\d): step (\d), ring forward shift of k/v (from|to) rank 1 "
                   r"(timed out after 2 s|failed: .+)")  # gloo says "Connection closed/reset by peer"


class SabotagedCommunicator(Communicator):
    """Rank VICTIM dies (os._exit) or stalls when its ring reaches FAULT_STEP."""

    def __init__(self, fault: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.fault = fault

    def shift(self, tensor, step, op, **kwargs):
        if self.rank == VICTIM and step == FAULT_STEP:
            if self.fault == "stall":
                time.sleep(2 * TIMEOUT_S)  # alive but silent past both peers' deadlines (they fail ~TIMEOUT_S in)
            os._exit(DIED_CODE)
        return super().shift(tensor, step, op, **kwargs)


def sabotaged_ring(rank: int, world: int, fault: str) -> dict:
    """Ring forward + backward; returns the CommError text (None if none came) and the seconds until it."""
    comm = SabotagedCommunicator(fault, timeout_s=TIMEOUT_S)
    gen = torch.Generator().manual_seed(rank)
    q, k, v = (torch.randn(1, 2, LENGTH // world, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    plan = plan_ring(Causal(), Layout.STRIPED, world, LENGTH)  # striped causal: every step computes and sends

    def positions_of(r: int) -> torch.Tensor:
        return shard_positions(Layout.STRIPED, r, world, LENGTH)

    args = (Causal(), NoScoreMod(), 0.5, plan, positions_of)
    from seqweave.runtime.sequence_parallel import ring_attention_backward, ring_attention_forward
    start = time.monotonic()
    try:
        out, lse = ring_attention_forward(comm, q, k, v, *args)
        ring_attention_backward(comm, torch.ones_like(out), q, k, v, out, lse, *args)
    except CommError as error:
        return {"error": str(error), "elapsed_s": time.monotonic() - start}
    return {"error": None, "elapsed_s": time.monotonic() - start}


@pytest.mark.parametrize("fault", ["dies", "stall"])
def test_peers_of_a_failed_rank_raise_comm_error_in_time(fault: str):
    started = time.monotonic()
    outcomes = run_ranks_outcomes(WORLD, sabotaged_ring, fault, timeout_s=25, pg_timeout_s=TIMEOUT_S)
    assert time.monotonic() - started < 25
    victim = outcomes[VICTIM]
    assert victim.error == f"rank {VICTIM} exited with code {DIED_CODE} before returning"
    for outcome in (outcomes[0], outcomes[2]):
        assert outcome.ok, outcome.error  # the CommError was caught and returned
        text = outcome.value["error"]
        assert text is not None, f"rank {outcome.rank} finished the ring without noticing rank {VICTIM} {fault}"
        match = ERROR.search(text)
        assert match and int(match[1]) == outcome.rank and int(match[2]) == FAULT_STEP, text
        assert "a peer died or stalled" in text and "timeout_s (now 2 s)" in text
        # both neighbours of the victim block at forward step 1 and give up within one timeout
        assert outcome.value["elapsed_s"] < TIMEOUT_S + 2, text
    if fault == "stall":  # rank 2 waits on the silent rank 1 itself: a timeout, not a closed connection
        assert "ring forward shift of k/v from rank 1 timed out after 2 s" in outcomes[2].value["error"]
