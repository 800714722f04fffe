"""The capsule layers and the margin loss against hand-computed numbers and against the independent
NumPy reference of the paper's equations (`tests/reference.py`)."""

from __future__ import annotations

from collections.abc import Callable

import keras
import numpy as np
import pytest
import reference as ref
import tensorflow as tf

import capsulenet
from capsnet import layers as capsulelayers
from capsnet.layers import CapsuleLayer, Length, Mask, PrimaryCap, Squash, squash

# float32 layers against a float64 reference.
RTOL = 1e-4
ATOL = 1e-6


def random_capsules(rng: np.random.Generator, shape: tuple[int, ...], scale: float = 1.5
                    ) -> np.ndarray:
    """Primary-capsule-like inputs: squashed Gaussian vectors, float32."""
    return ref.squash(rng.normal(size=shape) * scale).astype("float32")


def capsule_layer_with(w: np.ndarray, routings: int) -> CapsuleLayer:
    """A built CapsuleLayer whose W is set to `w` with `set_weights`."""
    n_out, n_in, out_dim, in_dim = w.shape
    layer = CapsuleLayer(num_capsule=n_out, dim_capsule=out_dim, routings=routings)
    layer.build((None, n_in, in_dim))
    layer.set_weights([w.astype("float32")])
    return layer


