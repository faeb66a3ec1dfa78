"""Test helpers: float64 NumPy references and assertions. No framework imports."""

import copy

import keras
import numpy as np
import pytest

from keras_rdrop.src.alpha_schedule import weigh_terms
from keras_rdrop.src.consistency_terms import pairwise_terms
from keras_rdrop.src.step_paths import record_paths, use_paths

# keras-hub 0.32 (the newest release) imports `get_keras_mask` from
# `keras.src.backend`, which Keras 3.16 no longer exports; the tox envs on
# 3.16 install keras-hub-nightly, which imports there.
KERAS_HUB_SKIP = (
    "keras-hub is not importable here: not installed, or keras-hub 0.32 "
    "on Keras 3.16, which no longer exports `keras.src.backend.get_keras_mask` "
    "(install keras-hub-nightly there)"
)


def import_keras_hub():
    """The `keras_hub` module, or a skip saying why it cannot be imported."""
    return pytest.importorskip("keras_hub", reason=KERAS_HUB_SKIP, exc_type=ImportError)


def to_numpy(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


def assert_allclose(actual, expected, rtol=1e-5, atol=1e-6):
    np.testing.assert_allclose(
        to_numpy(actual).astype(np.float64), np.asarray(expected), rtol=rtol, atol=atol
    )


def np_log_softmax(x, axis=-1):
    x = np.asarray(x, np.float64)
    m = x.max(axis=axis, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=axis, keepdims=True))


def np_log_sigmoid(x):
    x = np.asarray(x, np.float64)
    return -np.logaddexp(0.0, -x)


def np_kl(p, q, from_logits=True, axis=-1, distribution="auto"):
    """KL(p || q) per position, float64, written independently of the package."""
    p = np.asarray(p, np.float64)
    q = np.asarray(q, np.float64)
    if distribution == "auto":
        distribution = "bernoulli" if p.shape[axis] == 1 else "categorical"
    if distribution == "categorical":
        if from_logits:
            lp, lq = np_log_softmax(p, axis), np_log_softmax(q, axis)
            pp = np.exp(lp)
        else:
            pp = p
            with np.errstate(divide="ignore", invalid="ignore"):
                lp, lq = np.log(p), np.log(q)
        with np.errstate(invalid="ignore"):
            terms = np.where(pp > 0, pp * (lp - lq), 0.0)
        return terms.sum(axis=axis)
    if from_logits:
        p1 = np.exp(np_log_sigmoid(p))
        lp1, lq1 = np_log_sigmoid(p), np_log_sigmoid(q)
        lp0, lq0 = np_log_sigmoid(-p), np_log_sigmoid(-q)
        p0 = np.exp(lp0)
    else:
        p1, p0 = p, 1 - p
        with np.errstate(divide="ignore"):
            lp1, lq1, lp0, lq0 = np.log(p), np.log(q), np.log(1 - p), np.log(1 - q)
    with np.errstate(invalid="ignore"):
        t1 = np.where(p1 > 0, p1 * (lp1 - lq1), 0.0)
        t0 = np.where(p0 > 0, p0 * (lp0 - lq0), 0.0)
    return (t1 + t0).sum(axis=axis)


def np_symmetric_kl(p, q, **kwargs):
    return 0.5 * (np_kl(p, q, **kwargs) + np_kl(q, p, **kwargs))


def assert_same_training(actual, expected):
    """Two runs, each `(history dict, weights)`: the same logs and weights."""
    (history, weights), (expected_history, expected_weights) = actual, expected
    for key in expected_history:
        assert_allclose(history[key], expected_history[key], rtol=1e-5, atol=1e-6)
    for weight, expected_weight in zip(weights, expected_weights):
        assert_allclose(weight, expected_weight, rtol=1e-4, atol=1e-5)


_TRAINED: dict = {}


def trained(key, run):
    """`run()`'s result, computed once per test session for each `key`.

    For deterministic training runs that several tests read: the
    uninterrupted reference of the resume tests, the general half of the
    fused-versus-general pairs. `key` must name everything the run depends
    on (builder, settings, data, seeds); `run()` must return plain Python and
    NumPy values (histories, weights), never live models or tensors. Each
    caller gets its own deep copy.

    Args:
        key: A hashable that identifies the run.
        run: Trains and returns the result; called on the key's first use.

    Returns:
        A deep copy of the stored result.
    """
    if key not in _TRAINED:
        _TRAINED[key] = run()
    return copy.deepcopy(_TRAINED[key])


def assert_fused_matches_general(
    train, fused_path, fused_paths, general_paths, general_key=None, **kw
):
    """Two runs of `train()`: the fused path taken, and then not; same training.

    Args:
        train: Builds, compiles and fits a model, returning
            `(history dict, weights)`; called once per run, from the same
            seeds.
        fused_path: The path the first run must take, at every step.
        fused_paths: The fused paths allowed in the first run (`use_paths`).
        general_paths: Those allowed in the second, without `fused_path`.
        general_key: When given, the second run is `trained(general_key)`:
            one run shared by the tests whose general half is the same (the
            key names what it depends on).
        **kw: Passed to `use_paths` (`chunked=`).

    Returns:
        The two runs, fused first.
    """

    def run(allowed):
        with use_paths(*allowed, **kw), record_paths() as taken:
            result = train()
        return result, list(taken)

    fused, taken = run(fused_paths)
    assert taken and set(taken) == {fused_path}, "the path was not taken"
    if general_key is None:
        general, taken = run(general_paths)
    else:
        general, taken = trained(
            ("general", fused_path, general_paths, general_key),
            lambda: run(general_paths),
        )
    assert taken and fused_path not in taken
    assert_same_training(fused, general)
    return [fused, general]


def consistency(model, y_pred_1, y_pred_2, sample_weight=None):
    """The general path's consistency terms of `model` between two passes."""
    plan = model._plans.get(model.model, model.loss, model._plan_settings(), y_pred_1)
    terms = pairwise_terms(plan, y_pred_1, y_pred_2, sample_weight)
    return weigh_terms(terms, model.alpha, {})


class CrashAt(keras.callbacks.Callback):
    """Raises `RuntimeError("simulated crash")` after batch `batch` of epoch
    `epoch` (both counted from 0): a process killed in the middle of `fit`."""

    def __init__(self, epoch=1, batch=3):
        super().__init__()
        self.crash_epoch, self.crash_batch = epoch, batch
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if self._epoch == self.crash_epoch and batch == self.crash_batch:
            raise RuntimeError("simulated crash")


def crash_and_resume(make, fit, backup_dir, crash_at=(1, 3), save_freq="epoch"):
    """The crash-and-resume scenario: a run killed mid-`fit`, then a new
    process that resumes it from `BackupAndRestore`'s backup.

    Args:
        make: `make(seed)` builds and compiles a fresh model. The crashing run
            uses seed 0, the resumed one seed 7: other initial weights and
            dropout seeds, as in a restarted job.
        fit: `fit(model, callbacks)` trains it (the same data and epochs in
            both runs), with the given callbacks added.
        backup_dir: Where `BackupAndRestore` writes.
        crash_at: `(epoch, batch)` after which the first run crashes.
        save_freq: `BackupAndRestore`'s `save_freq`.

    Returns:
        `(crashed, resumed)`: the two models, after the crash and after the
        resumed run's end.
    """

    def backup():
        return keras.callbacks.BackupAndRestore(str(backup_dir), save_freq=save_freq)

    crashed = make(0)
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(crashed, [backup(), CrashAt(*crash_at)])
    resumed = make(7)
    fit(resumed, [backup()])
    return crashed, resumed
