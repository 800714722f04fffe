"""The original CapsNet-Keras formulation, re-implemented in Keras 3 for benchmarking only.

This is the baseline of `bench/step.py` and `bench/epoch.py`: the computation the original project
ran (Keras 2.0.7 master and its `tf2.2` branch), written again with today's APIs so that it runs next
to this port on the same machine. It is not part of the product and is never imported by it.

What is kept from the original, because it is what the benchmark measures:

- `u_hat` by tiling the primary capsules `[B, 1152, 8] -> [B, 10, 1152, 8]` and a per-sample
  map of a batched matmul with `W` (the original's `K.map_fn(K.batch_dot(...))`, the `tf2.2`
  branch's `tf.map_fn(lambda x: tf.matmul(W, x))`), then routing with matmuls on
  `[B, 10, 1, 1152]` logits, as in the `tf2.2` branch. Written with `keras.ops`: `ops.map` is
  `tf.map_fn` on TensorFlow (and `jax.lax.map` on JAX), so the layer also runs on other backends;
- `Lambda(squash)` for the primary capsules;
- training data from a Python generator that shifts every image on its own, like
  `ImageDataGenerator(width_shift_range, height_shift_range).flow(...)`: a shift drawn uniformly in
  `[-fraction, fraction] * size` (sub-pixel), applied with `scipy.ndimage.affine_transform` with
  `order=0` (nearest-neighbour, i.e. the shift is rounded to whole pixels) and `fill_mode='nearest'`,
  Keras 2.0.7's defaults; without SciPy an equivalent NumPy integer shift with edge padding is used;
- training with `model.fit` on that generator (Keras 3 runs it in a `tf.data.Dataset.from_generator`
  thread with prefetch, as Keras 2's `fit_generator` ran it in an enqueuer thread), no XLA (TF 1.x);
- the manipulation grid from 176 `predict` calls of batch 1.

What is deliberately not kept, so that both formulations compute the same numbers from the same
weights (tests/test_bench_reference.py checks it):

- the length `sqrt(sum(v^2) + 1e-7)` (with the original's later epsilon a fresh model stays at
  chance): the product's `LENGTH_EPSILON` is used instead;
- the `tf2.2` branch's batch size fixed in the graph and axis-less `tf.squeeze`: the batch size here
  is dynamic, so partial batches work.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np
from keras import layers, ops

from capsnet import plots
from capsnet.layers import LENGTH_EPSILON

CAPSULE_DIM = 16
PERTURBATIONS = [-0.25, -0.2, -0.15, -0.1, -0.05, 0.0, 0.05, 0.1, 0.15, 0.2, 0.25]


def squash(vectors: Any, axis: int = -1) -> Any:
    """The original's squash: `|s|^2 / (1 + |s|^2) * s / sqrt(|s|^2 + 1e-7)`; shape unchanged."""
    s_squared_norm = ops.sum(ops.square(vectors), axis, keepdims=True)
    scale = s_squared_norm / (1 + s_squared_norm) / ops.sqrt(s_squared_norm + keras.config.epsilon())
    return scale * vectors


class OriginalLength(layers.Layer):
    """Capsule lengths `[B, n_class, 16] -> [B, n_class]` (with the product's epsilon, see above)."""

    def call(self, inputs: Any) -> Any:
        return ops.sqrt(ops.sum(ops.square(inputs), -1) + LENGTH_EPSILON)

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return tuple(input_shape[:-1])


class OriginalMask(layers.Layer):
    """The original's Mask: by the one-hot `y` if given, else by the longest capsule; flattened.

    `[B, n_class, 16]` (and `[B, n_class]`) -> `[B, n_class * 16]`.
    """

    def call(self, inputs: Any) -> Any:
        if isinstance(inputs, (list, tuple)):
            inputs, mask = inputs
        else:
            lengths = ops.sqrt(ops.sum(ops.square(inputs), -1))
            mask = ops.one_hot(ops.argmax(lengths, 1), inputs.shape[1])
        masked = inputs * ops.expand_dims(ops.cast(mask, inputs.dtype), -1)
        return ops.reshape(masked, (-1, inputs.shape[1] * inputs.shape[2]))

    def compute_output_shape(self, input_shape: Any) -> tuple:
        shape = input_shape[0] if isinstance(input_shape, list) else input_shape
        return (shape[0], shape[1] * shape[2])