def gradient(fn: Callable[[tf.Tensor], tf.Tensor], x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Value of `sum(fn(x))` and its gradient with respect to `x`."""
    x = tf.constant(x, dtype="float32")
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = tf.reduce_sum(fn(x))
    return y.numpy(), tape.gradient(y, x).numpy()


# ---------------------------------------------------------------------------------------------
# squash
# ---------------------------------------------------------------------------------------------


def test_squash_hand_computed() -> None:
    # s = [3, 4]: |s|^2 = 25, |s| = 5; scale = 25/26 / 5 = 5/26 (eps 1e-7 changes the 9th digit).
    # v = [15/26, 20/26] = [0.5769231, 0.7692308]; |v| = 25/26 = 0.9615385.
    v = np.asarray(squash(np.array([[3.0, 4.0]], dtype="float32")))
    np.testing.assert_allclose(v, [[15 / 26, 20 / 26]], rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(v), 25 / 26, rtol=1e-6)
    # s = [0.1, 0, 0]: |s|^2 = 0.01; v = 0.01/1.01 * [1, 0, 0] = [0.00990099, 0, 0].
    v = np.asarray(squash(np.array([0.1, 0.0, 0.0], dtype="float32")))
    np.testing.assert_allclose(v, [0.01 / 1.01, 0.0, 0.0], rtol=1e-5)


def test_squash_matches_reference_across_scales() -> None:
    rng = np.random.default_rng(0)
    for scale in (1e-3, 0.3, 1.0, 10.0, 1e3):
        s = (rng.normal(size=(5, 7, 8)) * scale).astype("float32")
        np.testing.assert_allclose(np.asarray(squash(s)), ref.squash(s), rtol=RTOL, atol=ATOL)
    # Another capsule axis.
    s = rng.normal(size=(4, 8, 3)).astype("float32")
    np.testing.assert_allclose(np.asarray(squash(s, axis=1)), ref.squash(s, axis=1),
                               rtol=RTOL, atol=ATOL)


def test_squash_layer_equals_function_and_is_zero_safe() -> None:
    rng = np.random.default_rng(1)
    s = rng.normal(size=(3, 10, 8)).astype("float32")
    np.testing.assert_allclose(np.asarray(Squash()(s)), ref.squash(s), rtol=RTOL, atol=ATOL)
    value, grad = gradient(squash, np.zeros((2, 4), dtype="float32"))
    assert value == 0.0
    assert np.isfinite(grad).all()


# ---------------------------------------------------------------------------------------------
# Length
# ---------------------------------------------------------------------------------------------


def test_length_hand_computed_and_reference() -> None:
    # |[3, 4]| = 5, |[0, 0]| = 0 (up to a NaN-guard far below any real capsule), |[1, 2, 2]| = 3.
    np.testing.assert_allclose(np.asarray(Length()(np.array([[[3.0, 4.0], [0.0, 0.0]]],
                                                             dtype="float32"))), [[5.0, 0.0]],
                               rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(np.asarray(Length()(np.array([[[1.0, 2.0, 2.0]]], "float32"))), [[3]],
                               rtol=1e-6)
    rng = np.random.default_rng(2)
    v = random_capsules(rng, (6, 10, 16))
    np.testing.assert_allclose(np.asarray(Length()(v)), ref.length(v), rtol=RTOL, atol=ATOL)


def test_length_gradient_is_finite_and_zero_at_zero() -> None:
    value, grad = gradient(Length(), np.zeros((2, 10, 16), dtype="float32"))
    assert value == pytest.approx(0.0, abs=1e-9)
    assert np.isfinite(grad).all()
    np.testing.assert_array_equal(grad, 0.0)


def test_length_is_exact_for_tiny_capsules() -> None:
    """The original's later trap: sqrt(|v|^2 + 1e-7) turns a 1e-8 length into 3.2e-4."""
    rng = np.random.default_rng(3)
    direction = rng.normal(size=(3, 10, 16))
    direction /= np.linalg.norm(direction, axis=-1, keepdims=True)
    norms = rng.uniform(0.5e-8, 2e-8, size=(3, 10, 1))
    v = (direction * norms).astype("float32")
    value = np.asarray(Length()(v))
    np.testing.assert_allclose(value, ref.length(v), rtol=1e-3)
    assert value.max() < 1e-7
    # The gradient of a length is the unit vector, whatever the length.
    _, grad = gradient(Length(), v)
    np.testing.assert_allclose(grad, direction, rtol=1e-3, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Mask
# ---------------------------------------------------------------------------------------------


def test_mask_by_label_hand_computed() -> None:
    capsules = np.arange(12, dtype="float32").reshape(1, 3, 4) + 1  # capsule k holds 4k+1..4k+4
    y = np.array([[0.0, 1.0, 0.0]], dtype="float32")
    np.testing.assert_array_equal(np.asarray(Mask()([capsules, y])),
                                  [[0, 0, 0, 0, 5, 6, 7, 8, 0, 0, 0, 0]])
    # Without y the longest capsule (the last one, 9..12) is kept.
    np.testing.assert_array_equal(np.asarray(Mask()(capsules)),
                                  [[0, 0, 0, 0, 0, 0, 0, 0, 9, 10, 11, 12]])


def test_mask_matches_reference_in_both_modes() -> None:
    rng = np.random.default_rng(4)
    capsules = random_capsules(rng, (9, 10, 16))
    y = np.eye(10, dtype="float32")[rng.integers(0, 10, size=9)]
    masked = np.asarray(Mask()([capsules, y]))
    assert masked.shape == (9, 160)
    np.testing.assert_allclose(masked, ref.mask_by_label(capsules, y), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(np.asarray(Mask()(capsules)), ref.mask_by_length(capsules),
                               rtol=RTOL, atol=ATOL)


def test_mask_by_length_picks_the_longest_of_tiny_capsules() -> None:
    """A fresh model's capsules are ~1e-7 long; an epsilon that swamps them makes every length
    equal, and the mask would always keep capsule 0."""
    rng = np.random.default_rng(5)
    capsules = (random_capsules(rng, (20, 10, 16)) * 1e-7).astype("float32")
    assert (np.argmax(ref.length(capsules), axis=1) != 0).any()
    np.testing.assert_allclose(np.asarray(Mask()(capsules)), ref.mask_by_length(capsules),
                               rtol=RTOL, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# CapsuleLayer (dynamic routing)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("routings", [1, 2, 3])
def test_capsule_layer_matches_procedure_1(routings: int) -> None:
    rng = np.random.default_rng(10 + routings)
    u = random_capsules(rng, (4, 6, 4))
    w = rng.normal(size=(3, 6, 5, 4)) * 0.5
    layer = capsule_layer_with(w, routings)
    out = np.asarray(layer(u))
    assert out.shape == (4, 3, 5)
    np.testing.assert_allclose(out, ref.capsule_layer(w.astype("float32"), u, routings),
                               rtol=RTOL, atol=ATOL)


def test_routing_iterations_matter_in_this_setting() -> None:
    """Guards the test above: with these inputs 1 and 3 iterations give clearly different capsules,
    so a layer that ignored `routings` (or routed over the wrong axis) could not pass it."""
    rng = np.random.default_rng(13)
    u = random_capsules(rng, (4, 6, 4))
    w = rng.normal(size=(3, 6, 5, 4)) * 0.5
    assert np.abs(ref.capsule_layer(w, u, 3) - ref.capsule_layer(w, u, 1)).max() > 1e-2
    out = np.asarray(capsule_layer_with(w, 3)(u))
    assert np.abs(out - ref.capsule_layer(w, u, 1)).max() > 1e-2


def numeric_gradient(fn: Callable[[np.ndarray], float], w: np.ndarray, h: float = 1e-6
                     ) -> np.ndarray:
    """Central finite differences of a float64 scalar function."""
    grad = np.zeros_like(w)
    for index in np.ndindex(w.shape):
        step = np.zeros_like(w)
        step[index] = h
        grad[index] = (fn(w + step) - fn(w - step)) / (2 * h)
    return grad


def test_gradient_flows_through_every_routing_iteration() -> None:
    """d(sum_j k_j |v_j|)/dW equals the finite-difference gradient of the reference Procedure 1,
    and not that of a variant with stop_gradient on the routing logits."""
    rng = np.random.default_rng(20)
    u = random_capsules(rng, (2, 3, 2), scale=2.0).astype("float64")
    w = rng.normal(size=(2, 3, 2, 2)).astype("float32").astype("float64")
    k = rng.normal(size=(2,))
    routings = 3

    def objective(weights: np.ndarray) -> float:
        return float(np.sum(ref.length(ref.capsule_layer(weights, u, routings)) * k))

    frozen = ref.final_coupling(ref.predictions(w, u), routings)

    def stopped(weights: np.ndarray) -> float:
        v = ref.routing(ref.predictions(weights, u), routings, coupling=frozen)
        return float(np.sum(ref.length(v) * k))

    layer = capsule_layer_with(w, routings)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(Length()(layer(u.astype("float32"))) * k.astype("float32"))
    grad = tape.gradient(loss, layer.W).numpy()
    expected = numeric_gradient(objective, w)
    np.testing.assert_allclose(grad, expected, rtol=1e-3, atol=1e-5)
    assert np.abs(numeric_gradient(stopped, w) - expected).max() > 1e-2


def layer_gradients_problem(routings: int) -> dict[str, np.ndarray]:
    """Small W, u and output weights k whose objective `sum(v * k)` reaches every component of the
    output capsules (a length would only reach their direction)."""
    rng = np.random.default_rng(30 + routings)
    return {"w": rng.normal(size=(3, 4, 3, 2)).astype("float32").astype("float64"),
            "u": random_capsules(rng, (2, 4, 2), scale=2.0).astype("float64"),
            "k": rng.normal(size=(2, 3, 3))}


def expected_layer_gradients(problem: dict[str, np.ndarray], routings: int
                             ) -> tuple[np.ndarray, np.ndarray]:
    """Finite-difference gradients of the NumPy Procedure 1 with respect to W and u."""
    w, u, k = problem["w"], problem["u"], problem["k"]
    return (numeric_gradient(lambda w_: float(np.sum(ref.capsule_layer(w_, u, routings) * k)), w),
            numeric_gradient(lambda u_: float(np.sum(ref.capsule_layer(w, u_, routings) * k)), u))


@pytest.mark.parametrize("routings", [1, 2, 3])
def test_hand_written_routing_gradient_matches_finite_differences(routings: int) -> None:
    """`dynamic_routing`'s own gradient, through the layer, for the kernel and the inputs."""
    problem = layer_gradients_problem(routings)
    layer = capsule_layer_with(problem["w"], routings)
    u = tf.constant(problem["u"].astype("float32"))
    with tf.GradientTape() as tape:
        tape.watch(u)
        loss = tf.reduce_sum(layer(u) * problem["k"].astype("float32"))
    w_grad, u_grad = tape.gradient(loss, [layer.W, u])
    expected_w, expected_u = expected_layer_gradients(problem, routings)
    np.testing.assert_allclose(w_grad.numpy(), expected_w, rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(u_grad.numpy(), expected_u, rtol=1e-3, atol=1e-5)


JAX_GRADIENTS = """
import json, sys
import jax, numpy as np
sys.path.insert(0, ".")
from capsnet.layers import CapsuleLayer
problem = {k: np.asarray(v) for k, v in json.loads(sys.stdin.read()).items()}
routings = int(sys.argv[1])
layer = CapsuleLayer(num_capsule=3, dim_capsule=3, routings=routings)
layer.build((None, 4, 2))
def objective(w, u):
    outputs, _ = layer.stateless_call([w], [], u)
    return (outputs * problem["k"]).sum()
grads = jax.jit(jax.grad(objective, argnums=(0, 1)))(problem["w"].astype("float32"),
                                                       problem["u"].astype("float32"))
print(json.dumps([np.asarray(g).tolist() for g in grads]))
"""


def test_hand_written_routing_gradient_on_jax() -> None:
    """The same gradients under `jax.grad` + `jax.jit` (Keras' JAX backend, in a child process)."""
    import json
    import subprocess
    import sys

    from conftest import REPO_ROOT, child_env

    routings = 3
    problem = layer_gradients_problem(routings)
    result = subprocess.run([sys.executable, "-c", JAX_GRADIENTS, str(routings)], cwd=REPO_ROOT,
                            input=json.dumps({k: v.tolist() for k, v in problem.items()}),
                            env=child_env(KERAS_BACKEND="jax"), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    w_grad, u_grad = (np.array(g) for g in json.loads(result.stdout.strip().splitlines()[-1]))
    expected_w, expected_u = expected_layer_gradients(problem, routings)
    np.testing.assert_allclose(w_grad, expected_w, rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(u_grad, expected_u, rtol=1e-3, atol=1e-5)


def test_routings_below_one_refused_at_construction() -> None:
    for routings in (0, -1):
        with pytest.raises(ValueError, match="routings"):
            CapsuleLayer(num_capsule=10, dim_capsule=16, routings=routings)
        with pytest.raises(ValueError, match="routings"):
            capsulelayers.dynamic_routing(np.zeros((1, 2, 3, 4), dtype="float32"), routings)


# ---------------------------------------------------------------------------------------------
# Margin loss
# ---------------------------------------------------------------------------------------------


def test_margin_loss_hand_computed() -> None:
    y = np.array([[1, 0, 0], [1, 0, 0]], dtype="float32")
    lengths = np.array([[0.95, 0.3, 0.05], [0.5, 0.8, 0.0]], dtype="float32")
    # Sample 0: present class 0.95 > 0.9 -> 0; absent 0.3 -> 0.5 * 0.2^2 = 0.02; 0.05 < 0.1 -> 0.
    # Sample 1: present (0.9 - 0.5)^2 = 0.16; absent 0.5 * (0.8 - 0.1)^2 = 0.245; 0 -> 0. = 0.405.
    np.testing.assert_allclose(np.asarray(capsulenet.margin_loss(y, lengths)), [0.02, 0.405],
                               rtol=1e-5)


def test_margin_loss_matches_reference() -> None:
    rng = np.random.default_rng(30)
    y = np.eye(10, dtype="float32")[rng.integers(0, 10, size=32)]
    lengths = rng.uniform(0, 1, size=(32, 10)).astype("float32")
    np.testing.assert_allclose(np.asarray(capsulenet.margin_loss(y, lengths)),
                               ref.margin_loss(y, lengths), rtol=RTOL, atol=ATOL)


def init_images(n: int) -> np.ndarray:
    """`n` images in [0, 1]: real Fashion-MNIST if installed, else uniform noise."""
    from conftest import FASHION_DIR, fashion_available, read_idx_gz

    if fashion_available():
        x = read_idx_gz(FASHION_DIR / "t10k-images-idx3-ubyte.gz")[:n]
        return (x[..., None] / 255.0).astype("float32")
    return np.random.default_rng(40).uniform(size=(n, 28, 28, 1)).astype("float32")


def test_margin_loss_gradient_reaches_w_at_init() -> None:
    """At the glorot init the digit capsules are ~1e-7 long; a length with 1e-7
    inside the square root leaves W a gradient of ~1e-12..1e-9 and the model never learns.
    Measured 2026-11-25 on the 2-core dev machine: ~7e-7 with the safe norm, 7.5e-10 with 1e-7."""
    keras.utils.set_random_seed(0)
    train_model, _, _ = capsulenet.CapsNet((28, 28, 1), 10, 3)
    x = init_images(8)
    y = np.eye(10, dtype="float32")[np.arange(8) % 10]
    digitcaps = train_model.get_layer("digitcaps")
    with tf.GradientTape() as tape:
        lengths, _ = train_model([x, y])
        loss = tf.reduce_mean(capsulenet.margin_loss(y, lengths))
    grad = tape.gradient(loss, digitcaps.W).numpy()
    # The regime of the trap: capsules far shorter than sqrt(1e-7) = 3.2e-4.
    assert np.asarray(lengths).max() < 1e-4
    assert np.isfinite(grad).all()
    assert np.abs(grad).max() > 1e-8


# ---------------------------------------------------------------------------------------------
# Dynamic batch size
# ---------------------------------------------------------------------------------------------


def small_capsule_model() -> keras.Model:
    """Image -> PrimaryCap -> CapsuleLayer -> [Length, Mask by length], with no fixed batch size."""
    keras.utils.set_random_seed(50)
    x = keras.Input((12, 12, 3))
    primary = PrimaryCap(x, dim_capsule=4, n_channels=2, kernel_size=3, strides=2)
    digits = CapsuleLayer(num_capsule=3, dim_capsule=5, routings=3, name="digits")(primary)
    return keras.Model(x, [Length()(digits), Mask()(digits)])


def test_any_batch_size_gives_per_sample_results() -> None:
    model = small_capsule_model()
    x = np.random.default_rng(51).uniform(size=(250, 12, 12, 3)).astype("float32")
    probe = [0, 1, 6, 99, 100, 199, 200, 249]  # includes the partial last batch of 50
    single = {i: [np.asarray(t) for t in model(x[i : i + 1])] for i in probe}
    runs = {
        "call 1": [np.asarray(t) for t in model(x[:1])],
        "call 7": [np.asarray(t) for t in model(x[:7])],
        "call 100": [np.asarray(t) for t in model(x[:100])],
        "predict 7": model.predict(x[:7], batch_size=7, verbose=0),
        "predict 250 / 100": model.predict(x, batch_size=100, verbose=0),
    }
    for name, outputs in runs.items():
        assert outputs[0].shape == (len(outputs[0]), 3), name
        for i in (i for i in probe if i < len(outputs[0])):
            for got, want in zip(outputs, single[i], strict=True):
                np.testing.assert_allclose(got[i : i + 1], want, rtol=1e-4, atol=1e-6,
                                           err_msg=f"{name}, sample {i}")
    assert len(runs["predict 250 / 100"][0]) == 250


# ---------------------------------------------------------------------------------------------
# Serialization
# ---------------------------------------------------------------------------------------------


def roundtrip(layer: keras.layers.Layer) -> keras.layers.Layer:
    """Serializes `layer` by its registered name and deserializes it."""
    return keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))


@pytest.mark.parametrize(
    "layer",
    [
        Squash(axis=-2, name="sq"),
        Length(name="len"),
        Mask(name="mask"),
        CapsuleLayer(num_capsule=4, dim_capsule=6, routings=2, name="caps",
                     kernel_initializer="he_normal"),
    ],
    ids=lambda layer: type(layer).__name__,
)
def test_get_config_round_trips(layer: keras.layers.Layer) -> None:
    config = layer.get_config()
    clone = type(layer).from_config(config)
    assert clone.get_config() == config
    restored = roundtrip(layer)
    assert type(restored) is type(layer)
    assert restored.get_config() == config
    registered = keras.saving.get_registered_name(type(layer))
    assert registered.startswith(capsulelayers.PACKAGE + ">")


def test_capsule_layer_config_keeps_arguments_and_outputs() -> None:
    rng = np.random.default_rng(60)
    w = rng.normal(size=(4, 5, 6, 3)) * 0.5
    layer = capsule_layer_with(w, routings=2)
    config = layer.get_config()
    assert (config["num_capsule"], config["dim_capsule"], config["routings"]) == (4, 6, 2)
    clone = roundtrip(layer)
    if not clone.built:
        clone.build((None, 5, 3))
    clone.set_weights(layer.get_weights())
    u = random_capsules(rng, (3, 5, 3))
    np.testing.assert_array_equal(np.asarray(clone(u)), np.asarray(layer(u)))
