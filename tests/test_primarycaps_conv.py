"""`capsulelayers.Conv2D` and `im2col_conv2d`, the PrimaryCaps convolution as matrix products: the same
outputs and gradients as `keras.layers.Conv2D` (float32 and bfloat16, several batch sizes and input
sizes, `tf.function`, `tf.distribute` replicas, the JAX backend), the same weight layout, and weight
files that move both ways between models built with either layer. Behaviour only, no timing.

Run as a script (`python tests/test_primarycaps_conv.py --jax` or `--two_replicas`), this file prints
one JSON line of relative errors: the tests start it in a child process because Keras' backend, and
TensorFlow's logical devices, are fixed when they are first initialised.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from capsnet import im2col  # noqa: E402 - after the repository is on the path, when run as a script
from capsnet.im2col import im2col_conv2d, im2col_indices  # noqa: E402
from capsnet.layers import Conv2D, PrimaryCap  # noqa: E402

# float32: both sides round differently (81 x 256 products per output); relative to the largest value.
RTOL = 2e-5
# bfloat16 keeps 8 significant bits: its unit roundoff (the largest relative error of one rounding to
# nearest) is u = 2^-8. See `bf16_bounds` for how the tolerances of a bfloat16 sum follow from it.
BF16_U = 2.0**-8
# How many times u * sqrt(n) * sqrt(sum of squared terms) a bfloat16 sum of n terms may be off (see
# `bf16_bounds`): twice the worst seen when every addition rounds to bfloat16 (3.8, in NumPy).
BF16_LAMBDA = 8.0

PRIMARYCAPS = {"filters": 256, "kernel_size": 9, "strides": 2}


def assert_close(got: Any, want: Any, rtol: float = RTOL, name: str = "") -> None:
    """Equal within `rtol` of the largest magnitude of `want` (elementwise relative error is
    meaningless for the values that cancel to about zero)."""
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, name
    scale = np.max(np.abs(want))
    assert scale > 0, name
    np.testing.assert_allclose(got, want, rtol=0, atol=rtol * scale, err_msg=name)


def relative_error(got: Any, want: Any) -> float:
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def twin_layers(input_shape: tuple[int, ...], seed: int, dtype: str | None = None, **conv: Any
                ) -> tuple[keras.layers.Conv2D, Conv2D]:
    """A `keras.layers.Conv2D` and an im2col `Conv2D` with the same random kernel and bias (the bias
    non-zero, so that its loading and gradient are checked too)."""
    plain = keras.layers.Conv2D(**conv, dtype=dtype)
    im2col = Conv2D(**conv, implementation="im2col", dtype=dtype)
    rng = np.random.default_rng(seed)
    for layer in (plain, im2col):
        layer.build((None, *input_shape))
    fan_in = np.prod(plain.kernel.shape[:-1])
    weights = [(rng.standard_normal(plain.kernel.shape) / np.sqrt(fan_in)).astype("float32"),
               rng.standard_normal(plain.bias.shape).astype("float32") * 0.1]
    plain.set_weights(weights)
    im2col.set_weights(weights)
    return plain, im2col


def tf_forward_backward(layer: keras.layers.Layer, x: np.ndarray, upstream: np.ndarray,
                        compile_: bool = True, jit_compile: bool = False) -> list[np.ndarray]:
    """`[outputs, d/dx, d/dkernel, d/dbias]` of `sum(layer(x) * upstream)`, in a `tf.function`
    (through XLA with `jit_compile`)."""
    import tensorflow as tf

    def run(x: Any) -> list[Any]:
        with tf.GradientTape() as tape:
            tape.watch(x)
            outputs = layer(x)
            loss = tf.reduce_sum(tf.cast(outputs, "float32") * upstream)
        return [outputs, *tape.gradient(loss, [x, layer.kernel, layer.bias])]

    run = tf.function(run, jit_compile=jit_compile) if compile_ else run
    return [np.asarray(tf.cast(t, "float32")) for t in run(tf.constant(x))]


def to_bfloat16(a: Any) -> np.ndarray:
    """`a` rounded to the nearest bfloat16 (as the layers' casts do), returned in float64."""
    import ml_dtypes

    return np.asarray(a, np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)


def conv_sums(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray, upstream: np.ndarray,
              strides: tuple[int, int]) -> dict[str, np.ndarray]:
    """A "valid" convolution plus bias and its gradients for `upstream`, in float64 by im2col and
    `np.add.at`: `{"outputs", "input grad", "kernel grad", "bias grad"}` in the layer's shapes.

    Each is a sum of products of one operand from each side, so given |operands| it gives the sums of
    |terms|, given squares the sums of squared terms, given ones the number of terms."""
    batch, rows, cols, channels = x.shape
    kernel_rows, kernel_cols, _, filters = kernel.shape
    index = im2col_indices((rows, cols), (kernel_rows, kernel_cols), strides)
    patches = x.reshape(batch, rows * cols, channels)[:, index].reshape(-1, kernel.size // filters)
    weights = kernel.reshape(-1, filters)
    grad = upstream.reshape(-1, filters)
    input_grad = np.zeros((batch, rows * cols, channels))
    np.add.at(input_grad, (slice(None), index), (grad @ weights.T).reshape(batch, len(index), channels))
    return {"outputs": (patches @ weights + bias).reshape(upstream.shape),
            "input grad": input_grad.reshape(x.shape),
            "kernel grad": (patches.T @ grad).reshape(kernel.shape),
            "bias grad": grad.sum(0)}


def bf16_bounds(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray, upstream: np.ndarray,
                strides: tuple[int, int]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The exact results of a bfloat16 convolution and its gradients, and how far a correct one may be
    off, element by element, computed in float64 from the operands as the layer sees them (rounded to
    bfloat16 first, as `mixed_bfloat16` casts them).

    Each result element is a sum of n exact products t_k (a product of two bfloat16 numbers is exact
    in float32). Where the library accumulates in float32 (oneDNN, AMX, XLA) the error is about u
    times the result; where it accumulates in bfloat16 (TensorFlow's Eigen kernels: the backward
    convolutions with oneDNN off, or on CPUs without bfloat16 instructions) every addition
    s_k = s_{k-1} + t_k rounds, off by at most u |s_k|. The worst case, gamma_n * sum |t_k| with
    gamma_n = n u / (1 - n u), says nothing once n u >= 1 (n is 288 to 20,737 here). Rounding errors
    of random operands are independent and of either sign (Higham & Mary, SIAM J. Sci. Comput. 41,
    2019), and the partial sums of random-signed terms grow like sqrt(k) * rms(t), so the error is
    about u * sqrt(sum_k s_k^2) ~ u * sqrt(n) * sqrt(sum_k t_k^2): the bound here is
    `u * (2 |result| + BF16_LAMBDA * sqrt(n) * sqrt(sum_k t_k^2))` (2 |result|: the output rounded to
    bfloat16, and the inputs' rounding where a path rounds an intermediate). Measured for the
    operands of `test_mixed_bfloat16_computes_in_bfloat16_with_float32_weights`, the largest error as a
    fraction of this bound: 0.03 on this Xeon (oneDNN, AMX); 0.48 with `TF_ENABLE_ONEDNN_OPTS=0`,
    whose Eigen kernels accumulate the backward convolutions in bfloat16 (and fail the former 3%-of-
    the-largest tolerance on exactly the 28 of 819,200 input-gradient elements that the AVX2 EPYC of
    issue 19 did); 0.44 in NumPy with every addition rounded to bfloat16, in order. The last is a test
    (`test_bf16_bound_holds_when_every_addition_rounds_to_bfloat16`, on a smaller convolution).

    Such a bound is loose for long sums (the outputs' 20,737 terms: about 6x the values themselves),
    so `test_mixed_bfloat16_is_exact_where_every_partial_sum_is` checks every element exactly.

    Returns:
        `{name: (exact, bound)}` for "outputs", "input grad", "kernel grad" and "bias grad".
    """
    operands = [to_bfloat16(a) for a in (x, kernel, bias, upstream)]
    exact = conv_sums(*operands, strides)
    squares = conv_sums(*(a**2 for a in operands), strides)
    counts = conv_sums(*(np.ones_like(a) for a in operands), strides)
    return {name: (exact[name], BF16_U * (2 * np.abs(exact[name])
                                          + BF16_LAMBDA * np.sqrt(counts[name] * squares[name])))
            for name in exact}


def random_io(rng: np.random.Generator, batch: int, input_shape: tuple[int, ...],
              layer: keras.layers.Layer) -> tuple[np.ndarray, np.ndarray]:
    x = rng.standard_normal((batch, *input_shape)).astype("float32")
    out_shape = layer.compute_output_shape((batch, *input_shape))
    return x, rng.standard_normal(out_shape).astype("float32")


# ---------------------------------------------------------------------------------------------
# The op
# ---------------------------------------------------------------------------------------------


def test_im2col_indices_hand_computed() -> None:
    # 4x5 image (flat position r * 5 + c), 2x2 kernel, stride 2 -> 2x2 outputs; taps in row order.
    np.testing.assert_array_equal(
        im2col_indices((4, 5), (2, 2), (2, 2)).reshape(4, 4),
        [[0, 1, 5, 6], [2, 3, 7, 8], [10, 11, 15, 16], [12, 13, 17, 18]])
    # PrimaryCaps: 6x6 outputs x 9x9 taps; output (5, 5)'s last tap reads pixel (18, 18).
    index = im2col_indices((20, 20), (9, 9), (2, 2))
    assert index.shape == (6 * 6 * 81,) and index.dtype == np.int32
    assert index[-1] == 18 * 20 + 18 and index.max() == 18 * 20 + 18


def test_im2col_matches_numpy_float64() -> None:
    """The op itself against a direct float64 sum, on a small odd geometry (3x4 kernel, strides 2, 3)."""
    import tensorflow as tf

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 9, 11, 3))
    kernel = rng.standard_normal((3, 4, 3, 5))
    want = np.zeros((2, 4, 3, 5))
    for i in range(4):
        for j in range(3):
            window = x[:, 2 * i: 2 * i + 3, 3 * j: 3 * j + 4, :]
            want[:, i, j] = np.einsum("buvc,uvcf->bf", window, kernel)
    got = im2col_conv2d(tf.constant(x, "float32"), tf.constant(kernel, "float32"), (2, 3))
    assert_close(got, want, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Against keras.layers.Conv2D
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("batch", "input_shape", "conv"), [
    (1, (20, 20, 256), PRIMARYCAPS),
    (7, (20, 20, 256), PRIMARYCAPS),
    (100, (20, 20, 256), PRIMARYCAPS),
    (3, (24, 24, 256), PRIMARYCAPS),  # conv1's output on 32x32x3 images (CIFAR-10)
    (4, (28, 28, 1), {"filters": 256, "kernel_size": 9, "strides": 1, "activation": "relu"}),  # conv1
], ids=["primarycaps-1", "primarycaps-7", "primarycaps-100", "primarycaps-24x24", "conv1"])
def test_same_outputs_and_gradients_as_keras_conv2d(batch: int, input_shape: tuple[int, ...],
                                                    conv: dict[str, Any]) -> None:
    plain, im2col = twin_layers(input_shape, seed=batch, **conv)
    x, upstream = random_io(np.random.default_rng(batch), batch, input_shape, plain)
    want = tf_forward_backward(plain, x, upstream)
    got = tf_forward_backward(im2col, x, upstream)
    for name, g, w in zip(("outputs", "input grad", "kernel grad", "bias grad"), got, want,
                          strict=True):
        assert_close(g, w, name=name)


def test_tensorflow_xla_compiles_it_with_the_same_results() -> None:
    """Under `jit_compile=True` (XLA has no sorted `SegmentSum`) the input gradient takes the unsorted
    sum: the same numbers as Keras' convolution."""
    plain, im2col = twin_layers((20, 20, 16), seed=7, filters=8, kernel_size=9, strides=2)
    x, upstream = random_io(np.random.default_rng(7), 3, (20, 20, 16), plain)
    want = tf_forward_backward(plain, x, upstream)
    got = tf_forward_backward(im2col, x, upstream, jit_compile=True)
    for name, g, w in zip(("outputs", "input grad", "kernel grad", "bias grad"), got, want,
                          strict=True):
        assert_close(g, w, name=name)


def test_eager_and_any_batch_in_one_trace() -> None:
    """Eagerly, and in one `tf.function` traced for an unknown batch size, for batches 1, 5 and 2."""
    import tensorflow as tf

    plain, im2col = twin_layers((20, 20, 256), seed=3, **PRIMARYCAPS)
    rng = np.random.default_rng(3)
    x, upstream = random_io(rng, 2, (20, 20, 256), plain)
    for got, want in zip(tf_forward_backward(im2col, x, upstream, compile_=False),
                         tf_forward_backward(plain, x, upstream, compile_=False), strict=True):
        assert_close(got, want)
    forward = tf.function(im2col, input_signature=[tf.TensorSpec((None, 20, 20, 256), "float32")])
    for batch in (1, 5, 2):
        x = rng.standard_normal((batch, 20, 20, 256)).astype("float32")
        assert_close(forward(x), plain(x))
    assert forward.experimental_get_tracing_count() == 1


def test_mixed_bfloat16_computes_in_bfloat16_with_float32_weights() -> None:
    plain, im2col = twin_layers((20, 20, 256), seed=5, dtype="mixed_bfloat16", **PRIMARYCAPS)
    x, upstream = random_io(np.random.default_rng(5), 8, (20, 20, 256), plain)
    import tensorflow as tf

    assert im2col(tf.constant(x)).dtype == "bfloat16"
    assert im2col.kernel.dtype == im2col.bias.dtype == "float32"
    want = tf_forward_backward(plain, x, upstream)
    got = tf_forward_backward(im2col, x, upstream)
    bounds = bf16_bounds(x, *plain.get_weights(), upstream, strides=(2, 2))
    for i, (name, (exact, bound)) in enumerate(bounds.items()):
        for layer, result in (("im2col", got[i]), ("keras.layers.Conv2D", want[i])):
            assert np.isfinite(result).all(), name
            off = np.abs(result - exact) > bound
            assert not off.any(), (f"{layer} {name}: {off.sum()} of {off.size} beyond the bfloat16 bound, "
                                   f"e.g. {result[off][0]} for {exact[off][0]} +- {bound[off][0]}")


def bf16_sequential_sum(terms: np.ndarray) -> np.ndarray:
    """The sum over the last axis, in order, every partial sum rounded to bfloat16 (the worst way a
    library can accumulate), in float64."""
    import ml_dtypes

    total = np.zeros(terms.shape[:-1], np.float32)
    for k in range(terms.shape[-1]):
        total = (total + terms[..., k].astype(np.float32)).astype(ml_dtypes.bfloat16).astype(np.float32)
    return total.astype(np.float64)


def test_bf16_bound_holds_when_every_addition_rounds_to_bfloat16() -> None:
    """`bf16_bounds` against NumPy sums that round to bfloat16 after every addition, the terms taken in
    their natural order and in a random one: a machine that accumulates so stays within the bound.
    A convolution small enough to list every term (3x20x20x16 -> 8 filters, 9x9, stride 2)."""
    rng = np.random.default_rng(21)
    x = rng.standard_normal((3, 20, 20, 16)).astype("float32")
    kernel = (rng.standard_normal((9, 9, 16, 8)) / np.sqrt(9 * 9 * 16)).astype("float32")
    bias = (rng.standard_normal(8) * 0.1).astype("float32")
    upstream = rng.standard_normal((3, 6, 6, 8)).astype("float32")
    bounds = bf16_bounds(x, kernel, bias, upstream, strides=(2, 2))
    xb, kb, bb, gb = (to_bfloat16(a) for a in (x, kernel, bias, upstream))
    index = im2col_indices((20, 20), (9, 9), (2, 2))
    patches = xb.reshape(3, 400, 16)[:, index].reshape(108, 9 * 9 * 16)  # [output pixels, taps]
    weights, grad = kb.reshape(-1, 8), gb.reshape(108, 8)
    # The input gradient's terms: pixel q of image b, channel c gets grad[b, p, f] * kernel[t, c, f]
    # for every (output position p, tap t) that reads q and every filter f (at most 25 x 8 terms;
    # the rest padded with zeros, which add exactly).
    products = gb.reshape(3, 36, 1, 1, 8) * kb.reshape(1, 1, 81, 16, 8)  # [b, p, t, c, f]
    readers: dict[int, list[tuple[int, int]]] = {}
    for p, row in enumerate(index.reshape(36, 81)):
        for t, pixel in enumerate(row):
            readers.setdefault(int(pixel), []).append((p, t))
    input_terms = np.zeros((3, 400, 16, 25 * 8))
    for pixel, pairs in readers.items():
        p, t = np.array(pairs).T
        input_terms[:, pixel, :, :len(pairs) * 8] = (
            products[:, p, t].transpose(0, 2, 1, 3).reshape(3, 16, len(pairs) * 8))
    terms = {
        "outputs": np.concatenate([patches[:, None, :] * weights.T[None], np.broadcast_to(
            bb[None, :, None], (108, 8, 1))], axis=-1).reshape(3, 6, 6, 8, -1),
        "kernel grad": (patches.T[:, None, :] * grad.T[None]).reshape(9, 9, 16, 8, 108),
        "bias grad": grad.T,
        "input grad": input_terms.reshape(3, 20, 20, 16, -1),
    }
    for order in ("natural", "shuffled"):
        for name, t in terms.items():
            if order == "shuffled":
                t = t[..., rng.permutation(t.shape[-1])]
            exact, bound = bounds[name]
            np.testing.assert_allclose(t.sum(-1), exact, rtol=1e-9, atol=1e-9)  # the terms are right
            error = np.abs(bf16_sequential_sum(t) - exact)
            assert (error <= bound).all(), (order, name, float(np.max(error / bound)))


def test_mixed_bfloat16_is_exact_where_every_partial_sum_is_representable() -> None:
    """Operands whose products are multiples of 1/8 and whose sums of |products| stay below 32 (or
    integers below 256): every partial sum, in any order, has at most 8 significant bits, so bfloat16
    holds it exactly and any correct implementation, accumulating in bfloat16 or float32, in any order
    or blocking, gives the float64 result exactly. Each element is checked exactly, on every CPU."""
    plain, im2col = twin_layers((20, 20, 256), seed=8, dtype="mixed_bfloat16", **PRIMARYCAPS)
    rng = np.random.default_rng(8)

    def sparse_signs(shape: tuple[int, ...], density: float) -> np.ndarray:
        return (rng.choice([-1, 1], shape) * (rng.random(shape) < density)).astype("float32")

    x = sparse_signs((8, 20, 20, 256), 0.1)
    kernel = sparse_signs(plain.kernel.shape, 0.04) / 8
    bias = rng.integers(-8, 9, plain.bias.shape).astype("float32") / 8
    upstream = sparse_signs((8, 6, 6, 256), 0.3)
    for layer in (plain, im2col):
        layer.set_weights([kernel, bias])
    exact = conv_sums(*(a.astype(np.float64) for a in (x, kernel, bias, upstream)), strides=(2, 2))
    magnitudes = conv_sums(*(np.abs(a).astype(np.float64) for a in (x, kernel, bias, upstream)), (2, 2))
    # The premise: no partial sum can need more than 8 significant bits.
    assert max(magnitudes[n].max() for n in ("outputs", "input grad")) * 8 < 256
    assert max(magnitudes[n].max() for n in ("kernel grad", "bias grad")) < 256
    assert all((exact[n] != 0).mean() > 0.3 for n in exact)  # mostly non-zero: every check counts
    for layer in (im2col, plain):
        for name, result in zip(exact, tf_forward_backward(layer, x, upstream), strict=True):
            np.testing.assert_array_equal(result, exact[name], err_msg=f"{type(layer)} {name}")


def test_auto_uses_im2col_on_this_cpu_and_the_parent_where_it_does_not_apply() -> None:
    import tensorflow as tf

    if tf.config.list_logical_devices("GPU"):
        pytest.skip("a GPU is visible: auto keeps the library convolution")
    assert im2col.im2col_is_default()
    layer = Conv2D(4, 3, strides=2)
    assert layer.implementation == "auto"
    graph = tf.function(layer).get_concrete_function(tf.TensorSpec((None, 9, 9, 2))).graph
    ops_used = {op.type for op in graph.get_operations()}
    assert "GatherV2" in ops_used and "Conv2D" not in ops_used
    # "same" padding: the parent's convolution, the same results as keras.layers.Conv2D.
    plain, same = keras.layers.Conv2D(4, 3, padding="same"), Conv2D(4, 3, padding="same")
    plain.build((None, 9, 9, 2))
    same.build((None, 9, 9, 2))
    same.set_weights(plain.get_weights())
    x = np.random.default_rng(6).standard_normal((2, 9, 9, 2)).astype("float32")
    np.testing.assert_array_equal(same(x), plain(x))
    with pytest.raises(ValueError, match="padding='valid'"):
        Conv2D(4, 3, padding="same", implementation="im2col")
    with pytest.raises(ValueError, match="implementation"):
        Conv2D(4, 3, implementation="fast")


# ---------------------------------------------------------------------------------------------
# Weights and files
# ---------------------------------------------------------------------------------------------


def test_primarycap_layer_name_class_and_weight_layout() -> None:
    x = keras.Input((20, 20, 256))
    model = keras.Model(x, PrimaryCap(x, dim_capsule=8, n_channels=32, kernel_size=9, strides=2))
    layer = model.get_layer("primarycap_conv2d")
    assert isinstance(layer, keras.layers.Conv2D) and type(layer).__name__ == "Conv2D"
    assert [(v.name, tuple(v.shape)) for v in layer.weights] == [("kernel", (9, 9, 256, 256)),
                                                                 ("bias", (256,))]
    assert [v.path for v in layer.weights] == ["primarycap_conv2d/kernel", "primarycap_conv2d/bias"]
    assert model.output_shape == (None, 1152, 8)
    config = layer.get_config()
    assert config["implementation"] == "auto"
    assert Conv2D.from_config(config).get_config() == config
    assert keras.saving.get_registered_name(Conv2D) == "capsnet>Conv2D"


@pytest.fixture(scope="module")
def old_and_new() -> tuple[keras.Model, keras.Model]:
    """The product's eval model (`capsulenet.CapsNet`) and the same model as it was built before this
    layer existed, with `keras.layers.Conv2D` for `primarycap_conv2d` (its config rewritten)."""
    import capsulenet

    keras.utils.set_random_seed(7)
    _, new, _ = capsulenet.CapsNet((28, 28, 1), 10, routings=3)
    config = new.get_config()
    for layer in config["layers"]:
        if layer["name"] == "primarycap_conv2d":
            assert layer["registered_name"] == "capsnet>Conv2D"
            layer.update(module="keras.layers", class_name="Conv2D", registered_name=None)
            del layer["config"]["implementation"]
    old = keras.Model.from_config(config)
    assert type(old.get_layer("primarycap_conv2d")) is keras.layers.Conv2D
    return old, new


def scramble(model: keras.Model, seed: int) -> None:
    """Random weights at a scale where the outputs are not all ~0, biases included."""
    rng = np.random.default_rng(seed)
    model.set_weights([rng.standard_normal(w.shape).astype("float32") * 0.05
                       for w in model.get_weights()])


def state(model: keras.Model, x: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The model's weights and its outputs on `x`."""
    return ([np.asarray(w) for w in model.get_weights()],
            [np.asarray(t) for t in model(x, training=False)])


def assert_same_state(got: tuple[list[np.ndarray], list[np.ndarray]],
                      want: tuple[list[np.ndarray], list[np.ndarray]]) -> None:
    """Identical weights; outputs equal within float rounding (the two convolutions round apart)."""
    for a, b in zip(got[0], want[0], strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(got[1], want[1], strict=True):
        assert_close(a, b, rtol=1e-4)


def test_weight_files_load_both_ways_between_old_and_new_models(
        old_and_new: tuple[keras.Model, keras.Model], tmp_path: Path) -> None:
    old, new = old_and_new
    x = np.random.default_rng(9).uniform(size=(4, 28, 28, 1)).astype("float32")
    want = {}
    for name, model, seed in (("old", old, 1), ("new", new, 2)):
        scramble(model, seed)
        want[name] = state(model, x)
        model.save(tmp_path / f"{name}.keras")
        model.save_weights(tmp_path / f"{name}.weights.h5")
    for source, target in (("old", new), ("new", old)):
        for suffix in (".keras", ".weights.h5"):
            scramble(target, seed=3)
            target.load_weights(tmp_path / f"{source}{suffix}")
            assert_same_state(state(target, x), want[source])

    # Whole files: an old `.keras` loads as it was, a new one with this layer (safe mode).
    loaded = keras.saving.load_model(tmp_path / "old.keras", safe_mode=True)
    assert type(loaded.get_layer("primarycap_conv2d")) is keras.layers.Conv2D
    assert_same_state(state(loaded, x), want["old"])
    loaded = keras.saving.load_model(tmp_path / "new.keras", safe_mode=True)
    assert type(loaded.get_layer("primarycap_conv2d")) is Conv2D
    assert loaded.get_layer("primarycap_conv2d").implementation == "auto"
    assert_same_state(state(loaded, x), want["new"])


def test_legacy_h5_weights_load_into_the_new_layer(old_and_new: tuple[keras.Model, keras.Model],
                                                   tmp_path: Path) -> None:
    """Keras' legacy HDF5 layout (weights by layer name, as Keras 2 wrote them) of a plain-Conv2D
    model."""
    from keras.src.legacy.saving import legacy_h5_format

    old, new = old_and_new
    x = np.random.default_rng(10).uniform(size=(2, 28, 28, 1)).astype("float32")
    scramble(old, seed=4)
    scramble(new, seed=5)
    legacy_h5_format.save_model_to_hdf5(old, tmp_path / "old.h5")
    new.load_weights(tmp_path / "old.h5")
    assert_same_state(state(new, x), state(old, x))


# ---------------------------------------------------------------------------------------------
# Training: TensorFlowSteps under a strategy, and the JAX backend
# ---------------------------------------------------------------------------------------------


def sgd_step_deltas(implementation: str, batch: tuple[np.ndarray, np.ndarray], strategy: Any
                    ) -> list[np.ndarray]:
    """The weight changes of one `TensorFlowSteps` step with SGD (the gradients times 1000, so that
    the weights' float32 rounding does not swamp them), for the product's train model with the given
    PrimaryCaps implementation, built under `strategy`."""
    import capsulenet
    from capsnet import backends

    with strategy.scope():
        keras.utils.set_random_seed(11)
        model, _, _ = capsulenet.CapsNet((28, 28, 1), 10, routings=3)
        model.get_layer("primarycap_conv2d").implementation = implementation
        rng = np.random.default_rng(11)  # weights where the gradients are not ~1e-12 (a fresh model's)
        model.set_weights([rng.standard_normal(w.shape).astype("float32") * 0.05
                           for w in model.get_weights()])
        optimizer = keras.optimizers.SGD(learning_rate=1000.0)
    steps = backends.TensorFlowSteps(model, optimizer, lam_recon=0.392, batch_size=len(batch[0]),
                                     strategy=strategy)
    steps.build_optimizer()
    before = [np.asarray(w) for w in model.get_weights()]
    steps.train(*batch)
    return [b - np.asarray(a) for a, b in zip(model.get_weights(), before, strict=True)]


def train_batch(n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(12)
    return (rng.uniform(size=(n, 28, 28, 1)).astype("float32"),
            np.eye(10, dtype="float32")[np.arange(n) % 10])


def run_child(flag: str, backend: str = "tensorflow") -> dict[str, float]:
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run([sys.executable, __file__, flag], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_two_replicas_give_the_conv2d_gradients() -> None:
    """Two logical CPUs under `MirroredStrategy`: each replica runs its half of the batch through the
    custom gradient; the all-reduced step equals the plain convolution's."""
    errors = run_child("--two_replicas")
    assert errors["replicas"] == 2
    assert max(v for k, v in errors.items() if k != "replicas") < 1e-4, errors


def test_jax_backend_gives_the_conv_gradients() -> None:
    errors = run_child("--jax", backend="jax")
    assert errors.pop("backend") == "jax" and errors.pop("default") == "im2col"
    assert max(errors.values()) < 1e-5, errors


# ---------------------------------------------------------------------------------------------
# The child processes
# ---------------------------------------------------------------------------------------------


def two_replica_errors() -> dict[str, float]:
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    strategy = tf.distribute.MirroredStrategy(["CPU:0", "CPU:1"])
    batch = train_batch(6)
    got = sgd_step_deltas("im2col", batch, strategy)
    want = sgd_step_deltas("conv", batch, strategy)
    return {"replicas": strategy.num_replicas_in_sync,
            **{f"weight{i}": relative_error(g, w) for i, (g, w) in enumerate(zip(got, want, strict=True))}}


def jax_errors() -> dict[str, Any]:
    import jax
    from keras import ops

    rng = np.random.default_rng(13)
    x = rng.standard_normal((3, 20, 20, 16)).astype("float32")
    kernel = (rng.standard_normal((9, 9, 16, 8)) / 36).astype("float32")
    upstream = rng.standard_normal((3, 6, 6, 8)).astype("float32")

    def loss(conv: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
        def value(x: Any, kernel: Any) -> Any:
            outputs = conv(x, kernel)
            return ops.sum(outputs * upstream), outputs
        return jax.jit(jax.value_and_grad(value, argnums=(0, 1), has_aux=True))

    (_, got), got_grads = loss(lambda x, k: im2col_conv2d(x, k, (2, 2)))(x, kernel)
    (_, want), want_grads = loss(lambda x, k: ops.conv(x, k, strides=2))(x, kernel)
    return {"backend": keras.backend.backend(),
            "default": "im2col" if im2col.im2col_is_default() else "conv",
            "outputs": relative_error(got, want),
            "input grad": relative_error(got_grads[0], want_grads[0]),
            "kernel grad": relative_error(got_grads[1], want_grads[1])}


if __name__ == "__main__":
    print(json.dumps({"--jax": jax_errors, "--two_replicas": two_replica_errors}[sys.argv[1]]()))
