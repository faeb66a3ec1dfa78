"""`jit_compile=True` on torch (Keras maps it to `torch.compile`).

The training step must compile with no graph break in keras-rdrop's code,
and a second epoch must not recompile it. Graph breaks in Keras' own trainer
(Keras 3.15 calls `loss.backward()` inside the compiled step, which Dynamo
cannot trace) are Keras', and plain Keras has them too.
"""

import keras
import numpy as np
import pytest

from keras_rdrop import RDropModel, ReferenceKLRegularizer
from keras_rdrop.src.reference_penalty import ReferenceSettings

pytestmark = [
    pytest.mark.torch,
    pytest.mark.compile,
    # Dynamo warns from inside torch while it traces Keras' step (torch 2.13:
    # inductor imports its deprecated `torch.jit.script_method`, it
    # instantiates Keras' `ops.custom_gradient` autograd Function, and reads
    # `.grad` of non-leaf tensors when it resumes after Keras 3.15's
    # `loss.backward()` break). Those are torch's, not ours: not errors here.
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]


def _model(mode, vocabulary=None):
    keras.utils.set_random_seed(0)
    if vocabulary:
        tokens = keras.Input((5,), dtype="int32")
        h = keras.layers.Embedding(vocabulary, 8)(tokens)
        h = keras.layers.Dropout(0.3)(h)
        inner = keras.Model(tokens, keras.layers.Dense(vocabulary)(h))
    else:
        inner = keras.Sequential(
            [
                keras.Input((6,)),
                keras.layers.Dense(16, activation="relu"),
                keras.layers.Dropout(0.3),
                keras.layers.Dense(3),
            ]
        )
    model = RDropModel(inner, alpha=1.0, mode=mode)
    model.compile(
        optimizer="sgd",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=True,
    )
    return model


def _data(vocabulary=None):
    rng = np.random.default_rng(0)
    if vocabulary:
        x = rng.integers(0, vocabulary, size=(16, 5)).astype("int32")
        return x, rng.integers(0, vocabulary, size=(16, 5)).astype("int32")
    return rng.random((16, 6)).astype("float32"), rng.integers(0, 3, size=(16,))


def _ours(frames):
    return [f for f in frames if "keras_rdrop" in f.filename]


@pytest.mark.parametrize(
    "case, mode",
    [
        # The smoke test that also runs on Keras 3.15 (`-m keras_version`).
        pytest.param("classifier", "concat", marks=pytest.mark.keras_version),
        ("language_model", "sequential"),
        ("anchor", "concat"),
    ],
)
def test_training_step_compiles_without_a_graph_break_of_ours(case, mode):
    import torch

    vocabulary = 7 if case == "language_model" else None
    model = _model(mode, vocabulary)
    x, y = _data(vocabulary)
    callbacks = [ReferenceKLRegularizer(0.1)] if case == "anchor" else []
    # One eager epoch builds everything (optimizer, metrics, the snapshot).
    model.jit_compile = False
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=callbacks)
    if case == "anchor":
        # `fit` switched the anchor off at its end: on again for the step.
        model.anchor.settings = ReferenceSettings()
    torch._dynamo.reset()
    data = (torch.as_tensor(x[:8]), torch.as_tensor(y[:8]))
    explanation = torch._dynamo.explain(model.train_step)(data)
    ours = [
        (reason.reason, _ours(reason.user_stack))
        for reason in explanation.break_reasons
        if _ours(reason.user_stack)
    ]
    assert not ours, f"graph breaks in keras_rdrop: {ours}"
    assert explanation.graph_count >= 1


@pytest.mark.parametrize("mode", ["sequential", "concat"])
def test_a_second_epoch_does_not_recompile(mode):
    import torch
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = _model(mode)
    x, y = _data()
    first = model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1, "the training step was not compiled"
    history = model.fit(x, y, batch_size=8, epochs=2, verbose=0)
    assert counters["stats"]["unique_graphs"] == graphs, "the step recompiled"
    assert np.isfinite(history.history["kl_loss"]).all()
    # What `test_rdrop_model.py::test_jit_compile_modes` checks of
    # `jit_compile=True` on the other backends: the compiled R-Drop step
    # trains (a KL term, a loss that does not blow up).
    assert history.history["kl_loss"][-1] > 0
    assert history.history["loss"][-1] < first.history["loss"][0] + 0.5
