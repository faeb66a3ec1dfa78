"""Exact resume with dropout: RDropModel checkpoints the inner model's seed states.

Keras saves weights and optimizer state but not the `SeedGenerator` states
that dropout draws its masks from; RDropModel saves them with its own state
(`keras_rdrop/src/seed_state.py`), so a run interrupted mid-epoch and resumed
by `BackupAndRestore` ends with bitwise the weights of an uninterrupted run.

The exact comparisons here are sound on any CPU: both runs execute the same
ops, on the same shapes, in the same order, in one process (a resumed step is
the step the uninterrupted run takes), and saved and loaded values are copies.
Seed states are integers.

On torch, an unseeded `Dropout` draws from torch's global generator (Keras'
fast path, `torch.nn.functional.dropout`), whose state RDropModel saves too:
the same exact resume holds there.
"""

import keras
import numpy as np
import pytest

from keras_rdrop import RDropModel, ReferenceKLRegularizer
from keras_rdrop.src import seed_state
from tests.models import NUM_CLASSES, classification_data, mlp, sparse_ce
from tests.testing import crash_and_resume, to_numpy, trained

TORCH_CPU_KEY = "seed_state_torch_cpu_rank0"


def unseeded_mlp(features=8):
    """Dropout with `seed=None`: its generator's seed comes from Python's RNG."""
    return keras.Sequential(
        [
            keras.Input((features,)),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dropout(0.4),
            keras.layers.GaussianNoise(0.2),
            keras.layers.Dense(NUM_CLASSES),
        ]
    )


def make(seed, inner="seeded", mode="concat"):
    """A fresh process's model: other initial weights and dropout seeds."""
    keras.utils.set_random_seed(seed)
    net = mlp(dropout=0.4, seed=seed) if inner == "seeded" else unseeded_mlp()
    model = RDropModel(net, alpha=1.0, mode=mode)
    model.compile(optimizer="adam", loss=sparse_ce())
    return model


def train(model, callbacks, epochs=3, anchor=False):
    x, y = classification_data(n=96)
    if anchor:
        callbacks = [ReferenceKLRegularizer(beta=0.3), *callbacks]
    model.fit(
        x,
        y,
        batch_size=16,
        epochs=epochs,
        shuffle=False,
        verbose=0,
        callbacks=callbacks,
    )
    return model


def state(model):
    return [to_numpy(v) for v in model.variables]


def uninterrupted(inner="seeded", mode="concat", anchor=False):
    """The uninterrupted 3-epoch run of `make(0, inner, mode)`, as NumPy:
    shared by the tests that compare with it (`trained`)."""

    def run():
        model = train(make(0, inner=inner, mode=mode), [], anchor=anchor)
        return {
            "variables": state(model),
            "optimizer": state(model.optimizer),
            "weights": [to_numpy(w) for w in model.model.weights],
            "reference": [to_numpy(w) for w in model.reference.ref_weights],
            "iterations": int(to_numpy(model.optimizer.iterations)),
        }

    return trained(("exact_resume", inner, mode, anchor), run)


def interrupted_and_resumed(tmp_path, anchor=False, **kwargs):
    _, resumed = crash_and_resume(
        lambda seed: make(seed, **kwargs),
        lambda model, callbacks: train(model, callbacks, anchor=anchor),
        tmp_path / "backup",
    )
    return resumed


