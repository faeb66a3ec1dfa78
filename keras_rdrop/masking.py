"""Read and attach the Keras mask carried by an output tensor.

Keras attaches masks (for example from `Embedding(mask_zero=True)`) to output
tensors and its losses read them back, but it exports no public getter or
setter. R-Drop's concatenated mode splits an output in two and must carry the
mask over to each half, so this module is the one place that reaches for the
private helpers, with a fallback to the attribute Keras has always used.
"""

try:  # Keras >= 3.6
    from keras.src.backend import get_keras_mask, set_keras_mask
except ImportError:  # pragma: no cover - depends on the Keras version

    def get_keras_mask(x):
        return getattr(x, "_keras_mask", None)

    def set_keras_mask(x, mask):
        x._keras_mask = mask


__all__ = ["get_keras_mask", "set_keras_mask"]
