"""The anchor's snapshot copies only what training changes (issue 16).

Frozen weights are read from the live model; the snapshot holds the trainable
weights and the state a training step updates (moving statistics of trainable
BatchNormalization layers). Every test checks that the reference is still
exactly θ0 (the model before fine-tuning): its outputs, its memory, and the
logged `ref_kl` against a float64 NumPy recomputation.
"""

from pathlib import Path

import keras
import numpy as np
import pytest

from keras_rdrop import RDropModel, ReferenceKLRegularizer
from tests.models import classification_data, sparse_ce
from tests.testing import CrashAt, assert_allclose, crash_and_resume, np_kl, to_numpy

DATA = Path(__file__).resolve().parent / "data"
HIDDEN = 16


def count(variables):
    return int(sum(np.prod(v.shape) for v in variables))


def extra_values(model):
    """Values the RDropModel holds beyond its inner model: beta + the copies."""
    return count(model.weights) - count(model.model.weights)


def copied_paths(model):
    return sorted(w.path for w, _ in model.reference.copies(model.model))


def reference_outputs(model, x):
    """The reference's inference outputs, as the training step computes them."""
    inner = model.model
    trainable, non_trainable = model.reference.reference_values(inner)
    outputs, _ = inner.stateless_call(trainable, non_trainable, x, training=False)
    return to_numpy(outputs)


def training_outputs(inner, x):
    """The live model's training-mode outputs, without updating its state."""
    outputs, _ = inner.stateless_call(
        [v.value for v in inner.trainable_variables],
        [v.value for v in inner.non_trainable_variables],
        x,
        training=True,
    )
    return to_numpy(outputs)


def dense(units, seed, activation=None):
    return keras.layers.Dense(
        units,
        activation=activation,
        kernel_initializer=keras.initializers.GlorotUniform(seed=seed),
    )


def frozen_body_model():
    """A frozen body with BatchNormalization and a trainable head with one."""
    body = keras.Sequential(
        [
            keras.Input((8,)),
            dense(HIDDEN, 0, "relu"),
            keras.layers.BatchNormalization(),
        ],
        name="body",
    )
    head = keras.Sequential(
        [dense(HIDDEN, 1, "relu"), keras.layers.BatchNormalization(), dense(3, 2)],
        name="head",
    )
    body.trainable = False
    return keras.Sequential([body, head], name="frozen_body")


def keras_lora_model():
    """Two Dense layers with `enable_lora`: kernels frozen, biases and LoRA train."""
    model = keras.Sequential(
        [keras.Input((8,)), dense(HIDDEN, 0, "relu"), dense(3, 1)], name="lora"
    )
    for layer in model.layers:
        layer.enable_lora(rank=2)
    return model


def pretrained(build, seed=3):
    """`build()` with weights moved away from their initial values (θ0)."""
    keras.utils.set_random_seed(seed)
    inner = build()
    rng = np.random.default_rng(seed)
    inner.set_weights(
        [
            w + 0.1 * rng.standard_normal(w.shape).astype(w.dtype)
            if "variance" not in path
            else w + rng.uniform(0.5, 1.0, w.shape).astype(w.dtype)
            for w, path in zip(inner.get_weights(), [v.path for v in inner.weights])
        ]
    )
    return inner


def fine_tune(inner, x, y, epochs=2, **callback_kwargs):
    model = RDropModel(inner, alpha=0.0)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=sparse_ce())
    model.fit(
        x,
        y,
        batch_size=16,
        epochs=epochs,
        verbose=0,
        callbacks=[ReferenceKLRegularizer(beta=0.5, **callback_kwargs)],
    )
    return model


def assert_ref_kl_matches_numpy(model, x, y, theta0_outputs):
    """One full-batch step at learning rate 0 logs KL(live || θ0) exactly."""
    live = training_outputs(model.model, x)
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss=sparse_ce())
    history = model.fit(
        x,
        y,
        batch_size=len(x),
        epochs=1,
        shuffle=False,
        verbose=0,
        callbacks=[ReferenceKLRegularizer(beta=0.5)],
    )
    expected = np_kl(live, theta0_outputs).mean()
    assert expected > 1e-3  # the model did leave θ0
    assert_allclose(history.history["ref_kl"][0], expected, rtol=1e-4, atol=1e-7)


