"""How other R-Drop implementations' weights map to our `alpha` (README table).

Our loss (RDropModel, default reduction) is

    ours(alpha) = (task(pass_1) + task(pass_2)) / 2 + alpha * SKL
    SKL = mean over valid positions of sum_k (KL(p||q) + KL(q||p)) / 2

Each test below computes another codebase's training objective on the same two
passes' logits with a float64 NumPy re-implementation written here from
reading that code (the file and commit are named in each docstring; nothing is
copied), and `RDropModel`'s total loss on a model whose two passes return
exactly those logits. It then asserts the README's row:
`theirs == factor * ours(alpha=f(their weight))`.

`F.kl_div(log_softmax(a), softmax(b), reduction="none")`, the building block
of every implementation here, is elementwise `softmax(b) * (log_softmax(b) -
log_softmax(a))`: summed over classes, KL(b || a).
"""

import keras
import numpy as np
import pytest
from keras import ops

from keras_rdrop import RDropModel
from tests.models import sparse_ce
from tests.testing import np_log_softmax

B, C = 8, 5  # classification: batch, classes
T, V = 6, 7  # sequences: length, vocabulary


class FixedPasses(keras.layers.Layer):
    """The logits of two given passes, selected by one-hot example rows.

    In training (RDropModel's default `mode="concat"` calls the inner model on
    `[x; x]`) the first half of the batch gets `first[i]`, the second half
    `second[i]`, exactly: a one-hot row times the table. Outside training, one
    pass: `first`. `noise`, from a Dropout layer, enters as `0 * sum(noise)`:
    it declares a stochastic layer (so RDropModel does not warn that the KL
    would always be 0) and changes no value. `scale`, a trainable weight fixed
    at 1 (the tests train with learning rate 0), gives the step something to
    train, as Keras' torch trainer warns without one.
    """

    def __init__(self, first, second, **kwargs):
        super().__init__(**kwargs)
        self.first = np.asarray(first, "float32")
        self.second = np.asarray(second, "float32")
        self.scale = self.add_weight(shape=(), initializer="ones", name="scale")

    def call(self, inputs, training=None):
        rows, noise = inputs
        zero = 0.0 * ops.sum(noise)
        rows = rows * self.scale
        first = ops.convert_to_tensor(self.first)
        if not training:
            return ops.tensordot(rows, first, axes=1) + zero
        second = ops.convert_to_tensor(self.second)
        rows_1, rows_2 = ops.split(rows, 2, axis=0)
        out_1 = ops.tensordot(rows_1, first, axes=1)
        out_2 = ops.tensordot(rows_2, second, axes=1)
        return ops.concatenate([out_1, out_2], axis=0) + zero


def ours(first, second, y, loss, alpha, sample_weight=None):
    """RDropModel's logs for one training step whose passes give `first`, `second`."""
    n = first.shape[0]
    rows = keras.Input((n,))
    noise = keras.layers.Dropout(0.5)(rows)
    inner = keras.Model(rows, FixedPasses(first, second)([rows, noise]))
    model = RDropModel(inner, alpha=alpha)
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.0), loss=loss)
    logs = model.train_on_batch(
        np.eye(n, dtype="float32"), y, sample_weight=sample_weight, return_dict=True
    )
    return {key: float(value) for key, value in logs.items()}


# ------------------------------------------------- float64 NumPy references


def kl_div_none(log_input, target_log):
    """`F.kl_div(log_input, exp(target_log), reduction="none")`, elementwise."""
    return np.exp(target_log) * (target_log - log_input)


def cross_entropy(logits, labels):
    """Per-position `-log softmax(logits)[label]`."""
    lp = np_log_softmax(logits)
    return -np.take_along_axis(lp, labels[..., None], axis=-1)[..., 0]


def symmetric_terms(a, b):
    """`(kl_div(log_softmax(a), softmax(b)), kl_div(log_softmax(b), softmax(a)))`."""
    la, lb = np_log_softmax(a), np_log_softmax(b)
    return kl_div_none(la, lb), kl_div_none(lb, la)


