"""What training does, checked against expectations computed here: the learning-rate schedule (in
`log.csv` and in the optimizer), the loss weighting (`loss = capsnet_loss + lam_recon * decoder_loss`,
and a decoder that `--lam_recon 0` leaves exactly as initialised), and the random shifts of the
training batches (hand-computed pixels, SciPy's bilinear shift as the reference, zero fill, bounds,
reproducibility from `(seed, epoch)`).

The end-to-end part is three short in-process runs of `capsulenet.main` on tiny synthetic data (40
training images, 2 steps of 20 per epoch, one routing): enough to see every epoch boundary, cheap
enough not to need TensorFlow's start-up three times.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
from conftest import save_npz, synthetic_raw, weights_in
from scipy import ndimage

import capsulenet
from capsnet import batches, training

SEED = 7
BATCH = 20
N_TRAIN = 40  # 2 steps per epoch
COMMON = ["--batch_size", str(BATCH), "-r", "1", "--seed", str(SEED), "--lr", "0.002"]
# lr x lr_decay^epoch for --lr 0.002, computed by hand.
RATES_DECAY_05 = [0.002, 0.001, 0.0005]
RATES_DECAY_09 = [0.002, 0.0018, 0.00162]


@dataclass
class Run:
    """One finished in-process run: its folder, its log and the calls it made to `train_batches`."""

    save_dir: Path
    log: pd.DataFrame
    batch_calls: list[dict]


def fresh_layer_weights(seed: int, layer: str) -> list[np.ndarray]:
    """The weights `layer` of a newly built 28x28 CapsNet has after `keras.utils.set_random_seed(seed)`
    (what `--seed` does before the model is built)."""
    keras.utils.set_random_seed(seed)
    model, _, _ = capsulenet.CapsNet((28, 28, 1), 10, 1)
    return [np.asarray(w) for w in model.get_layer(layer).get_weights()]


def trained_layer_weights(save_dir: Path, layer: str) -> list[np.ndarray]:
    """The weights of `layer` in `save_dir/trained_model.weights.h5`, loaded into a CapsNet."""
    model, _, _ = capsulenet.CapsNet((28, 28, 1), 10, 1)
    model.load_weights(save_dir / "trained_model.weights.h5")
    return [np.asarray(w) for w in model.get_layer(layer).get_weights()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Run]]:
    """Three runs of the same seed and data:
    `decay_05` (`--lr_decay 0.5 --lam_recon 0.5 --shift_fraction 0.2`, 3 epochs), `decay_09` (the same
    with `--lr_decay 0.9`) and `no_recon` (`--lam_recon 0 --shift_fraction 0`, 1 epoch).

    `batches.train_batches` is wrapped (its results pass through unchanged) to record the arguments
    the command line gave it."""
    folder = tmp_path_factory.mktemp("training")
    npz = save_npz(folder / "tiny.npz", synthetic_raw(N_TRAIN, 20, seed=3))
    flags = {
        "decay_05": ["--epochs", "3", "--lr_decay", "0.5", "--lam_recon", "0.5", "--shift_fraction", "0.2"],
        "decay_09": ["--epochs", "3", "--lr_decay", "0.9", "--lam_recon", "0.5", "--shift_fraction", "0.2"],
        "no_recon": ["--epochs", "1", "--lr_decay", "0.5", "--lam_recon", "0", "--shift_fraction", "0"],
    }
    results: dict[str, Run] = {}
    real = batches.train_batches
    for name, extra in flags.items():
        calls: list[dict] = []

        def recording(x: np.ndarray, y: np.ndarray, batch_size: int, shift_fraction: float, seed: int,
                      epoch: int, calls: list[dict] = calls) -> Iterator:
            calls.append({"n": len(x), "batch_size": batch_size, "shift_fraction": shift_fraction,
                          "seed": seed, "epoch": epoch})
            return real(x, y, batch_size, shift_fraction, seed, epoch)

        save_dir = folder / name
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(batches, "train_batches", recording)
            code = capsulenet.main([*COMMON, *extra, "--dataset", str(npz), "--save_dir", str(save_dir)])
        assert code == 0, name
        results[name] = Run(save_dir, pd.read_csv(save_dir / "log.csv"), calls)
    yield results


# ---------------------------------------------------------------------------------------------
# Learning rate
# ---------------------------------------------------------------------------------------------


def test_optimizer_rate_is_lr_times_decay_per_epoch() -> None:
    """`make_optimizer(0.002, 0.5, 5)`: the rate the optimizer applies at iteration i is
    0.002 * 0.5^(i // 5), a staircase that steps at each epoch boundary (values by hand)."""
    optimizer = training.make_optimizer(0.002, 0.5, steps_per_epoch=5)
    model, _, _ = capsulenet.CapsNet((28, 28, 1), 10, 1)
    optimizer.build(model.trainable_variables)
    expected = {0: 0.002, 4: 0.002, 5: 0.001, 9: 0.001, 10: 0.0005, 14: 0.0005, 15: 0.00025}
    for iteration, rate in expected.items():
        optimizer.iterations.assign(iteration)
        assert float(optimizer.learning_rate) == pytest.approx(rate, rel=1e-6), iteration


def test_build_makes_the_command_lines_models_optimizer_and_step() -> None:
    """`training.build` with the defaults: the original's flags (lr 0.001 decaying x0.9 per epoch,
    lam_recon 0.392, batch 100, 3 routings, typed here by hand), one optimizer shared by the compiled
    model and the step; with `two_digits` the step trains the three-input MultiMNIST model."""
    import dataclasses

    from capsnet import losses

    built = training.build((28, 28, 1), 10, steps_per_epoch=3)
    assert built.model.count_params() == 8_215_568 and built.model.get_layer("digitcaps").routings == 3
    assert built.steps.model is built.train_model is built.model and built.steps.optimizer is built.optimizer
    assert built.model.optimizer is built.optimizer
    assert built.steps.lam_recon == 0.392 and built.steps.batch_size == 100
    assert built.steps.objective is losses.ONE_DIGIT
    built.steps.build_optimizer()
    for iteration, rate in {0: 0.001, 2: 0.001, 3: 0.0009, 6: 0.00081}.items():
        built.optimizer.iterations.assign(iteration)
        assert float(built.optimizer.learning_rate) == pytest.approx(rate, rel=1e-6), iteration
    config = dataclasses.replace(training.DEFAULTS, routings=1, batch_size=5)
    two = training.build((36, 36, 1), 10, config, steps_per_epoch=1, two_digits=True)
    assert two.steps.model is two.train_model and two.train_model is not two.model
    assert len(two.train_model.inputs) == 3 and two.steps.objective is losses.TWO_DIGITS
    assert two.steps.batch_size == 5 and two.model.get_layer("digitcaps").routings == 1


def numpy_adam(weights: np.ndarray, grads: list[np.ndarray], rate: Callable[[int], float],
               beta_1: float = 0.9, beta_2: float = 0.999, epsilon: float = 1e-7) -> np.ndarray:
    """Adam (Kingma & Ba, Algorithm 1, with Keras' epsilon outside the square root) in float64."""
    w, m, v = weights.astype(np.float64), np.zeros(weights.shape), np.zeros(weights.shape)
    for t, g in enumerate(grads, start=1):
        m = beta_1 * m + (1 - beta_1) * g
        v = beta_2 * v + (1 - beta_2) * g * g
        w = w - rate(t - 1) * np.sqrt(1 - beta_2**t) / (1 - beta_1**t) * m / (np.sqrt(v) + epsilon)
    return w


def test_optimizer_update_is_adam_with_the_decayed_rate() -> None:
    """Seven updates of `make_optimizer(0.01, 0.5, 3)`'s optimizer (TensorFlow's fused kernel here)
    equal Adam's equations in NumPy, the rate halving every 3 steps; Keras' own Adam agrees."""
    rng = np.random.default_rng(3)
    start = rng.normal(size=(40, 7)).astype("float32")
    grads = [rng.normal(size=start.shape).astype("float32") * (t + 1) for t in range(7)]
    expected = numpy_adam(start, grads, rate=lambda t: 0.01 * 0.5 ** (t // 3))
    for optimizer in (training.make_optimizer(0.01, 0.5, steps_per_epoch=3),
                      keras.optimizers.Adam(keras.optimizers.schedules.ExponentialDecay(
                          0.01, 3, 0.5, staircase=True))):
        variable = keras.Variable(start)
        optimizer.build([variable])
        for g in grads:
            optimizer.apply_gradients([(g, variable)])
        np.testing.assert_allclose(variable.numpy(), expected, rtol=1e-5, atol=1e-6)
    assert np.abs(expected - start).max() > 0.02  # the updates are far above the tolerance


@pytest.mark.slow
def test_log_learning_rate_per_epoch(runs: dict[str, Run]) -> None:
    """`log.csv`'s `learning_rate` is lr x lr_decay^epoch: 0.002, 0.001, 0.0005 for --lr_decay 0.5 and
    0.002, 0.0018, 0.00162 for --lr_decay 0.9 (values by hand)."""
    np.testing.assert_allclose(runs["decay_05"].log["learning_rate"], RATES_DECAY_05, rtol=1e-6)
    np.testing.assert_allclose(runs["decay_09"].log["learning_rate"], RATES_DECAY_09, rtol=1e-6)
    assert runs["decay_05"].log["epoch"].tolist() == [0, 1, 2]


@pytest.mark.slow
def test_another_lr_decay_trains_differently_from_the_second_epoch_on(runs: dict[str, Run]) -> None:
    """The decay is applied, not only logged: two runs that differ only in --lr_decay agree on the
    first epoch (both at 0.002) and end with other weights (every later step moves each weight by
    ~lr, 0.001 against 0.0018; run-to-run noise is ~1e-7)."""
    a, b = runs["decay_05"], runs["decay_09"]
    columns = [c for c in a.log.columns if c != "epoch"]
    np.testing.assert_allclose(a.log.loc[0, columns].to_numpy(float), b.log.loc[0, columns].to_numpy(float),
                               rtol=1e-5, atol=1e-7)
    final_a = weights_in(a.save_dir / "trained_model.weights.h5")
    final_b = weights_in(b.save_dir / "trained_model.weights.h5")
    assert final_a.keys() == final_b.keys()
    largest = max(float(np.abs(final_a[k] - final_b[k]).max()) for k in final_a)
    assert largest > 1e-4, f"--lr_decay 0.5 and 0.9 ended within {largest:g} of each other"


# ---------------------------------------------------------------------------------------------
# Loss weighting
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("prefix", ["", "val_"])
def test_loss_is_margin_plus_lam_recon_times_mse(runs: dict[str, Run], prefix: str) -> None:
    """`loss = capsnet_loss + lam_recon x decoder_loss` in every row of log.csv, for training and
    validation, with --lam_recon 0.5 and with 0 (float32 sums: relative 1e-5)."""
    for name, lam in (("decay_05", 0.5), ("decay_09", 0.5), ("no_recon", 0.0)):
        log = runs[name].log
        np.testing.assert_allclose(log[f"{prefix}loss"],
                                   log[f"{prefix}capsnet_loss"] + lam * log[f"{prefix}decoder_loss"],
                                   rtol=1e-5, atol=1e-7, err_msg=name)
        # Each term is present: the check above cannot pass by a zero decoder loss.
        assert (log[f"{prefix}decoder_loss"] > 1e-3).all(), name


@pytest.mark.slow
def test_lam_recon_0_gives_the_decoder_no_gradient(runs: dict[str, Run]) -> None:
    """With --lam_recon 0 the decoder gets no gradient, so Adam leaves it exactly as a freshly built
    model of the same seed initialises it (built here), while the encoder trained; with 0.5 the
    decoder moved too."""
    fresh_decoder = fresh_layer_weights(SEED, "decoder")
    fresh_conv1 = fresh_layer_weights(SEED, "conv1")
    for got, want in zip(trained_layer_weights(runs["no_recon"].save_dir, "decoder"), fresh_decoder,
                         strict=True):
        np.testing.assert_array_equal(got, want)
    # The encoder moved (its gradients are tiny at a fresh model's ~1e-7 capsules, but not zero).
    conv1 = trained_layer_weights(runs["no_recon"].save_dir, "conv1")
    assert max(float(np.abs(g - w).max()) for g, w in zip(conv1, fresh_conv1, strict=True)) > 1e-6
    decoder = trained_layer_weights(runs["decay_05"].save_dir, "decoder")
    assert max(float(np.abs(g - w).max()) for g, w in zip(decoder, fresh_decoder, strict=True)) > 1e-4


# ---------------------------------------------------------------------------------------------
# Shifts
# ---------------------------------------------------------------------------------------------


def test_whole_pixel_shift_moves_the_content_with_zero_fill() -> None:
    """2 rows down and 3 columns left: out[r, c] = x[r - 2, c + 3] inside, 0 where that is outside."""
    x = np.random.default_rng(0).uniform(size=(1, 6, 7, 2)).astype("float32")
    out = batches.shift_images(x, np.array([2.0]), np.array([-3.0]))
    want = np.zeros_like(x)
    want[:, 2:6, 0:4] = x[:, 0:4, 3:7]
    np.testing.assert_allclose(out, want, atol=1e-7)


def test_a_bright_pixel_that_leaves_the_image_disappears() -> None:
    """A pixel in the bottom-left corner moved down and left is gone: nothing wraps to the top row or
    the right column; half a pixel down keeps half of it in place."""
    x = np.zeros((3, 28, 28, 1), "float32")
    x[:, 27, 0] = 1.0
    out = batches.shift_images(x, np.array([1.5, 0.5, 0.0]), np.array([-0.5, 0.0, -1.0]))
    np.testing.assert_array_equal(out[0], 0.0)
    assert out[1, 27, 0, 0] == pytest.approx(0.5) and out[1].sum() == pytest.approx(0.5)
    np.testing.assert_array_equal(out[2], 0.0)


def test_half_pixel_shift_is_bilinear() -> None:
    """Hand-computed bilinear values: a unit pixel shifted by (0.5, 0.5) spreads 0.25 over four
    pixels; a ramp x[c] = (c + 1) / 10 shifted right by 0.5 is (c + 0.5) / 10, with 0.05 at the left
    edge (half of the first pixel, half zero fill); left by 0.25, the last column is 0.75 x[27]."""
    dot = np.zeros((1, 28, 28, 1), "float32")
    dot[0, 10, 10] = 1.0
    out = batches.shift_images(dot, np.array([0.5]), np.array([0.5]))
    want = np.zeros_like(dot)
    want[0, 10:12, 10:12] = 0.25
    np.testing.assert_allclose(out, want, atol=1e-7)

    ramp = np.tile((np.arange(28, dtype="float32") + 1) / 10, (2, 28, 1))[..., None]  # [2, 28, 28, 1]
    out = batches.shift_images(ramp, np.array([0.0, 0.0]), np.array([0.5, -0.25]))
    right = np.array([0.05] + [(c + 0.5) / 10 for c in range(1, 28)])
    np.testing.assert_allclose(out[0, :, :, 0], np.tile(right, (28, 1)), atol=1e-6)
    left = np.array([(c + 1.25) / 10 for c in range(27)] + [0.75 * 2.8])
    np.testing.assert_allclose(out[1, :, :, 0], np.tile(left, (28, 1)), atol=1e-6)


def marked_images(n: int, rows: int = 28, cols: int = 40, seed: int = 0) -> np.ndarray:
    """`[n, rows, cols, 2]`: channel 0 random content, channel 1 a unit pixel at the centre, whose
    centre of mass after a bilinear shift is the centre plus the shift."""
    x = np.zeros((n, rows, cols, 2), "float32")
    x[..., 0] = np.random.default_rng(seed).uniform(size=(n, rows, cols))
    x[:, rows // 2, cols // 2, 1] = 1.0
    return x


def offsets_of(xb: np.ndarray) -> np.ndarray:
    """Each image's shift `[n, 2]` (rows, cols), read from the centre of mass of its marker."""
    marker = xb[..., 1].astype(np.float64)
    mass = marker.sum(axis=(1, 2))
    np.testing.assert_allclose(mass, 1.0, atol=1e-5)  # moved whole, nothing left the image
    rows = (marker.sum(axis=2) * np.arange(marker.shape[1])).sum(axis=1) / mass
    cols = (marker.sum(axis=1) * np.arange(marker.shape[2])).sum(axis=1) / mass
    return np.stack([rows - marker.shape[1] // 2, cols - marker.shape[2] // 2], axis=1)


def test_training_batches_are_the_ordered_images_shifted_within_the_fraction() -> None:
    """Each batch holds `x[order]` (order from `batch_order`) with its labels, each image moved by at
    most shift_fraction x its height (rows) and x its width (cols), and equal to SciPy's bilinear,
    zero-filled shift of the original by that amount (an independent implementation)."""
    n, batch_size, fraction = 120, 40, 0.1
    x = marked_images(n)  # 28 x 40: shifts up to 2.8 rows and 4.0 columns
    y = np.eye(10, dtype="float32")[np.arange(n) % 10]
    order = batches.batch_order(n, batch_size, seed=3, epoch=2)
    made = list(batches.train_batches(x, y, batch_size, fraction, seed=3, epoch=2))
    assert len(made) == len(order) == n // batch_size
    offsets = []
    for indices, (xb, yb) in zip(order, made, strict=True):
        np.testing.assert_array_equal(yb, y[indices])
        shift = offsets_of(xb)
        offsets.append(shift)
        for image, original, (dr, dc) in zip(xb, x[indices], shift, strict=True):
            want = ndimage.shift(original[..., 0].astype(np.float64), (dr, dc), order=1,
                                 mode="grid-constant", cval=0.0, prefilter=False)
            np.testing.assert_allclose(image[..., 0], want, atol=1e-4)
    offsets = np.concatenate(offsets)
    assert np.abs(offsets[:, 0]).max() <= 0.1 * 28 + 1e-4
    assert np.abs(offsets[:, 1]).max() <= 0.1 * 40 + 1e-4
    # The whole range is used, each axis scaled by its own size (120 uniform draws per axis).
    assert np.abs(offsets[:, 0]).max() > 0.7 * 2.8 and np.abs(offsets[:, 1]).max() > 0.7 * 4.0
    assert np.abs(offsets[:, 1]).max() > 2.8  # columns use the width, not the height
    assert len(np.unique(np.round(offsets, 3), axis=0)) == n  # each image its own shift


def test_shifts_are_reproducible_from_seed_and_epoch() -> None:
    """The same `(seed, epoch)` gives identical batches; another epoch or another seed gives others."""
    x = marked_images(60)
    y = np.eye(10, dtype="float32")[np.arange(60) % 10]

    def epoch_of(seed: int, epoch: int) -> np.ndarray:
        return np.stack([xb for xb, _ in batches.train_batches(x, y, 20, 0.1, seed=seed, epoch=epoch)])

    first = epoch_of(5, 1)
    np.testing.assert_array_equal(epoch_of(5, 1), first)
    for other in (epoch_of(5, 2), epoch_of(6, 1)):
        assert np.abs(other - first).max() > 0.1
    # The shifts themselves change, not only the order: the same image gets another offset.
    x_same = np.repeat(x[:1], 60, axis=0)
    a = np.concatenate([xb for xb, _ in batches.train_batches(x_same, y, 20, 0.1, seed=5, epoch=1)])
    b = np.concatenate([xb for xb, _ in batches.train_batches(x_same, y, 20, 0.1, seed=5, epoch=2)])
    assert np.abs(offsets_of(a) - offsets_of(b)).max() > 0.1


def test_shift_fraction_0_gives_the_originals_in_batch_order() -> None:
    x = marked_images(50)
    y = np.eye(10, dtype="float32")[np.arange(50) % 10]
    order = batches.batch_order(50, 20, seed=9, epoch=4)
    assert order.shape == (2, 20)  # full batches only: 10 images are left out this epoch
    assert len(np.unique(order)) == 40 and order.min() >= 0 and order.max() < 50
    made = list(batches.train_batches(x, y, 20, 0.0, seed=9, epoch=4))
    assert len(made) == 2
    for indices, (xb, yb) in zip(order, made, strict=True):
        np.testing.assert_array_equal(xb, x[indices])
        np.testing.assert_array_equal(yb, y[indices])


@pytest.mark.slow
def test_the_command_line_flags_reach_the_batches(runs: dict[str, Run]) -> None:
    """--batch_size, --shift_fraction and --seed are what the training batches are made with, one
    call per epoch in order."""
    def call(shift_fraction: float, epoch: int) -> dict:
        return {"n": N_TRAIN, "batch_size": BATCH, "shift_fraction": shift_fraction, "seed": SEED,
                "epoch": epoch}

    assert runs["decay_05"].batch_calls == [call(0.2, epoch) for epoch in range(3)]
    assert runs["no_recon"].batch_calls == [call(0.0, 0)]


def test_stack_batches_groups_k_batches_along_a_new_first_axis() -> None:
    """7 batches of (x [2, 1], y [2]) in groups of 3: shapes [3, 2, 1], [3, 2, 1], [1, 2, 1]; batch i
    holds the value i, so each group's content is known by hand."""
    batches = [(np.full((2, 1), i, dtype="float32"), np.full(2, 10 + i)) for i in range(7)]
    groups = list(training.stack_batches(iter(batches), 3))
    assert [g[0].shape for g in groups] == [(3, 2, 1), (3, 2, 1), (1, 2, 1)]
    assert [g[1].shape for g in groups] == [(3, 2), (3, 2), (1, 2)]
    assert [g[0][:, 0, 0].tolist() for g in groups] == [[0, 1, 2], [3, 4, 5], [6]]
    assert [g[1][:, 1].tolist() for g in groups] == [[10, 11, 12], [13, 14, 15], [16]]
    assert [g[0].shape[0] for g in training.stack_batches(iter(batches[:6]), 3)] == [3, 3]


def test_steps_per_execution_must_be_positive(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert capsulenet.main(["--steps_per_execution", "0", "--save_dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err == "error: --steps_per_execution 0: must be >= 1\n"
