"""Shared test set-up: a fixed, derandomised hypothesis profile so CI runs are repeatable."""
import os

import torch
from hypothesis import HealthCheck, settings

settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Two cores: keep torch from oversubscribing them when pytest runs.
torch.set_num_threads(min(torch.get_num_threads(), 2))


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch: dynamo's caches (and its recompile limit) are per process."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