def fairseq_translation(a, b, labels, valid, reg_alpha, eps):
    """dropreg/R-Drop 9dcc830, fairseq_src/examples/translation_rdrop:
    `RegLabelSmoothedCrossEntropyCriterion.forward_reg` (criterion
    `reg_label_smoothed_cross_entropy`, task `rdrop_translation`, `--reg-alpha`).

    One forward on the source concatenated with itself; label-smoothed NLL
    summed over the valid tokens of both copies; KL terms of both directions
    with pad positions zeroed, summed, halved; `loss += reg_alpha * kl_loss`.
    The trainer divides the gradient by `sample_size = ntokens`, the valid
    target tokens of ONE copy (fairseq/trainer.py, `multiply_grads(numer /
    sample_size)`), so the objective per step is `loss / ntokens`.
    """
    lprobs = np_log_softmax(np.concatenate([a, b]))
    target = np.concatenate([labels, labels])
    keep = np.concatenate([valid, valid])
    nll = -np.take_along_axis(lprobs, target[..., None], axis=-1)[..., 0]
    smooth = -lprobs.sum(-1)
    nll_sum = (nll * keep).sum()
    smooth_sum = (smooth * keep).sum()
    task = (1.0 - eps) * nll_sum + eps / lprobs.shape[-1] * smooth_sum
    p_loss, q_loss = symmetric_terms(a, b)
    kl = ((p_loss * valid[..., None]).sum() + (q_loss * valid[..., None]).sum()) / 2
    return (task + reg_alpha * kl) / valid.sum()


def fairseq_sentence_prediction(a, b, labels, reg_alpha):
    """dropreg/R-Drop 9dcc830, fairseq_src/examples/roberta/roberta_rdrop_src:
    `RegSentencePredictionCriterion.forward_kl` (criterion
    `reg_sentence_prediction`, `--reg-alpha`, default 1.0).

    Two forwards; `nll_loss(..., reduction="sum")` of each added; KL terms of
    both directions summed over everything, halved, times `reg_alpha`;
    `sample_size` is the number of sentences, so the objective is `loss / B`.
    """
    task = cross_entropy(a, labels).sum() + cross_entropy(b, labels).sum()
    p_loss, q_loss = symmetric_terms(a, b)
    kl = (p_loss.sum() + q_loss.sum()) / 2
    return (task + reg_alpha * kl) / len(labels)


def hf_bert_fork(a, b, labels):
    """dropreg/R-Drop 9dcc830, huggingface_transformer_src, modeling_bert.py:
    `BertForSequenceClassification.bert_kl`.

    Two forwards; `CrossEntropyLoss()` (a batch mean) of each added with
    weight 1; `loss += 0.5 * (kl_loss + reverse_kl_loss) / 2.` where both
    are `F.kl_div(..., reduction="none").sum()` over the whole batch.
    """
    task = cross_entropy(a, labels).mean() + cross_entropy(b, labels).mean()
    p_loss, q_loss = symmetric_terms(a, b)
    return task + 0.5 * (p_loss.sum() + q_loss.sum()) / 2.0


def hf_roberta_fork(a, b, labels):
    """dropreg/R-Drop 9dcc830, huggingface_transformer_src, modeling_roberta.py:
    `RobertaForSequenceClassification` (the R-Drop forward): `0.5 *` each
    pass's mean cross-entropy, plus `0.7 * (kl_loss.sum() +
    reverse_kl_loss.sum()) / 2` over the whole batch.
    """
    task = 0.5 * cross_entropy(a, labels).mean() + 0.5 * cross_entropy(b, labels).mean()
    p_loss, q_loss = symmetric_terms(a, b)
    return task + 0.7 * (p_loss.sum() + q_loss.sum()) / 2


def paddle_rdrop_loss(a, b, reduction, pad_mask=None):
    """PaddlePaddle/PaddleNLP 790e1a0, paddlenlp/losses/rdrop.py: `RDropLoss`.

    `F.kl_div(log_softmax(p), softmax(q), reduction)` and its mirror; with
    `pad_mask` (only meaningful with `"none"`) the kept elements are selected;
    each is then summed and the two averaged. Paddle's `kl_div` reductions:
    `"none"` elementwise, `"sum"` the sum, `"mean"` the mean over all
    elements, `"batchmean"` the sum divided by the first dimension.
    """

    def reduce(values):
        if reduction == "none":
            return values
        if reduction == "sum":
            return values.sum()
        if reduction == "mean":
            return values.mean()
        if reduction == "batchmean":
            return values.sum() / values.shape[0]
        raise ValueError(reduction)

    p_loss, q_loss = (reduce(t) for t in symmetric_terms(a, b))
    if pad_mask is not None:
        keep = np.broadcast_to(pad_mask[..., None], p_loss.shape)
        p_loss, q_loss = p_loss[keep], q_loss[keep]
    return (np.sum(p_loss) + np.sum(q_loss)) / 2


def paddle_question_matching(a, b, labels, coef, reduction):
    """PaddleNLP examples/text_matching/question_matching (train.py 035eebc,
    model.py 1d80141): `loss = ce_loss + kl_loss * rdrop_coef` where
    `ce_loss = CrossEntropyLoss()(logits1, labels)`, the FIRST pass only, and
    `kl_loss = RDropLoss()(logits1, logits2)`.
    """
    return cross_entropy(a, labels).mean() + coef * paddle_rdrop_loss(a, b, reduction)


