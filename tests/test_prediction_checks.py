"""Logits declared as probabilities and the reverse: stopped or warned, before harm.

README, "What happens if": probabilities that leave [0, 1] and a model output
whose activation contradicts the compiled loss raise a `ValueError` (certain
mistakes); probabilities that do not sum to 1 and softmax values passed as
logits warn once (heuristics).
"""

import warnings

import keras
import numpy as np
import pytest

from keras_rdrop import (
    RDropModel,
    SymmetricKLDivergence,
    kl_divergence,
    symmetric_kl_divergence,
)
from keras_rdrop.src import prediction_checks
from tests.models import classification_data, mlp, sparse_ce


@pytest.fixture(autouse=True)
def fresh_checks():
    prediction_checks.reset_warnings()
    yield
    prediction_checks.reset_warnings()


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True)).astype("float32")


def logits(seed=0, shape=(8, 5)):
    return np.random.default_rng(seed).normal(size=shape).astype("float32") * 3


def declaration_warnings(fn):
    """Runs `fn` and returns the messages of the declaration warnings it gave.

    (`pytest.warns` would re-emit every other warning from this file, where the
    pyproject filter for Keras' own NumPy deprecation no longer applies.)
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    return [
        str(w.message)
        for w in caught
        if issubclass(w.category, UserWarning) and "declared" in str(w.message)
    ]


def no_warning(fn):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return fn()


@pytest.mark.parametrize("fn", [kl_divergence, symmetric_kl_divergence])
def test_probabilities_that_do_not_sum_to_one_warn_once(fn):
    p = softmax(logits(0)) * 0.5  # in [0, 1], sums to 0.5
    q = softmax(logits(1))
    with pytest.warns(UserWarning, match=r"do not sum to 1 over axis -1.*0\.5"):
        fn(p, q, from_logits=False)
    no_warning(lambda: fn(p, q, from_logits=False))  # once per process


def test_logits_declared_as_probabilities_raise_every_time():
    for _ in range(2):  # not once per process: a certain mistake
        with pytest.raises(ValueError, match=r"outside \[0, 1\].*from_logits=True"):
            kl_divergence(logits(0), logits(1), from_logits=False)


def test_bernoulli_probabilities_outside_unit_range_raise():
    p = logits(0, (8, 1))
    with pytest.raises(ValueError, match=r"`p` was declared as probabilities"):
        kl_divergence(p, np.full_like(p, 0.5), from_logits=False)


def test_probabilities_declared_as_logits_warn():
    p, q = softmax(logits(0)), softmax(logits(1))
    with pytest.warns(UserWarning, match=r"look like probabilities"):
        symmetric_kl_divergence(p, q, from_logits=True)


def test_the_loss_class_checks_too():
    p, q = softmax(logits(0)), softmax(logits(1))
    with pytest.warns(UserWarning, match=r"look like probabilities"):
        SymmetricKLDivergence(from_logits=True)(p, q)


def test_valid_inputs_do_not_warn():
    a, b = logits(0), logits(1)
    no_warning(lambda: symmetric_kl_divergence(a, b, from_logits=True))
    no_warning(
        lambda: symmetric_kl_divergence(softmax(a), softmax(b), from_logits=False)
    )
    # Multi-label probabilities do not sum to 1 and need not.
    p = np.random.default_rng(0).uniform(size=(8, 4)).astype("float32")
    no_warning(
        lambda: kl_divergence(p, p[::-1], from_logits=False, distribution="bernoulli")
    )


def test_nan_inputs_are_not_reported_as_a_declaration_problem():
    p = softmax(logits(0))
    p[0, 0] = np.nan
    no_warning(lambda: kl_divergence(p, softmax(logits(1)), from_logits=False))


def softmax_mlp():
    return mlp(activation="softmax")


@pytest.mark.parametrize(
    "build, loss, match",
    [
        (
            softmax_mlp,
            sparse_ce(from_logits=True),
            r"Output 'output_0' \(layer 'dense_1'\) is declared as logits "
            r"\(from_logits=True, from the compiled loss "
            r"SparseCategoricalCrossentropy\), but its layer ends "
            r"in a softmax activation.*\(1\) remove the softmax.*\(2\) declare "
            r"probabilities: compile with keras.losses.SparseCategoricalCrossentropy"
            r"\(from_logits=False\).*check_output_activation=False",
        ),
        (
            mlp,
            "sparse_categorical_crossentropy",
            r"Output 'output_0' \(layer 'dense_1'\) is declared as probabilities "
            r"\(from_logits=False, from the compiled loss "
            r"'sparse_categorical_crossentropy': Keras' "
            r"string losses take probabilities\), but its layer has no "
            r"activation, so it emits logits.*\(1\) declare logits: compile with "
            r"keras.losses.SparseCategoricalCrossentropy\(from_logits=True\).*"
            r"\(2\) add activation='softmax'.*check_output_activation=False",
        ),
        (
            mlp,
            keras.losses.BinaryCrossentropy(),
            r"declared as probabilities.*BinaryCrossentropy\(from_logits=True\)"
            r".*add activation='sigmoid'",
        ),
    ],
    ids=["softmax-as-logits", "logits-as-probabilities", "binary"],
)
@pytest.mark.parametrize("alpha", [1.0, 0.0])
def test_rdrop_model_raises_when_the_output_activation_contradicts_the_loss(
    build, loss, match, alpha
):
    x, y = classification_data()
    if isinstance(loss, keras.losses.BinaryCrossentropy):
        y = (y == 0).astype("float32")[:, None] * np.ones((1, 3), "float32")
    model = RDropModel(build(), alpha=alpha)
    model.compile(optimizer="sgd", loss=loss)
    batches = []
    count = keras.callbacks.LambdaCallback(on_train_batch_end=batches.append)
    with warnings.catch_warnings():
        # TensorFlow's own cross-entropy warns about a softmax output with
        # from_logits=True, and trains on.
        warnings.filterwarnings("ignore", message=".*produced by a Softmax")
        # Evaluation checks no declaration: it reports what the inner model
        # would.
        model.evaluate(x, y, verbose=0)
        with pytest.raises(ValueError, match=match):
            model.fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=[count])
    assert batches == []  # stopped before the first step ended


class NormalizingDense(keras.layers.Dense):
    """A Dense layer with no activation that emits probabilities all the same."""

    def call(self, inputs):
        return keras.ops.softmax(super().call(inputs))


def normalizing_mlp():
    return keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dropout(0.3),
            NormalizingDense(3),
        ]
    )


@pytest.mark.traced
def test_check_output_activation_false_trains_a_custom_probability_layer():
    x, y = classification_data()
    model = RDropModel(normalizing_mlp(), alpha=1.0)
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    with pytest.raises(ValueError, match="check_output_activation=False"):
        model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    model = RDropModel(normalizing_mlp(), alpha=1.0, check_output_activation=False)
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    history = no_warning(lambda: model.fit(x, y, batch_size=16, epochs=2, verbose=0))
    logs = history.history
    assert np.all(np.isfinite(logs["loss"])) and np.all(np.isfinite(logs["kl_loss"]))
    assert logs["kl_loss"][-1] > 0
    config = model.get_config()
    assert config["check_output_activation"] is False
    clone = RDropModel.from_config(
        config, custom_objects={"NormalizingDense": NormalizingDense}
    )
    assert clone.check_output_activation is False


def test_check_output_activation_must_be_a_bool():
    with pytest.raises(TypeError, match="Received: check_output_activation='no'"):
        RDropModel(mlp(), check_output_activation="no")


class SubclassedSoftmax(keras.Model):
    """An output layer the structural check cannot see into."""

    def __init__(self):
        super().__init__()
        self.hidden = keras.layers.Dense(16, activation="relu")
        self.dropout = keras.layers.Dropout(0.3)
        self.out = keras.layers.Dense(3)

    def call(self, x, training=False):
        h = self.dropout(self.hidden(x), training=training)
        return keras.ops.softmax(self.out(h))


@pytest.mark.traced
def test_eager_training_reads_the_first_batch_of_a_subclassed_model():
    # With run_eagerly the first step's values can be read on torch and
    # TensorFlow (and always on torch); in a traced step (jit, tf.function)
    # only the structural check runs, and it cannot see inside a subclassed
    # model's call (README).
    if keras.backend.backend() == "jax":
        pytest.skip(
            "JAX computes the loss under jax.value_and_grad even with "
            "run_eagerly=True, so the predictions are tracers whose values "
            "cannot be read; on JAX only the output-activation check runs "
            "(README, 'What happens if')."
        )
    x, y = classification_data()
    model = RDropModel(SubclassedSoftmax(), alpha=1.0)
    model.compile(optimizer="sgd", loss=sparse_ce(from_logits=True), run_eagerly=True)
    messages = declaration_warnings(
        lambda: model.fit(x, y, batch_size=16, epochs=2, verbose=0)
    )
    assert len(messages) == 1 and "look like probabilities" in messages[0], messages


class SubclassedLogits(SubclassedSoftmax):
    def call(self, x, training=False):
        return self.out(self.dropout(self.hidden(x), training=training))


@pytest.mark.traced
def test_eager_training_raises_on_logits_of_a_subclassed_model_declared_probabilities():
    # Values outside [0, 1] declared as probabilities are certain: an error.
    # Read where values can be read (see the test above for JAX).
    if keras.backend.backend() == "jax":
        pytest.skip(
            "JAX computes the loss under jax.value_and_grad even with "
            "run_eagerly=True, so the predictions are tracers whose values "
            "cannot be read; on JAX only the output-activation check runs "
            "(README, 'What happens if')."
        )
    x, y = classification_data()
    model = RDropModel(SubclassedLogits(), alpha=1.0)
    model.compile(
        optimizer="sgd", loss="sparse_categorical_crossentropy", run_eagerly=True
    )
    with pytest.raises(ValueError, match=r"declared as probabilities.*outside"):
        model.fit(x, y, batch_size=16, epochs=1, verbose=0)


@pytest.mark.traced
def test_correct_declarations_train_without_warnings():
    x, y = classification_data()
    for build, loss in [
        (mlp, sparse_ce(from_logits=True)),
        (softmax_mlp, "sparse_categorical_crossentropy"),
    ]:
        model = RDropModel(build(), alpha=1.0)
        model.compile(optimizer="sgd", loss=loss)
        no_warning(lambda m=model: m.fit(x, y, batch_size=16, epochs=1, verbose=0))
