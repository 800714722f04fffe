"""The CapsNet models: size and layer names, the forward pass against the NumPy reference, weight
sharing, saving and loading (`.keras` in safe mode, `.weights.h5`, legacy Keras-2 `.h5`), the
latent manipulation and the image grids."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import h5py
import keras
import numpy as np
import pytest
import reference as ref
from PIL import Image

import capsulenet
import saving
import utils
from errors import UserError

INPUT_SHAPE = (28, 28, 1)
WEIGHTED_LAYERS = ("conv1", "primarycap_conv2d", "digitcaps", "decoder")
# Layer order of the original Keras-2 train model (model.layers), weightless layers included.
LEGACY_LAYER_NAMES = ("input_1", "conv1", "primarycap_conv2d", "primarycap_reshape",
                      "primarycap_squash", "digitcaps", "input_2", "mask_1", "capsnet", "decoder")
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


def legacy_weights(n_class: int, seed: int) -> dict[str, list[tuple[str, np.ndarray]]]:
    """Random weights named as Keras 2.0.7 named the original train model's variables."""
    rng = np.random.default_rng(seed)
    shapes = {
        "conv1": [("conv1/kernel:0", (9, 9, 1, 256)), ("conv1/bias:0", (256,))],
        "primarycap_conv2d": [("primarycap_conv2d/kernel:0", (9, 9, 256, 256)),
                              ("primarycap_conv2d/bias:0", (256,))],
        "digitcaps": [("digitcaps/W:0", (n_class, 1152, 16, 8))],
        "decoder": [("dense_1/kernel:0", (16 * n_class, 512)), ("dense_1/bias:0", (512,)),
                    ("dense_2/kernel:0", (512, 1024)), ("dense_2/bias:0", (1024,)),
                    ("dense_3/kernel:0", (1024, 784)), ("dense_3/bias:0", (784,))],
    }
    return {layer: [(name, (rng.standard_normal(shape, dtype=np.float32) * 0.05))
                    for name, shape in entries] for layer, entries in shapes.items()}


def write_legacy_h5(path: Path, weights: dict[str, list[tuple[str, np.ndarray]]],
                    full_model: bool = False) -> None:
    """Keras 2's `save_weights` HDF5 layout: root attrs `layer_names`, `backend`, `keras_version`;
    one group per layer (weightless ones too) with attr `weight_names` and one dataset per weight
    at `group/<weight name>`. `full_model` nests it under `model_weights`, as `model.save` did."""
    with h5py.File(path, "w") as f:
        root = f.create_group("model_weights") if full_model else f
        if full_model:
            f.attrs["keras_version"] = b"2.0.7"
            f.attrs["backend"] = b"tensorflow"
        root.attrs["layer_names"] = [name.encode("utf8") for name in LEGACY_LAYER_NAMES]
        root.attrs["backend"] = b"tensorflow"
        root.attrs["keras_version"] = b"2.0.7"
        for layer in LEGACY_LAYER_NAMES:
            group = root.create_group(layer)
            entries = weights.get(layer, [])
            group.attrs["weight_names"] = [name.encode("utf8") for name, _ in entries]
            for name, value in entries:
                group.create_dataset(name, data=value)


@pytest.mark.parametrize("full_model", [False, True], ids=["save_weights", "model_save"])
def test_load_legacy_keras2_h5(tmp_path: Path, full_model: bool) -> None:
    weights = legacy_weights(10, seed=11)
    path = tmp_path / "trained_model.h5"
    write_legacy_h5(path, weights, full_model=full_model)
    target, eval_model, _ = build(seed=12)
    saving.load_weights(target, str(path))
    want = {layer: [value for _, value in entries] for layer, entries in weights.items()}
    assert_same_weights(layer_weights(target), want)
    assert_same_weights(layer_weights(eval_model), want)


def test_legacy_h5_for_another_class_count_is_a_user_error(tmp_path: Path) -> None:
    path = tmp_path / "five_classes.h5"
    write_legacy_h5(path, legacy_weights(5, seed=13))
    target, _, _ = build(seed=14)
    with pytest.raises(UserError):
        saving.load_weights(target, str(path))


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
    noise = capsulenet.perturbation_grid(10)
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
    picked = {capsulenet.pick_sample(y, 5, rng) for _ in range(40)}
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
    copies = [np.repeat(x[1:2], 176, 0), np.repeat(y[1:2], 176, 0), capsulenet.perturbation_grid(10)]
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
    grid = utils.combine_images(stack, height=height)
    assert grid.shape == shape
    width = shape[1] // 28
    for k in range(count):
        row, col = divmod(k, width)
        np.testing.assert_array_equal(grid[row * 28 : (row + 1) * 28, col * 28 : (col + 1) * 28],
                                      stack[k, ..., 0])


def test_save_image_writes_8_bit_grayscale(tmp_path: Path) -> None:
    image = np.tile(np.linspace(0, 1, 308, dtype="float32"), (448, 1))
    path = tmp_path / "grid.png"
    utils.save_image(image, path)
    saved = Image.open(path)
    assert saved.format == "PNG" and saved.mode == "L" and saved.size == (308, 448)
    pixels = np.asarray(saved, dtype=float)
    assert pixels.min() == 0 and pixels.max() == 255
    np.testing.assert_allclose(pixels, image * 255, atol=1.0)