# ------------------------------------------------- what the snapshot copies


def test_frozen_body_copies_the_head_and_its_moving_statistics():
    x, y = classification_data(n=64)
    inner = pretrained(frozen_body_model)
    theta0_outputs = to_numpy(inner.predict(x, verbose=0))
    model = fine_tune(inner, x, y)
    # The trainable head and the moving statistics of its BatchNormalization
    # (which training updates); nothing of the frozen body, whose
    # BatchNormalization runs in inference mode.
    head = inner.get_layer("head")
    head_bn = head.layers[1]
    expected = sorted(
        [w.path for w in head.trainable_weights]
        + [head_bn.moving_mean.path, head_bn.moving_variance.path]
    )
    assert copied_paths(model) == expected
    assert extra_values(model) == count(inner.trainable_weights) + 2 * HIDDEN + 1
    assert extra_values(model) < count(inner.weights)  # the full copy, before
    # The body did not move; the head did.
    assert_allclose(reference_outputs(model, x), theta0_outputs, rtol=1e-5, atol=1e-5)
    assert not np.allclose(to_numpy(inner.predict(x, verbose=0)), theta0_outputs)
    assert_ref_kl_matches_numpy(model, x, y, theta0_outputs)


def test_keras_lora_leaves_the_frozen_base_kernels_out():
    x, y = classification_data(n=64)
    inner = pretrained(keras_lora_model)
    theta0_outputs = to_numpy(inner.predict(x, verbose=0))
    kernels = [layer._kernel for layer in inner.layers]
    assert not any(k.trainable for k in kernels)  # non-trainable, trainable layer
    model = fine_tune(inner, x, y)
    assert copied_paths(model) == sorted(w.path for w in inner.trainable_weights)
    assert not set(copied_paths(model)) & {k.path for k in kernels}
    assert extra_values(model) == count(inner.trainable_weights) + 1
    assert_allclose(reference_outputs(model, x), theta0_outputs, rtol=1e-5, atol=1e-5)
    assert_ref_kl_matches_numpy(model, x, y, theta0_outputs)


def test_fully_trainable_model_with_batch_norm_copies_weights_and_statistics():
    x, y = classification_data(n=64)

    def build():
        return keras.Sequential(
            [
                keras.Input((8,)),
                dense(HIDDEN, 0, "relu"),
                keras.layers.BatchNormalization(),
                keras.layers.Dropout(0.3, seed=1),
                dense(3, 1),
            ]
        )

    inner = pretrained(build)
    theta0_outputs = to_numpy(inner.predict(x, verbose=0))
    model = fine_tune(inner, x, y)
    assert copied_paths(model) == sorted(w.path for w in inner.weights)
    assert extra_values(model) == count(inner.weights) + 1
    assert_allclose(reference_outputs(model, x), theta0_outputs, rtol=1e-5, atol=1e-5)


def test_subclassed_model_without_inputs_gets_a_full_copy():
    """No `keras.Input` to trace the model with: every float weight is copied."""

    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__()
            self.body = dense(HIDDEN, 0, "relu")
            self.head = dense(3, 1)

        def call(self, x, training=None):
            return self.head(self.body(x))

    x, y = classification_data(n=64)
    inner = Subclassed()
    inner(x[:2])
    inner.body.trainable = False
    theta0_outputs = to_numpy(inner.predict(x, verbose=0))
    model = fine_tune(inner, x, y)
    assert copied_paths(model) == sorted(w.path for w in inner.weights)
    assert_allclose(reference_outputs(model, x), theta0_outputs, rtol=1e-5, atol=1e-5)


# ------------------------------------------------ trainability that changes


