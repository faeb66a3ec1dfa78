"""The benchmark models in Keras, their data, and the settings both sides share.

`keras` is imported inside the builders so that the PyTorch loop process can
import `make_data` and `MODELS` without it.
"""

from __future__ import annotations

import numpy as np

# Architecture and batch of each benchmark model (the sizes).
MODELS = {
    "mlp": {
        "batch_size": 128,
        "in_dim": 256,
        "hidden": 512,
        "num_classes": 10,
        "dropout": 0.3,
    },
    "transformer": {
        "batch_size": 32,
        "vocab_size": 8000,
        "seq_len": 64,
        "width": 128,
        "num_layers": 2,
        "num_heads": 4,
        "ff_dim": 512,
        "num_classes": 2,
        "dropout": 0.1,
    },
}

# Optimizer and loss settings shared by every variant, Keras and PyTorch.
LEARNING_RATE = 1e-3
WEIGHT_DECAY = 0.01
EPSILON = 1e-7
CLIPNORM = 1.0
ALPHA = 1.0  # R-Drop weight
BETA = 0.1  # reference-KL weight


def make_data(name: str, num_samples: int, seed: int = 0):
    """A fixed random dataset: `(x, y)` numpy arrays of `num_samples` rows."""
    cfg = MODELS[name]
    rng = np.random.default_rng(seed)
    if name == "mlp":
        x = rng.standard_normal((num_samples, cfg["in_dim"]), dtype=np.float32)
    else:
        x = rng.integers(
            1, cfg["vocab_size"], size=(num_samples, cfg["seq_len"]), dtype=np.int32
        )
    y = rng.integers(0, cfg["num_classes"], size=(num_samples,), dtype=np.int32)
    return x, y


def build_mlp():
    import keras

    cfg = MODELS["mlp"]
    inputs = keras.Input((cfg["in_dim"],), name="features")
    h = keras.layers.Dense(cfg["hidden"], activation="relu")(inputs)
    h = keras.layers.Dropout(cfg["dropout"])(h)
    h = keras.layers.Dense(cfg["hidden"], activation="relu")(h)
    h = keras.layers.Dropout(cfg["dropout"])(h)
    outputs = keras.layers.Dense(cfg["num_classes"], name="logits")(h)
    return keras.Model(inputs, outputs, name="mlp")


def _position_embedding_class():
    import keras
    from keras import ops

    class PositionEmbedding(keras.layers.Layer):
        """Adds a learned embedding of the position to each token vector."""

        def __init__(self, seq_len, width, **kwargs):
            super().__init__(**kwargs)
            self.embedding = keras.layers.Embedding(seq_len, width)

        def build(self, input_shape):
            self.embedding.build((input_shape[1],))

        def call(self, x):
            positions = ops.arange(ops.shape(x)[1])
            return x + ops.expand_dims(self.embedding(positions), 0)

    return PositionEmbedding


def build_transformer():
    """The same architecture as `torch_rdrop_loop.TransformerClassifier`.

    Post-norm encoder layers like `nn.TransformerEncoderLayer`: attention
    (dropout on the attention probabilities), dropout, add & LayerNorm, then
    Dense-ReLU, dropout, Dense, dropout, add & LayerNorm.
    """
    import keras

    cfg = MODELS["transformer"]
    width, heads = cfg["width"], cfg["num_heads"]
    rate = cfg["dropout"]
    tokens = keras.Input((cfg["seq_len"],), dtype="int32", name="tokens")
    h = keras.layers.Embedding(cfg["vocab_size"], width)(tokens)
    h = _position_embedding_class()(cfg["seq_len"], width)(h)
    h = keras.layers.Dropout(rate)(h)
    for _ in range(cfg["num_layers"]):
        attention = keras.layers.MultiHeadAttention(
            num_heads=heads, key_dim=width // heads, dropout=rate
        )(h, h)
        attention = keras.layers.Dropout(rate)(attention)
        h = keras.layers.LayerNormalization(epsilon=1e-5)(h + attention)
        f = keras.layers.Dense(cfg["ff_dim"], activation="relu")(h)
        f = keras.layers.Dropout(rate)(f)
        f = keras.layers.Dense(width)(f)
        f = keras.layers.Dropout(rate)(f)
        h = keras.layers.LayerNormalization(epsilon=1e-5)(h + f)
    h = keras.layers.GlobalAveragePooling1D()(h)
    h = keras.layers.Dropout(rate)(h)
    outputs = keras.layers.Dense(cfg["num_classes"], name="logits")(h)
    return keras.Model(tokens, outputs, name="transformer")


def build_keras_model(name: str):
    return {"mlp": build_mlp, "transformer": build_transformer}[name]()
