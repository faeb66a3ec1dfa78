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
    # keras-hub's BertBackbone at BERT-tiny size (google/bert_uncased_L-2_H-128
    # _A-2), built from config: nothing is downloaded.
    "bert_tiny": {
        "batch_size": 32,
        "vocab_size": 30522,
        "seq_len": 128,
        "max_sequence_length": 512,
        "num_segments": 2,
        "hidden_dim": 128,
        "num_layers": 2,
        "num_heads": 2,
        "intermediate_dim": 512,
        "num_classes": 2,
        "dropout": 0.1,
    },
    # A large sequence output for memory: logits of shape (2, 512, 50257).
    "lm50k": {
        "batch_size": 2,
        "vocab_size": 50257,
        "seq_len": 512,
        "width": 32,
        "dropout": 0.1,
    },
    # LoRA fine-tuning of a keras-hub GPT2Backbone built from config (random
    # weights, nothing downloaded): 6 layers of width 768, a small
    # vocabulary, so the frozen weights (about 177 MB) dominate memory. LoRA
    # rank 4 on the attention query and value projections
    # (`backbone.enable_lora`), mean pooling, dropout, a 2-class head.
    "lora": {
        "batch_size": 4,
        "vocab_size": 2048,
        "seq_len": 32,
        "max_sequence_length": 64,
        "hidden_dim": 768,
        "num_layers": 6,
        "num_heads": 12,
        "intermediate_dim": 3072,
        "lora_rank": 4,
        "num_classes": 2,
        "dropout": 0.1,
    },
}

# The Keras transfer-learning recipe: the transformer's body (embeddings,
# encoder layers, pooling; no dropout inside, as a feature extractor),
# frozen, then dropout and a trainable 2-class head.
MODELS["frozen_base"] = dict(MODELS["transformer"], body_dropout=0.0)

# Optimizer and loss settings shared by every variant, Keras and PyTorch.
LEARNING_RATE = 1e-3
WEIGHT_DECAY = 0.01
EPSILON = 1e-7
CLIPNORM = 1.0
ALPHA = 1.0  # R-Drop weight
BETA = 0.1  # reference-KL weight


def logits_shape(name: str, batch_size: int | None = None) -> list[int] | None:
    """Shape of a batch's logits, for models whose output dominates memory.

    Only `lm50k`: its logits (batch, length, vocabulary) are the unit in which
    its memory table counts full-size copies. None for the others.
    """
    if name != "lm50k":
        return None
    cfg = MODELS[name]
    return [batch_size or cfg["batch_size"], cfg["seq_len"], cfg["vocab_size"]]


def logits_bytes(name: str, batch_size: int | None = None) -> int | None:
    """Bytes of one float32 logits tensor of a batch (see `logits_shape`)."""
    shape = logits_shape(name, batch_size)
    return None if shape is None else 4 * shape[0] * shape[1] * shape[2]


