"""Capsule layers for Keras 3: `squash`, `Length`, `Mask`, `CapsuleLayer`, `PrimaryCap`.

Sabour, Frosst & Hinton, "Dynamic Routing Between Capsules", NIPS 2017.
Every layer is written with `keras.ops`, so it runs on any Keras backend, and is registered as
serializable: a `.keras` file that uses them loads with `safe_mode=True` after `import capsulelayers`.

Usage::

    import keras
    from capsulelayers import CapsuleLayer, Length, Mask, PrimaryCap

    x = keras.Input((28, 28, 1))
    h = keras.layers.Conv2D(256, 9, activation="relu")(x)
    primary = PrimaryCap(h, dim_capsule=8, n_channels=32, kernel_size=9, strides=2)
    digits = CapsuleLayer(num_capsule=10, dim_capsule=16, routings=3)(primary)
    lengths = Length()(digits)
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

PACKAGE = "capsnet"

# Keras' own epsilon (1e-7), as in the original squash.
SQUASH_EPSILON = 1e-7

# Added under the square root of a capsule length so that its gradient is finite at an all-zero
# vector. It must stay far below the squared norm of a freshly initialised digit capsule (about
# (6e-8)^2 = 3.6e-15): the original's later 1e-7 turns every length into sqrt(1e-7) = 3.2e-4, the
# gradient into ~1e-12, and the model never leaves chance (SPEC section 3). 1e-21 is representable in
# float32 and bfloat16; float16 gets its own floor.
LENGTH_EPSILON = 1e-21
FLOAT16_LENGTH_EPSILON = 1e-7


def safe_norm(vectors: Any, axis: int = -1, keepdims: bool = False) -> Any:
    """Euclidean norm that is exact for tiny vectors and has a finite gradient at zero.

    Args:
        vectors: tensor, e.g. `[batch, num_capsule, dim_capsule]`.
        axis: axis to reduce.
        keepdims: keep the reduced axis with size 1.

    Returns:
        `sqrt(sum(vectors**2) + LENGTH_EPSILON)`, e.g. `[batch, num_capsule]`.
    """
    squared = ops.sum(ops.square(vectors), axis=axis, keepdims=keepdims)
    # float16 cannot hold 1e-21 (it would round to 0 and the gradient at zero to inf); bfloat16 can.
    float16 = keras.backend.standardize_dtype(squared.dtype) == "float16"
    epsilon = FLOAT16_LENGTH_EPSILON if float16 else LENGTH_EPSILON
    return ops.sqrt(squared + epsilon)


@keras.saving.register_keras_serializable(package=PACKAGE)
def squash(vectors: Any, axis: int = -1) -> Any:
    """The non-linear activation of the paper's eq. 1.

    `v = |s|^2 / (1 + |s|^2) * s / sqrt(|s|^2 + epsilon)`: short vectors shrink to almost zero,
    long ones to a length just below 1.

    Args:
        vectors: tensor of capsules, e.g. `[batch, num_capsule, dim_capsule]`.
        axis: the capsule dimension.

    Returns:
        a tensor of the same shape as `vectors`.
    """
    s_squared_norm = ops.sum(ops.square(vectors), axis=axis, keepdims=True)
    scale = s_squared_norm / (1 + s_squared_norm) / ops.sqrt(s_squared_norm + SQUASH_EPSILON)
    return scale * vectors


@keras.saving.register_keras_serializable(package=PACKAGE)
class Squash(keras.layers.Layer):
    """`squash` as a layer, so that models need no `Lambda` (which safe-mode loading refuses).

    Input shape: `[..., dim_capsule]`. Output shape: the same.
    """

    def __init__(self, axis: int = -1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.axis = axis

    def call(self, inputs: Any) -> Any:
        return squash(inputs, axis=self.axis)

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return input_shape

    def get_config(self) -> dict:
        return {**super().get_config(), "axis": self.axis}


@keras.saving.register_keras_serializable(package=PACKAGE)
class Length(keras.layers.Layer):
    """The length of each capsule, the probability that its entity is present.

    Input shape: `[batch, num_capsule, dim_capsule]`. Output shape: `[batch, num_capsule]`.
    Uses `safe_norm`: exact for the tiny capsules of a fresh model, finite gradient at zero.
    """

    def call(self, inputs: Any) -> Any:
        return safe_norm(inputs, axis=-1)

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return tuple(input_shape[:-1])


@keras.saving.register_keras_serializable(package=PACKAGE)
class Mask(keras.layers.Layer):
    """Keeps one capsule per sample and zeroes the others, then flattens.

    Called as `Mask()([capsules, y])` the kept capsule is the one that `y` (one-hot, `[batch,
    num_capsule]`) selects, as during training; called as `Mask()(capsules)` it is the longest one,
    as at prediction time.

    Input shape: `[batch, num_capsule, dim_capsule]` (and `[batch, num_capsule]`).
    Output shape: `[batch, num_capsule * dim_capsule]`.
    """

    def call(self, inputs: Any) -> Any:
        if isinstance(inputs, (list, tuple)):
            capsules, mask = inputs
        else:
            capsules = inputs
            lengths = safe_norm(capsules, axis=-1)
            mask = ops.one_hot(ops.argmax(lengths, axis=1), ops.shape(capsules)[1])
        mask = ops.cast(mask, capsules.dtype)
        masked = capsules * ops.expand_dims(mask, -1)
        return ops.reshape(masked, (-1, capsules.shape[1] * capsules.shape[2]))

    def compute_output_shape(self, input_shape: Any) -> tuple:
        capsules_shape = input_shape[0] if isinstance(input_shape, list) else input_shape
        return (capsules_shape[0], capsules_shape[1] * capsules_shape[2])


@keras.saving.register_keras_serializable(package=PACKAGE)
class CapsuleLayer(keras.layers.Layer):
    """Fully connected capsule layer with routing-by-agreement (the paper's Procedure 1).

    The prediction vectors `u_hat[j|i] = W_ij u_i` are computed for the whole batch in one
    `einsum` (no per-sample loop), and the routing logits start as zeros shaped from the input, so
    the batch size stays dynamic. There is no bias, the coupling coefficients are a softmax over the
    output capsules, and gradients flow through every routing iteration, as in the original.

    Args:
        num_capsule: number of output capsules (10 for MNIST).
        dim_capsule: dimension of each output capsule (16).
        routings: routing iterations, at least 1.
        kernel_initializer: initializer of `W`.

    Input shape: `[batch, input_num_capsule, input_dim_capsule]`, e.g. `[batch, 1152, 8]`.
    Output shape: `[batch, num_capsule, dim_capsule]`, e.g. `[batch, 10, 16]`.
    Weights: `W` of shape `[num_capsule, input_num_capsule, dim_capsule, input_dim_capsule]`,
    the original's layout, so its saved weights load unchanged.
    """

    def __init__(
        self,
        num_capsule: int,
        dim_capsule: int,
        routings: int = 3,
        kernel_initializer: Any = "glorot_uniform",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if int(routings) < 1:
            raise ValueError(f"CapsuleLayer: routings must be >= 1, got {routings}.")
        self.num_capsule = int(num_capsule)
        self.dim_capsule = int(dim_capsule)
        self.routings = int(routings)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)

    def build(self, input_shape: tuple) -> None:
        if len(input_shape) != 3 or input_shape[1] is None or input_shape[2] is None:
            raise ValueError(
                "CapsuleLayer expects [batch, input_num_capsule, input_dim_capsule] with known "
                f"capsule dimensions, got {input_shape}."
            )
        self.input_num_capsule = int(input_shape[1])
        self.input_dim_capsule = int(input_shape[2])
        self.W = self.add_weight(
            name="W",
            shape=(
                self.num_capsule,
                self.input_num_capsule,
                self.dim_capsule,
                self.input_dim_capsule,
            ),
            initializer=self.kernel_initializer,
        )

    def predictions(self, inputs: Any) -> Any:
        """`u_hat[b, j, i, :] = W[j, i] @ u[b, i]`: `[batch, 1152, 8]` -> `[batch, 10, 1152, 16]`."""
        return ops.einsum("jiod,bid->bjio", self.W, inputs)

    def call(self, inputs: Any) -> Any:
        inputs_hat = self.predictions(inputs)
        # Routing logits b: [batch, num_capsule, input_num_capsule], zeros carrying the batch size.
        logits = ops.zeros_like(inputs_hat[..., 0])
        for iteration in range(self.routings):
            coupling = ops.softmax(logits, axis=1)
            outputs = squash(ops.einsum("bji,bjio->bjo", coupling, inputs_hat))
            if iteration < self.routings - 1:
                logits = logits + ops.einsum("bjo,bjio->bji", outputs, inputs_hat)
        return outputs

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return (input_shape[0], self.num_capsule, self.dim_capsule)

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "num_capsule": self.num_capsule,
            "dim_capsule": self.dim_capsule,
            "routings": self.routings,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
        }


def PrimaryCap(  # noqa: N802 - the original's public name
    inputs: Any,
    dim_capsule: int,
    n_channels: int,
    kernel_size: int | tuple,
    strides: int | tuple,
    padding: str = "valid",
) -> Any:
    """Primary capsules: a Conv2D whose channels are grouped into vectors, then squashed.

    Args:
        inputs: 4D tensor `[batch, rows, cols, channels]`, e.g. `[batch, 20, 20, 256]`.
        dim_capsule: length of each primary capsule (8).
        n_channels: number of capsule types (32).
        kernel_size, strides, padding: of the Conv2D (9, 2, "valid").

    Returns:
        `[batch, rows' * cols' * n_channels, dim_capsule]`, e.g. `[batch, 1152, 8]`, from the layers
        `primarycap_conv2d`, `primarycap_reshape` and `primarycap_squash`.
    """
    output = keras.layers.Conv2D(
        filters=dim_capsule * n_channels,
        kernel_size=kernel_size,
        strides=strides,
        padding=padding,
        name="primarycap_conv2d",
    )(inputs)
    outputs = keras.layers.Reshape(target_shape=(-1, dim_capsule), name="primarycap_reshape")(output)
    return Squash(name="primarycap_squash")(outputs)
