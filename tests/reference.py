"""A plain-NumPy (float64) re-implementation of the equations of Sabour, Frosst & Hinton,
"Dynamic Routing Between Capsules" (NIPS 2017, arXiv:1710.09829), written from the paper and
the original project's documented model, not from the project's code. The tests compare the Keras
layers against it.

Shapes follow the paper's indices: `i` input (lower) capsules, `j` output (higher) capsules.
Everything is deliberately written with explicit loops and sums, not with the einsum strings the
product uses, so that a wrong axis in one cannot hide in the other.
"""

from __future__ import annotations

import numpy as np

SQUASH_EPSILON = 1e-7  # Keras' epsilon, inside the square root of the squash, as the original
M_PLUS = 0.9
M_MINUS = 0.1
LAMBDA = 0.5


def squash(s: np.ndarray, axis: int = -1) -> np.ndarray:
    """Eq. 1: `v = |s|^2 / (1 + |s|^2) * s / sqrt(|s|^2 + eps)`."""
    s = np.asarray(s, dtype=np.float64)
    squared_norm = np.sum(s * s, axis=axis, keepdims=True)
    return squared_norm / (1.0 + squared_norm) * s / np.sqrt(squared_norm + SQUASH_EPSILON)


def length(v: np.ndarray) -> np.ndarray:
    """The length of each capsule (last axis), the paper's plain Euclidean norm."""
    v = np.asarray(v, dtype=np.float64)
    return np.sqrt(np.sum(v * v, axis=-1))


def margin_loss(t: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Eq. 4 summed over the classes: one value per sample.

    `L = sum_k T_k max(0, m+ - |v_k|)^2 + lambda (1 - T_k) max(0, |v_k| - m-)^2`.
    """
    t = np.asarray(t, dtype=np.float64)
    lengths = np.asarray(lengths, dtype=np.float64)
    present = t * np.maximum(0.0, M_PLUS - lengths) ** 2
    absent = LAMBDA * (1.0 - t) * np.maximum(0.0, lengths - M_MINUS) ** 2
    return np.sum(present + absent, axis=-1)


def predictions(w: np.ndarray, u: np.ndarray) -> np.ndarray:
    """The prediction vectors `u_hat[j|i] = W_ij u_i`, one matrix product at a time.

    Args:
        w: `[J, I, out_dim, in_dim]` (the original's layout of `W`).
        u: `[batch, I, in_dim]`.

    Returns:
        `[batch, J, I, out_dim]`.
    """
    w = np.asarray(w, dtype=np.float64)
    u = np.asarray(u, dtype=np.float64)
    n_out, n_in, out_dim, _ = w.shape
    u_hat = np.zeros((u.shape[0], n_out, n_in, out_dim))
    for b in range(u.shape[0]):
        for j in range(n_out):
            for i in range(n_in):
                u_hat[b, j, i] = w[j, i] @ u[b, i]
    return u_hat


def softmax(x: np.ndarray, axis: int) -> np.ndarray:
    """Numerically stable softmax along `axis`."""
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)


def routing(u_hat: np.ndarray, routings: int, coupling: np.ndarray | None = None) -> np.ndarray:
    """Procedure 1, routing by agreement.

    b_ij = 0; repeat r times: c_i = softmax(b_i) over the OUTPUT capsules j; s_j = sum_i c_ij u_hat_j|i;
    v_j = squash(s_j); except after the last iteration, b_ij += u_hat_j|i . v_j.

    Args:
        u_hat: `[batch, J, I, out_dim]`.
        routings: r >= 1.
        coupling: if given, use these coupling coefficients `[batch, J, I]` for a single final
            iteration instead of routing (used to build a "stop_gradient" variant in the tests).

    Returns:
        v, `[batch, J, out_dim]`.
    """
    u_hat = np.asarray(u_hat, dtype=np.float64)
    if coupling is not None:
        return squash(np.sum(coupling[..., None] * u_hat, axis=2))
    b = np.zeros(u_hat.shape[:3])
    v = None
    for iteration in range(routings):
        c = softmax(b, axis=1)  # axis 1 = j, the output capsules
        s = np.sum(c[..., None] * u_hat, axis=2)  # sum over i
        v = squash(s)
        if iteration < routings - 1:
            b = b + np.sum(u_hat * v[:, :, None, :], axis=-1)
    return v


def final_coupling(u_hat: np.ndarray, routings: int) -> np.ndarray:
    """The coupling coefficients `c` used in the last routing iteration, `[batch, J, I]`."""
    b = np.zeros(u_hat.shape[:3])
    for _ in range(routings - 1):
        c = softmax(b, axis=1)
        v = squash(np.sum(c[..., None] * u_hat, axis=2))
        b = b + np.sum(u_hat * v[:, :, None, :], axis=-1)
    return softmax(b, axis=1)


def capsule_layer(w: np.ndarray, u: np.ndarray, routings: int) -> np.ndarray:
    """A fully connected capsule layer: predictions, then routing. `[batch, J, out_dim]`."""
    return routing(predictions(w, u), routings)


def mask_by_label(capsules: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Zeroes every capsule but the labelled one, then flattens: `[batch, J * dim]`."""
    capsules = np.asarray(capsules, dtype=np.float64)
    out = np.zeros_like(capsules)
    for b in range(capsules.shape[0]):
        k = int(np.argmax(y[b]))
        out[b, k] = capsules[b, k]
    return out.reshape(capsules.shape[0], -1)


def mask_by_length(capsules: np.ndarray) -> np.ndarray:
    """Keeps only the longest capsule of each sample, then flattens: `[batch, J * dim]`."""
    capsules = np.asarray(capsules, dtype=np.float64)
    eye = np.eye(capsules.shape[1])
    return mask_by_label(capsules, eye[np.argmax(length(capsules), axis=1)])


def valid_conv(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray, stride: int) -> np.ndarray:
    """A "valid" 2-D convolution (cross-correlation, as Keras' Conv2D) from its definition, float64:
    `out[b, r, c, o] = bias[o] + sum_{i, j, k} x[b, r*s + i, c*s + j, k] * kernel[i, j, k, o]`.

    Args:
        x: `[batch, rows, cols, channels]`; kernel: `[kernel_rows, kernel_cols, channels, filters]`;
        bias: `[filters]`.

    Returns:
        `[batch, (rows - kernel_rows) // stride + 1, (cols - kernel_cols) // stride + 1, filters]`.
    """
    x = np.asarray(x, dtype=np.float64)
    rows, cols, _, _ = kernel.shape
    out_rows = (x.shape[1] - rows) // stride + 1
    out_cols = (x.shape[2] - cols) // stride + 1
    out = np.zeros((x.shape[0], out_rows, out_cols, kernel.shape[3])) + bias
    for i in range(rows):
        for j in range(cols):
            patch = x[:, i:i + stride * out_rows:stride, j:j + stride * out_cols:stride, :]
            out += patch @ kernel[i, j]
    return out
