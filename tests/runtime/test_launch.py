"""`seqweave run`'s launcher: torchrun's agent on real local ranks; a failing rank stops the job
instead of hanging it, and is named."""
import json
import signal
import textwrap
import time

import pytest
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

from seqweave.runtime.launch import launch, root_cause

#: Far below the 600 s the surviving rank sleeps, and below the agent's 30 s grace before SIGKILL:
#: the survivor is stopped by SIGTERM at once (the run takes under a second on an idle machine).
STOPPED_WITHIN_S = 10
TORCHRUN_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

# The environment is not only set but usable: init_process_group finds its peers through it.
ALL_REDUCE = textwrap.dedent(f"""
    import json, os, sys, torch, torch.distributed as dist
    dist.init_process_group("gloo")
    total = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(total)
    env = {{name: os.environ.get(name) for name in {TORCHRUN_ENV!r}}}
    print(json.dumps({{"env": env, "sum": total.item(), "args": sys.argv[1:]}}))
    dist.destroy_process_group()
""")

ONE_RANK_DIES = textwrap.dedent("""
    import os, sys, time
    if os.environ["RANK"] == "1":
        sys.exit(7)
    time.sleep(600)  # rank 0 would wait forever for its peer
""")


def _script(tmp_path, text):
    path = tmp_path / "job.py"
    path.write_text(text)
    return str(path)


def _by_rank(out: str) -> dict[str, dict]:
    """Each prefixed JSON line of the output, by its prefix."""
    lines = [line.split(" ", 2) for line in out.splitlines() if line.startswith("[rank ") and "{" in line]
    return {f"{a} {b}": json.loads(text) for a, b, text in lines}


def test_every_rank_runs_with_torchrun_environment_and_a_rank_prefix(tmp_path, capfd):
    result = launch(2, _script(tmp_path, ALL_REDUCE), ["--flag", "x"])
    assert (result.returncode, result.failed_rank) == (0, None)
    printed = _by_rank(capfd.readouterr().out)
    assert sorted(printed) == ["[rank 0]", "[rank 1]"]
    env = [printed[f"[rank {rank}]"]["env"] for rank in range(2)]
    assert [(e["RANK"], e["LOCAL_RANK"], e["WORLD_SIZE"]) for e in env] == [("0", "0", "2"), ("1", "1", "2")]
    assert env[0]["MASTER_ADDR"] and env[0]["MASTER_ADDR"] == env[1]["MASTER_ADDR"]
    assert env[0]["MASTER_PORT"] == env[1]["MASTER_PORT"] and int(env[0]["MASTER_PORT"]) > 0
    assert all(p["sum"] == 3 and p["args"] == ["--flag", "x"] for p in printed.values())


def test_a_dead_rank_stops_the_others_and_is_named(tmp_path):
    start = time.monotonic()
    result = launch(2, _script(tmp_path, ONE_RANK_DIES))
    elapsed = time.monotonic() - start
    assert (result.returncode, result.failed_rank) == (7, 1)
    assert elapsed < STOPPED_WITHIN_S, f"the sleeping rank was not stopped at once ({elapsed:.1f} s)"
    assert "rank      : 1" in result.report and "exitcode  : 7" in result.report  # torchrun's own report


def _failure(exitcode: int) -> ProcessFailure:
    return ProcessFailure(local_rank=0, pid=1, exitcode=exitcode, error_file="<N/A>")


def test_root_cause_is_the_failed_rank_not_one_stopped_after_it():
    # The agent's SIGTERM to rank 0 lands in the same second as rank 2's failure, and first in the dict.
    error = ChildFailedError("job.py", {0: _failure(-signal.SIGTERM), 2: _failure(7), 1: _failure(-signal.SIGTERM)})
    assert root_cause(error)[0] == 2
    stopped_only = ChildFailedError("job.py", {1: _failure(-signal.SIGTERM), 0: _failure(-signal.SIGTERM)})
    assert root_cause(stopped_only)[0] == 0  # someone sent SIGTERM to every rank: the lowest is named


def test_nproc_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="at least 1"):
        launch(0, _script(tmp_path, ONE_RANK_DIES))
