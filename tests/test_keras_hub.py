"""keras-hub tasks built from config (no download) on every backend."""

import keras
import numpy as np
import pytest

from keras_rdrop import RDropModel, ReferenceKLRegularizer
from tests.models import sparse_ce
from tests.testing import assert_allclose, consistency, import_keras_hub, to_numpy

keras_hub = import_keras_hub()

BERT_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + (
    "win a free prize now call to claim cash hello how are you see at lunch "
    "meeting today"
).split()
SPAM = ["win a free prize now", "call now to claim cash", "free cash prize"]
HAM = ["hello how are you", "see you at lunch", "meeting today"]

# A byte-pair vocabulary in the style of keras-hub's own GPT-2 tests.
GPT2_MERGES = [
    "Ġ a", "Ġ t", "Ġ i", "Ġ b", "a i", "p l", "n e", "Ġa t", "p o", "r t",
    "ai r", "pl a", "po rt", "Ġa i", "Ġai r", "pla ne",
]  # fmt: skip
GPT2_VOCAB = {"<|endoftext|>": 0, "!": 1}
for _merge in GPT2_MERGES:
    for _token in [*_merge.split(" "), _merge.replace(" ", "")]:
        GPT2_VOCAB.setdefault(_token, len(GPT2_VOCAB))


def text_classifier(dropout=0.2):
    tokenizer = keras_hub.models.BertTokenizer(vocabulary=BERT_VOCAB)
    preprocessor = keras_hub.models.BertTextClassifierPreprocessor(
        tokenizer, sequence_length=12
    )
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=len(BERT_VOCAB),
        num_layers=1,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
        max_sequence_length=12,
        dropout=dropout,
    )
    return keras_hub.models.BertTextClassifier(
        backbone, num_classes=2, preprocessor=preprocessor, dropout=dropout
    )


def causal_lm(dropout=0.2, sequence_length=8):
    tokenizer = keras_hub.models.GPT2Tokenizer(
        vocabulary=GPT2_VOCAB, merges=GPT2_MERGES
    )
    preprocessor = keras_hub.models.GPT2CausalLMPreprocessor(
        tokenizer, sequence_length=sequence_length
    )
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=len(GPT2_VOCAB),
        num_layers=1,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
        max_sequence_length=sequence_length,
        dropout=dropout,
    )
    return keras_hub.models.GPT2CausalLM(backbone, preprocessor=preprocessor)


def test_keras_nlp_name_imports_too():
    keras_nlp = pytest.importorskip("keras_nlp")
    assert keras_nlp.models.BertTextClassifier is keras_hub.models.BertTextClassifier


def test_text_classifier_on_raw_strings():
    x = np.array((SPAM + HAM) * 4)
    y = np.array(([1] * 3 + [0] * 3) * 4)
    model = RDropModel(text_classifier(), alpha=1.0)
    model.compile(optimizer="sgd", loss=sparse_ce(), metrics=["accuracy"])
    history = model.fit(
        x,
        y,
        batch_size=8,
        epochs=2,
        verbose=0,
        validation_data=(x[:6], y[:6]),
        callbacks=[ReferenceKLRegularizer(beta=0.1)],
    )
    logs = history.history
    assert logs["kl_loss"][0] > 0 and "ref_kl" in logs and "val_accuracy" in logs
    # evaluate and predict take raw strings and match the task itself.
    preds = model.predict(x[:6], verbose=0)
    assert_allclose(preds, model.model.predict(x[:6], verbose=0), rtol=1e-5)
    ours = model.evaluate(list(x), y, verbose=0, return_dict=True)
    assert set(ours) == {"loss", "accuracy"}