def bert4torch_rdrop_stacked(y_pred, y_true, alpha):
    """Tongjilibo/bert4torch 10a1044, bert4torch/losses.py: `RDropLoss(alpha)`
    called as `(y_pred, y_true)` with both passes stacked (`rank="adjacent"`:
    even rows one pass, odd rows the other).

    `CrossEntropyLoss()` over all 2B rows, plus `torch.mean(kl1 + kl2) / 4 *
    alpha` with the elementwise `KLDivLoss(reduction="none")` terms: a mean
    over batch AND classes.
    """
    task = cross_entropy(y_pred, y_true).mean()
    kl_1, kl_2 = symmetric_terms(y_pred[1::2], y_pred[::2])
    return task + np.mean(kl_1 + kl_2) / 4 * alpha


def bert4torch_rdrop_pair(a, b, labels, alpha):
    """The same `RDropLoss` called as `(y_pred1, y_pred2, y_true)`: the mean
    of the two passes' cross-entropies, plus the same KL term."""
    task = (cross_entropy(a, labels).mean() + cross_entropy(b, labels).mean()) / 2
    kl_1, kl_2 = symmetric_terms(a, b)
    return task + np.mean(kl_1 + kl_2) / 4 * alpha


# ---------------------------------------------------------------- the data


def passes(shape, seed):
    rng = np.random.default_rng(seed)
    a = 2.0 * rng.standard_normal(shape)
    b = a + rng.standard_normal(shape)  # two "dropout passes" that disagree
    return a.astype("float32"), b.astype("float32")


def classification(seed=0):
    a, b = passes((B, C), seed)
    labels = np.random.default_rng(seed + 1).integers(0, C, B).astype("int32")
    return a, b, labels


def sequences(seed=0):
    a, b = passes((B, T, V), seed)
    rng = np.random.default_rng(seed + 1)
    labels = rng.integers(0, V, (B, T)).astype("int32")
    lengths = rng.integers(2, T + 1, B)
    valid = (np.arange(T)[None, :] < lengths[:, None]).astype("float32")
    assert 0 < valid.sum() < B * T
    return a, b, labels, valid


def assert_close(actual, expected):
    np.testing.assert_allclose(actual, expected, rtol=2e-5, atol=1e-6)


# ------------------------------------------------------------------ the rows


@pytest.mark.parametrize("reg_alpha", [1.0, 5.0])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_fairseq_translation_is_twice_ours_at_half_alpha(reg_alpha, eps):
    a, b, labels, valid = sequences()
    theirs = fairseq_translation(a, b, labels, valid, reg_alpha, eps)
    if eps:
        y = np.eye(V, dtype="float32")[labels]
        loss = keras.losses.CategoricalCrossentropy(
            from_logits=True, label_smoothing=eps, reduction="mean_with_sample_weight"
        )
    else:
        y, loss = labels, sparse_ce(reduction="mean_with_sample_weight")
    logs = ours(a, b, y, loss, alpha=reg_alpha / 2, sample_weight=valid)
    assert_close(theirs, 2.0 * logs["loss"])


def test_fairseq_translation_needs_the_per_token_task_mean():
    # With the default reduction, a padding mask given as `sample_weight`
    # divides the task loss by all B*T positions, padded ones included, while
    # the KL is averaged over the valid ones: the factor then depends on the
    # batch's padding, so the README says to use "mean_with_sample_weight".
    a, b, labels, valid = sequences()
    theirs = fairseq_translation(a, b, labels, valid, reg_alpha=5.0, eps=0.0)
    logs = ours(a, b, labels, sparse_ce(), alpha=2.5, sample_weight=valid)
    assert abs(theirs - 2.0 * logs["loss"]) > 1e-2 * theirs
    # ... and exactly this: the task part is scaled by valid / (B * T).
    per_token = ours(
        a,
        b,
        labels,
        sparse_ce(reduction="mean_with_sample_weight"),
        2.5,
        sample_weight=valid,
    )
    scale = valid.sum() / valid.size
    assert_close(logs["task_loss"], scale * per_token["task_loss"])
    assert_close(logs["kl_loss"], per_token["kl_loss"])


@pytest.mark.parametrize("reg_alpha", [1.0, 0.5])
def test_fairseq_sentence_prediction_is_twice_ours_at_half_alpha(reg_alpha):
    a, b, labels = classification()
    theirs = fairseq_sentence_prediction(a, b, labels, reg_alpha)
    logs = ours(a, b, labels, sparse_ce(), alpha=reg_alpha / 2)
    assert_close(theirs, 2.0 * logs["loss"])


