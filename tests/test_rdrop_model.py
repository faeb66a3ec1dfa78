import os
import warnings

import keras
import numpy as np
import pytest

from keras_rdrop import RDropModel
from tests.models import (
    NUM_CLASSES,
    classification_data,
    mlp,
    sequence_model,
    sparse_ce,
)
from tests.testing import (
    assert_allclose,
    assert_same_training,
    consistency,
    np_log_softmax,
    np_symmetric_kl,
    to_numpy,
)

BACKEND = keras.backend.backend()


def rdrop(inner=None, **kwargs):
    return RDropModel(inner if inner is not None else mlp(), **kwargs)


def compiled(model, optimizer="sgd", metrics=("accuracy",), **kwargs):
    model.compile(
        optimizer=optimizer, loss=sparse_ce(), metrics=list(metrics), **kwargs
    )
    return model


def no_dropout_rdrop(**kwargs):
    with pytest.warns(UserWarning, match="no stochastic layer"):
        return RDropModel(mlp(dropout=0.0), **kwargs)


# ---------------------------------------------------------------- semantics


@pytest.mark.parametrize("mode", ["sequential", "concat"])
def test_kl_positive_with_dropout_and_logs(mode):
    x, y = classification_data()
    model = compiled(rdrop(mode=mode))
    history = model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    logs = history.history
    assert sorted(logs) == ["accuracy", "kl_loss", "loss", "task_loss"]
    assert logs["kl_loss"][0] > 1e-4
    assert_allclose(
        logs["loss"][0], logs["task_loss"][0] + logs["kl_loss"][0], rtol=1e-4
    )


@pytest.mark.parametrize("mode", ["sequential", "concat"])
def test_kl_zero_without_dropout(mode):
    x, y = classification_data()
    model = compiled(no_dropout_rdrop(mode=mode))
    history = model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    kl = history.history["kl_loss"][0]
    if mode == "sequential":
        # Bitwise: the two passes are the same ops on the same input in one
        # process, so their logits are identical and every KL term is 0.
        assert kl == 0.0
    else:
        # The two halves of `[x; x]` go through one matmul, whose kernels
        # may round the rows of each half differently (seen: 4e-16 on an AMD
        # EPYC). Logits equal to float32 rounding (relative 1e-7) give a KL of
        # its square; dropout at 0.3 gives about 1e-2.
        assert 0.0 <= kl < 1e-10


@pytest.mark.parametrize("mode", ["sequential", "concat"])
def test_one_step_loss_matches_hand_computation(mode):
    x, y = classification_data(n=16)
    inner = mlp(dropout=0.5)
    alpha = 2.0
    model = RDropModel(inner, alpha=alpha, mode=mode)
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.0), loss=sparse_ce())
    model.build((None, 8))
    # Dropout draws from seed-generator state, so the step's two masks can be
    # replayed: remember the state, take the step, restore it, redo by hand.
    state = [to_numpy(v) for v in inner.non_trainable_variables]
    logs = model.train_on_batch(x, y, return_dict=True)
    for v, value in zip(inner.non_trainable_variables, state):
        v.assign(value)
    if mode == "concat":
        stacked = to_numpy(inner(np.concatenate([x, x]), training=True))
        o1, o2 = stacked[:16], stacked[16:]
    else:
        o1 = to_numpy(inner(x, training=True))
        o2 = to_numpy(inner(x, training=True))
    assert not np.allclose(o1, o2), "the two passes drew the same dropout mask"

    def ce(o):
        return -np_log_softmax(o)[np.arange(16), y].mean()

    task = 0.5 * (ce(o1) + ce(o2))
    kl = np_symmetric_kl(o1, o2).mean()
    assert_allclose(logs["task_loss"], task, rtol=1e-5)
    assert_allclose(logs["kl_loss"], kl, rtol=1e-5)
    assert_allclose(logs["loss"], task + alpha * kl, rtol=1e-5)


