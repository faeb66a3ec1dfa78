"""The dropout seed state of the inner model, saved with RDropModel's own state.

Every Keras layer that draws random numbers (`Dropout`, `GaussianNoise`, ...)
owns a `keras.random.SeedGenerator`, whose `state` variable (an integer pair:
the seed and a counter) advances at each draw. Keras lists these variables in
`layer.variables` but not in `layer.weights`, and saves only the weights: a
`.keras` file or a `BackupAndRestore` checkpoint holds no seed state, so a
resumed run draws other dropout masks than an uninterrupted one.
`RDropModel.save_own_variables` stores them next to its own variables with
`save_seed_states`, and `load_own_variables` restores them with
`load_seed_states`, so that a resumed run draws the same masks.

On the torch backend an unseeded `Dropout` (`seed=None`) does not use its
seed generator: Keras' `keras.src.backend.torch.random.dropout` takes torch's
fast path, `torch.nn.functional.dropout`, which draws from torch's global
generators (the CPU one, or CUDA's for tensors on a GPU). `save_seed_states`
therefore also stores, on torch, the CPU generator state
(`torch.random.get_rng_state()`) and, where CUDA is available, every CUDA
device's (`torch.cuda.get_rng_state_all()`), as PyTorch Lightning's
checkpoints do. These states belong to the process: the keys name the
process's rank in `torch.distributed` (0 without it), and a process restores
only its own rank's, so that a file written by another rank (or a file
without them, written before keras-rdrop saved them) leaves the generators
as they are.
"""

from __future__ import annotations

import keras
import numpy as np

KEY_PREFIX = "seed_state_"
# The torch generator states: `seed_state_torch_cpu_rank{R}` and
# `seed_state_torch_cuda{D}_rank{R}` (CUDA device D), so that `is_seed_key`
# holds for them and RDropModel keeps them out of its own variables.
TORCH_PREFIX = f"{KEY_PREFIX}torch_"


def seed_states(model: keras.Model) -> list:
    """The `state` variables of the seed generators of `model`'s layers.

    They are the variables of `model.variables` that are not in
    `model.weights`, in Keras' (deterministic) traversal order.

    Args:
        model: A `keras.Model`, built.

    Returns:
        A list of integer `keras.Variable`s of shape `(2,)`.
    """
    weights = {id(w) for w in model.weights}
    return [v for v in model.variables if id(v) not in weights]


def is_seed_key(key: str) -> bool:
    """Whether `key` of a weights store names a saved seed state."""
    return key.startswith(KEY_PREFIX)


def save_seed_states(model: keras.Model, store) -> None:
    """Writes the seed states of `model` into `store` (a Keras weights store).

    Args:
        model: The inner model.
        store: The dict-like store given to `save_own_variables`.
    """
    for i, variable in enumerate(seed_states(model)):
        store[f"{KEY_PREFIX}{i}"] = keras.ops.convert_to_numpy(variable.value)
    if keras.backend.backend() == "torch":
        for key, value in _torch_generator_states().items():
            store[key] = value


def load_seed_states(model: keras.Model, store) -> None:
    """Restores the seed states of `model` from `store`.

    A store with no seed state (a file written before keras-rdrop saved them)
    leaves the current states as they are.

    Args:
        model: The inner model.
        store: The dict-like store given to `load_own_variables`.

    Raises:
        ValueError: If the store holds seed states for another number of
            seed generators than `model` has.
    """
    if keras.backend.backend() == "torch":
        _restore_torch_generator_states(store)
    keys = [key for key in store.keys() if _is_generator_key(key)]
    if not keys:
        return
    variables = seed_states(model)
    if len(keys) != len(variables):
        raise ValueError(
            f"The weights file holds {len(keys)} dropout seed states, but the "
            f"model {model.name!r} has {len(variables)} seed generators "
            f"({[v.path for v in variables]}). Load it into the model it was "
            "saved from."
        )
    for i, variable in enumerate(variables):
        value = np.asarray(store[f"{KEY_PREFIX}{i}"])
        variable.assign(value.astype(keras.backend.standardize_dtype(variable.dtype)))


def _is_generator_key(key: str) -> bool:
    """Whether `key` names a seed generator's state (`seed_state_{i}`)."""
    return is_seed_key(key) and key[len(KEY_PREFIX) :].isdigit()


def _torch_rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _torch_generator_states() -> dict:
    """This process's torch generator states, by store key (uint8 arrays)."""
    import torch

    rank = _torch_rank()
    states = {f"{TORCH_PREFIX}cpu_rank{rank}": torch.random.get_rng_state().numpy()}
    if torch.cuda.is_available():
        for device, state in enumerate(torch.cuda.get_rng_state_all()):
            states[f"{TORCH_PREFIX}cuda{device}_rank{rank}"] = state.numpy()
    return states


def _restore_torch_generator_states(store) -> None:
    """Sets torch's generators to this rank's states in `store`, if any.

    A CUDA state is restored if its device is present.
    """
    import torch

    rank = _torch_rank()
    keys = set(store.keys())

    def state(name):
        value = np.asarray(store[f"{TORCH_PREFIX}{name}_rank{rank}"], dtype=np.uint8)
        return torch.from_numpy(value.copy())

    if f"{TORCH_PREFIX}cpu_rank{rank}" in keys:
        torch.random.set_rng_state(state("cpu"))
    if torch.cuda.is_available():
        for device in range(torch.cuda.device_count()):
            if f"{TORCH_PREFIX}cuda{device}_rank{rank}" in keys:
                torch.cuda.set_rng_state(state(f"cuda{device}"), device)
