"""Every script in samples/ runs to the end (so a newcomer's first read never rots); scripts
that start a process group run on 2 local ranks through `seqweave run`'s launcher."""
import pathlib
import runpy

import pytest

from seqweave.runtime.launch import launch

SAMPLES = sorted((pathlib.Path(__file__).parent.parent / "samples").glob("*.py"))
DISTRIBUTED_MARK = "init_process_group"
#: what a sample prints when it did its job (default: a training loss)
SUCCESS_MARKS = {"write_a_pass.py": " 0 failed"}


@pytest.mark.parametrize("script", SAMPLES, ids=lambda path: path.name)
def test_sample_runs(script, capfd):
    if DISTRIBUTED_MARK not in script.read_text():
        runpy.run_path(str(script), run_name="__main__")
        assert SUCCESS_MARKS.get(script.name, "loss") in capfd.readouterr().out
        return
    result = launch(2, str(script), ["--steps", "2", "--seq-len", "64"])
    out = capfd.readouterr().out
    assert result.returncode == 0, result.report + out
    assert any(line.startswith("[rank 0] step 1: loss") for line in out.splitlines()), out