class OriginalCapsuleLayer(layers.Layer):
    """Capsule layer computed the original way: tile, per-sample map, matmul routing.

    Input `[B, input_num_capsule, input_dim_capsule]` (e.g. `[B, 1152, 8]`); output
    `[B, num_capsule, dim_capsule]` (`[B, 10, 16]`). `W` is `[num_capsule, input_num_capsule,
    dim_capsule, input_dim_capsule]`, the product's layout, so weights copy across unchanged.
    """

    def __init__(self, num_capsule: int, dim_capsule: int, routings: int = 3, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_capsule = num_capsule
        self.dim_capsule = dim_capsule
        self.routings = routings

    def build(self, input_shape: tuple) -> None:
        self.input_num_capsule = int(input_shape[1])
        self.input_dim_capsule = int(input_shape[2])
        self.W = self.add_weight(
            name="W",
            shape=(self.num_capsule, self.input_num_capsule, self.dim_capsule,
                   self.input_dim_capsule),
            initializer="glorot_uniform",
        )

    def call(self, inputs: Any) -> Any:
        # [B, 1152, 8] -> [B, 1, 1152, 8] -> [B, 10, 1152, 8] -> [B, 10, 1152, 8, 1]
        inputs_tiled = ops.tile(ops.expand_dims(inputs, 1), [1, self.num_capsule, 1, 1])
        inputs_tiled = ops.expand_dims(inputs_tiled, 4)
        # One sample at a time: [10, 1152, 16, 8] @ [10, 1152, 8, 1] -> [10, 1152, 16, 1].
        weights = ops.convert_to_tensor(self.W)
        inputs_hat = ops.map(lambda x: ops.matmul(weights, x), inputs_tiled)
        inputs_hat = ops.squeeze(inputs_hat, axis=4)  # [B, 10, 1152, 16]
        # Routing logits [B, 10, 1, 1152], zeros shaped from the data: the batch stays dynamic.
        b = ops.zeros_like(ops.expand_dims(inputs_hat[..., 0], 2))
        inputs_hat_t = ops.swapaxes(inputs_hat, -1, -2)  # [B, 10, 16, 1152]
        for i in range(self.routings):
            c = ops.softmax(b, axis=1)
            outputs = squash(ops.matmul(c, inputs_hat))  # [B, 10, 1, 16]
            if i < self.routings - 1:
                b = b + ops.matmul(outputs, inputs_hat_t)  # [B, 10, 1, 1152]
        return ops.squeeze(outputs, axis=2)

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return (input_shape[0], self.num_capsule, self.dim_capsule)


def OriginalCapsNet(  # noqa: N802 - the original's public name
    input_shape: Sequence[int], n_class: int, routings: int
) -> tuple[keras.Model, keras.Model, keras.Model]:
    """The original `CapsNet(...)`: train, eval and manipulate models with the product's layer names.

    Returns:
        `train_model` (`[x, y] -> [lengths, reconstruction]`), `eval_model`
        (`x -> [lengths, reconstruction]`), `manipulate_model` (`[x, y, noise] -> reconstruction`).
    """
    input_shape = tuple(int(d) for d in input_shape)
    x = layers.Input(shape=input_shape)
    conv1 = layers.Conv2D(256, 9, strides=1, padding="valid", activation="relu", name="conv1")(x)
    primary = layers.Conv2D(256, 9, strides=2, padding="valid", name="primarycap_conv2d")(conv1)
    primary = layers.Reshape(target_shape=(-1, 8), name="primarycap_reshape")(primary)
    primary = layers.Lambda(squash, name="primarycap_squash")(primary)
    digitcaps = OriginalCapsuleLayer(n_class, CAPSULE_DIM, routings, name="digitcaps")(primary)
    out_caps = OriginalLength(name="capsnet")(digitcaps)

    y = layers.Input(shape=(n_class,))
    masked_by_y = OriginalMask()([digitcaps, y])
    masked = OriginalMask()(digitcaps)
    decoder = keras.Sequential(
        [
            layers.Input(shape=(CAPSULE_DIM * n_class,)),
            layers.Dense(512, activation="relu"),
            layers.Dense(1024, activation="relu"),
            layers.Dense(math.prod(input_shape), activation="sigmoid"),
            layers.Reshape(target_shape=input_shape, name="out_recon"),
        ],
        name="decoder",
    )
    train_model = keras.Model([x, y], [out_caps, decoder(masked_by_y)])
    eval_model = keras.Model(x, [out_caps, decoder(masked)])
    noise = layers.Input(shape=(n_class, CAPSULE_DIM))
    noised_digitcaps = layers.Add()([digitcaps, noise])
    masked_noised_y = OriginalMask()([noised_digitcaps, y])
    manipulate_model = keras.Model([x, y, noise], decoder(masked_noised_y))
    return train_model, eval_model, manipulate_model


# Layers that hold weights, by name, in both this model and the product's.
WEIGHT_LAYERS = ("conv1", "primarycap_conv2d", "digitcaps", "decoder")


def copy_weights(source: keras.Model, target: keras.Model) -> None:
    """Copies the weights of the layers in `WEIGHT_LAYERS` from `source` to `target` by name."""
    for name in WEIGHT_LAYERS:
        target.get_layer(name).set_weights(source.get_layer(name).get_weights())


# ---------------------------------------------------------------------------------------------
# Python-side augmentation, as ImageDataGenerator(width_shift_range, height_shift_range).flow
# ---------------------------------------------------------------------------------------------


def _shift_scipy(image: np.ndarray, tx: float, ty: float) -> np.ndarray:
    """Keras 2.0.7 `apply_transform` for a pure translation: `[rows, cols, ch]` -> same shape."""
    from scipy import ndimage

    channels = [
        ndimage.affine_transform(image[..., c], np.eye(2), (tx, ty), order=0, mode="nearest")
        for c in range(image.shape[-1])
    ]
    return np.stack(channels, axis=-1)


def _shift_numpy(image: np.ndarray, tx: float, ty: float) -> np.ndarray:
    """The same nearest-neighbour shift without SciPy: whole pixels, edge values fill the border."""
    rows, cols = image.shape[:2]
    r, c = int(np.rint(tx)), int(np.rint(ty))
    padded = np.pad(image, ((abs(r),) * 2, (abs(c),) * 2, (0, 0)), mode="edge")
    return padded[abs(r) + r : abs(r) + r + rows, abs(c) + c : abs(c) + c + cols]


@functools.cache
def shift_backend() -> str:
    """`'scipy'` when SciPy is importable (the original's path), else `'numpy'`."""
    try:
        import scipy.ndimage  # noqa: F401
    except ImportError:
        return "numpy"
    return "scipy"


def random_shift(image: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """One image `[rows, cols, ch]`, shifted by up to `fraction` of its size in each direction."""
    rows, cols = image.shape[:2]
    tx = rng.uniform(-fraction, fraction) * rows if fraction else 0.0
    ty = rng.uniform(-fraction, fraction) * cols if fraction else 0.0
    if tx == 0 and ty == 0:
        return image
    shift = _shift_scipy if shift_backend() == "scipy" else _shift_numpy
    return shift(image, tx, ty)


def train_generator(
    x: np.ndarray, y: np.ndarray, batch_size: int, shift_fraction: float, seed: int = 0
) -> Iterator[tuple]:
    """The original's `train_generator`: endless `((x, y), (y, x))` batches, every image shifted in
    Python, reshuffled at every pass, the last batch of a pass partial (as `NumpyArrayIterator`).

    Args:
        x: `[n, rows, cols, ch]` float32; y: `[n, n_class]` one-hot.
    """
    rng = np.random.default_rng(seed)
    n = len(x)
    while True:
        order = rng.permutation(n)
        for start in range(0, n, batch_size):
            index = order[start : start + batch_size]
            x_batch = np.zeros((len(index),) + x.shape[1:], dtype="float32")
            for i, j in enumerate(index):
                x_batch[i] = random_shift(x[j].astype("float32"), shift_fraction, rng)
            y_batch = y[index]
            yield (x_batch, y_batch), (y_batch, x_batch)


# ---------------------------------------------------------------------------------------------
# The manipulation grid, 176 predicts of batch 1
# ---------------------------------------------------------------------------------------------


def manipulate_latent(
    model: keras.Model, x_test: np.ndarray, y_test: np.ndarray, digit: int, save_dir: str | Path,
    rng: np.random.Generator,
) -> np.ndarray:
    """The original's `manipulate_latent`: one `predict` per (dimension, perturbation).

    Picks a random test sample of `digit` (every sample can be picked, unlike the original's
    `randint(0, count - 1)`), writes `manipulate-{digit}.png` and returns `[176, rows, cols, ch]`.
    """
    candidates = np.flatnonzero(np.argmax(y_test, 1) == digit)
    chosen = candidates[rng.integers(len(candidates))]
    x, y = x_test[chosen : chosen + 1], y_test[chosen : chosen + 1]  # [1, rows, cols, ch], [1, n]
    noise = np.zeros([1, y_test.shape[1], CAPSULE_DIM], dtype="float32")
    x_recons = []
    for dim in range(CAPSULE_DIM):
        for r in PERTURBATIONS:
            tmp = np.copy(noise)
            tmp[:, :, dim] = r
            x_recons.append(model.predict([x, y, tmp], verbose=0))
    x_recons = np.concatenate(x_recons)
    image = plots.combine_images(x_recons, height=CAPSULE_DIM)
    plots.save_image(image, Path(save_dir) / f"manipulate-{digit}.png")
    return x_recons
