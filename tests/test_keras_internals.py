"""One test per private Keras access (`keras_rdrop/src/keras_internals.py`).

Each test fails, naming the access, when the installed Keras changes it: a
Keras release that moves one of them breaks here first, not silently in a
training step. The loss settings keras-rdrop reads through `get_config()`
are tested here too, for every setting it reads.
"""

import keras
import numpy as np
import pytest
from keras import ops

from keras_rdrop.src import keras_internals
from keras_rdrop.src.fused_step import fusable_loss
from keras_rdrop.src.output_plan import describe_loss, loss_setting
from tests.testing import assert_allclose, to_numpy


def test_get_and_set_keras_mask_are_what_keras_losses_read():
    # The private helpers import on this Keras (not the attribute fallback).
    assert keras_internals._get_keras_mask is not None, "Keras moved get_keras_mask"
    assert keras_internals._set_keras_mask is not None, "Keras moved set_keras_mask"
    tokens = np.array([[3, 1, 0, 0]], "int32")
    embedded = keras.layers.Embedding(5, 2, mask_zero=True)(tokens)
    mask = keras_internals.get_keras_mask(embedded)
    assert mask is not None, "Keras no longer attaches the mask via get_keras_mask"
    np.testing.assert_array_equal(to_numpy(mask), [[True, True, False, False]])  # bools
    # A mask set with `set_keras_mask` is the one Keras' losses honour.
    logits = keras.ops.convert_to_tensor(np.zeros((1, 4, 3), "float32"))
    logits = logits + keras.ops.convert_to_tensor(np.array([0.0, 0.0, 5.0], "float32"))
    keras_internals.set_keras_mask(
        logits, keras.ops.convert_to_tensor(np.array([[True, False, False, False]]))
    )
    loss = keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction="mean_with_sample_weight"
    )
    value = loss(np.array([[2, 0, 0, 0]]), logits)
    expected = -np.log(np.exp(5.0) / (2 + np.exp(5.0)))
    assert_allclose(value, expected, rtol=1e-5)


def test_flatten_layers_reaches_nested_layers():
    dropout = keras.layers.Dropout(0.2)
    inner = keras.Sequential([keras.Input((3,)), dropout, keras.layers.Dense(2)])
    outer = keras.Sequential([keras.Input((3,)), inner])
    layers = keras_internals.flatten_layers(outer)
    assert layers[0] is outer
    assert any(layer is dropout for layer in layers)


def test_output_layer_of_a_functional_output():
    inputs = keras.Input((3,))
    head = keras.layers.Dense(2, activation="softmax")
    model = keras.Model(inputs, head(inputs))
    assert keras_internals.output_layer(model.outputs[0]) is head
    assert keras_internals.output_layer(np.zeros(2)) is None


def test_variable_layout_is_read_and_set():
    variable = keras.Variable(np.ones((2, 2), "float32"))
    assert hasattr(variable, "_layout"), "keras.Variable no longer has `_layout`"
    assert keras_internals.variable_layout(variable) is None
    keras_internals.set_variable_layout(variable, None)
    assert_allclose(variable, np.ones((2, 2)))


def test_loss_function_kwargs_of_a_keras_loss():
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, axis=1)
    kwargs = keras_internals.loss_function_kwargs(loss)
    assert kwargs.get("axis") == 1 and kwargs.get("from_logits") is True
    assert keras_internals.loss_function_kwargs(object()) == {}


def test_additional_losses_are_what_compute_loss_adds():
    # An integer regularization loss is cast to floatx and summed, as Keras'
    # own `compute_loss` adds it to the compiled loss.
    class AddsLosses(keras.layers.Layer):
        def call(self, x):
            self.add_loss(ops.ones((2, 3), "int32"))
            self.add_loss(ops.sum(x) * 0.5)
            return x

    inputs = keras.Input((3,))
    model = keras.Model(inputs, AddsLosses()(inputs))
    model.compile(loss="mse")
    x = np.arange(6, dtype="float32").reshape(2, 3)
    y_pred = model(x)
    losses = keras_internals.additional_losses(model)
    assert [keras.backend.standardize_dtype(v.dtype) for v in losses] == [
        keras.backend.floatx()
    ] * 2
    assert_allclose(losses[0], 6.0)
    assert_allclose(losses[1], 7.5)
    total = model.compute_loss(x, np.zeros_like(x), y_pred)
    compiled = np.mean(np.square(np.arange(6.0).reshape(2, 3)), axis=-1).mean()
    assert_allclose(total, compiled + 6.0 + 7.5, rtol=1e-6)