def test_alpha_zero_no_dropout_equals_plain_fit():
    x, y = classification_data()
    plain = mlp(dropout=0.0, seed=3)
    inner = mlp(dropout=0.0, seed=3)
    inner.set_weights(plain.get_weights())
    plain.compile(optimizer="sgd", loss=sparse_ce(), metrics=["accuracy"])
    model = compiled(RDropModel(inner, alpha=0.0))
    h_plain = plain.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    h_ours = model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    assert_allclose(h_ours.history["loss"], h_plain.history["loss"], rtol=1e-6)
    assert "kl_loss" not in h_ours.history
    for a, b in zip(inner.get_weights(), plain.get_weights()):
        assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_sequential_and_concat_agree_when_randomness_is_fixed():
    x, y = classification_data()
    results = {}
    for mode in ["sequential", "concat"]:
        keras.utils.set_random_seed(1)
        with pytest.warns(UserWarning, match="no stochastic layer"):
            model = RDropModel(mlp(dropout=0.0, seed=5), alpha=1.0, mode=mode)
        compiled(model)
        h = model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
        results[mode] = (h.history, model.model.get_weights())
    (h_s, w_s), (h_c, w_c) = results["sequential"], results["concat"]
    for key in ["loss", "task_loss", "accuracy"]:
        assert_allclose(h_s[key], h_c[key], rtol=1e-5)
    for a, b in zip(w_s, w_c):
        assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_evaluate_and_predict_equal_inner_model():
    x, y = classification_data()
    model = compiled(rdrop())
    model.fit(x, y, epochs=1, verbose=0)
    inner = model.model
    inner.compile(loss=sparse_ce(), metrics=["accuracy"])
    ours = model.evaluate(x, y, verbose=0, return_dict=True)
    theirs = inner.evaluate(x, y, verbose=0, return_dict=True)
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        assert_allclose(ours[key], theirs[key], rtol=1e-6)
    assert_allclose(model.predict(x, verbose=0), inner.predict(x, verbose=0))


def test_validation_logs_have_no_kl():
    x, y = classification_data()
    model = compiled(rdrop())
    h = model.fit(x, y, validation_split=0.25, epochs=1, verbose=0)
    assert "val_loss" in h.history and "val_accuracy" in h.history
    assert "val_kl_loss" not in h.history


# ------------------------------------------------------------------ outputs


def test_from_logits_read_from_string_loss_means_probabilities():
    x, y = classification_data()
    model = RDropModel(mlp(activation="softmax"))
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    h = model.fit(x, y, epochs=1, verbose=0)
    assert np.isfinite(h.history["kl_loss"][0]) and h.history["kl_loss"][0] > 0


def test_custom_loss_needs_from_logits():
    x, y = classification_data()

    def my_loss(y_true, y_pred):
        return keras.losses.sparse_categorical_crossentropy(
            y_true, y_pred, from_logits=True
        )

    model = RDropModel(mlp())
    model.compile(optimizer="sgd", loss=my_loss)
    with pytest.raises(ValueError, match="from_logits"):
        model.fit(x, y, epochs=1, verbose=0)
    model = RDropModel(mlp(), from_logits=True)
    model.compile(optimizer="sgd", loss=my_loss)
    assert model.fit(x, y, epochs=1, verbose=0).history["kl_loss"][0] > 0


def test_binary_sigmoid_output_uses_bernoulli_kl():
    x, y = classification_data()
    y_bin = (y == 0).astype("float32")
    inner = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dropout(0.5),
            keras.layers.Dense(1, activation="sigmoid"),
        ]
    )
    model = RDropModel(inner)
    model.compile(optimizer="sgd", loss="binary_crossentropy")
    h = model.fit(x, y_bin, epochs=1, verbose=0)
    assert h.history["kl_loss"][0] > 1e-5  # a softmax over 1 class would give 0


def multi_output_model():
    inputs = {"a": keras.Input((8,), name="a"), "b": keras.Input((4,), name="b")}
    h = keras.layers.Concatenate()([inputs["a"], inputs["b"]])
    h = keras.layers.Dense(16, activation="relu")(h)
    h = keras.layers.Dropout(0.4)(h)
    outputs = {
        "label": keras.layers.Dense(NUM_CLASSES, name="label")(h),
        "score": keras.layers.Dense(1, name="score")(h),
    }
    return keras.Model(inputs, outputs)


def multi_output_data():
    x, y = classification_data()
    inputs = {"a": x, "b": x[:, :4] * 2}
    targets = {"label": y, "score": x[:, :1]}
    return inputs, targets


