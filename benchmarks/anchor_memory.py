"""Values the anchor's snapshot holds, for LoRA and frozen-backbone models.

Prints, per model, the inner model's weight count, its trainable count, and
the extra values the `RDropModel` holds beyond its inner model (the snapshot
and `beta`) once `ReferenceKLRegularizer` has taken the snapshot. Uses only
the public API, so the same script measures any commit:

    PYTHONPATH=. KERAS_BACKEND=jax python benchmarks/anchor_memory.py [--big]

`--big` adds a GPT-2 base-sized model built from config (124M weights; the
snapshot is taken without training it).
"""

import argparse

import keras
import keras_hub
import numpy as np

import keras_rdrop
from keras_rdrop import RDropModel, ReferenceKLRegularizer


def count(variables):
    return int(sum(np.prod(v.shape) for v in variables))


def tiny_gpt2_lora():
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=29,
        num_layers=2,
        num_heads=2,
        hidden_dim=64,
        intermediate_dim=128,
        max_sequence_length=64,
        dropout=0.1,
    )
    lm = keras_hub.models.GPT2CausalLM(backbone, preprocessor=None)
    backbone.enable_lora(rank=2)
    rng = np.random.default_rng(0)
    x = {
        "token_ids": rng.integers(0, 29, (8, 16)).astype("int32"),
        "padding_mask": np.ones((8, 16), "int32"),
    }
    return lm, x, rng.integers(0, 29, (8, 16))


def frozen_body_mlp():
    body = keras.Sequential(
        [
            keras.Input((32,)),
            keras.layers.Dense(256, activation="relu"),
            keras.layers.BatchNormalization(),
            keras.layers.Dense(256, activation="relu"),
        ],
        name="body",
    )
    body.trainable = False
    model = keras.Sequential([body, keras.layers.Dropout(0.1), keras.layers.Dense(4)])
    rng = np.random.default_rng(0)
    return model, rng.random((32, 32)).astype("float32"), rng.integers(0, 4, (32,))


def gpt2_base_lora():
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=50257,
        num_layers=12,
        num_heads=12,
        hidden_dim=768,
        intermediate_dim=3072,
        max_sequence_length=1024,
    )
    lm = keras_hub.models.GPT2CausalLM(backbone, preprocessor=None)
    backbone.enable_lora(rank=4)
    return lm, None, None


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--big", action="store_true")
    builds = [tiny_gpt2_lora, frozen_body_mlp]
    if parser.parse_args().big:
        builds.append(gpt2_base_lora)
    print(f"keras_rdrop from {keras_rdrop.__file__}, backend {keras.backend.backend()}")
    for build in builds:
        keras.utils.set_random_seed(0)
        inner, x, y = build()
        model = RDropModel(inner, alpha=1.0 if x is not None else 0.0)
        callback = ReferenceKLRegularizer(beta=0.1)
        if x is None:
            callback.set_model(model)  # takes the snapshot, as `fit` does
            logs = {}
        else:
            model.compile(
                optimizer="adam",
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            )
            history = model.fit(x, y, batch_size=4, verbose=0, callbacks=[callback])
            logs = {k: round(v[-1], 5) for k, v in history.history.items()}
        print(
            f"{build.__name__}: weights {count(inner.weights):,} trainable "
            f"{count(inner.trainable_weights):,} extra "
            f"{count(model.weights) - count(inner.weights):,} {logs}"
        )


if __name__ == "__main__":
    main()
