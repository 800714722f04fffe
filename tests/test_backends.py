"""The guards of the training step, on every Keras backend's step (`backends.make_steps`).

The step is the one part of training that differs per backend (`TensorFlowSteps`, `JaxSteps`,
`TorchSteps`), so each check here runs on each backend's step, from the same initial weights and the
same batch, against values computed here in NumPy (`tests/reference.py` and hand-derived gradients):

- the sums a step returns are the margin loss, the reconstruction MSE, `loss = margin + lam_recon x
  MSE` and the correct count of the outputs the model gave before the step;
- the gradient the step applies contains `lam_recon` x the MSE's gradient: with plain SGD the
  decoder's output bias moves by the rate times `lam_recon / batch x sum_b 2/P (r - x) r (1 - r)` (the
  derivative of the mean squared error through the sigmoid, `P` pixels); with `lam_recon = 0` the
  decoder does not move at all while the encoder does (the margin term's gradient);
- the learning-rate schedule reaches the step: Adam started at iteration 2 of
  `make_optimizer(0.01, 0.5, steps_per_epoch=1)` moves that bias by Adam's equations at rate
  `0.01 x 0.5^2` (bias correction at t = 3);
- every backend's gradient of every weight (from its SGD step) equals TensorFlow's.

A step that dropped the reconstruction term from its gradient (while still reporting it in its sums)
fails the second check on that backend. The random shifts are made in NumPy before any backend sees a
batch (`batches.train_batches`, tested in test_training.py), and resuming is checked per backend in
test_other_backends.py.

Each non-TensorFlow backend runs in a child process (the backend is fixed when Keras is imported), with
the other engines hidden (`conftest.run_on_backend`), on a small CapsNet (20x20 inputs: 128 primary
capsules, 3 routings), ~10 s for JAX, ~5 s for PyTorch.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import reference
from conftest import backend_available, child_entry, describe, run_on_backend

import capsulenet

SHAPE = (20, 20, 1)  # conv1 -> 12x12, PrimaryCaps -> 2x2x32 = 128 capsules: every layer, small
N_CLASS = 10
ROUTINGS = 3  # the routing's hand-written gradient over several iterations
BATCH = 6
LAM = 0.5
# Adam (Keras' defaults) started at iteration 2 of make_optimizer(0.01, 0.5, steps_per_epoch=1).
ADAM_LR, ADAM_DECAY, ADAM_START = 0.01, 0.5, 2
BETA_1, BETA_2, EPSILON = 0.9, 0.999, 1e-7
BACKENDS = ["tensorflow", "jax", "torch"]
# Plain SGD at this rate: a weight's change is SGD_RATE x its gradient, far above the float32 rounding
# of the weight (the encoder's gradients at a fresh model are ~1e-8; its weights ~0.05, rounded to
# ~4e-9). The decoder's output bias starts at zero, so its change is exact at any rate.
SGD_RATE = 1e6


def step_main(weights: str, data: str, out: str) -> None:
    """One backend's steps from `weights` on the batch in `data`, written to `out` (.npz): the model's
    outputs before any step, then for `lam_recon` 0.5 and 0 the sums of one SGD step and each weight's
    gradient (its change / SGD_RATE), then each weight's change in one Adam step at a decayed rate."""
    from capsnet import backends, training

    batch = np.load(data)
    x, y = batch["x"], batch["y"]
    model, _, _ = capsulenet.CapsNet(SHAPE, N_CLASS, ROUTINGS)
    model.load_weights(weights)
    initial = model.get_weights()
    lengths, recon = (keras.ops.convert_to_numpy(o) for o in model([x, y], training=False))
    found = {"lengths": lengths, "recon": recon}

    def step(optimizer: object, lam_recon: float, start: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
        model.set_weights(initial)
        steps = backends.make_steps(model, optimizer, lam_recon, BATCH)
        steps.build_optimizer()
        optimizer.iterations.assign(start)
        steps.reload()
        sums = steps.train(x, y)
        steps.sync()
        found[f"iterations_{len(found)}"] = int(keras.ops.convert_to_numpy(optimizer.iterations)) - start
        return sums, [w0 - w for w0, w in zip(initial, model.get_weights(), strict=True)]

    for lam in (LAM, 0.0):
        sums, changes = step(keras.optimizers.SGD(learning_rate=SGD_RATE), lam)
        found[f"sums_{lam}"] = sums
        found.update({f"sgd_{lam}_{i}": c.astype(np.float64) / SGD_RATE for i, c in enumerate(changes)})
    _, changes = step(training.make_optimizer(ADAM_LR, ADAM_DECAY, steps_per_epoch=1), LAM, ADAM_START)
    found.update({f"adam_{i}": c for i, c in enumerate(changes)})
    np.savez(out, **found)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The initial weights (a fresh small CapsNet, saved) and one batch of images and one-hot labels."""
    folder = tmp_path_factory.mktemp("backends")
    keras.utils.set_random_seed(11)
    model, _, _ = capsulenet.CapsNet(SHAPE, N_CLASS, ROUTINGS)
    weights = folder / "initial.weights.h5"
    model.save_weights(weights)
    rng = np.random.default_rng(5)
    x = rng.uniform(size=(BATCH, *SHAPE)).astype("float32")
    y = np.eye(N_CLASS, dtype="float32")[rng.integers(0, N_CLASS, BATCH)]
    data = folder / "batch.npz"
    np.savez(data, x=x, y=y)
    names = [w.path for w in model.weights]
    return {"folder": folder, "weights": weights, "data": data, "x": x, "y": y, "names": names,
            "initial": model.get_weights()}


@pytest.fixture(scope="module")
def stepped(inputs: dict) -> dict:
    """Each backend's results (`step_main`), by backend name; TensorFlow in this process."""
    results = {}
    for backend in BACKENDS:
        out = inputs["folder"] / f"{backend}.npz"
        if backend == keras.backend.backend():
            step_main(str(inputs["weights"]), str(inputs["data"]), str(out))
        elif backend_available(backend):
            run = run_on_backend(backend, "tests/test_backends.py", "--step", str(inputs["weights"]),
                                 str(inputs["data"]), str(out))
            assert run.returncode == 0, describe(run)
        else:
            continue
        results[backend] = dict(np.load(out))
    return results


def result_of(stepped: dict, backend: str) -> dict:
    if backend not in stepped:
        pytest.skip(f"{backend} is not installed")
    return stepped[backend]


def decoder_bias_index(inputs: dict) -> int:
    """The index (in `model.weights` order) of the decoder's output bias (one per pixel: 400 here)."""
    found = [i for i, name in enumerate(inputs["names"]) if name.startswith("decoder/") and
             name.endswith("/bias")]
    assert found, inputs["names"]
    return found[-1]


def mse_bias_gradient(x: np.ndarray, recon: np.ndarray) -> np.ndarray:
    """d/d(bias) of the batch mean of the per-image MSE `mean_p (r_p - x_p)^2`, `r = sigmoid(z + bias)`:
    `1/B sum_b 2/P (r - x) r (1 - r)`, in float64."""
    r = recon.reshape(len(recon), -1).astype(np.float64)
    t = x.reshape(len(x), -1).astype(np.float64)
    return (2 / r.shape[1] * (r - t) * r * (1 - r)).mean(axis=0)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_step_sums_are_the_losses_of_the_outputs(stepped: dict, inputs: dict, backend: str) -> None:
    found = result_of(stepped, backend)
    x, y = inputs["x"], inputs["y"]
    margin = reference.margin_loss(y, found["lengths"].astype(np.float64))
    mse = np.square(found["recon"].astype(np.float64) - x).reshape(BATCH, -1).mean(axis=1)
    correct = (found["lengths"].argmax(axis=1) == y.argmax(axis=1)).sum()
    for lam in (LAM, 0.0):
        np.testing.assert_allclose(found[f"sums_{lam}"], [(margin + lam * mse).sum(), margin.sum(), mse.sum(),
                                                          correct], rtol=1e-5, err_msg=f"lam_recon {lam}")
    assert mse.sum() > 0.1  # the reconstruction term is not negligible in the check above


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_step_gradient_holds_lam_recon_times_the_mse_gradient(stepped: dict, inputs: dict,
                                                             backend: str) -> None:
    """The gradient of the decoder's output bias (zero-initialised, so its SGD change is exact in
    float32) is lam_recon x the MSE's gradient (the margin does not reach the decoder)."""
    found = result_of(stepped, backend)
    expected = LAM * mse_bias_gradient(inputs["x"], found["recon"])
    got = found[f"sgd_{LAM}_{decoder_bias_index(inputs)}"]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-9)
    assert np.abs(expected).max() > 1e-4  # far above the tolerance


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_step_with_lam_recon_0_leaves_the_decoder_and_moves_the_encoder(stepped: dict, inputs: dict,
                                                                        backend: str) -> None:
    found = result_of(stepped, backend)
    moved = {name: float(np.abs(found[f"sgd_0.0_{i}"]).max()) for i, name in enumerate(inputs["names"])}
    assert all(change == 0 for name, change in moved.items() if name.startswith("decoder/")), moved
    assert moved["conv1/kernel"] > 0 and moved["digitcaps/W"] > 0, moved


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_step_applies_adam_at_the_scheduled_rate(stepped: dict, inputs: dict, backend: str) -> None:
    """Adam from iteration 2 of lr 0.01 halved per epoch (1 step each): the rate is 0.0025 and
    `m = (1 - beta_1) g`, `v = (1 - beta_2) g^2`, so the bias moves by
    `0.0025 sqrt(1 - beta_2^3) / (1 - beta_1^3) m / (sqrt(v) + epsilon)` with g from the SGD step."""
    found = result_of(stepped, backend)
    index = decoder_bias_index(inputs)
    g = found[f"sgd_{LAM}_{index}"].astype(np.float64)
    rate = ADAM_LR * ADAM_DECAY**ADAM_START
    t = ADAM_START + 1
    expected = (rate * np.sqrt(1 - BETA_2**t) / (1 - BETA_1**t) * (1 - BETA_1) * g
                / (np.sqrt(1 - BETA_2) * np.abs(g) + EPSILON))
    np.testing.assert_allclose(found[f"adam_{index}"], expected, rtol=1e-4, atol=1e-9)
    assert np.abs(expected).max() > 1e-3
    assert [int(v) for k, v in found.items() if k.startswith("iterations_")] == [1, 1, 1]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_step_updates_every_weight_as_tensorflow(stepped: dict, inputs: dict, backend: str) -> None:
    """The same forward (capsule lengths) and the same gradients, each weight within 1e-3 of its
    largest gradient (float32 sums in other orders) plus the rounding of its SGD change (two float32
    spacings of its largest initial value, over SGD_RATE)."""
    found, tf = result_of(stepped, backend), result_of(stepped, "tensorflow")
    np.testing.assert_allclose(found["lengths"], tf["lengths"], rtol=1e-4, atol=1e-9)
    for i, name in enumerate(inputs["names"]):
        for key in (f"sgd_{LAM}_{i}", f"sgd_0.0_{i}"):
            scale = np.abs(tf[key]).max()
            rounding = 2 * np.spacing(np.abs(inputs["initial"][i]).max()) / SGD_RATE
            np.testing.assert_allclose(found[key], tf[key], rtol=0, atol=1e-3 * scale + rounding,
                                       err_msg=f"{name} ({key})")
            assert scale > 0 or name.startswith("decoder/"), name


if __name__ == "__main__":
    child_entry(step=step_main)
