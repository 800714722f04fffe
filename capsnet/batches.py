"""Training batches: the shuffled order, the random shifts, and a thread that makes them ahead."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np


def shift_images(x: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Moves each image by its own sub-pixel offset, bilinear, zero fill (no wrap).

    Args:
        x: `[n, rows, cols, channels]`.
        rows, cols: `[n]` offsets in pixels; positive moves the content down / right.

    Returns:
        `[n, rows, cols, channels]`, `out[i, r, c] = x[i, r - rows[i], c - cols[i]]` interpolated.
    """
    return _shift_axis(_shift_axis(x, rows, axis=1), cols, axis=2)


def _shift_axis(x: np.ndarray, offsets: np.ndarray, axis: int) -> np.ndarray:
    # A translation is separable: along one axis, out[j] = (1 - f) x[j - k] + f x[j - k - 1] for the
    # offset k + f (k whole, 0 <= f < 1), with x = 0 outside the image.
    # Hand-written in NumPy: faster than keras.layers.RandomTranslation called eagerly per batch
    # (bench/RESULTS.md), and it needs no backend at all, so batches are made beside the device's step.
    size = x.shape[axis]
    whole = np.floor(offsets)
    frac = (offsets - whole).astype(x.dtype)
    shape = [len(x)] + [1] * (x.ndim - 1)
    shape[axis] = size
    out = np.zeros_like(x)
    for source_offset, weight in ((whole, 1 - frac), (whole + 1, frac)):
        source = np.arange(size)[None, :] - source_offset[:, None].astype(np.int64)  # [n, size]
        inside = (source >= 0) & (source < size)
        picked = np.take_along_axis(x, np.clip(source, 0, size - 1).reshape(shape), axis=axis)
        out += picked * (inside * weight[:, None]).reshape(shape).astype(x.dtype)
    return out


def batch_order(n: int, batch_size: int, seed: int, epoch: int) -> np.ndarray:
    """The sample indices of each training step of `epoch`, `[n // batch_size, batch_size]`.

    Depends only on `(seed, epoch)`, so a resumed run sees the data an uninterrupted one would. Only
    full batches, as the original's `steps_per_epoch = n // batch_size`.
    """
    steps = n // batch_size
    order = np.random.default_rng([seed, epoch]).permutation(n)
    return order[: steps * batch_size].reshape(steps, batch_size)


def train_batches(x: np.ndarray, y: np.ndarray, batch_size: int, shift_fraction: float, seed: int,
                  epoch: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """One epoch of shuffled training batches, each image shifted at random.

    The shift of each image is drawn uniformly in `[-shift_fraction, shift_fraction]` times the image's
    height and width, sub-pixel and zero-filled, as the original's
    `ImageDataGenerator(width_shift_range, height_shift_range)` drew it; like the order, it depends
    only on `(seed, epoch)`.

    Args:
        x: `[n, rows, cols, channels]` float32; y: `[n, n_class]`.

    Yields:
        `(x [batch_size, rows, cols, channels], y [batch_size, n_class])`.
    """
    order = batch_order(len(x), batch_size, seed, epoch)
    rng = np.random.default_rng([seed, epoch, 1])  # its own stream: the order stays that of older runs
    size = np.array(x.shape[1:3], dtype=np.float64)
    for indices in order:
        xb, yb = x[indices], y[indices]
        if shift_fraction > 0:
            offsets = rng.uniform(-shift_fraction, shift_fraction, size=(len(indices), 2)) * size
            xb = shift_images(xb, offsets[:, 0], offsets[:, 1])
        yield xb, yb


class DigitBatcher:
    """Batches of single-digit data: shuffled, randomly shifted `(x, y)` for training (see
    `train_batches`), and the test set as it is for validation.

    Args:
        batch_size: images per training step.
        shift_fraction: the largest shift, as a fraction of the image size.
    """

    def __init__(self, batch_size: int, shift_fraction: float) -> None:
        self.batch_size = batch_size
        self.shift_fraction = shift_fraction

    def train(self, x: np.ndarray, y: np.ndarray, epoch: int, seed: int
              ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        return train_batches(x, y, self.batch_size, self.shift_fraction, seed, epoch)

    def valid(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return x, y


def prefetch(batches: Iterator[Any], depth: int = 2) -> Iterator[Any]:
    """`batches`, made one or two ahead in a thread while the device computes the current step."""
    slots: queue.Queue = queue.Queue(maxsize=depth)
    done = object()

    def produce() -> None:
        try:
            for batch in batches:
                slots.put(batch)
        except BaseException as e:  # handed to the consumer, which raises it
            slots.put(e)
        slots.put(done)

    threading.Thread(target=produce, daemon=True).start()
    while (item := slots.get()) is not done:
        if isinstance(item, BaseException):
            raise item
        yield item
