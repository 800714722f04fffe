"""The CapsNet models: size and layer names, the forward pass against the NumPy reference, weight
sharing, saving and loading (`.keras` in safe mode, `.weights.h5`, legacy Keras-2 `.h5`), the
latent manipulation and the image grids."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import zipfile
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest
import reference as ref
from conftest import child_env, describe, run_script
from PIL import Image

import capsulenet
from capsnet import evaluation, plots, saving
from capsnet.errors import UserError

INPUT_SHAPE = (28, 28, 1)
WEIGHTED_LAYERS = ("conv1", "primarycap_conv2d", "digitcaps", "decoder")
PERTURBATIONS = [-0.25, -0.2, -0.15, -0.1, -0.05, 0.0, 0.05, 0.1, 0.15, 0.2, 0.25]

Models = tuple[keras.Model, keras.Model, keras.Model]


def build(n_class: int = 10, seed: int = 0) -> Models:
    """`(train, eval, manipulate)` for MNIST-sized images, seeded."""
    keras.utils.set_random_seed(seed)
    return capsulenet.CapsNet(INPUT_SHAPE, n_class, 3)


# Standard deviations that give capsules of length ~0.1..1 on [0, 1] images, where routing and
# masking matter (a glorot-initialised model's capsules are ~1e-6 long).
WEIGHT_SCALES = {"conv1": 0.1, "primarycap_conv2d": 0.02, "digitcaps": 0.05, "decoder": 0.05}


def randomize(model: keras.Model, seed: int) -> None:
    """Sets every weight (biases included, so that loading them is checked too) to Gaussian noise."""
    rng = np.random.default_rng(seed)
    for name, scale in WEIGHT_SCALES.items():
        layer = model.get_layer(name)
        layer.set_weights([(rng.normal(size=w.shape) * (scale if w.ndim > 1 else 0.01))
                           .astype("float32") for w in layer.get_weights()])


@pytest.fixture(scope="module")
def models() -> Models:
    """One MNIST CapsNet with random weights at a scale where routing is visible."""
    train_model, eval_model, manipulate_model = build(seed=1)
    randomize(train_model, seed=1)
    return train_model, eval_model, manipulate_model


def images(n: int, seed: int = 0) -> np.ndarray:
    """Random images in [0, 1], `[n, 28, 28, 1]`."""
    return np.random.default_rng(seed).uniform(size=(n, *INPUT_SHAPE)).astype("float32")


def one_hot(labels: Any, n_class: int = 10) -> np.ndarray:
    return np.eye(n_class, dtype="float32")[np.asarray(labels)]


def layer_weights(model: keras.Model) -> dict[str, list[np.ndarray]]:
    """The weights of the layers that have some, by layer name."""
    return {name: [np.asarray(w) for w in model.get_layer(name).get_weights()]
            for name in WEIGHTED_LAYERS}


def assert_same_weights(got: dict[str, list[np.ndarray]], want: dict[str, list[np.ndarray]]
                        ) -> None:
    assert got.keys() == want.keys()
    for name in want:
        assert len(got[name]) == len(want[name]), name
        for a, b in zip(got[name], want[name], strict=True):
            np.testing.assert_array_equal(a, b, err_msg=name)


def assert_different_weights(a: dict[str, list[np.ndarray]], b: dict[str, list[np.ndarray]]
                             ) -> None:
    """Guards the loading tests: the target starts with other weights than the file's."""
    for name in a:
        for x, y in zip(a[name], b[name], strict=True):
            assert x.shape != y.shape or not np.allclose(x, y), name


# ---------------------------------------------------------------------------------------------
# Structure
# ---------------------------------------------------------------------------------------------


def test_parameter_counts_and_layer_names(models: Models) -> None:
    train_model, eval_model, manipulate_model = models
    # conv1 9*9*1*256 + 256; primary 9*9*256*256 + 256; W 10*1152*16*8;
    # decoder 160*512+512 + 512*1024+1024 + 1024*784+784.
    expected = {"conv1": 20_992, "primarycap_conv2d": 5_308_672, "digitcaps": 1_474_560,
                "decoder": 1_411_344}
    for name, count in expected.items():
        assert train_model.get_layer(name).count_params() == count, name
    assert train_model.count_params() == 8_215_568
    assert eval_model.count_params() == 8_215_568
    assert manipulate_model.count_params() == 8_215_568
    assert train_model.count_params() - expected["decoder"] == 6_804_224
    for name in ("conv1", "primarycap_conv2d", "digitcaps", "capsnet", "decoder"):
        train_model.get_layer(name)
    train_model.get_layer("decoder").get_layer("out_recon")
    assert train_model.get_layer("digitcaps").W.shape == (10, 1152, 16, 8)