def test_unscale_for_distribution_is_identity_without_replicas():
    # Under `tf.distribute` it multiplies by the replica count
    # (tests/test_distribution.py checks the logged values there).
    value = ops.convert_to_tensor(1.5, "float32")
    assert_allclose(keras_internals.unscale_for_distribution(value), 1.5)


@pytest.mark.parametrize(
    "loss, setting, expected",
    [
        (
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            "from_logits",
            True,
        ),
        (keras.losses.SparseCategoricalCrossentropy(ignore_class=7), "ignore_class", 7),
        (keras.losses.SparseCategoricalCrossentropy(axis=1), "axis", 1),
        (
            keras.losses.SparseCategoricalCrossentropy(reduction="sum"),
            "reduction",
            "sum",
        ),
        (
            keras.losses.CategoricalCrossentropy(label_smoothing=0.1),
            "label_smoothing",
            0.1,
        ),
        (keras.losses.BinaryCrossentropy(from_logits=True), "from_logits", True),
        (keras.losses.BinaryFocalCrossentropy(), "from_logits", False),
        (
            keras.losses.CategoricalFocalCrossentropy(from_logits=True),
            "from_logits",
            True,
        ),
    ],
)
def test_loss_settings_are_read(loss, setting, expected):
    assert loss_setting(loss, setting) == expected


def test_sparse_categorical_settings_come_from_the_config_where_keras_has_them():
    # Keras 3.16 keeps `axis` and `label_smoothing` in the config of
    # `SparseCategoricalCrossentropy`; 3.15 leaves `axis` out, and then the
    # function's arguments are read (`loss_function_kwargs`).
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, axis=1)
    config = loss.get_config()
    assert config["from_logits"] is True and "ignore_class" in config
    version = tuple(int(v) for v in keras.__version__.split(".")[:2])
    if version >= (3, 16):
        assert config["axis"] == 1
    assert describe_loss(loss).from_logits is True


def test_the_fused_path_recognises_the_language_model_loss():
    # If a Keras release changes how the loss reports its settings, the
    # fused language-model path would silently stop being taken: this and
    # test_fused_cross_entropy's spies fail instead.
    logits = keras.ops.zeros((2, 3, 5))
    assert fusable_loss(
        keras.losses.SparseCategoricalCrossentropy(from_logits=True), logits
    )
    assert not fusable_loss(
        keras.losses.SparseCategoricalCrossentropy(from_logits=True, axis=1), logits
    )


def test_functional_graph_lists_the_calls_keras_runs():
    base = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4)], name="base")
    inputs = {"a": keras.Input((3,), name="a"), "b": keras.Input((2,), name="b")}
    hidden = base(inputs["a"], training=False)
    joined = keras.layers.Concatenate(name="join")([hidden, inputs["b"]])
    outputs = [keras.layers.Dense(2, name="head")(joined)]
    model = keras.Model(inputs, outputs)
    graph = keras_internals.functional_graph(model)
    # Inputs and outputs keep their structure; each call comes after the
    # calls that make its inputs, with its keyword arguments.
    assert set(graph.inputs) == {"a", "b"} and isinstance(graph.outputs, list)
    names = [call.operation.name for call in graph.calls]
    assert names == ["base", "join", "head"]
    base_call, join_call, head_call = graph.calls
    assert base_call.kwargs == {"training": False}
    assert base_call.inputs == (inputs["a"],) and base_call.outputs == (hidden,)
    assert join_call.inputs == (hidden, inputs["b"])
    assert head_call.outputs == (outputs[0],)
    # A Sequential model runs its own graph; a subclassed one has none.
    sequential = keras_internals.functional_graph(base)
    assert [call.operation.name for call in sequential.calls] == [base.layers[0].name]

    class Net(keras.Model):
        def call(self, x):
            return x

    assert keras_internals.functional_graph(Net()) is None

    # A functional model whose class overrides `call` runs that code instead.
    class Doubled(keras.Model):
        def call(self, inputs, training=None, mask=None):
            return 2.0 * super().call(inputs, training=training, mask=mask)

    x = keras.Input((3,))
    assert keras_internals.functional_graph(Doubled(x, base(x))) is None
