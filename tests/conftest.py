"""Shared pytest setup: backend markers, seeding and the `--run-slow` switch.

No framework (tensorflow, torch, jax) is imported here: the suite is collected
on every backend.
"""

import gc
import os

import keras
import pytest

BACKENDS = ("tensorflow", "torch", "jax")

# Files whose every test depends on the Keras version, and why. They run on
# both Keras versions of the tox matrix (`pytest -m keras_version` on 3.15);
# every other test runs on the newest Keras only. A test of these files
# marked `compile` (torch.compile) is left out: on 3.15 one smoke test runs,
# marked `keras_version` itself.
KERAS_VERSION_DEPENDENT = {
    "test_keras_internals.py": "each private Keras access",
    "test_keras_hub.py": "the keras-hub release that imports on this Keras",
    "test_rdrop_model.py": "the training step inside Keras' trainer",
    "test_losses.py": "the Keras `Loss` base class: reductions, configs",
    "test_fused_cross_entropy.py": "recognising Keras' loss and its settings",
    "test_fused_reference_kl.py": "recognising Keras' loss and its settings",
    "test_reference_kl_regularizer.py": "the callback's hooks into `fit`",
    "test_partial_snapshot.py": "Keras' saving format, old files loading",
    "test_exact_resume.py": "Keras' checkpoints and seed generators",
    "test_distribution.py": "keras.distribution and tf.distribute",
    "test_torch_ddp.py": "Keras' torch DDP integration (from 3.16)",
}


def pytest_addoption(parser):
    parser.addoption(
        "--run-slow", action="store_true", help="also run tests marked `slow`"
    )


def pytest_collection_modifyitems(config, items):
    backend = keras.backend.backend()
    for item in items:
        if item.path.name in KERAS_VERSION_DEPENDENT and "compile" not in item.keywords:
            item.add_marker(pytest.mark.keras_version)
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
    # `clear_session` resets Keras' global state and runs a garbage
    # collection. A full collection walks every object the frameworks have
    # created (0.2-0.5 s a test on torch and TensorFlow); after it, the
    # survivors are frozen (`gc.freeze`), so the next test's collection only
    # walks what that test created. `_full_collection` unfreezes them once
    # per test file.
    keras.backend.clear_session()
    gc.freeze()


@pytest.fixture(autouse=True, scope="module")
def _full_collection():
    yield
    # What the file's tests left behind (module fixtures, cycles frozen after
    # a test) becomes collectable again.
    gc.unfreeze()
    gc.collect()


def pytest_report_header(config):
    return f"keras {keras.__version__}, backend {keras.backend.backend()}, " + (
        f"KERAS_BACKEND={os.environ.get('KERAS_BACKEND')}"
    )