def test_multi_output_dict_inputs_kl_on_classification_only():
    inputs, targets = multi_output_data()
    losses = {"label": sparse_ce(), "score": "mse"}
    model = RDropModel(multi_output_model(), alpha={"label": 1.0})
    model.compile(optimizer="sgd", loss=losses)
    h = model.fit(inputs, targets, batch_size=16, epochs=1, verbose=0)
    assert h.history["kl_loss"][0] > 0
    # Regression outputs get a term only on request.
    model = RDropModel(multi_output_model(), alpha=0.0 + 1.0)
    model.compile(optimizer="sgd", loss=losses)
    kl_label_only = model.fit(inputs, targets, epochs=1, verbose=0)
    model = RDropModel(multi_output_model(), regression_consistency=True)
    model.compile(optimizer="sgd", loss=losses)
    with_mse = model.fit(inputs, targets, epochs=1, verbose=0)
    assert with_mse.history["kl_loss"][0] > 0
    assert kl_label_only.history["kl_loss"][0] > 0


def test_alpha_on_regression_output_is_an_error():
    inputs, targets = multi_output_data()
    model = RDropModel(multi_output_model(), alpha={"score": 1.0})
    model.compile(optimizer="sgd", loss={"label": sparse_ce(), "score": "mse"})
    with pytest.raises(ValueError, match="not a distribution"):
        model.fit(inputs, targets, epochs=1, verbose=0)


def test_alpha_dict_with_unknown_output_is_an_error():
    inputs, targets = multi_output_data()
    model = RDropModel(multi_output_model(), alpha={"nope": 1.0})
    model.compile(optimizer="sgd", loss={"label": sparse_ce(), "score": "mse"})
    with pytest.raises(ValueError, match="nope"):
        model.fit(inputs, targets, epochs=1, verbose=0)


def sequence_data(n=32, vocab=20, length=6, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, vocab, size=(n, length)).astype("int32")
    lengths = rng.integers(2, length + 1, size=(n,))
    pad = np.arange(length)[None, :] >= lengths[:, None]
    tokens[pad] = 0
    return tokens, np.roll(tokens, -1, axis=1), (~pad).astype("float32")


@pytest.mark.parametrize("mode", ["sequential", "concat"])
def test_sequence_outputs_with_mask_and_padding_weight(mode):
    tokens, targets, not_pad = sequence_data()
    model = RDropModel(sequence_model(), mode=mode)
    model.compile(optimizer="sgd", loss=sparse_ce())
    h = model.fit(tokens, targets, sample_weight=not_pad, epochs=1, verbose=0)
    assert h.history["kl_loss"][0] > 0


@pytest.mark.parametrize("mode", ["sequential", "concat"])
def test_chunked_kl_trains_like_the_whole_tensor(set_chunks, mode):
    # Large logits are split into chunks for the KL and its gradient
    # (keras_rdrop.set_chunk_elements); forcing chunks of at most 16
    # elements must not change training: same losses and weights.
    tokens, targets, not_pad = sequence_data(n=16)
    runs = []
    for chunk_elements in (10**9, 16):
        set_chunks(chunk_elements)
        keras.utils.set_random_seed(0)
        model = RDropModel(sequence_model(), mode=mode)
        model.compile(optimizer="sgd", loss=sparse_ce())
        h = model.fit(
            tokens, targets, sample_weight=not_pad, batch_size=8, epochs=2, verbose=0
        )
        runs.append((h.history, [to_numpy(w) for w in model.weights]))
    assert runs[1][0]["kl_loss"][0] > 0
    assert_same_training(runs[1], runs[0])


def test_padded_positions_contribute_nothing_to_the_kl():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((4, 5, 7)).astype("float32")
    b = rng.standard_normal((4, 5, 7)).astype("float32")
    weight = (rng.random((4, 5)) > 0.4).astype("float32")
    model = RDropModel(sequence_model(vocab=7, length=5))
    model.compile(optimizer="sgd", loss=sparse_ce())
    got = consistency(model, a, b, weight).unweighted
    per = np_symmetric_kl(a, b)
    assert_allclose(got, (per * weight).sum() / weight.sum(), rtol=1e-5)
    # Changing the padded positions changes nothing.
    b2 = b.copy()
    b2[weight == 0] = 100.0
    assert_allclose(consistency(model, a, b2, weight).unweighted, got, rtol=1e-6)


