"""Shared pytest setup: backend markers, seeding and the `--run-slow` switch.

No framework (tensorflow, torch, jax) is imported here: the suite is collected
on every backend.
"""

import os

import keras
import pytest

BACKENDS = ("tensorflow", "torch", "jax")


def pytest_addoption(parser):
    parser.addoption(
        "--run-slow", action="store_true", help="also run tests marked `slow`"
    )


def pytest_collection_modifyitems(config, items):
    backend = keras.backend.backend()
    for item in items:
        marked = [b for b in BACKENDS if b in item.keywords]
        if marked and backend not in marked:
            item.add_marker(
                pytest.mark.skip(
                    reason=f"runs only on {', '.join(marked)}; backend is {backend}"
                )
            )
        if "slow" in item.keywords and not config.getoption("--run-slow"):
            item.add_marker(pytest.mark.skip(reason="slow: use --run-slow"))


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(0)
    yield
    keras.backend.clear_session()


def pytest_report_header(config):
    return f"keras {keras.__version__}, backend {keras.backend.backend()}, " + (
        f"KERAS_BACKEND={os.environ.get('KERAS_BACKEND')}"
    )
