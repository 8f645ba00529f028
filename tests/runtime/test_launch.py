"""`seqweave run`: real local ranks over gloo; a failing rank stops the job instead of hanging it."""
import textwrap
import time

from seqweave.runtime.launch import GRACE_S, launch

ALL_REDUCE = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    dist.init_process_group("gloo")
    total = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(total)
    print(f"world={dist.get_world_size()} sum={total.item():.0f} args={sys.argv[1:]}")
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


def test_every_rank_runs_with_torchrun_environment(tmp_path):
    lines = []
    result = launch(2, _script(tmp_path, ALL_REDUCE), ["--flag", "x"], sink=lines.append)
    assert result.returncode == 0 and result.failed_rank is None
    assert sorted(lines) == [f"[rank {r}] world=2 sum=3 args=['--flag', 'x']\n" for r in range(2)]


def test_a_dead_rank_stops_the_others_and_is_named(tmp_path):
    start = time.monotonic()
    result = launch(2, _script(tmp_path, ONE_RANK_DIES), sink=lambda line: None)
    assert (result.returncode, result.failed_rank) == (7, 1)
    assert time.monotonic() - start < GRACE_S + 10