def test_subclassed_inner_model():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.hidden = keras.layers.Dense(16, activation="relu")
            self.drop = keras.layers.Dropout(0.3)
            self.out = keras.layers.Dense(NUM_CLASSES)

        def call(self, x, training=False):
            return self.out(self.drop(self.hidden(x), training=training))

    x, y = classification_data()
    model = compiled(RDropModel(Net()))
    assert model.fit(x, y, epochs=1, verbose=0).history["kl_loss"][0] > 0


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"alpha": -1.0}, ValueError, r"`alpha` should be a non-negative float"),
        ({"alpha": "big"}, TypeError, r"Received: alpha='big'"),
        ({"alpha": float("nan")}, ValueError, "alpha"),
        ({"alpha": {"out": -2}}, ValueError, "alpha"),
        ({"mode": "parallel"}, ValueError, "mode"),
        ({"from_logits": "yes"}, TypeError, "from_logits"),
        ({"regression_consistency": 1}, TypeError, "regression_consistency"),
    ],
)
def test_bad_constructor_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        RDropModel(mlp(), **kwargs)


def test_not_a_keras_model():
    with pytest.raises(TypeError, match="keras.Model"):
        RDropModel(lambda x: x)
    with pytest.raises(TypeError, match="already an `RDropModel`"):
        RDropModel(RDropModel(mlp()))


def test_no_stochastic_layer_warns_once():
    with pytest.warns(UserWarning, match="no stochastic layer") as record:
        RDropModel(mlp(dropout=0.0))
    assert len(record) == 1


def test_dropout_at_rate_zero_is_not_stochastic():
    # A Dropout layer holds a seed generator but draws nothing at rate 0.
    inner = keras.Sequential(
        [keras.Input((8,)), keras.layers.Dropout(0.0), keras.layers.Dense(3)]
    )
    with pytest.warns(UserWarning, match="no stochastic layer"):
        RDropModel(inner)


def test_compile_without_loss_is_an_error():
    x, y = classification_data()
    model = RDropModel(mlp())
    model.compile(optimizer="sgd")
    with pytest.raises(ValueError, match="loss"):
        model.fit(x, y, epochs=1, verbose=0)


# ------------------------------------------------------- nothing of Keras lost

# On torch, `jit_compile=True` is torch.compile, which takes half a minute a
# model on CPU: tests/test_torch_compile.py compiles the R-Drop step in both
# modes and checks it as this test does, besides graph breaks and recompiles.
JIT_MODES = [
    False,
    pytest.param(
        True,
        marks=pytest.mark.skipif(
            BACKEND == "torch",
            reason="torch.compile: test_torch_compile.py::"
            "test_a_second_epoch_does_not_recompile checks the same, in both modes",
        ),
    ),
    "auto",
]


@pytest.mark.traced
@pytest.mark.parametrize("jit_compile", JIT_MODES)
@pytest.mark.parametrize("mode", ["sequential", "concat"])
def test_jit_compile_modes(jit_compile, mode):
    # On torch, jit_compile=True is torch.compile; graph breaks and
    # recompiles are tested in test_torch_compile.py, which says why torch's
    # own warnings while it compiles are not errors.
    x, y = classification_data()
    model = compiled(rdrop(mode=mode), jit_compile=jit_compile)
    with warnings.catch_warnings():
        if BACKEND == "torch" and jit_compile is True:
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", UserWarning)
        h = model.fit(x, y, batch_size=16, epochs=2, verbose=0)
    assert h.history["kl_loss"][-1] > 0
    assert h.history["loss"][-1] < h.history["loss"][0] + 0.5


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision(policy):
    x, y = classification_data()
    keras.config.set_dtype_policy(policy)
    try:
        model = compiled(rdrop(mlp()))
        h = model.fit(x, y, batch_size=16, epochs=1, verbose=0)
        if policy == "mixed_float16":
            assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    finally:
        keras.config.set_dtype_policy("float32")
    assert np.isfinite(h.history["loss"][0]) and h.history["kl_loss"][0] > 0