def test_layers_unfrozen_between_fits_are_added_at_theta0():
    x, y = classification_data(n=64)
    inner = pretrained(frozen_body_model)
    theta0_outputs = to_numpy(inner.predict(x, verbose=0))
    model = fine_tune(inner, x, y)
    before = extra_values(model)
    body = inner.get_layer("body")
    body.trainable = True
    model = fine_tune_again(model, x, y)
    # The body's weights and its BatchNormalization's moving statistics, now
    # trained and updated, joined the snapshot with their θ0 values.
    body_bn = body.layers[1]
    assert {w.path for w in body.weights} <= set(copied_paths(model))
    assert body_bn.moving_mean.path in copied_paths(model)
    assert extra_values(model) == before + count(body.weights)
    assert not np.allclose(to_numpy(body.weights[0]), 0)
    assert_allclose(reference_outputs(model, x), theta0_outputs, rtol=1e-5, atol=1e-5)
    # Freezing the head again keeps its θ0 copies (its live values moved).
    inner.get_layer("head").trainable = False
    model = fine_tune_again(model, x, y)
    assert_allclose(reference_outputs(model, x), theta0_outputs, rtol=1e-5, atol=1e-5)
    assert_ref_kl_matches_numpy(model, x, y, theta0_outputs)


def fine_tune_again(model, x, y):
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=sparse_ce())
    model.fit(
        x, y, batch_size=16, epochs=1, verbose=0, callbacks=[ReferenceKLRegularizer()]
    )
    return model