def _bert_inputs(cfg, num_samples, rng):
    """Already-tokenized BERT inputs: [CLS] a [SEP] b [SEP], then padding.

    Each row has a random length between half and all of `seq_len`; padding
    has token id 0 and `padding_mask` 0. Ids 100-103 are BERT's special
    tokens ([UNK], [CLS], [SEP], [MASK]); 0 is [PAD].
    """
    seq_len = cfg["seq_len"]
    tokens = rng.integers(
        1000, cfg["vocab_size"], size=(num_samples, seq_len), dtype=np.int32
    )
    lengths = rng.integers(seq_len // 2, seq_len + 1, size=num_samples)
    splits = rng.integers(2, lengths - 1)
    positions = np.arange(seq_len)[None, :]
    padding = positions < lengths[:, None]
    tokens[:, 0] = 101
    tokens[np.arange(num_samples), splits] = 102
    tokens[np.arange(num_samples), lengths - 1] = 102
    tokens = np.where(padding, tokens, 0).astype(np.int32)
    segments = ((positions > splits[:, None]) & padding).astype(np.int32)
    return {
        "token_ids": tokens,
        "segment_ids": segments,
        "padding_mask": padding.astype(np.int32),
    }


def make_data(name: str, num_samples: int, seed: int = 0):
    """A fixed random dataset: `(x, y)` numpy arrays of `num_samples` rows.

    `x` is a dict of arrays for `bert_tiny` (token_ids, segment_ids,
    padding_mask) and `lora` (token_ids, padding_mask: no padding); `y`
    holds one class per row, or one token per position for `lm50k`.
    """
    cfg = MODELS[name]
    rng = np.random.default_rng(seed)
    if name == "mlp":
        x = rng.standard_normal((num_samples, cfg["in_dim"]), dtype=np.float32)
    elif name == "bert_tiny":
        x = _bert_inputs(cfg, num_samples, rng)
    elif name == "lora":
        shape = (num_samples, cfg["seq_len"])
        x = {
            "token_ids": rng.integers(1, cfg["vocab_size"], size=shape, dtype=np.int32),
            "padding_mask": np.ones(shape, dtype=np.int32),
        }
    else:
        x = rng.integers(
            1, cfg["vocab_size"], size=(num_samples, cfg["seq_len"]), dtype=np.int32
        )
    if name == "lm50k":
        y = rng.integers(
            0, cfg["vocab_size"], size=(num_samples, cfg["seq_len"]), dtype=np.int32
        )
    else:
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


def _transformer_body(cfg, rate):
    """Tokens -> mean-pooled features: embeddings and post-norm encoder layers
    like `nn.TransformerEncoderLayer` (see `build_transformer`)."""
    import keras

    width, heads = cfg["width"], cfg["num_heads"]
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
    return tokens, keras.layers.GlobalAveragePooling1D()(h)


def build_transformer():
    """The same architecture as `torch_rdrop_loop.TransformerClassifier`.

    Post-norm encoder layers like `nn.TransformerEncoderLayer`: attention
    (dropout on the attention probabilities), dropout, add & LayerNorm, then
    Dense-ReLU, dropout, Dense, dropout, add & LayerNorm.
    """
    import keras

    cfg = MODELS["transformer"]
    tokens, h = _transformer_body(cfg, cfg["dropout"])
    h = keras.layers.Dropout(cfg["dropout"])(h)
    outputs = keras.layers.Dense(cfg["num_classes"], name="logits")(h)
    return keras.Model(tokens, outputs, name="transformer")


def build_frozen_base():
    """The transformer's body frozen (no dropout inside), then dropout and a
    head: `torch_rdrop_loop.FrozenBaseClassifier`."""
    import keras

    cfg = MODELS["frozen_base"]
    body = keras.Model(*_transformer_body(cfg, cfg["body_dropout"]), name="body")
    body.trainable = False
    tokens = keras.Input((cfg["seq_len"],), dtype="int32", name="tokens")
    h = keras.layers.Dropout(cfg["dropout"])(body(tokens))
    outputs = keras.layers.Dense(cfg["num_classes"], name="logits")(h)
    return keras.Model(tokens, outputs, name="frozen_base")


def build_bert_tiny():
    """keras-hub's `BertTextClassifier` on a BERT-tiny `BertBackbone`.

    Built from config, no preset: random weights, no download, no
    preprocessor (the data is already tokenized). keras-hub is imported here
    only, in the Keras worker.
    """
    import keras_hub

    cfg = MODELS["bert_tiny"]
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=cfg["vocab_size"],
        num_layers=cfg["num_layers"],
        num_heads=cfg["num_heads"],
        hidden_dim=cfg["hidden_dim"],
        intermediate_dim=cfg["intermediate_dim"],
        dropout=cfg["dropout"],
        max_sequence_length=cfg["max_sequence_length"],
        num_segments=cfg["num_segments"],
    )
    return keras_hub.models.BertTextClassifier(
        backbone=backbone,
        num_classes=cfg["num_classes"],
        preprocessor=None,
        dropout=cfg["dropout"],
    )


def build_lm50k():
    """Embedding(50257, 32), dropout, Dense(50257): per-position logits."""
    import keras

    cfg = MODELS["lm50k"]
    tokens = keras.Input((cfg["seq_len"],), dtype="int32", name="tokens")
    h = keras.layers.Embedding(cfg["vocab_size"], cfg["width"])(tokens)
    h = keras.layers.Dropout(cfg["dropout"])(h)
    outputs = keras.layers.Dense(cfg["vocab_size"], name="logits")(h)
    return keras.Model(tokens, outputs, name="lm50k")


def build_lora():
    """A GPT2Backbone from config with LoRA adapters, and a classifier head.

    `backbone.enable_lora(rank)` freezes every backbone weight and adds
    trainable rank-`rank` adapters to the attention query and value
    projections; the head (a Dense layer) is trainable. keras-hub is imported
    here only, in the Keras worker.
    """
    import keras
    import keras_hub

    cfg = MODELS["lora"]
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=cfg["vocab_size"],
        num_layers=cfg["num_layers"],
        num_heads=cfg["num_heads"],
        hidden_dim=cfg["hidden_dim"],
        intermediate_dim=cfg["intermediate_dim"],
        dropout=cfg["dropout"],
        max_sequence_length=cfg["max_sequence_length"],
    )
    backbone.enable_lora(rank=cfg["lora_rank"])
    inputs = {
        "token_ids": keras.Input((cfg["seq_len"],), dtype="int32", name="token_ids"),
        "padding_mask": keras.Input(
            (cfg["seq_len"],), dtype="int32", name="padding_mask"
        ),
    }
    h = backbone(inputs)
    h = keras.layers.GlobalAveragePooling1D()(h)
    h = keras.layers.Dropout(cfg["dropout"])(h)
    outputs = keras.layers.Dense(cfg["num_classes"], name="logits")(h)
    return keras.Model(inputs, outputs, name="gpt2_lora_classifier")


BUILDERS = {
    "mlp": build_mlp,
    "transformer": build_transformer,
    "frozen_base": build_frozen_base,
    "bert_tiny": build_bert_tiny,
    "lm50k": build_lm50k,
    "lora": build_lora,
}


def build_keras_model(name: str):
    return BUILDERS[name]()
