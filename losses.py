"""CapsNet's losses: the margin loss of the capsule lengths and the reconstruction error.

Total loss per sample = margin + lam_recon * MSE (lam_recon = 0.392 = 0.0005 * 784, the paper's
0.0005 * sum of squared errors). Written with `keras.ops`, so every backend trains the same loss.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

from capsulelayers import PACKAGE


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
