"""`ReferenceSnapshot` holds θ0 and nothing else; `AnchorState` the rest.

The snapshot's store holds the copies and their positions; `beta` is the
anchor state's. Files written when the snapshot also held `beta` (its first
array) load: `beta` goes to the anchor state, the copies to the snapshot.
What the snapshot copies, and the full snapshots of older files, are in
tests/test_partial_snapshot.py.
"""

from pathlib import Path

import keras
import numpy as np

from keras_rdrop import RDropModel, ReferenceKLRegularizer
from tests.models import classification_data, mlp, sparse_ce
from tests.testing import assert_allclose, to_numpy

DATA = Path(__file__).resolve().parent / "data"


def anchored_model():
    x, y = classification_data()
    model = RDropModel(mlp(), alpha=1.0)
    model.compile(optimizer="adam", loss=sparse_ce())
    model.fit(
        x,
        y,
        batch_size=16,
        epochs=1,
        verbose=0,
        callbacks=[ReferenceKLRegularizer(beta=1.0, target_kl=1e-6, horizon=64)],
    )
    return model


def test_the_snapshot_holds_only_the_copies_and_the_anchor_state_beta():
    model = anchored_model()
    snapshot, anchor = model.reference, model.anchor
    copies = {id(ref) for ref in snapshot.ref_weights}
    assert {id(v) for v in snapshot.variables} == copies
    assert [v.path for v in anchor.variables] == [anchor.beta.path]
    # KL far above its target: the controller raised beta.
    assert float(to_numpy(anchor.beta)) > 1.0
    store = {}
    snapshot.save_own_variables(store)
    assert sorted(store) == sorted([*map(str, range(len(copies))), "positions"])
    np.testing.assert_array_equal(store["positions"], snapshot.positions)
    anchor_store = {}
    anchor.save_own_variables(anchor_store)
    assert list(anchor_store) == ["0"]
    assert_allclose(anchor_store["0"], to_numpy(anchor.beta), rtol=0, atol=0)


def test_a_saved_model_restores_beta_and_the_snapshot(tmp_path):
    model = anchored_model()
    path = str(tmp_path / "anchored.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert_allclose(loaded.anchor.beta, to_numpy(model.anchor.beta), rtol=0, atol=0)
    assert loaded.reference.positions == model.reference.positions
    for got, want in zip(loaded.reference.ref_weights, model.reference.ref_weights):
        assert_allclose(got, to_numpy(want), rtol=0, atol=0)


def test_a_file_whose_snapshot_held_beta_loads():
    """`tests/data/snapshot_with_beta_785f4f3.keras` was written by
    keras-rdrop at 785f4f3, whose snapshot stored `beta` first and then the
    copies with their positions: an `mlp` fit one epoch with an adaptive
    beta, on Keras 3.15.1 (whose files both Keras versions load). Its θ0,
    positions and beta are in the `.npz` beside it."""
    loaded = keras.saving.load_model(str(DATA / "snapshot_with_beta_785f4f3.keras"))
    saved = np.load(DATA / "snapshot_with_beta_785f4f3_theta0.npz")
    assert loaded.reference.positions == [int(p) for p in saved["positions"]]
    assert_allclose(loaded.anchor.beta, saved["beta"], rtol=0, atol=0)
    assert float(saved["beta"]) > 1.0  # not the initial beta: it was restored
    theta0 = [saved[f"arr_{i}"] for i in range(len(loaded.reference.ref_weights))]
    for got, want in zip(loaded.reference.ref_weights, theta0):
        assert_allclose(got, want, rtol=0, atol=0)
    # Saved again, it is in this version's layout.
    store = {}
    loaded.reference.save_own_variables(store)
    assert len(store) == len(theta0) + 1


def test_a_model_never_anchored_has_no_beta():
    model = RDropModel(mlp(), alpha=1.0)
    assert model.anchor.beta is None
    assert model.anchor.variables == [] and model.reference.variables == []


def test_a_scheduled_beta_keeps_its_step_in_the_anchor_state(tmp_path):
    # A LearningRateSchedule beta is evaluated inside the step, at a step
    # count the anchor state holds and saves; other anchors have no counter.
    x, y = classification_data()
    model = RDropModel(mlp(), alpha=0.0)
    model.compile(optimizer="adam", loss=sparse_ce())
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay([1], [0.0, 3.0])
    callback = ReferenceKLRegularizer(beta=schedule)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[callback])
    assert int(to_numpy(model.anchor.beta_step)) == 4
    store = {}
    model.anchor.save_own_variables(store)
    assert sorted(store) == ["0", "1"] and int(store["1"]) == 4
    path = str(tmp_path / "scheduled.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert int(to_numpy(loaded.anchor.beta_step)) == 4
    assert anchored_model().anchor.beta_step is None