def test_model_io_shapes_have_no_fixed_batch(models: Models) -> None:
    train_model, eval_model, manipulate_model = models
    assert [tuple(t.shape) for t in train_model.inputs] == [(None, 28, 28, 1), (None, 10)]
    assert [tuple(t.shape) for t in train_model.outputs] == [(None, 10), (None, 28, 28, 1)]
    assert [tuple(t.shape) for t in eval_model.outputs] == [(None, 10), (None, 28, 28, 1)]
    assert [tuple(t.shape) for t in manipulate_model.inputs][2] == (None, 10, 16)


def test_forward_pass_matches_reference(models: Models) -> None:
    """primary capsules = squash(conv reshaped to [1152, 8]); digitcaps = Procedure 1 with 3
    routings; capsnet = lengths; train/eval reconstructions = decoder(mask by label / longest)."""
    train_model, eval_model, _ = models
    x = images(2, seed=2)
    y = one_hot([3, 8])
    probe = keras.Model(train_model.inputs, [train_model.get_layer(n).output for n in
                                             ("primarycap_conv2d", "primarycap_squash",
                                              "digitcaps", "capsnet")])
    conv, primary, digitcaps, lengths = (np.asarray(t) for t in probe([x, y]))
    np.testing.assert_allclose(primary, ref.squash(conv.reshape(2, 1152, 8)), rtol=1e-4, atol=1e-6)
    w = train_model.get_layer("digitcaps").get_weights()[0]
    want_caps = ref.capsule_layer(w, primary, 3)
    np.testing.assert_allclose(digitcaps, want_caps, rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(lengths, ref.length(want_caps), rtol=1e-3, atol=1e-5)
    assert ref.length(want_caps).max() > 0.05  # a scale where routing and masking matter
    decoder = train_model.get_layer("decoder")

    def decode(masked: np.ndarray) -> np.ndarray:
        return np.asarray(decoder(masked.astype("float32")))

    np.testing.assert_allclose(np.asarray(train_model([x, y])[1]),
                               decode(ref.mask_by_label(digitcaps, y)), atol=1e-5)
    np.testing.assert_allclose(np.asarray(eval_model(x)[1]),
                               decode(ref.mask_by_length(digitcaps)), atol=1e-5)


def test_eval_and_manipulate_models_share_weights(models: Models) -> None:
    train_model, eval_model, manipulate_model = models
    for name in WEIGHTED_LAYERS:
        assert eval_model.get_layer(name) is train_model.get_layer(name)
        assert manipulate_model.get_layer(name) is train_model.get_layer(name)
    x = images(3, seed=3)
    y = one_hot([1, 5, 9])
    lengths, recon = (np.asarray(t) for t in train_model([x, y]))
    np.testing.assert_allclose(np.asarray(eval_model(x)[0]), lengths, rtol=1e-5, atol=1e-7)
    zero_noise = np.zeros((3, 10, 16), dtype="float32")
    np.testing.assert_allclose(np.asarray(manipulate_model([x, y, zero_noise])), recon, atol=1e-6)
    # With noise: decoder(mask_by_label(digitcaps + noise, y)).
    noise = np.random.default_rng(3).normal(size=(3, 10, 16)).astype("float32") * 0.1
    digitcaps = np.asarray(keras.Model(train_model.inputs[0],
                                       train_model.get_layer("digitcaps").output)(x))
    want = train_model.get_layer("decoder")(
        ref.mask_by_label(digitcaps + noise, y).astype("float32"))
    np.testing.assert_allclose(np.asarray(manipulate_model([x, y, noise])), np.asarray(want),
                               atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Saving and loading
# ---------------------------------------------------------------------------------------------


def test_keras_file_reloads_in_safe_mode_with_identical_outputs(models: Models,
                                                                 tmp_path: Path) -> None:
    _, eval_model, _ = models
    path = tmp_path / "model.keras"
    saving.save_model(eval_model, path)
    with zipfile.ZipFile(path) as archive:
        config = json.loads(archive.read("config.json"))
    assert "Lambda" not in json.dumps(config)
    loaded = keras.saving.load_model(path, safe_mode=True)
    for batch in (1, 5):
        x = images(batch, seed=batch)
        for got, want in zip(loaded.predict(x, verbose=0), eval_model.predict(x, verbose=0),
                             strict=True):
            np.testing.assert_array_equal(got, want)


def test_load_weights_from_weights_h5(models: Models, tmp_path: Path) -> None:
    _, eval_model, _ = models
    path = tmp_path / "w.weights.h5"
    saving.save_weights(eval_model, path)  # the CLI saves the eval model's weights
    target, _, _ = build(seed=7)
    assert_different_weights(layer_weights(target), layer_weights(eval_model))
    assert saving.load_weights(target, str(path)) == str(path)
    assert_same_weights(layer_weights(target), layer_weights(eval_model))


def test_load_weights_from_keras_file(models: Models, tmp_path: Path) -> None:
    _, eval_model, _ = models
    path = tmp_path / "m.keras"
    saving.save_model(eval_model, path)
    target, _, _ = build(seed=8)
    saving.load_weights(target, str(path))
    assert_same_weights(layer_weights(target), layer_weights(eval_model))


def test_legacy_name_falls_back_to_weights_h5(models: Models, tmp_path: Path) -> None:
    """`-w result/trained_model.h5` (the original's name) loads `trained_model.weights.h5`."""
    _, eval_model, _ = models
    saving.save_weights(eval_model, tmp_path / "trained_model.weights.h5")
    target, _, _ = build(seed=9)
    loaded = saving.load_weights(target, str(tmp_path / "trained_model.h5"))
    assert loaded == str(tmp_path / "trained_model.weights.h5")
    assert_same_weights(layer_weights(target), layer_weights(eval_model))


def test_missing_weights_file_is_a_user_error(models: Models, tmp_path: Path) -> None:
    with pytest.raises(UserError):
        saving.load_weights(models[0], str(tmp_path / "nothing.h5"))


@pytest.fixture(scope="module")
def keras2_files(small_npz: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real Keras-2 files: `tests/keras2_writer.py` run under legacy Keras (`tf_keras` with
    `TF_USE_LEGACY_KERAS=1`, in a child process) writes `x.h5` (`save_weights`), `full.h5` (`save`) and
    `five.h5` (5 classes) of the original model with long capsules, its own predictions on
    `small_npz`'s test images (`predictions.npz`) and a relabelled copy of the data (`relabelled.npz`)."""
    if importlib.util.find_spec("tf_keras") is None:
        missing = "tf_keras is not installed (pip install -r requirements/dev.txt)"
        if os.environ.get("CI"):
            pytest.fail(missing)
        pytest.skip(missing)
    out = tmp_path_factory.mktemp("keras2")
    result = run_script("tests/keras2_writer.py", str(small_npz), str(out),
                        env=child_env(TF_USE_LEGACY_KERAS="1"), timeout=300)
    assert result.returncode == 0, describe(result)
    return out


def images_in(npz: Path) -> np.ndarray:
    """The test images of a keras-layout `.npz` as the model takes them: `[n, 28, 28, 1]` in [0, 1]."""
    with np.load(npz) as f:
        return f["x_test"][..., None].astype("float32") / 255


@pytest.mark.slow
@pytest.mark.parametrize("name", ["x.h5", "full.h5"], ids=["save_weights", "model_save"])
def test_real_keras2_file_predicts_as_legacy_keras(keras2_files: Path, small_npz: Path, name: str) -> None:
    """A file legacy Keras wrote (`save_weights` or `save`) loads by topology into this model, whose
    capsule lengths and reconstructions then equal legacy Keras' own predictions on the same images,
    at a scale where the encoder, routing and masking all show (capsules ~0.1-1 long)."""
    want = np.load(keras2_files / "predictions.npz")
    assert np.median(want["lengths"].max(axis=1)) > 0.1
    target, eval_model, _ = build(seed=12)
    saving.load_weights(target, str(keras2_files / name))
    lengths, recon = eval_model.predict(images_in(small_npz), batch_size=50, verbose=0)
    np.testing.assert_allclose(lengths, want["lengths"], atol=1e-5)
    np.testing.assert_allclose(recon, want["recon"], atol=1e-5)


@pytest.mark.slow
def test_cli_tests_a_keras2_file_to_the_accuracy_legacy_keras_computed(keras2_files: Path,
                                                                       tmp_path: Path) -> None:
    """`capsulenet.py -t -w x.h5` prints the accuracy legacy Keras computed on the same test set (the
    writer labelled it so that only the same predictions give 37%), and its `real_and_recon.png`
    shows legacy Keras' own reconstructions of the first 50 test images, to the 8-bit rounding (an
    accuracy on 100 images alone stayed the same with two layers' biases swapped on loading)."""
    want = np.load(keras2_files / "predictions.npz")
    result = run_script("capsulenet.py", "-t", "-w", str(keras2_files / "x.h5"),
                        "--dataset", str(keras2_files / "relabelled.npz"), "--save_dir", str(tmp_path),
                        "--digit", str(int(want["y_test"][0])))
    assert result.returncode == 0, describe(result)
    assert f"Test acc: {float(want['accuracy']):.4f}" in result.stdout.splitlines(), describe(result)
    assert float(want["accuracy"]) == pytest.approx(0.37)
    with Image.open(tmp_path / "real_and_recon.png") as image:  # 10x10 tiles; the bottom 5 rows
        tiles = np.asarray(image, dtype=np.float64).reshape(10, 28, 10, 28).transpose(0, 2, 1, 3)
    recon = tiles.reshape(100, 28, 28)[50:] / 255
    assert np.ptp(want["recon"][:50]) > 10 / 255  # reconstructions with something to compare
    # Rounded to the nearest of 256 levels: within half a level of legacy Keras' float32 values.
    np.testing.assert_allclose(recon, want["recon"][:50, ..., 0], rtol=0, atol=0.5 / 255 + 1e-5)


@pytest.mark.slow
def test_keras2_file_for_another_class_count_is_a_user_error(keras2_files: Path) -> None:
    """A 5-class legacy file is refused in the README's words: the layer, the shape it needs, the shape
    the file holds."""
    target, _, _ = build(seed=14)
    with pytest.raises(UserError, match=re.escape("layer digitcaps needs weights of shape (10, 1152, 16, 8), "
                                                  "the file holds (5, 1152, 16, 8)")):
        saving.load_weights(target, str(keras2_files / "five.h5"))


def test_weights_h5_for_another_class_count_is_a_user_error(tmp_path: Path) -> None:
    _, five_eval, _ = build(n_class=5, seed=15)
    path = tmp_path / "five.weights.h5"
    saving.save_weights(five_eval, path)
    target, _, _ = build(seed=16)
    with pytest.raises(UserError):
        saving.load_weights(target, str(path))


# ---------------------------------------------------------------------------------------------
# Manipulation of the latent capsule
# ---------------------------------------------------------------------------------------------


def two_fives() -> tuple[np.ndarray, np.ndarray]:
    """A test set of 12 samples in which class 5 has exactly two samples (indices 3 and 7)."""
    labels = np.array([0, 1, 2, 5, 3, 4, 6, 5, 7, 8, 9, 0])
    x = np.stack([np.full(INPUT_SHAPE, i / 12, dtype="float32") for i in range(12)])
    return x, one_hot(labels)


def test_perturbation_grid_rows_are_dimensions_and_columns_shifts() -> None:
    noise = evaluation.perturbation_grid(10)
    assert noise.shape == (176, 10, 16)
    for dim in range(16):
        for col, shift in enumerate(PERTURBATIONS):
            row = noise[dim * 11 + col]
            np.testing.assert_allclose(row[:, dim], shift, atol=1e-6)
            np.testing.assert_array_equal(np.delete(row, dim, axis=1), 0.0)


@pytest.mark.parametrize("seeded", [True, False])
def test_manipulation_can_pick_every_sample_of_the_digit(seeded: bool) -> None:
    _, y = two_fives()
    rng = np.random.default_rng(1) if seeded else None
    # Both of two samples appear in 40 draws with probability 1 - 2**-39.
    picked = {evaluation.pick_sample(y, 5, rng) for _ in range(40)}
    assert picked == {3, 7}


def test_manipulation_of_an_absent_digit_is_a_user_error(tmp_path: Path) -> None:
    x, _ = two_fives()
    with pytest.raises(UserError):
        capsulenet.manipulate_latent(None, (x, one_hot(np.zeros(12, int))), digit=5, save_dir=tmp_path)


def test_manipulation_equals_the_manipulate_model_on_176_copies(models: Models, tmp_path: Path) -> None:
    """Encoding once and decoding 176 masked capsules gives what the original's manipulate model
    gives for 176 copies of the sample, and the PNG tiles them rows = dimensions."""
    _, _, manipulate_model = models
    x, y = images(4, seed=21), one_hot([1, 5, 2, 3])
    recons = capsulenet.manipulate_latent(manipulate_model, (x, y), digit=5, save_dir=tmp_path)
    copies = [np.repeat(x[1:2], 176, 0), np.repeat(y[1:2], 176, 0), evaluation.perturbation_grid(10)]
    want = np.asarray(manipulate_model(copies))
    np.testing.assert_allclose(recons, want, atol=1e-5)
    image = Image.open(tmp_path / "manipulate-5.png")
    assert image.size == (308, 448) and image.mode == "L"
    pixels = np.asarray(image, dtype=float)
    for dim in (0, 7, 15):
        for col in (0, 5, 10):
            tile = pixels[dim * 28 : (dim + 1) * 28, col * 28 : (col + 1) * 28]
            np.testing.assert_allclose(tile, want[dim * 11 + col, ..., 0] * 255, atol=1.0)


def test_manipulation_with_the_real_model(models: Models, tmp_path: Path) -> None:
    _, _, manipulate_model = models
    x = images(4, seed=20)
    recons = capsulenet.manipulate_latent(manipulate_model, (x, one_hot([5, 1, 2, 3])), digit=5,
                                          save_dir=tmp_path)
    assert recons.shape == (176, *INPUT_SHAPE)
    zero_shift = recons[5::11]  # column 5 adds 0.0: every row is the plain reconstruction
    np.testing.assert_allclose(zero_shift, np.broadcast_to(zero_shift[0], zero_shift.shape),
                               atol=1e-6)
    assert np.abs(recons[0] - recons[10]).max() > 1e-4  # -0.25 and +0.25 on dimension 0 differ
    assert Image.open(tmp_path / "manipulate-5.png").size == (308, 448)


# ---------------------------------------------------------------------------------------------
# Test function and images
# ---------------------------------------------------------------------------------------------


def test_test_reports_accuracy_and_saves_real_and_recon(models: Models, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    _, eval_model, _ = models
    x = np.round(images(60, seed=30) * 255) / 255
    y = one_hot(np.arange(60) % 10)
    lengths, recon = eval_model.predict(x, verbose=0)
    want = float(np.mean(np.argmax(lengths, 1) == np.arange(60) % 10))
    assert capsulenet.test(eval_model, (x, y), batch_size=25, save_dir=tmp_path) == pytest.approx(want)
    assert f"Test acc: {want:.4f}" in capsys.readouterr().out
    image = Image.open(tmp_path / "real_and_recon.png")
    assert image.size == (280, 280) and image.mode == "L"
    pixels = np.asarray(image, dtype=float) / 255
    tiles = pixels.reshape(10, 28, 10, 28).transpose(0, 2, 1, 3).reshape(100, 28, 28)
    np.testing.assert_allclose(tiles[:50], x[:50, ..., 0], atol=0.5 / 255 + 1e-6)
    np.testing.assert_allclose(tiles[50:], recon[:50, ..., 0], atol=1 / 255)


@pytest.mark.parametrize(
    ("count", "height", "shape"),
    [(100, None, (280, 280)), (176, 16, (448, 308)), (7, None, (112, 56)), (4, None, (56, 56))],
)
def test_combine_images_tiles_row_by_row(count: int, height: int | None,
                                         shape: tuple[int, int]) -> None:
    stack = np.random.default_rng(count).uniform(size=(count, 28, 28, 1)).astype("float32")
    grid = plots.combine_images(stack, height=height)
    assert grid.shape == shape
    width = shape[1] // 28
    for k in range(count):
        row, col = divmod(k, width)
        np.testing.assert_array_equal(grid[row * 28 : (row + 1) * 28, col * 28 : (col + 1) * 28],
                                      stack[k, ..., 0])


def test_save_image_writes_8_bit_grayscale(tmp_path: Path) -> None:
    image = np.tile(np.linspace(0, 1, 308, dtype="float32"), (448, 1))
    path = tmp_path / "grid.png"
    plots.save_image(image, path)
    saved = Image.open(path)
    assert saved.format == "PNG" and saved.mode == "L" and saved.size == (308, 448)
    pixels = np.asarray(saved, dtype=float)
    assert pixels.min() == 0 and pixels.max() == 255
    np.testing.assert_allclose(pixels, image * 255, atol=1.0)