def test_causal_lm_padding_counts_for_nothing():
    texts = ["airplane at airport", "airplane", " airplane airport", "airport"]
    lm = causal_lm()
    data = lm.preprocess_samples(texts)
    _, _, padding = keras.utils.unpack_x_y_sample_weight(data)
    padding = to_numpy(padding)
    assert padding.min() == 0 and padding.max() == 1  # there is padding

    model = RDropModel(lm, alpha=1.0)
    model.compile(optimizer="sgd", loss=sparse_ce(), weighted_metrics=["accuracy"])
    history = model.fit(
        texts * 2,
        batch_size=4,
        epochs=1,
        verbose=0,
        callbacks=[ReferenceKLRegularizer(beta=0.5)],
    )
    assert history.history["kl_loss"][0] > 0
    assert history.history["ref_kl"][0] > 0

    # The KL of a step uses the preprocessor's padding mask as its weight:
    # changing the logits at padded positions changes nothing.
    x, _, weight = keras.utils.unpack_x_y_sample_weight(lm.preprocess_samples(texts))
    logits = to_numpy(lm(x, training=False))
    other = logits + np.random.default_rng(0).normal(size=logits.shape)
    weight = to_numpy(weight).astype("float32")
    kl = consistency(model, logits, other, weight).unweighted
    shuffled = other.copy()
    shuffled[weight == 0] = 50.0
    assert_allclose(consistency(model, logits, shuffled, weight).unweighted, kl)


def test_saved_task_round_trip(tmp_path):
    x = np.array((SPAM + HAM) * 2)
    y = np.array(([1] * 3 + [0] * 3) * 2)
    model = RDropModel(text_classifier(), alpha=1.0)
    model.compile(optimizer="sgd", loss=sparse_ce())
    model.fit(x, y, epochs=1, verbose=0)
    path = str(tmp_path / "hub.keras")
    model.save(path)
    # keras-hub tasks override compile(), so Keras warns it cannot recompile
    # the *inner* task from its config; the RDropModel itself is recompiled.
    with pytest.warns(UserWarning, match="compile"):
        loaded = keras.saving.load_model(path)
    assert isinstance(loaded, RDropModel)
    assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0))


def test_lora_causal_lm_anchor_copies_only_the_lora_weights():
    """`backbone.enable_lora` + R-Drop + the anchor, on raw strings: the
    snapshot holds the LoRA weights alone (the frozen backbone is read from
    the live model), and the reference is still the model before fine-tuning."""
    texts = ["airplane at airport", "airplane", " airplane airport", "airport"]
    lm = causal_lm()
    lm.backbone.enable_lora(rank=2)
    x, _, _ = keras.utils.unpack_x_y_sample_weight(lm.preprocess_samples(texts))
    theta0_logits = to_numpy(lm(x, training=False))

    model = RDropModel(lm, alpha=1.0)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=sparse_ce())
    history = model.fit(
        texts * 2,
        batch_size=4,
        epochs=3,
        verbose=0,
        callbacks=[ReferenceKLRegularizer(beta=0.5)],
    )
    assert history.history["kl_loss"][0] > 0
    assert history.history["ref_kl"][-1] > 0  # the LoRA weights moved

    def count(variables):
        return int(sum(np.prod(v.shape) for v in variables))

    trainable = lm.trainable_weights
    # LoRA factors and the biases of the LoRA layers (query and value).
    assert any("lora" in w.path for w in trainable)
    assert {w.path.split("/")[-2] for w in trainable} == {"query", "value"}
    copied = [w for w, _ in model.reference.copies(lm)]
    assert sorted(w.path for w in copied) == sorted(w.path for w in trainable)
    extra = count(model.weights) - count(lm.weights)
    assert extra == count(trainable) + 1  # + beta
    assert extra < count(lm.weights) / 10

    # The reference's logits, as the training step computes them, are θ0's.
    values = model.reference.reference_values(lm)
    reference_logits, _ = lm.stateless_call(*values, x, training=False)
    assert_allclose(reference_logits, theta0_logits, rtol=1e-5, atol=1e-5)
    assert not np.allclose(to_numpy(lm(x, training=False)), theta0_logits, atol=1e-3)
