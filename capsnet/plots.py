"""Pictures: image grids, PNG files, the training curves and the model diagram."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from capsnet.atomic import atomic_path

# `overlay_image` follows the single-digit `real_and_recon.png`: 50 inputs in the top 5 rows of a
# 10-wide grid and their 50 reconstructions in the 5 rows below.
FIGURE_IMAGES = 50
FIGURE_WIDTH = 10


def combine_images(
    generated_images: np.ndarray, height: int | None = None, width: int | None = None
) -> np.ndarray:
    """Tiles images row by row into one picture.

    Args:
        generated_images: `[n, rows, cols]` or `[n, rows, cols, channels]`.
        height, width: the grid in tiles; by default as square as possible.

    Returns:
        `[height * rows, width * cols]` (or `[..., channels]` for colour images).
    """
    images = np.asarray(generated_images)
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    num = images.shape[0]
    if width is None and height is None:
        width = int(math.sqrt(num))
        height = int(math.ceil(float(num) / width))
    elif width is not None and height is None:
        height = int(math.ceil(float(num) / width))
    elif height is not None and width is None:
        width = int(math.ceil(float(num) / height))
    rows, cols = images.shape[1:3]
    image = np.zeros((height * rows, width * cols) + images.shape[3:], dtype=images.dtype)
    for index, img in enumerate(images[: height * width]):
        i, j = divmod(index, width)
        image[i * rows : (i + 1) * rows, j * cols : (j + 1) * cols] = img
    return image


def save_image(image: np.ndarray, path: str | os.PathLike) -> None:
    """Saves a [0, 1] float image (`[h, w]` or `[h, w, 3]`) as an 8-bit PNG, atomically."""
    from PIL import Image

    pixels = np.clip(np.asarray(image) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    with atomic_path(path) as tmp:
        Image.fromarray(pixels).save(tmp, format="PNG")


def plot_log(filename: str | os.PathLike, show: bool = False) -> str:
    """Plots the loss and accuracy columns of a `log.csv`; writes `log.png` beside it.

    Returns:
        the path of the PNG.
    """
    import matplotlib

    if not show:
        matplotlib.use("Agg")  # never open a window, so headless machines work
    import matplotlib.pyplot as plt
    import pandas as pd

    log = pd.read_csv(filename)
    fig, (ax_loss, ax_acc) = plt.subplots(2, 1, figsize=(5, 8))
    for column in log.columns:
        if column.endswith("loss"):
            ax_loss.plot(log["epoch"], log[column], label=column)
        elif column.endswith("accuracy"):
            ax_acc.plot(log["epoch"], log[column], label=column)
    ax_loss.set_title("Training loss")
    ax_acc.set_title("Training and validation accuracy")
    for ax in (ax_loss, ax_acc):
        ax.set_xlabel("epoch")
        ax.legend()
    fig.tight_layout()
    out = str(Path(filename).with_name("log.png"))
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    if show:
        plt.show()
    plt.close(fig)
    return out


def plot_model(model: object, path: str | os.PathLike) -> bool:
    """Draws the model diagram (`model.png`, as the original did) with `keras.utils.plot_model`.

    pydot and Graphviz's `dot` program are optional: without them one line says so and nothing is
    drawn.

    Returns:
        whether the picture was drawn.
    """
    import keras

    try:
        import pydot

        pydot.Dot.create(pydot.Dot())  # fails without graphviz's `dot` program
    except Exception as e:  # ImportError, OSError or pydot's own error type
        print(f"Note: {path} not drawn, plot_model needs pydot and graphviz ({type(e).__name__}; "
              "pip install pydot, apt-get install graphviz)")
        return False
    with atomic_path(path) as tmp:
        keras.utils.plot_model(model, to_file=tmp, show_shapes=True)
    return True


def overlay_image(x: np.ndarray, recon_first: np.ndarray, recon_second: np.ndarray) -> np.ndarray:
    """The paper's Figure 5 for `real_and_recon.png`: inputs above, both reconstructions below.

    The first (up to) 50 inputs fill the top 5 rows of a 10-wide grid in gray; below them, in the
    same places, each image's two reconstructions are drawn over each other, the first digit's in
    red and the second's in green (R = recon_first, G = recon_second, B = 0), so where they overlap
    is yellow. With fewer than 50 images the inputs fill fewer rows and the reconstructions still
    start on a new row.

    Args:
        x: `[n, 36, 36, 1]` inputs in [0, 1].
        recon_first, recon_second: `[n, 36, 36, 1]` (or `[n, 1296]`) reconstructions, clipped to [0, 1].

    Returns:
        `[2 * ceil(m / 10) * 36, 10 * 36, 3]` float32 RGB in [0, 1], m = min(n, 50); with n >= 50
        `[360, 360, 3]`. `capsnet.plots.save_image` writes it.
    """
    x = np.asarray(x, dtype=np.float32)
    m = min(len(x), FIGURE_IMAGES)
    if m == 0:
        raise ValueError("overlay_image needs at least one image")
    shape = x.shape[1:3]
    inputs = np.clip(x[:m].reshape((m,) + shape), 0.0, 1.0)
    red = np.clip(np.asarray(recon_first, dtype=np.float32)[:m].reshape((m,) + shape), 0.0, 1.0)
    green = np.clip(np.asarray(recon_second, dtype=np.float32)[:m].reshape((m,) + shape), 0.0, 1.0)
    tiles_per_half = -(-m // FIGURE_WIDTH) * FIGURE_WIDTH  # whole rows, so the halves never share one
    tiles = np.zeros((2 * tiles_per_half,) + shape + (3,), dtype=np.float32)
    tiles[:m] = inputs[..., np.newaxis]  # gray: the same value in R, G and B
    tiles[tiles_per_half : tiles_per_half + m, ..., 0] = red
    tiles[tiles_per_half : tiles_per_half + m, ..., 1] = green
    return combine_images(tiles, width=FIGURE_WIDTH)
