"""Capsule layers for Keras 3: `squash`, `Length`, `Mask`, `CapsuleLayer`, `PrimaryCap`.

Sabour, Frosst & Hinton, "Dynamic Routing Between Capsules", NIPS 2017.
Every layer is written with `keras.ops`, so it runs on any Keras backend, and is registered as
serializable: a `.keras` file that uses them loads with `safe_mode=True` after `import capsulelayers`.
`Conv2D` is `keras.layers.Conv2D` with the same weights and files, whose convolution runs as one matrix
product over the image patches (im2col) with its own gradient: faster on TensorFlow CPUs.

Usage::

    import keras
    from capsnet.layers import CapsuleLayer, Length, Mask, PrimaryCap

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

from capsnet.im2col import im2col_conv2d, im2col_is_default

PACKAGE = "capsnet"

# Keras' own epsilon (1e-7), as in the original squash.
SQUASH_EPSILON = 1e-7

# Added under the square root of a capsule length so that its gradient is finite at an all-zero
# vector. It must stay far below the squared norm of a freshly initialised digit capsule (about
# (6e-8)^2 = 3.6e-15): the original's later 1e-7 turns every length into sqrt(1e-7) = 3.2e-4, the
# gradient into ~1e-12, and the model never leaves chance. 1e-21 is representable in
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
    return _squash_scale(ops.sum(ops.square(vectors), axis=axis, keepdims=True)) * vectors


def _squash_scale(squared: Any, root: Any = None) -> Any:
    """`f(n2) = n2 / ((1 + n2) sqrt(n2 + SQUASH_EPSILON))`, squash's factor for a squared length
    `n2` (`root`: that square root, when the caller has it)."""
    root = ops.sqrt(squared + SQUASH_EPSILON) if root is None else root
    return squared / (1 + squared) / root


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
            mask = _first_longest(safe_norm(capsules, axis=-1))
        mask = ops.cast(mask, capsules.dtype)
        masked = capsules * ops.expand_dims(mask, -1)
        return ops.reshape(masked, (-1, capsules.shape[1] * capsules.shape[2]))

    def compute_output_shape(self, input_shape: Any) -> tuple:
        capsules_shape = input_shape[0] if isinstance(input_shape, list) else input_shape
        return (capsules_shape[0], capsules_shape[1] * capsules_shape[2])


def _first_longest(lengths: Any) -> Any:
    """One-hot of the first longest capsule, `[batch, n_class] -> [batch, n_class]`: `argmax`'s choice.

    Made of max, equal and min rather than `ops.argmax`, whose TensorFlow version adds a sign-bit guard
    (`Bitcast`, `BitwiseAnd`) that ONNX and LiteRT cannot run: exported models would not load there.
    """
    n_class = lengths.shape[1]
    positions = ops.arange(n_class, dtype="int32")[None, :]  # [1, n_class]
    longest = ops.equal(lengths, ops.max(lengths, axis=1, keepdims=True))
    first = ops.min(ops.where(longest, positions, n_class), axis=1, keepdims=True)  # [batch, 1]
    return ops.equal(positions, first)


def squash_gradient(vectors: Any, upstream: Any) -> Any:
    """The gradient of `sum(squash(vectors) * upstream)` with respect to `vectors` (last axis).

    With `n2 = |s|^2` and `squash(s) = f(n2) s`, `f = n2 / ((1 + n2) sqrt(n2 + eps))`:
    `ds = f dv + 2 f'(n2) (s . dv) s`, `f' = 1 / ((1 + n2)^2 sqrt(n2 + eps)) - f / (2 (n2 + eps))`.
    """
    squared = ops.sum(ops.square(vectors), axis=-1, keepdims=True)
    root = ops.sqrt(squared + SQUASH_EPSILON)
    scale = _squash_scale(squared, root)
    slope = 1 / (ops.square(1 + squared) * root) - scale / (2 * (squared + SQUASH_EPSILON))
    return scale * upstream + 2 * slope * ops.sum(vectors * upstream, axis=-1, keepdims=True) * vectors


def dynamic_routing(inputs_hat: Any, routings: int) -> Any:
    """Routing by agreement (the paper's Procedure 1) with a hand-written gradient.

    `b = 0`; `routings` times: `c = softmax(b)` over the output capsules `j`, `v_j = squash(sum_i
    c_ij u_hat_j|i)`, and except after the last, `b_ij += u_hat_j|i . v_j`. Gradients flow through
    every iteration, as in the original.

    Why by hand: every use of `u_hat` (`[batch, 10, 1152, 16]`, 74 MB at batch 100 in float32) is a
    batched matrix-vector product, and automatic differentiation gives each of the `2 * routings - 1`
    uses its own outer product of `u_hat`'s size plus a sum of them all, where the gradient of `u_hat`
    is one batched product `[1152, k] @ [k, 16]` of the stacked factors (`k = 2 * routings - 1`).
    The stacked product does the work of the `2 * routings - 1` outer products in one pass over
    `u_hat` (bench/RESULTS.md has the measured difference); the tests check it against finite
    differences of the NumPy equations, on TensorFlow and JAX.

    Args:
        inputs_hat: the prediction vectors `[batch, num_capsule, input_num_capsule, dim_capsule]`,
            e.g. `[batch, 10, 1152, 16]`.
        routings: iterations, at least 1.

    Returns:
        `[batch, num_capsule, dim_capsule]`, e.g. `[batch, 10, 16]`.

    Raises:
        ValueError: `routings` is below 1.
    """
    if int(routings) < 1:
        raise ValueError(f"dynamic_routing: routings must be >= 1, got {routings}.")

    @ops.custom_gradient
    def route(inputs_hat: Any) -> tuple[Any, Any]:
        logits = ops.zeros_like(inputs_hat[..., 0])  # [batch, 10, 1152], carrying the batch size
        coupling, sums, outputs = [], [], []
        for iteration in range(routings):
            # softmax of the first (zero) logits: 1 / num_capsule everywhere
            coupling.append(ops.softmax(logits, axis=1) if iteration else
                            logits + 1 / inputs_hat.shape[1])
            sums.append(ops.einsum("bji,bjio->bjo", coupling[-1], inputs_hat))
            outputs.append(squash(sums[-1]))
            if iteration < routings - 1:
                logits = logits + ops.einsum("bjio,bjo->bji", inputs_hat, outputs[-1])

        def grad(*args: Any, upstream: Any = None) -> Any:
            outputs_grad = args[0] if upstream is None else upstream
            logits_grad = None  # of the logits after this iteration's update
            factors, vectors = [], []  # inputs_hat's gradient: sum_k factors[k] (x) vectors[k]
            for iteration in reversed(range(routings)):
                if logits_grad is not None:
                    outputs_grad = ops.einsum("bji,bjio->bjo", logits_grad, inputs_hat)
                    factors.append(logits_grad)
                    vectors.append(outputs[iteration])
                sums_grad = squash_gradient(sums[iteration], outputs_grad)
                factors.append(coupling[iteration])
                vectors.append(sums_grad)
                if iteration > 0:  # the first logits are constant zeros: no gradient needed
                    c = coupling[iteration]
                    coupling_grad = ops.einsum("bjio,bjo->bji", inputs_hat, sums_grad)
                    softmax_grad = c * (coupling_grad - ops.sum(c * coupling_grad, axis=1, keepdims=True))
                    logits_grad = softmax_grad if logits_grad is None else logits_grad + softmax_grad
            # Stacked as [batch, 10, k, 1152]: contiguous copies, where a last axis of k would be a
            # strided scatter; the batched product reads it transposed.
            return ops.einsum("bjki,bjko->bjio", ops.stack(factors, axis=2), ops.stack(vectors, axis=2))

        return outputs[-1], grad

    return route(inputs_hat)


@keras.saving.register_keras_serializable(package=PACKAGE)
class CapsuleLayer(keras.layers.Layer):
    """Fully connected capsule layer with routing-by-agreement (the paper's Procedure 1).

    The prediction vectors `u_hat[j|i] = W_ij u_i` are computed for the whole batch in one batched
    matrix product (no per-sample loop), and the routing (`dynamic_routing`, with its own gradient)
    starts from logits of zeros shaped from the input, so the batch size stays dynamic. There is no
    bias, the coupling coefficients are a softmax over the output capsules, and gradients flow through
    every routing iteration, as in the original.

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
        """`u_hat[b, j, i, :] = W[j, i] @ u[b, i]`: `[batch, 1152, 8]` -> `[batch, 10, 1152, 16]`.

        One batched matrix product over the input capsules (`[batch, 8] @ [8, 10 * 16]` for each of
        the 1152), then one transpose into the routing's layout, where the same `einsum` runs on
        TensorFlow's CPU kernel as several transposes of the 74 MB result (bench/RESULTS.md).
        """
        weights = ops.transpose(self.W, (1, 3, 0, 2))  # [1152, 8, 10, 16]
        weights = ops.reshape(weights, (self.input_num_capsule, self.input_dim_capsule, -1))
        u_hat = ops.matmul(ops.transpose(inputs, (1, 0, 2)), weights)  # [1152, batch, 160]
        u_hat = ops.reshape(u_hat, (self.input_num_capsule, -1, self.num_capsule, self.dim_capsule))
        return ops.transpose(u_hat, (1, 2, 0, 3))

    def call(self, inputs: Any) -> Any:
        return dynamic_routing(self.predictions(inputs), self.routings)

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


# ---------------------------------------------------------------------------------------------
# The convolution layer (`im2col_conv2d` or the library's)
# ---------------------------------------------------------------------------------------------

CONV_IMPLEMENTATIONS = ("auto", "im2col", "conv")


@keras.saving.register_keras_serializable(package=PACKAGE)
class Conv2D(keras.layers.Conv2D):
    """`keras.layers.Conv2D` that can run as `im2col_conv2d`: same arguments, weights and results.

    The weights are the parent's (`kernel` `[kernel_rows, kernel_cols, channels, filters]`, `bias`
    `[filters]`), so legacy Keras-2 `.h5`, `.weights.h5` and `.keras` files of models built with
    `keras.layers.Conv2D` load into models built with this layer and the other way round. The class is
    *named* `Conv2D` on purpose: Keras 3 files address a layer's weights by its class name
    (`layers/conv2d_1/vars/0`), so another name would leave them unmatched.

    Args:
        implementation: `"im2col"` (`im2col_conv2d`: valid padding, no dilation, one group,
            channels last; inputs of unknown rows or columns fall back to the parent's), `"conv"` (the
            parent's `ops.conv`) or `"auto"`: what `autotune.tune_model` measured faster on this
            machine (`tuned_implementation`, set before the layer is traced; the command line does
            it), else im2col where it applies and the backend computes on the CPU
            (`im2col_is_default`), else the parent's. The layer itself never times anything.
        **kwargs: those of `keras.layers.Conv2D`.

    Attributes:
        tuned_implementation: None, or `"im2col"`/`"conv"` chosen for `"auto"` by a measurement. Not
            part of `get_config`: files say `"auto"` whichever implementation ran.
    """

    def __init__(self, *args: Any, implementation: str = "auto", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if implementation not in CONV_IMPLEMENTATIONS:
            raise ValueError(f"Conv2D: implementation must be one of {CONV_IMPLEMENTATIONS}, "
                             f"got {implementation!r}.")
        if implementation == "im2col" and not self._im2col_applies():
            raise ValueError("Conv2D: implementation='im2col' needs padding='valid', dilation_rate=1, "
                             "groups=1 and data_format='channels_last'.")
        self.implementation = implementation
        self.tuned_implementation: str | None = None

    def _im2col_applies(self, inputs: Any = None) -> bool:
        static = inputs is None or all(d is not None for d in inputs.shape[1:])
        return (static and self.padding == "valid" and self.dilation_rate == (1, 1)
                and self.groups == 1 and self.data_format == "channels_last")

    def _uses_im2col(self, inputs: Any) -> bool:
        implementation = self.implementation
        if implementation == "auto":
            implementation = self.tuned_implementation or ("im2col" if im2col_is_default() else "conv")
        im2col = implementation == "im2col"
        return im2col and self._im2col_applies(inputs)

    def convolution_op(self, inputs: Any, kernel: Any) -> Any:
        if self._uses_im2col(inputs):
            return im2col_conv2d(inputs, kernel, self.strides)
        return super().convolution_op(inputs, kernel)

    def call(self, inputs: Any) -> Any:
        if not self._uses_im2col(inputs):
            return super().call(inputs)
        # The bias inside the op, whose gradient sums in float32 under mixed precision.
        outputs = im2col_conv2d(inputs, self.kernel, self.strides, self.bias if self.use_bias else None)
        return outputs if self.activation is None else self.activation(outputs)

    def get_config(self) -> dict:
        return {**super().get_config(), "implementation": self.implementation}


def PrimaryCap(  # noqa: N802 - the original's public name
    inputs: Any,
    dim_capsule: int,
    n_channels: int,
    kernel_size: int | tuple,
    strides: int | tuple,
    padding: str = "valid",
    implementation: str = "auto",
) -> Any:
    """Primary capsules: a Conv2D whose channels are grouped into vectors, then squashed.

    Args:
        inputs: 4D tensor `[batch, rows, cols, channels]`, e.g. `[batch, 20, 20, 256]`.
        dim_capsule: length of each primary capsule (8).
        n_channels: number of capsule types (32).
        kernel_size, strides, padding: of the Conv2D (9, 2, "valid").
        implementation: of the Conv2D (`Conv2D`): "auto" (im2col on CPUs), "im2col" or "conv".

    Returns:
        `[batch, rows' * cols' * n_channels, dim_capsule]`, e.g. `[batch, 1152, 8]`, from the layers
        `primarycap_conv2d`, `primarycap_reshape` and `primarycap_squash`.
    """
    output = Conv2D(
        filters=dim_capsule * n_channels,
        kernel_size=kernel_size,
        strides=strides,
        padding=padding,
        implementation=implementation,
        name="primarycap_conv2d",
    )(inputs)
    outputs = keras.layers.Reshape(target_shape=(-1, dim_capsule), name="primarycap_reshape")(output)
    return Squash(name="primarycap_squash")(outputs)
