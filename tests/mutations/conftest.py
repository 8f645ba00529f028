"""Runner processes shared by the planted-bug and hypothesis-profile tests (each costs a torch import)."""
import pytest
from mutations import Runner


@pytest.fixture(scope="session")
def runners():
    started = [Runner(), Runner()]
    yield started
    for runner in started:
        runner.close()
