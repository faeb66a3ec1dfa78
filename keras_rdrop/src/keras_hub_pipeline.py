"""keras-hub tasks: run the task's preprocessor in RDropModel's fit and predict.

`TaskPreprocessingModel` is the base class of `RDropModel` that holds the
overrides of `fit`, `evaluate`, `predict` and the `*_on_batch` methods, as
keras-hub's own `PipelineModel` holds them for its tasks; the training logic
lives in `RDropModel` and never sees raw inputs.

A keras-hub `Task` (`TextClassifier`, `CausalLM`, ...) accepts raw inputs
(strings) in `fit`, `evaluate` and `predict` and runs its `preprocessor` on
them. `RDropModel` wraps the task, so it must do the same. It calls the task's
own `preprocess_samples(x, y, sample_weight)`, which is exactly what keras-hub
maps over its data pipeline, so the result matches the task's: for a
`CausalLM` that includes the padding mask as `sample_weight`, which the task
loss and the KL then both use.

- NumPy arrays and Python lists are preprocessed eagerly, in chunks, into
  NumPy arrays. Keras' array adapter then batches them and honours
  `shuffle=True` (keras-hub's own grain pipeline ignores it).
- A `tf.data.Dataset` or grain dataset gets `preprocess_samples` mapped over
  its batches, as keras-hub does.
- Any other input (a `PyDataset`, a generator, a torch `DataLoader`) must
  already be preprocessed; set the task's `preprocessor` to `None` to make
  that explicit.

keras-hub stays optional: nothing here imports it.
"""

from __future__ import annotations

import keras
import numpy as np

CHUNK = 1024


def task_preprocessor(model):
    """`model.preprocess_samples` if `model` is a task with a preprocessor."""
    if getattr(model, "preprocessor", None) is None:
        return None
    return getattr(model, "preprocess_samples", None)


def _is_dataset(x) -> bool:
    module = type(x).__module__
    return hasattr(x, "map") and (
        module.startswith("tensorflow") or module.startswith("grain")
    )


def _is_array_like(x) -> bool:
    leaves = keras.tree.flatten(_as_arrays(x))
    return bool(leaves) and all(
        isinstance(leaf, (np.ndarray, list, tuple, str)) or hasattr(leaf, "__array__")
        for leaf in leaves
    )


def _as_arrays(x):
    """Lists of strings become arrays, so that they slice as one input."""
    if isinstance(x, dict):
        return {key: _as_arrays(value) for key, value in x.items()}
    if isinstance(x, (list, tuple)) and x and isinstance(x[0], str):
        return np.asarray(x)
    return x


def _to_numpy(structure):
    return keras.tree.map_structure(
        lambda t: t if t is None else np.asarray(keras.ops.convert_to_numpy(t)),
        structure,
    )


def _length(x) -> int:
    return len(keras.tree.flatten(x)[0])


def _slice(structure, start, stop):
    def piece(t):
        if t is None:
            return None
        t = np.asarray(t)[start:stop]
        # Some keras-hub tokenizers take only `str` or a list of `str`.
        return t.tolist() if t.dtype.kind in "USO" else t

    return keras.tree.map_structure(piece, structure)


def preprocess_arrays(fn, x, y=None, sample_weight=None):
    """Runs `fn` over array inputs in chunks; returns NumPy `(x, y, sample_weight)`."""
    x = _as_arrays(x)
    n = _length(x)
    chunks = []
    for start in range(0, n, CHUNK):
        stop = min(start + CHUNK, n)
        data = fn(
            _slice(x, start, stop),
            None if y is None else _slice(y, start, stop),
            None if sample_weight is None else _slice(sample_weight, start, stop),
        )
        chunks.append(_to_numpy(keras.utils.unpack_x_y_sample_weight(data)))
    if len(chunks) == 1:
        return chunks[0]
    return keras.tree.map_structure(
        lambda *parts: None if parts[0] is None else np.concatenate(parts), *chunks
    )


def preprocess(fn, x, y=None, sample_weight=None):
    """`(x, y, sample_weight)` after the task's preprocessing, as `fit` takes them."""
    if fn is None or x is None:
        return x, y, sample_weight
    if _is_dataset(x):
        return x.map(fn), y, sample_weight
    if _is_array_like(x):
        return preprocess_arrays(fn, x, y, sample_weight)
    return x, y, sample_weight


