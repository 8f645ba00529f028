"""Hypothesis runs a fixed, derandomised profile by default (CI) and varies examples under
`--hypothesis-profile nightly`: the flag must win over tests/conftest.py's own default.

`test_probe` records the profile and the examples it was given when PROBE_ENV names a file
(and does nothing otherwise); the other test runs it in forked pytest runs with each flag.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st
from mutations import PASSED, Runner, make_copy

PROBE_ENV = "SEQWEAVE_HYPOTHESIS_PROBE"
PROBE = f"{Path(__file__).relative_to(Path(__file__).parents[2])}::test_probe"


@settings(max_examples=15)
@given(st.integers(-10**9, 10**9))
def test_probe(value):
    path = os.environ.get(PROBE_ENV)
    if path:
        with open(path, "a") as out:
            out.write(f"{settings.get_current_profile_name()} {settings.default.derandomize} {value}\n")


def _probe_runs(runner: Runner, flags: list[list[str]]) -> list[list[str]]:
    """The probe's lines for one forked pytest run per entry of `flags`."""
    with tempfile.TemporaryDirectory(prefix="hypothesis-profile-") as tmp:
        root = make_copy(None, Path(tmp))
        lines = []
        for index, extra in enumerate(flags):
            record = root / f"probe-{index}.txt"
            verdict = runner.run(f"probe-{index}", root, (PROBE,), *extra, env={PROBE_ENV: str(record)})
            assert verdict.returncode == PASSED, verdict.output
            lines.append(record.read_text().splitlines())
        return lines


def test_nightly_profile_is_selected_by_the_flag_and_varies_examples(runners):
    default, nightly_a, nightly_b = _probe_runs(runners[0], [[], ["--hypothesis-profile", "nightly"],
                                                 ["--hypothesis-profile=nightly"]])
    assert {line.split()[:2] == ["ci", "True"] for line in default} == {True}, default[:3]
    for run in (nightly_a, nightly_b):
        assert {line.split()[:2] == ["nightly", "False"] for line in run} == {True}, run[:3]
    assert nightly_a != nightly_b, "two nightly runs drew the same examples"