@pytest.mark.parametrize(
    "inner, mode",
    [
        ("seeded", "concat"),
        ("seeded", "sequential"),
        ("unseeded", "concat"),
        ("unseeded", "sequential"),
    ],
)
def test_resumed_run_is_bitwise_the_uninterrupted_one(tmp_path, inner, mode):
    # "unseeded" on torch: the masks come from torch's global generator,
    # whose state the checkpoint holds.
    reference = uninterrupted(inner, mode)
    resumed = interrupted_and_resumed(tmp_path, inner=inner, mode=mode)
    # Every variable: weights and the seed states themselves.
    for a, b in zip(state(resumed), reference["variables"], strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(state(resumed.optimizer), reference["optimizer"], strict=True):
        np.testing.assert_array_equal(a, b)


def test_resume_with_the_anchor_and_dropout_is_bitwise(tmp_path):
    reference = uninterrupted(anchor=True)
    resumed = interrupted_and_resumed(tmp_path, anchor=True)
    for a, b in zip(state(resumed), reference["variables"], strict=True):
        np.testing.assert_array_equal(a, b)
    ref_weights = resumed.reference.ref_weights
    for a, b in zip(ref_weights, reference["reference"], strict=True):
        np.testing.assert_array_equal(to_numpy(a), b)


def test_without_the_seed_states_the_resumed_masks_differ(tmp_path, monkeypatch):
    """The control: what Keras alone gives (the test above can fail)."""
    reference = uninterrupted()
    monkeypatch.setattr(
        "keras_rdrop.src.rdrop_model.save_seed_states", lambda model, store: None
    )
    resumed = interrupted_and_resumed(tmp_path)
    weights = zip(resumed.model.weights, reference["weights"], strict=True)
    assert any(not np.array_equal(to_numpy(a), b) for a, b in weights)


def test_checkpoints_hold_the_seed_states(tmp_path):
    model = train(make(0), [], epochs=1)
    (variable,) = seed_state.seed_states(model.model)
    assert variable.shape == (2,)
    assert keras.backend.standardize_dtype(variable.dtype) in (
        "int32",
        "uint32",
        "int64",
    )
    # One draw per step in "concat" mode (both passes in one call).
    np.testing.assert_array_equal(to_numpy(variable), [0, 6])
    path = str(tmp_path / "w.weights.h5")
    model.save_weights(path)
    other = make(7)
    other.optimizer.build(other.trainable_variables)
    other.load_weights(path)
    (loaded,) = seed_state.seed_states(other.model)
    np.testing.assert_array_equal(to_numpy(loaded), [0, 6])
    for a, b in zip(state(other), state(model)):
        np.testing.assert_array_equal(a, b)


def test_a_loaded_keras_file_continues_with_the_same_masks(tmp_path):
    model = train(make(0), [], epochs=1)
    path = str(tmp_path / "model.keras")
    model.save(path)
    restored = keras.saving.load_model(path)
    train(model, [], epochs=1)
    train(restored, [], epochs=1)
    for a, b in zip(state(restored), state(model)):
        np.testing.assert_array_equal(a, b)


def test_files_without_seed_states_still_load(tmp_path, monkeypatch):
    model = train(make(0), [], epochs=1)
    path = str(tmp_path / "old.weights.h5")
    with monkeypatch.context() as patch:
        patch.setattr(
            "keras_rdrop.src.rdrop_model.save_seed_states", lambda model, store: None
        )
        model.save_weights(path)
    other = make(7)
    other.optimizer.build(other.trainable_variables)
    before = to_numpy(seed_state.seed_states(other.model)[0])
    other.load_weights(path)
    np.testing.assert_array_equal(
        to_numpy(seed_state.seed_states(other.model)[0]), before
    )
    for a, b in zip(other.model.weights, model.model.weights):
        np.testing.assert_array_equal(to_numpy(a), to_numpy(b))


def test_a_file_from_another_architecture_is_an_error(tmp_path):
    model = train(make(0, inner="unseeded"), [], epochs=1)  # two generators
    path = str(tmp_path / "w.weights.h5")
    model.save_weights(path)
    store = {}
    model.save_own_variables(store)
    assert sorted(k for k in store if not k.startswith("seed_state_torch_")) == [
        "seed_state_0",
        "seed_state_1",
    ]
    other = make(0)  # one generator
    with pytest.raises(ValueError, match="holds 2 dropout seed states"):
        other.load_own_variables(store)


def test_backups_within_an_epoch_replay_the_epoch(tmp_path):
    """Keras' `BackupAndRestore(save_freq=N)` resumes at the interrupted
    epoch's first batch, from weights saved in its middle: the first batches
    are trained twice, so only `save_freq="epoch"` resumes exactly."""
    reference = uninterrupted()
    _, resumed = crash_and_resume(make, train, tmp_path / "backup", save_freq=2)
    # 3 epochs of 6 steps; the resumed run saved after 4 steps of epoch 1 and
    # then ran epochs 1 and 2 in full.
    assert reference["iterations"] == 18
    assert int(to_numpy(resumed.optimizer.iterations)) == 6 + 4 + 12


@pytest.mark.torch
def test_without_torchs_generator_state_an_unseeded_resume_differs(
    tmp_path, monkeypatch
):
    """The control for torch's `Dropout(seed=None)`: Keras draws its masks
    from torch's global generator; without its saved state the resumed run
    differs (seen: 1.3e-2 in a user's run, 6e-3 here)."""
    reference = uninterrupted(inner="unseeded")
    monkeypatch.setattr(seed_state, "_torch_generator_states", lambda: {})
    resumed = interrupted_and_resumed(tmp_path, inner="unseeded")
    weights = zip(resumed.model.weights, reference["weights"], strict=True)
    assert any(not np.array_equal(to_numpy(a), b) for a, b in weights)


@pytest.mark.torch
def test_checkpoints_hold_torchs_generator_state(tmp_path):
    import torch

    model = make(0, inner="unseeded")
    store = {}
    model.save_own_variables(store)
    saved = torch.random.get_rng_state().numpy()
    np.testing.assert_array_equal(store[TORCH_CPU_KEY], saved)
    assert store[TORCH_CPU_KEY].dtype == np.uint8
    assert [k for k in store if "cuda" in k] == (
        [f"seed_state_torch_cuda{d}_rank0" for d in range(torch.cuda.device_count())]
        if torch.cuda.is_available()
        else []
    )
    path = str(tmp_path / "w.weights.h5")
    model.save_weights(path)
    torch.rand(100)  # moves the generator on
    assert not np.array_equal(torch.random.get_rng_state().numpy(), saved)
    make(7, inner="unseeded").load_weights(path)
    np.testing.assert_array_equal(torch.random.get_rng_state().numpy(), saved)


@pytest.mark.torch
def test_files_without_torchs_state_or_from_another_rank_leave_it(tmp_path):
    """Older files, and a file another rank wrote: the generator is untouched."""
    import torch

    model = make(0, inner="unseeded")
    store = {}
    model.save_own_variables(store)
    other_rank = dict(store)
    other_rank["seed_state_torch_cpu_rank1"] = other_rank.pop(TORCH_CPU_KEY)
    older = {k: v for k, v in store.items() if not k.startswith("seed_state_torch_")}
    for written in (older, other_rank):
        torch.rand(100)
        before = torch.random.get_rng_state().numpy()
        model.load_own_variables(written)
        np.testing.assert_array_equal(torch.random.get_rng_state().numpy(), before)


@pytest.mark.tensorflow
@pytest.mark.jax
def test_no_torch_state_on_the_other_backends():
    store = {}
    make(0, inner="unseeded").save_own_variables(store)
    assert sorted(store) == ["seed_state_0", "seed_state_1"]


@pytest.mark.torch
def test_a_wrapped_torch_dropout_resumes_exactly(tmp_path):
    """`nn.Dropout` in a `TorchModuleWrapper` draws from torch's global
    generator too: its masks are in the checkpoint as well."""
    import warnings

    import torch

    def wrapped(seed):
        keras.utils.set_random_seed(seed)
        module = torch.nn.Sequential(
            torch.nn.Linear(8, 16),
            torch.nn.ReLU(),
            torch.nn.Dropout(0.4),
            torch.nn.Linear(16, NUM_CLASSES),
        )
        inner = keras.Sequential(
            [keras.Input((8,)), keras.layers.TorchModuleWrapper(module)]
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # no Keras Dropout
            model = RDropModel(inner, alpha=1.0)
        model.compile(optimizer="adam", loss=sparse_ce())
        return model

    reference = train(wrapped(0), [])
    _, resumed = crash_and_resume(wrapped, train, tmp_path / "backup")
    assert reference.model.weights
    for a, b in zip(resumed.model.weights, reference.model.weights, strict=True):
        np.testing.assert_array_equal(to_numpy(a), to_numpy(b))
