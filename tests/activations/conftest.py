"""The activation tests' fixtures (their helpers are in activation_helpers.py)."""
import pytest


@pytest.fixture
def handles():
    made = []
    yield made
    for h in made:
        h.remove()
