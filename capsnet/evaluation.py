"""What a trained CapsNet is judged by: the test (accuracy and `real_and_recon.png`), MultiMNIST's test
(paper section 6, Figure 5) and the manipulation plot (`manipulate-{digit}.png`, paper Figure 4).

Each function takes the model and the data it needs and writes its picture into `save_dir`; the
command line (`capsulenet.py -t`) and `experiments/gallery.py` call them.

Usage::

    from capsnet.evaluation import manipulate_latent, test

    accuracy = test(eval_model, (x_test, y_test), batch_size=100, save_dir="result")
    manipulate_latent(manipulate_model, (x_test, y_test), digit=5, save_dir="result")
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import keras
import numpy as np

from capsnet import multimnist, plots
from capsnet.errors import UserError
from capsnet.model import CAPSULE_DIM

# Offsets added to one capsule dimension in the manipulation plot: -0.25, -0.2, ..., 0.25.
PERTURBATIONS = np.round(np.arange(-0.25, 0.25 + 1e-9, 0.05), 2)


def test(model: keras.Model, data: tuple[np.ndarray, np.ndarray], batch_size: int = 100,
         save_dir: str | os.PathLike = "./result") -> float:
    """Prints the test accuracy of `model` (the eval model) and writes `save_dir/real_and_recon.png`:
    the first 50 test images in the top five rows, their reconstructions below.

    Args:
        data: `(x_test [n, rows, cols, channels], y_test [n, n_class])`.

    Returns:
        the accuracy.
    """
    x_test, y_test = data
    y_pred, x_recon = model.predict(x_test, batch_size=batch_size, verbose=0)
    accuracy = float(np.mean(np.argmax(y_pred, 1) == np.argmax(y_test, 1)))
    print("-" * 30 + "Begin: test" + "-" * 30)
    print(f"Test acc: {accuracy:.4f}")
    image = plots.combine_images(np.concatenate([x_test[:50], x_recon[:50]]))
    path = Path(save_dir) / "real_and_recon.png"
    plots.save_image(image, path)
    print(f"Reconstructed images are saved to {path}")
    print("-" * 30 + "End: test" + "-" * 30)
    return accuracy


def test_two_digits(eval_model: keras.Model, pairs: Any, batch_size: int = 100,
                    save_dir: str | os.PathLike = "./result") -> dict[str, float]:
    """MultiMNIST's test: prints both metrics and writes `real_and_recon.png` as the paper's Figure 5.

    An image counts as right only if its two longest capsules are exactly its two digits (the official
    code's metric); "at least one" is also printed. The picture shows 50 overlaid inputs, then each one's
    two predicted digits decoded from their own capsules, drawn in red and green over each other.

    Args:
        eval_model: `x -> [lengths, reconstruction]` for 36x36 inputs.
        pairs: `multimnist.Pairs`, the test set.

    Returns:
        `{"both": ..., "at_least_one": ..., "error": ...}`.
    """
    lengths, _ = eval_model.predict(pairs.x, batch_size=batch_size, verbose=0)
    scores = multimnist.accuracy(lengths, pairs.y)
    print("-" * 30 + "Begin: test" + "-" * 30)
    print(f"Test acc: {scores['both']:.4f} (both digits right; MultiMNIST error {scores['error']:.2%})")
    print(f"Test acc, at least one digit right: {scores['at_least_one']:.4f}")
    shown = pairs.take(slice(0, 50))
    top2 = multimnist.two_longest(lengths[:50])
    eye = np.eye(lengths.shape[1], dtype="float32")
    decoder = eval_model.get_layer("decoder")
    # Called directly, not with `predict`: a model built per call would make `predict` trace anew.
    encoder = keras.Model(eval_model.inputs[0], eval_model.get_layer("digitcaps").output)
    capsules = keras.ops.convert_to_numpy(encoder(shown.x, training=False))  # [50, n_class, 16]
    recons = [keras.ops.convert_to_numpy(decoder(
        (capsules * eye[top2[:, k]][:, :, None]).reshape(len(capsules), -1), training=False)) for k in (0, 1)]
    path = Path(save_dir) / "real_and_recon.png"
    plots.save_image(plots.overlay_image(shown.x, *recons), path)
    print(f"Reconstructed images are saved to {path}")
    print("-" * 30 + "End: test" + "-" * 30)
    return scores


def pick_sample(y_test: np.ndarray, digit: int, rng: np.random.Generator | None = None) -> int:
    """The index of a random test sample of class `digit`; every one of them can be picked.

    Raises:
        UserError: the test set has no sample of that class.
    """
    candidates = np.flatnonzero(np.argmax(y_test, 1) == digit)
    if len(candidates) == 0:
        raise UserError(f"--digit {digit}: the test set holds no sample of that class")
    return int(candidates[(rng or np.random.default_rng()).integers(len(candidates))])


def perturbation_grid(n_class: int) -> np.ndarray:
    """The noise added to the capsules, `[16 * 11, n_class, 16]`: row `dim * 11 + k` adds
    `PERTURBATIONS[k]` to dimension `dim` of every capsule."""
    noise = np.zeros((CAPSULE_DIM, len(PERTURBATIONS), n_class, CAPSULE_DIM), dtype="float32")
    for dim in range(CAPSULE_DIM):
        noise[dim, :, :, dim] = PERTURBATIONS[:, None]
    return noise.reshape(-1, n_class, CAPSULE_DIM)


def manipulate_latent(model: keras.Model, data: tuple[np.ndarray, np.ndarray], digit: int = 5,
                      save_dir: str | os.PathLike = "./result", rng: np.random.Generator | None = None
                      ) -> np.ndarray:
    """Writes `save_dir/manipulate-{digit}.png`: one test sample of `digit` decoded with each of its 16
    capsule dimensions shifted by -0.25, -0.2, ..., 0.25 (rows: dimensions, columns: shifts).

    Computes what `model` (the manipulate model) would for the 176 noised copies, but encodes the
    sample once and decodes the 176 masked capsules in one batch: the encoder is 99% of the
    FLOPs, so this is far faster than one predict of 176 (bench/RESULTS.md).

    Returns:
        the reconstructions, `[16 * 11, rows, cols, channels]`.
    """
    print("-" * 30 + "Begin: manipulate" + "-" * 30)
    x_test, y_test = data
    index = pick_sample(y_test, digit, rng)
    noise = perturbation_grid(y_test.shape[1])
    encoder = keras.Model(model.inputs[0], model.get_layer("digitcaps").output)
    # Called directly, not with `predict`: the encoder is built per call and `predict` would trace it
    # anew every time (TensorFlow warns of retracing after a few calls, e.g. one grid per class).
    capsules = keras.ops.convert_to_numpy(encoder(x_test[index : index + 1], training=False))  # [1, n, 16]
    masked = (capsules + noise) * y_test[index][None, :, None]  # keep the label's capsule
    decoder = model.get_layer("decoder")
    x_recons = keras.ops.convert_to_numpy(
        decoder(masked.reshape(len(noise), -1).astype("float32"), training=False))
    image = plots.combine_images(x_recons, height=CAPSULE_DIM)
    path = Path(save_dir) / f"manipulate-{digit}.png"
    plots.save_image(image, path)
    print(f"manipulated result saved to {path}")
    print("-" * 30 + "End: manipulate" + "-" * 30)
    return x_recons
