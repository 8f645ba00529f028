"""Every script in samples/ runs to the end (so a newcomer's first read never rots)."""
import pathlib
import runpy

import pytest

SAMPLES = sorted((pathlib.Path(__file__).parent.parent / "samples").glob("*.py"))


@pytest.mark.parametrize("script", SAMPLES, ids=lambda path: path.name)
def test_sample_runs(script, capsys):
    runpy.run_path(str(script), run_name="__main__")
    assert "loss" in capsys.readouterr().out