def preprocess_validation(fn, validation_data):
    if fn is None or validation_data is None or _is_dataset(validation_data):
        if fn is not None and validation_data is not None:
            return validation_data.map(fn)
        return validation_data
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(validation_data)
    x, y, sample_weight = preprocess(fn, x, y, sample_weight)
    return keras.utils.pack_x_y_sample_weight(x, y, sample_weight)


def _check_not_empty(x):
    leaves = keras.tree.flatten(x) if x is not None else []
    if leaves and hasattr(leaves[0], "shape") and len(leaves[0].shape) > 0:
        if leaves[0].shape[0] == 0:
            raise ValueError(
                "`x` is empty: it has 0 samples, so there is nothing to train on. "
                f"Received: x with shape {tuple(leaves[0].shape)}"
            )


class TaskPreprocessingModel(keras.Model):
    """A model that wraps `self.model` and preprocesses as its task would.

    When `self.model` is a keras-hub task with a preprocessor, raw inputs
    (for example strings) given to `fit`, `evaluate`, `predict` and the
    `*_on_batch` methods go through the task's `preprocess_samples` first
    (see the module docstring); otherwise they pass through unchanged.
    """

    def _task_preprocessor(self):
        return task_preprocessor(self.model)

    def fit(
        self,
        x=None,
        y=None,
        batch_size=None,
        epochs=1,
        verbose="auto",
        callbacks=None,
        validation_split=0.0,
        validation_data=None,
        shuffle=True,
        class_weight=None,
        sample_weight=None,
        **kwargs,
    ):
        """Trains the model; see `keras.Model.fit`.

        When the inner model is a keras-hub task with a preprocessor, raw
        inputs (for example strings) are preprocessed by the task first, as
        the task's own `fit` does.
        """
        fn = self._task_preprocessor()
        x, y, sample_weight = preprocess(fn, x, y, sample_weight)
        validation_data = preprocess_validation(fn, validation_data)
        _check_not_empty(x)
        return super().fit(
            x=x,
            y=y,
            batch_size=batch_size,
            epochs=epochs,
            verbose=verbose,
            callbacks=self._training_callbacks(callbacks),
            validation_split=validation_split,
            validation_data=validation_data,
            shuffle=shuffle,
            class_weight=class_weight,
            sample_weight=sample_weight,
            **kwargs,
        )

    def evaluate(self, x=None, y=None, batch_size=None, sample_weight=None, **kwargs):
        """Evaluates the inner model; see `keras.Model.evaluate`."""
        fn = self._task_preprocessor()
        if kwargs.get("_use_cached_eval_dataset"):
            fn = None  # validation inside `fit`: `fit` preprocessed it already
        x, y, sample_weight = preprocess(fn, x, y, sample_weight)
        return super().evaluate(
            x=x, y=y, batch_size=batch_size, sample_weight=sample_weight, **kwargs
        )

    def predict(self, x, batch_size=None, **kwargs):
        """Predicts with the inner model; see `keras.Model.predict`."""
        x, _, _ = preprocess(self._task_preprocessor(), x)
        return super().predict(x, batch_size=batch_size, **kwargs)

    def _training_callbacks(self, callbacks):
        """The callbacks `fit` runs with (a subclass may add its own)."""
        return callbacks

    def _before_train_on_batch(self) -> None:
        """Runs on the host before `train_on_batch` (a subclass's hook)."""

    def train_on_batch(self, x, y=None, sample_weight=None, **kwargs):
        fn = self._task_preprocessor()
        x, y, sample_weight = preprocess(fn, x, y, sample_weight)
        self._before_train_on_batch()
        return super().train_on_batch(x, y, sample_weight=sample_weight, **kwargs)

    def test_on_batch(self, x, y=None, sample_weight=None, **kwargs):
        fn = self._task_preprocessor()
        x, y, sample_weight = preprocess(fn, x, y, sample_weight)
        return super().test_on_batch(x, y, sample_weight=sample_weight, **kwargs)

    def predict_on_batch(self, x):
        x, _, _ = preprocess(self._task_preprocessor(), x)
        return super().predict_on_batch(x)