def test_hf_bert_fork_is_twice_ours_at_alpha_batch_over_4():
    a, b, labels = classification()
    logs = ours(a, b, labels, sparse_ce(), alpha=B / 4)
    assert_close(hf_bert_fork(a, b, labels), 2.0 * logs["loss"])


def test_hf_roberta_fork_is_ours_at_alpha_0_7_batch():
    a, b, labels = classification()
    logs = ours(a, b, labels, sparse_ce(), alpha=0.7 * B)
    assert_close(hf_roberta_fork(a, b, labels), logs["loss"])


@pytest.mark.parametrize(
    "reduction, alpha_per_coef",
    [("none", B), ("sum", B), ("batchmean", 1.0), ("mean", 1.0 / C)],
)
def test_paddlenlp_rdrop_loss_reductions(reduction, alpha_per_coef):
    a, b, labels = classification()
    coef = 0.3
    logs = ours(a, b, labels, sparse_ce(), alpha=coef * alpha_per_coef)
    # The KL term: coef * RDropLoss(reduction) == alpha * our SKL.
    assert_close(
        coef * paddle_rdrop_loss(a, b, reduction), logs["loss"] - logs["task_loss"]
    )
    # Their example's total takes the task loss of the first pass only: it
    # differs from ours by (CE_1 - CE_2) / 2, zero in expectation over masks.
    ce_1, ce_2 = cross_entropy(a, labels).mean(), cross_entropy(b, labels).mean()
    theirs = paddle_question_matching(a, b, labels, coef, reduction)
    assert_close(theirs, logs["loss"] + (ce_1 - ce_2) / 2)


def test_paddlenlp_rdrop_loss_with_pad_mask_is_alpha_coef_times_valid_tokens():
    a, b, labels, valid = sequences()
    coef = 0.3
    logs = ours(
        a,
        b,
        labels,
        sparse_ce(reduction="mean_with_sample_weight"),
        alpha=coef * valid.sum(),
        sample_weight=valid,
    )
    kl_term = coef * paddle_rdrop_loss(a, b, "none", pad_mask=valid.astype(bool))
    assert_close(kl_term, logs["loss"] - logs["task_loss"])


@pytest.mark.parametrize("alpha", [4.0, 1.0])
def test_bert4torch_rdrop_loss_is_ours_at_alpha_over_2c(alpha):
    a, b, labels = classification()
    logs = ours(a, b, labels, sparse_ce(), alpha=alpha / (2 * C))
    assert_close(bert4torch_rdrop_pair(a, b, labels, alpha), logs["loss"])
    # The stacked call, rows interleaved as `rank="adjacent"` expects.
    stacked = np.empty((2 * B, C), "float32")
    stacked[::2], stacked[1::2] = a, b
    theirs = bert4torch_rdrop_stacked(stacked, np.repeat(labels, 2), alpha)
    assert_close(theirs, logs["loss"])


# ------------------------------------------- alpha and the task's reduction


def test_sum_reduction_divides_alphas_weight_by_the_positions():
    # The KL is always a mean over valid positions; a task loss compiled with
    # reduction="sum" is a sum over them. So ours_sum(alpha) equals
    # N * ours_default(alpha / N), N the number of positions in the batch.
    a, b, labels = classification()
    alpha = 2.0
    summed = ours(a, b, labels, sparse_ce(reduction="sum"), alpha=alpha)
    default = ours(a, b, labels, sparse_ce(), alpha=alpha / B)
    assert_close(summed["loss"], B * default["loss"])
    assert_close(summed["kl_loss"], default["kl_loss"])


def test_sum_reduction_with_padding_counts_valid_tokens():
    a, b, labels, valid = sequences()
    alpha = 2.0
    n_valid = valid.sum()
    summed = ours(
        a, b, labels, sparse_ce(reduction="sum"), alpha=alpha, sample_weight=valid
    )
    per_token = ours(
        a,
        b,
        labels,
        sparse_ce(reduction="mean_with_sample_weight"),
        alpha=alpha / n_valid,
        sample_weight=valid,
    )
    assert_close(summed["loss"], n_valid * per_token["loss"])


def test_the_controlled_passes_are_what_the_model_sees():
    # The oracle of this file: RDropModel's task_loss and kl_loss are those of
    # the two given passes, by the NumPy formulas above.
    a, b, labels = classification()
    logs = ours(a, b, labels, sparse_ce(), alpha=1.0)
    task = (cross_entropy(a, labels).mean() + cross_entropy(b, labels).mean()) / 2
    p_loss, q_loss = symmetric_terms(a, b)
    skl = ((p_loss + q_loss).sum(-1) / 2).mean()
    assert skl > 0.1
    assert_close(logs["task_loss"], task)
    assert_close(logs["kl_loss"], skl)
    assert_close(logs["loss"], task + skl)