def test_gradient_accumulation_and_steps_per_execution():
    x, y = classification_data()
    # Keras' torch backend allows only steps_per_execution=1.
    steps_per_execution = 1 if BACKEND == "torch" else 2
    model = rdrop()
    model.compile(
        optimizer=keras.optimizers.Adam(gradient_accumulation_steps=2),
        loss=sparse_ce(),
        steps_per_execution=steps_per_execution,
    )
    h = model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert int(to_numpy(model.optimizer.iterations)) == 4  # 8 batches / 2
    assert h.history["kl_loss"][0] > 0


def test_sample_weight_and_class_weight():
    x, y = classification_data()
    for kwargs in [
        {"sample_weight": np.linspace(0, 2, len(x)).astype("float32")},
        {"class_weight": {0: 1.0, 1: 2.0, 2: 0.5}},
    ]:
        model = compiled(rdrop())
        h = model.fit(x, y, epochs=1, verbose=0, **kwargs)
        assert np.isfinite(h.history["loss"][0])


def test_zero_sample_weights_zero_the_loss():
    x, y = classification_data(n=16)
    model = compiled(rdrop(), optimizer="sgd")
    logs = model.train_on_batch(
        x, y, sample_weight=np.zeros(16, "float32"), return_dict=True
    )
    # Bitwise: every term is multiplied by a weight of exactly 0, and Keras'
    # weighted mean of all-zero weights is defined as 0 (divide-no-nan).
    assert logs["loss"] == 0.0 and logs["kl_loss"] == 0.0


def test_callbacks(tmp_path):
    x, y = classification_data()
    model = compiled(rdrop())
    callbacks = [
        keras.callbacks.EarlyStopping(monitor="kl_loss", mode="min", patience=1),
        keras.callbacks.ModelCheckpoint(str(tmp_path / "ckpt.keras")),
        keras.callbacks.BackupAndRestore(str(tmp_path / "backup")),
        keras.callbacks.TerminateOnNaN(),
    ]
    model.fit(x, y, epochs=3, verbose=0, callbacks=callbacks)
    assert os.path.exists(tmp_path / "ckpt.keras")
    restored = keras.saving.load_model(str(tmp_path / "ckpt.keras"))
    assert isinstance(restored, RDropModel)


def test_pydataset_input():
    x, y = classification_data()

    class Batches(keras.utils.PyDataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return x[i * 16 : (i + 1) * 16], y[i * 16 : (i + 1) * 16]

    model = compiled(rdrop())
    assert model.fit(Batches(), epochs=1, verbose=0).history["kl_loss"][0] > 0


def test_tf_data_input():
    tf = pytest.importorskip(
        "tensorflow", reason="tf.data needs TensorFlow, installed in the tf env only"
    )
    x, y = classification_data()
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    model = compiled(rdrop())
    h = model.fit(ds, epochs=1, shuffle=False, verbose=0)
    assert h.history["kl_loss"][0] > 0


def test_torch_dataloader_input():
    torch = pytest.importorskip(
        "torch", reason="a torch DataLoader needs torch, installed in the torch env"
    )
    x, y = classification_data()
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.tensor(x), torch.tensor(y)),
        batch_size=16,
    )
    model = compiled(rdrop())
    h = model.fit(loader, epochs=1, shuffle=False, verbose=0)
    assert h.history["kl_loss"][0] > 0


@pytest.mark.parametrize("mode", ["sequential", "concat"])
def test_save_and_load_keras_file(tmp_path, mode):
    x, y = classification_data()
    model = compiled(rdrop(alpha=0.7, mode=mode))
    model.fit(x, y, epochs=1, verbose=0)
    path = str(tmp_path / "rdrop.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, RDropModel)
    assert loaded.alpha == 0.7 and loaded.mode == mode
    assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0))
    h = loaded.fit(x, y, epochs=1, verbose=0)
    assert h.history["kl_loss"][0] > 0
    # The inner model serves on its own, without keras_rdrop.
    inner_path = str(tmp_path / "inner.keras")
    loaded.model.save(inner_path)
    inner = keras.saving.load_model(inner_path)
    assert not isinstance(inner, RDropModel)
    assert_allclose(inner.predict(x, verbose=0), loaded.predict(x, verbose=0))


def test_get_config_round_trip():
    model = rdrop(alpha={"dense_1": 2.0}, mode="sequential", from_logits=True)
    config = model.get_config()
    clone = RDropModel.from_config(config)
    assert clone.alpha == {"dense_1": 2.0}
    assert clone.mode == "sequential" and clone.from_logits is True
