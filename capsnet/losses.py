"""CapsNet's losses: the margin loss of the capsule lengths and the reconstruction error.

Total loss per sample = margin + lam_recon * MSE (lam_recon = 0.392 = 0.0005 * 784, the paper's
0.0005 * sum of squared errors). Written with `keras.ops`, so every backend trains the same loss.
The baseline CNN's cross-entropy (`classifier_terms`) is here too, in the same per-sample form.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import keras
from keras import ops

from capsnet.layers import PACKAGE


@keras.saving.register_keras_serializable(package=PACKAGE)
def margin_loss(y_true: Any, y_pred: Any) -> Any:
    """Margin loss, the paper's eq. 4, per sample.

    `L = sum_k T_k max(0, 0.9 - |v_k|)^2 + 0.5 (1 - T_k) max(0, |v_k| - 0.1)^2`.

    Args:
        y_true: one-hot labels `[batch, n_class]`.
        y_pred: capsule lengths `[batch, n_class]`.

    Returns:
        `[batch]`; Keras' loss reduction (or the caller) averages it over the batch.
    """
    y_true = ops.cast(y_true, y_pred.dtype)
    present = y_true * ops.square(ops.relu(0.9 - y_pred))
    absent = 0.5 * (1 - y_true) * ops.square(ops.relu(y_pred - 0.1))
    return ops.sum(present + absent, axis=-1)


def reconstruction_loss(x: Any, x_recon: Any) -> Any:
    """Mean squared error per sample: `[batch, rows, cols, channels]` x2 -> `[batch]`."""
    x_recon = ops.cast(x_recon, x.dtype)
    return ops.mean(ops.reshape(ops.square(x - x_recon), (ops.shape(x)[0], -1)), axis=-1)


def per_sample_terms(x: Any, y: Any, lengths: Any, recon: Any, lam_recon: float) -> tuple[Any, ...]:
    """What training sums per sample, `[batch]` each: the total loss, the margin loss, the reconstruction
    MSE and whether the longest capsule is the label (1.0 or 0.0), in the order of `training.SUMS`.

    Args:
        x: images `[batch, rows, cols, channels]`; y: one-hot labels `[batch, n_class]`.
        lengths: capsule lengths `[batch, n_class]`; recon: reconstructions, the shape of `x`.
    """
    margin = margin_loss(y, ops.cast(lengths, "float32"))
    mse = reconstruction_loss(x, recon)
    correct = ops.cast(ops.equal(ops.argmax(lengths, -1), ops.argmax(y, -1)), "float32")
    return margin + lam_recon * mse, margin, mse, correct


def two_digit_terms(x: Any, y: Any, first: Any, second: Any, lengths: Any, recon_first: Any,
                    recon_second: Any, lam_recon: float) -> tuple[Any, ...]:
    """`per_sample_terms` for MultiMNIST (paper section 6): two digits per image.

    The margin loss takes the two-hot `y` as it is (both classes present); each digit is reconstructed
    from its own capsule against its own shifted image, and the two MSEs are added; a sample counts as
    correct only if its two longest capsules are exactly its two classes.

    Args:
        x: overlaid images `[batch, 36, 36, 1]` (unused: each reconstruction has its own target).
        y: two-hot labels `[batch, n_class]`.
        first, second: each digit alone, `[batch, 36, 36, 1]`.
        lengths: capsule lengths `[batch, n_class]`; recon_first, recon_second: `[batch, 36, 36, 1]`.
    """
    margin = margin_loss(y, ops.cast(lengths, "float32"))
    mse = reconstruction_loss(first, recon_first) + reconstruction_loss(second, recon_second)
    _, top2 = ops.top_k(ops.cast(lengths, "float32"), k=2)
    predicted = ops.sum(ops.one_hot(top2, ops.shape(y)[-1]), axis=1)  # two-hot
    correct = ops.cast(ops.all(ops.equal(predicted, ops.cast(y, predicted.dtype)), axis=-1), "float32")
    return margin + lam_recon * mse, margin, mse, correct


def classifier_terms(y: Any, probabilities: Any) -> tuple[Any, ...]:
    """`per_sample_terms` for a plain classifier (the baseline CNN, `baseline.py`), `[batch]` each.

    The terms keep CapsNet's slots, so that `log.csv` has the same columns and every tool that reads
    it (the best checkpoint, `log.png`, the results table) reads the baseline's too: the loss and the
    "capsnet" loss are the cross-entropy, the decoder loss is 0 (there is no decoder), the accuracy is
    whether the most probable class is the label.

    Args:
        y: one-hot labels `[batch, n_class]`; probabilities: softmax outputs `[batch, n_class]`.
    """
    probabilities = ops.cast(probabilities, "float32")
    cross_entropy = ops.categorical_crossentropy(ops.cast(y, "float32"), probabilities)
    correct = ops.cast(ops.equal(ops.argmax(probabilities, -1), ops.argmax(y, -1)), "float32")
    return cross_entropy, cross_entropy, ops.zeros_like(cross_entropy), correct


@dataclass(frozen=True)
class Objective:
    """How a batch (a tuple of arrays) feeds the train model, and what each step sums per sample.

    Attributes:
        inputs: the train model's inputs taken from a batch.
        terms: `(batch, model outputs, lam_recon) ->` the four per-sample terms of `training.SUMS`.
    """

    inputs: Callable[[Sequence[Any]], Any]
    terms: Callable[[Sequence[Any], Sequence[Any], float], tuple[Any, ...]]


# One digit per image: batches `(x, y)`, train model `[x, y] -> [lengths, reconstruction]`.
ONE_DIGIT = Objective(
    inputs=lambda batch: [batch[0], batch[1]],
    terms=lambda batch, out, lam_recon: per_sample_terms(batch[0], batch[1], out[0], out[1], lam_recon))

# MultiMNIST: batches `(x, y_two_hot, y_first, y_second, first, second)`, train model
# `[x, y_first, y_second] -> [lengths, reconstruction of first, reconstruction of second]`.
TWO_DIGITS = Objective(
    inputs=lambda batch: [batch[0], batch[2], batch[3]],
    terms=lambda batch, out, lam_recon: two_digit_terms(batch[0], batch[1], batch[4], batch[5], *out,
                                                        lam_recon))

# A plain classifier (the baseline CNN): batches `(x, y)`, model `x -> probabilities`; `lam_recon` has
# nothing to weigh.
CLASSIFIER = Objective(
    inputs=lambda batch: batch[0],
    terms=lambda batch, out, lam_recon: classifier_terms(batch[1], out))
