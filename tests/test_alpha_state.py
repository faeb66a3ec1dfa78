"""`AlphaState`: alpha's step counter, logged values and host feeds.

Unit checks of the state itself, and the files written before it existed
(when alpha's variables were `RDropModel`'s own), which load as before.
"""

from pathlib import Path

import keras
import numpy as np
import pytest

from keras_rdrop import RDropModel
from keras_rdrop.src.alpha_state import AlphaState
from keras_rdrop.src.weight_schedules import HostScheduleFeed
from tests.models import classification_data, mlp, sparse_ce
from tests.test_alpha_schedule import np_warm_up, warm_up
from tests.testing import assert_allclose, to_numpy

DATA = Path(__file__).resolve().parent / "data"


@pytest.mark.parametrize(
    "alpha, enabled",
    [
        (0.0, False),
        (0.5, True),
        ({"a": 0.0, "b": 0.0}, False),
        ({"a": 0.0, "b": 0.3}, True),
        # A schedule may be 0 now and positive later: the second pass runs.
        (warm_up(), True),
        ({"a": 0.0, "b": warm_up()}, True),
        (lambda step: 0.0, True),
    ],
)
def test_enabled(alpha, enabled):
    assert AlphaState(alpha).enabled is enabled


def test_a_float_alpha_has_no_variable_and_advances_nothing():
    state = AlphaState(0.7)
    assert state.step is None and not state.trackers and not state.feeds
    assert state.weights == []
    assert state.advance() == {}
    assert state.with_feed(None) is None


def test_advance_logs_each_schedule_and_counts_the_step():
    state = AlphaState({"a": warm_up(), "b": 1.0})
    assert list(state.schedules) == ["alpha_a"]
    for k in range(3):
        current = state.advance()
        assert_allclose(current["alpha_a"], np_warm_up(k))
        assert_allclose(state.trackers[0].result(), np_warm_up(k))
    assert state.step_count() == 3


def test_a_plain_callable_is_fed_from_the_host():
    state = AlphaState(lambda step: 0.25 * step)
    state.step.assign(2)
    state.feed_now()
    assert_allclose(state.values[0], 0.5)
    assert_allclose(state.advance()["alpha"], 0.5)
    (feed,) = state.with_feed(None)[-1:]
    assert isinstance(feed, HostScheduleFeed)
    callback = keras.callbacks.History()
    assert state.with_feed(callback)[0] is callback
    with pytest.raises(TypeError, match="cannot join a CallbackList"):
        state.with_feed(keras.callbacks.CallbackList([]))


@pytest.mark.keras_version
def test_a_file_from_before_alpha_state_loads():
    # Saved by the release before `AlphaState` (commit 47f7784, Keras 3.15.1,
    # so that both Keras versions load it): a scheduled
    # alpha after 2 steps, its counter in the model's own variables.
    loaded = keras.saving.load_model(DATA / "scheduled_alpha_47f7784.keras")
    assert int(to_numpy(loaded.alpha_step)) == 2
    if keras.backend.backend() == "torch":
        # Written on JAX, whose "auto" jit_compile the file records as True:
        # on torch that is torch.compile, which test_torch_compile.py covers.
        loaded.jit_compile = False
    x, y = classification_data(n=32)
    history = loaded.fit(x, y, batch_size=32, epochs=1, verbose=0).history
    assert_allclose(history["alpha_output_0"], [np_warm_up(2)])
    assert int(to_numpy(loaded.alpha_step)) == 3


@pytest.mark.keras_version
def test_weights_from_before_alpha_state_load():
    # Saved by the release before `AlphaState`: a plain-callable alpha after
    # 3 steps (its step and its last fed value), weights only.
    model = RDropModel(mlp(), alpha=lambda step: 0.5)
    model.compile(optimizer="adam", loss=sparse_ce())
    model.build((None, 8))
    model.optimizer.build(model.trainable_variables)
    before = [to_numpy(w) for w in model.model.weights]
    model.load_weights(DATA / "host_alpha_47f7784.weights.h5")
    assert int(to_numpy(model.alpha_step)) == 3
    assert_allclose(model.alpha_state.values[0], 0.5)
    after = [to_numpy(w) for w in model.model.weights]
    assert any(not np.array_equal(a, b) for a, b in zip(after, before))


@pytest.mark.keras_version
def test_new_files_keep_alpha_in_its_state(tmp_path):
    x, y = classification_data(n=32)
    model = RDropModel(mlp(), alpha=warm_up())
    model.compile(optimizer="adam", loss=sparse_ce())
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    store = {}
    model.save_own_variables(store)
    assert not [key for key in store if not key.startswith("seed_state")]
    path = tmp_path / "w.weights.h5"
    model.save_weights(path)
    other = RDropModel(mlp(), alpha=warm_up())
    other.compile(optimizer="adam", loss=sparse_ce())
    other.build((None, 8))
    other.optimizer.build(other.trainable_variables)
    other.load_weights(path)
    assert int(to_numpy(other.alpha_step)) == 2