def test_layer_unfrozen_during_fit_is_an_error():
    x, y = classification_data(n=64)
    inner = pretrained(frozen_body_model)

    class Unfreeze(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            inner.get_layer("body").trainable = True

    model = RDropModel(inner, alpha=0.0)
    model.compile(optimizer="sgd", loss=sparse_ce())
    with pytest.raises(
        RuntimeError, match=r"'body/dense/kernel'.*became trainable during `fit`"
    ):
        model.fit(
            x,
            y,
            epochs=2,
            verbose=0,
            callbacks=[ReferenceKLRegularizer(), Unfreeze()],
        )


# ------------------------------------------------------ nothing else lost


def test_saved_partial_snapshot_round_trip(tmp_path):
    x, y = classification_data(n=64)
    inner = pretrained(frozen_body_model)
    theta0_outputs = to_numpy(inner.predict(x, verbose=0))
    model = fine_tune(inner, x, y)
    path = str(tmp_path / "partial.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.reference.positions == model.reference.positions
    assert extra_values(loaded) == extra_values(model)
    assert_allclose(reference_outputs(loaded, x), theta0_outputs, rtol=1e-5, atol=1e-5)
    fine_tune_again(loaded, x, y)
    assert_allclose(reference_outputs(loaded, x), theta0_outputs, rtol=1e-5, atol=1e-5)
    assert_ref_kl_matches_numpy(loaded, x, y, theta0_outputs)


def test_backup_and_restore_resumes_a_partial_snapshot(tmp_path):
    x, y = classification_data(n=128)

    def fresh(seed):
        inner = pretrained(frozen_body_model, seed=seed)
        model = RDropModel(inner, alpha=0.0)
        model.compile(optimizer="adam", loss=sparse_ce())
        return model

    theta0_outputs = to_numpy(fresh(0).model.predict(x, verbose=0))

    def fit(model, callbacks):
        if not any(isinstance(c, CrashAt) for c in callbacks):
            # A new process: the model is rebuilt with other weights, frozen
            # body too.
            outputs = to_numpy(model.model.predict(x, verbose=0))
            assert not np.allclose(outputs, theta0_outputs)
        callbacks = [ReferenceKLRegularizer(beta=0.5), *callbacks]
        model.fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=callbacks)

    model, resumed = crash_and_resume(
        fresh, fit, tmp_path / "backup", crash_at=(0, 5), save_freq=2
    )
    assert resumed.reference.positions == model.reference.positions
    assert_allclose(reference_outputs(resumed, x), theta0_outputs, rtol=1e-5, atol=1e-5)


def test_restoring_a_snapshot_of_other_trainable_weights_is_an_error(tmp_path):
    x, y = classification_data(n=64)
    model = fine_tune(pretrained(frozen_body_model), x, y, epochs=1)
    path = str(tmp_path / "frozen_body.weights.h5")
    model.save_weights(path)
    other_inner = pretrained(frozen_body_model)
    other_inner.get_layer("body").trainable = True
    other = fine_tune(other_inner, x, y, epochs=1)
    with pytest.raises(ValueError, match="trainable differ"):
        other.load_weights(path)


def test_refresh_and_soft_update_move_only_the_copies():
    x, y = classification_data(n=64)
    inner = pretrained(frozen_body_model)
    model = fine_tune(inner, x, y, epochs=1, refresh_every_steps=1)
    # Refreshed after the last step: the reference is the current model.
    for w, ref in model.reference.copies(inner):
        assert_allclose(ref, w, rtol=0, atol=0)
    assert_allclose(
        reference_outputs(model, x),
        to_numpy(inner.predict(x, verbose=0)),
        rtol=1e-5,
        atol=1e-6,
    )
    before = [to_numpy(ref) for _, ref in model.reference.copies(inner)]
    model.fit(
        x,
        y,
        batch_size=64,
        epochs=1,
        verbose=0,
        callbacks=[ReferenceKLRegularizer(soft_update_tau=0.25, soft_update_every=1)],
    )
    for (w, ref), old in zip(model.reference.copies(inner), before):
        assert_allclose(ref, 0.25 * to_numpy(w) + 0.75 * old, rtol=1e-5, atol=1e-6)


def test_bfloat16_partial_snapshot():
    x, y = classification_data(n=64)
    inner = pretrained(frozen_body_model)
    theta0 = {w.path: to_numpy(w) for w in inner.weights}
    theta0_outputs = to_numpy(inner.predict(x, verbose=0))
    model = fine_tune(inner, x, y, reference_dtype="bfloat16")
    copies = model.reference.copies(inner)
    assert len(copies) == len(copied_paths(model)) > 0
    for w, ref in copies:
        assert keras.backend.standardize_dtype(ref.dtype) == "bfloat16"
        # θ0 rounded to bfloat16 (8 bits of mantissa).
        assert_allclose(ref, theta0[w.path], rtol=2**-8, atol=1e-30)
    # The frozen body is read at full precision; only the head is rounded.
    assert_allclose(reference_outputs(model, x), theta0_outputs, rtol=0.05, atol=0.05)


# -------------------------------------------- files of the full-snapshot era


def test_full_snapshot_file_from_751f1f1_loads_as_a_full_snapshot():
    """`tests/data/full_snapshot_751f1f1.keras` was written by keras-rdrop at
    751f1f1 (one copy per float weight, no positions): an `mlp` with
    BatchNormalization trained 2 epochs with the anchor; `..._theta0.npz`
    holds its weights before training (θ0)."""
    loaded = keras.saving.load_model(str(DATA / "full_snapshot_751f1f1.keras"))
    inner = loaded.model
    theta0 = np.load(DATA / "full_snapshot_751f1f1_theta0.npz")
    theta0 = [theta0[f"w{i}"] for i in range(len(theta0.files))]
    assert copied_paths(loaded) == sorted(w.path for w in inner.weights)
    for (_, ref), w0 in zip(loaded.reference.copies(inner), theta0):
        assert_allclose(ref, w0, rtol=0, atol=0)
    reference = keras.models.clone_model(inner)
    reference.set_weights(theta0)
    x, y = classification_data(n=32)
    theta0_outputs = to_numpy(reference.predict(x, verbose=0))
    assert_allclose(reference_outputs(loaded, x), theta0_outputs, rtol=1e-5, atol=1e-5)
    assert_ref_kl_matches_numpy(loaded, x, y, theta0_outputs)


def test_full_snapshot_file_into_a_partial_snapshot_is_a_clear_error():
    loaded = keras.saving.load_model(str(DATA / "full_snapshot_751f1f1.keras"))
    inner = loaded.model
    inner.layers[0].trainable = False
    model = RDropModel(inner, alpha=0.0)
    model.compile(optimizer="sgd", loss=sparse_ce())
    x, y = classification_data(n=32)
    model.fit(x, y, epochs=1, verbose=0, callbacks=[ReferenceKLRegularizer()])
    with pytest.raises(ValueError, match="full snapshot.*751f1f1"):
        model.load_weights(str(DATA / "full_snapshot_751f1f1.keras"))
