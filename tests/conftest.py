"""Shared test set-up: a fixed, derandomised hypothesis profile so CI runs are repeatable."""
import os

import torch  # does not import triton

# Without a GPU, kernel tests run Triton's CPU interpreter. Triton reads this once, when
# triton.language is first imported, so it is set before any test module loads. Compiled
# models still run the torch reference on CPU unless a test sets SEQWEAVE_TRITON_INTERPRET=1.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import HealthCheck, settings

settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
# nightly: new random examples every run (and more where a test does not fix its own count);
# a failure prints the blob to reproduce it with @reproduce_failure.
settings.register_profile("nightly", derandomize=False, max_examples=500, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Two cores: keep torch from oversubscribing them when pytest runs.
torch.set_num_threads(min(torch.get_num_threads(), 2))


import pytest  # noqa: E402


def pytest_configure(config):
    """`--hypothesis-profile NAME` wins over the default loaded above, whenever this file is loaded
    (hypothesis' own plugin applies the flag only if it configures after this file was imported)."""
    chosen = config.getoption("--hypothesis-profile", default=None)
    if chosen:
        settings.load_profile(chosen)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch: dynamo's caches (and its recompile limit) are per process."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def pytest_terminal_summary(terminalreporter):
    """How many generated programs check_pass held to the original on simulated ranks in this run."""
    import sys

    check_pass = sys.modules.get("seqweave.testing.check_pass")
    if check_pass is not None and check_pass.PROGRAMS_CHECKED:
        terminalreporter.write_line(f"seqweave.testing.check_pass: {check_pass.PROGRAMS_CHECKED:,} generated "
                                    "programs checked (verify, idempotence, float64 on simulated ranks, bytes)")
