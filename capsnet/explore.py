"""The capsule explorer: one self-contained HTML page to play with a trained CapsNet's capsules.

`write_explorer` writes `save_dir/explore.html` (`python capsulenet.py -t -w WEIGHTS --explore`): test
images of each class with their capsule lengths; choosing one shows its 16-D capsule as 16 sliders
(offsets of -0.25 ... 0.25 as in `manipulate-{digit}.png`, wider ranges on request) and its
reconstruction, which the page recomputes as the sliders move, with the decoder's weights embedded.
For MultiMNIST both digits' capsules get sliders and the two reconstructions are drawn in red and green.

The page needs no server and no network (its content security policy forbids any request): the
capsules were computed here by Keras, so only the decoder (three Dense layers, ~1.4M weights for
28x28 images) runs in the browser, in plain JavaScript. It sums in float64 over the float32 weights,
so what it draws equals the Keras decoder's output to Keras' own float32 rounding (tests/test_explore.py
checks within 1e-4 in headless Chromium). The weights are stored as float32: a float16 copy would
differ from Keras by ~1e-3, and float32 weights deflate poorly, so the page stays plain (several MB,
most of it the decoder's weights).

Nothing in the page is executed from the data: class names (which may come from folder names) are
inserted as text, never as HTML, and the data block escapes every `<`.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from capsnet import atomic

FILE_NAME = "explore.html"
TEMPLATE = Path(__file__).resolve().with_name("explore_template.html")
PLACEHOLDER = "__EXPLORER_DATA__"
# Images per class in the gallery: 8 per row fit beside the sliders in a 1280-pixel-wide window.
DEFAULT_PER_CLASS = 8
# The activations the page's decoder implements (the CapsNet decoder uses relu and sigmoid).
ACTIVATIONS = ("relu", "sigmoid", "linear")


def pick_images(first_labels: np.ndarray, n_class: int, n_per_class: int) -> np.ndarray:
    """The indices of the first `n_per_class` images of each class, class by class.

    Args:
        first_labels: `[n]` integer classes (MultiMNIST: the first digit's).

    Returns:
        `[m]` indices, m <= n_class * n_per_class (fewer where a class has fewer images).
    """
    return np.concatenate([np.flatnonzero(first_labels == c)[:n_per_class] for c in range(n_class)]
                          ).astype(np.int64)


def encode(eval_model: Any, x: np.ndarray, batch_size: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """The digit capsules and their lengths of `x` under `eval_model` (layers `digitcaps`, `capsnet`).

    Returns:
        `capsules [n, n_class, 16]` and `lengths [n, n_class]`, float32.
    """
    import keras

    encoder = keras.Model(eval_model.inputs[0], [eval_model.get_layer("digitcaps").output,
                                                 eval_model.get_layer("capsnet").output])
    # Called directly, not with `predict`: the model is built per call and `predict` would trace it.
    parts = [[keras.ops.convert_to_numpy(t).astype(np.float32)  # torch tensors may require grad
              for t in encoder(x[i : i + batch_size], training=False)] for i in range(0, len(x), batch_size)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def decoder_layers(decoder: Any) -> list[dict[str, Any]]:
    """The decoder's Dense layers as the page runs them: `units_in`, `units_out`, `activation` and the
    float32 `kernel [units_in, units_out]` and `bias [units_out]` (zeros without one).

    Raises:
        ValueError: a layer the page cannot run (anything but Dense with relu, sigmoid or no activation,
            and Reshape).
    """
    import keras

    found = []
    for layer in decoder.layers:
        if isinstance(layer, keras.layers.Reshape):
            continue
        if not isinstance(layer, keras.layers.Dense):
            raise ValueError(f"explorer: the decoder's layer {layer.name} ({type(layer).__name__}) cannot "
                             "run in the page (only Dense and Reshape)")
        activation = keras.activations.serialize(layer.activation)  # "relu", or a dict for custom ones
        if not isinstance(activation, str) or activation not in ACTIVATIONS:
            raise ValueError(f"explorer: the decoder's layer {layer.name} has activation {activation!r}; "
                             f"the page runs {', '.join(ACTIVATIONS)}")
        kernel = np.asarray(keras.ops.convert_to_numpy(layer.kernel), dtype=np.float32)
        bias = (np.asarray(keras.ops.convert_to_numpy(layer.bias), dtype=np.float32) if layer.use_bias
                else np.zeros(kernel.shape[1], np.float32))
        found.append({"units_in": int(kernel.shape[0]), "units_out": int(kernel.shape[1]),
                      "activation": activation, "kernel": kernel, "bias": bias})
    return found


def _b64(array: np.ndarray, dtype: str) -> str:
    return base64.b64encode(np.ascontiguousarray(array, dtype=dtype).tobytes()).decode("ascii")


def page_data(capsules: np.ndarray, lengths: np.ndarray, images: np.ndarray, labels: np.ndarray,
              source_index: np.ndarray, layers: list[dict[str, Any]], class_names: Sequence[str],
              title: str = "") -> dict[str, Any]:
    """What the page reads, JSON-ready: arrays as base64 of little-endian float32 (uint8 for images).

    Args:
        capsules: `[m, n_class, 16]` the shown images' digit capsules.
        lengths: `[m, n_class]` their lengths.
        images: `[m, rows, cols, channels]` in [0, 1] (stored as 8-bit, as `plots.save_image` rounds).
        labels: `[m]` classes, or `[m, 2]` for MultiMNIST (first and second digit).
        source_index: `[m]` each image's index in the test set, shown on the page.
        layers: `decoder_layers(...)`.
    """
    labels = np.asarray(labels, dtype=np.int64)
    two_digits = labels.ndim == 2
    pixels = np.floor(np.clip(images, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    n_class, dim = capsules.shape[1:]
    if len(class_names) != n_class or layers[0]["units_in"] != n_class * dim:
        raise ValueError(f"explorer: {len(class_names)} class names, {n_class} capsules of {dim} and a "
                         f"decoder of {layers[0]['units_in']} inputs do not fit together")
    if layers[-1]["units_out"] != int(np.prod(images.shape[1:])):
        raise ValueError(f"explorer: the decoder makes {layers[-1]['units_out']} values, the images "
                         f"have {int(np.prod(images.shape[1:]))}")
    return {
        "title": title,
        "class_names": [str(name) for name in class_names],
        "image_shape": [int(d) for d in images.shape[1:]],
        "capsule_dim": int(dim),
        "two_digits": bool(two_digits),
        "labels": (labels if two_digits else labels[:, None]).tolist(),
        "source_index": np.asarray(source_index, dtype=np.int64).tolist(),
        "images": _b64(pixels, "u1"),
        "capsules": _b64(capsules, "<f4"),
        "lengths": _b64(lengths, "<f4"),
        "decoder": [{"units_in": layer["units_in"], "units_out": layer["units_out"],
                     "activation": layer["activation"], "kernel": _b64(layer["kernel"], "<f4"),
                     "bias": _b64(layer["bias"], "<f4")} for layer in layers],
    }


def render(data: dict[str, Any], template: str | None = None) -> str:
    """The page: the template with `data` in its JSON block."""
    template = TEMPLATE.read_text(encoding="utf-8") if template is None else template
    if template.count(PLACEHOLDER) != 1:
        raise ValueError(f"explorer: the template must hold {PLACEHOLDER} exactly once")
    # `<` escaped, so no string in the data (a class name) can close the script element.
    return template.replace(PLACEHOLDER, json.dumps(data, separators=(",", ":")).replace("<", "\\u003c"))


def write_explorer(eval_model: Any, x: np.ndarray, labels: np.ndarray, class_names: Sequence[str],
                   path: str | os.PathLike, n_per_class: int = DEFAULT_PER_CLASS, title: str = "",
                   batch_size: int = 100) -> Path:
    """Writes the explorer page of `eval_model` for some of the images `x`.

    Args:
        eval_model: `x -> [lengths, reconstruction]`, with layers `digitcaps`, `capsnet` and `decoder`.
        x: `[n, rows, cols, channels]` test images in [0, 1] (MultiMNIST: the overlaid 36x36 pairs).
        labels: `[n]` integer classes, or `[n, 2]` both digits' classes for MultiMNIST.
        class_names: one name per class.
        path: the HTML file to write (replaced atomically if it exists).
        n_per_class: images shown per class (per first digit for MultiMNIST).
        title: a line under the page's heading (data and weights).

    Returns:
        the path written.
    """
    labels = np.asarray(labels)
    first = labels[:, 0] if labels.ndim == 2 else labels
    index = pick_images(first, len(class_names), n_per_class)
    if len(index) == 0:
        raise ValueError("explorer: no test image to show")
    capsules, lengths = encode(eval_model, x[index], batch_size)
    data = page_data(capsules, lengths, x[index], labels[index], index,
                     decoder_layers(eval_model.get_layer("decoder")), class_names, title)
    path = Path(path)
    with atomic.atomic_path(path) as tmp:
        Path(tmp).write_text(render(data), encoding="utf-8")
    return path


def save_explorer(eval_model: Any, x: np.ndarray, labels: np.ndarray, class_names: Sequence[str],
                  save_dir: str | os.PathLike, dataset: str, weights: str | None) -> Path:
    """`-t --explore`: writes `save_dir/explore.html` (see `write_explorer`) and says where, and how big.

    Args:
        dataset, weights: the `--dataset` and `-w` flags, named (file names only) under the heading.
    """
    source = f"weights {Path(weights).name}" if weights else "random weights (no -w)"
    title = f"{Path(str(dataset)).name}: test images, {source}"
    path = write_explorer(eval_model, x, labels, class_names, Path(save_dir) / FILE_NAME, title=title)
    print(f"Capsule explorer saved to {path} ({path.stat().st_size / 1e6:.1f} MB; open it in a browser)")
    return path
