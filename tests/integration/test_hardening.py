"""Bad input, interruptions and determinism (the README's "What happens if" table)."""

import keras
import numpy as np
import pytest

from keras_rdrop import RDropModel, ReferenceKLRegularizer, symmetric_kl_divergence
from tests.models import classification_data, mlp, sparse_ce
from tests.testing import assert_allclose, crash_and_resume, to_numpy


def fresh(mode="concat", alpha=1.0, seed=0, dropout=0.3):
    keras.utils.set_random_seed(seed)
    model = RDropModel(mlp(seed=seed, dropout=dropout), alpha=alpha, mode=mode)
    model.compile(optimizer="adam", loss=sparse_ce())
    return model


def test_dataset_without_targets_is_a_clear_error():
    x, _ = classification_data()
    with pytest.raises(ValueError, match=r"without targets.*\(x, y\)"):
        fresh().fit(x, epochs=1, verbose=0)


def test_empty_data_is_a_clear_error():
    x, y = classification_data()
    with pytest.raises(ValueError, match="0 samples"):
        fresh().fit(x[:0], y[:0], epochs=1, verbose=0)


@pytest.mark.parametrize("mode", ["sequential", "concat"])
def test_batch_of_one(mode):
    x, y = classification_data()
    h = fresh(mode).fit(x[:1], y[:1], epochs=1, verbose=0)
    assert np.isfinite(h.history["loss"][0]) and h.history["kl_loss"][0] >= 0


def test_ragged_final_batch_in_concat_mode():
    x, y = classification_data(n=50)  # 16 + 16 + 16 + 2
    h = fresh("concat").fit(x, y, batch_size=16, epochs=2, verbose=0)
    assert all(np.isfinite(h.history["loss"])) and h.history["kl_loss"][0] > 0


def test_finite_extreme_logits_never_give_nan():
    rng = np.random.default_rng(0)
    p = (rng.choice([-1e4, 1e4, 0.0], size=(64, 10))).astype("float32")
    q = (rng.choice([-1e4, 1e4, 0.0], size=(64, 10))).astype("float32")
    out = to_numpy(symmetric_kl_divergence(p, q))
    assert np.all(np.isfinite(out))


def test_same_seed_gives_identical_history():
    x, y = classification_data()
    histories = []
    for _ in range(2):
        model = fresh(seed=3)
        h = model.fit(x, y, batch_size=16, epochs=2, verbose=0)
        histories.append((h.history, [to_numpy(w) for w in model.weights]))
    (h1, w1), (h2, w2) = histories
    # Bitwise: the same seed, ops, shapes and thread settings in one process
    # run the same arithmetic in the same order.
    assert h1 == h2
    for a, b in zip(w1, w2):
        np.testing.assert_array_equal(a, b)


def test_interrupted_run_resumes_to_the_same_weights(tmp_path):
    """Killed mid-epoch, resumed from the last epoch's backup: same end state.

    Here the anchor (`alpha=0`, beta > 0) on a deterministic model; with
    dropout, RDropModel also restores the seed generators' states, tested in
    test_exact_resume.py.
    """
    x, y = classification_data(n=96)

    def make(seed):
        return fresh(seed=seed, alpha=0.0, dropout=0.0)

    def run(model, callbacks):
        model.fit(
            x,
            y,
            batch_size=16,
            epochs=3,
            shuffle=False,
            verbose=0,
            callbacks=[ReferenceKLRegularizer(beta=0.3), *callbacks],
        )
        return model

    reference = run(make(0), [])
    _, resumed = crash_and_resume(make, run, tmp_path / "backup")
    for a, b in zip(resumed.model.weights, reference.model.weights):
        assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(resumed.reference.ref_weights, reference.reference.ref_weights):
        assert_allclose(a, b, rtol=0, atol=0)


def test_terminate_on_nan_and_kl_stays_finite():
    x, y = classification_data()
    model = fresh()
    model.compile(optimizer=keras.optimizers.SGD(1e30), loss=sparse_ce())
    h = model.fit(
        x * 1e10,
        y,
        batch_size=8,
        epochs=3,
        verbose=0,
        callbacks=[keras.callbacks.TerminateOnNaN()],
    )
    assert len(h.history["loss"]) < 3 or not np.isfinite(h.history["loss"][-1])
