"""The command line: flags and defaults, the two local data formats, and `python capsulenet.py` end
to end as a subprocess (train one epoch on a small local dataset, then test, as a user would); the
`--debug` event files; RGB 32x32 data and the refusal of images under 25x25; data without internet.

The subprocesses are few on purpose: each pays TensorFlow's start-up (5-10 s)."""

from __future__ import annotations

import contextlib
import io
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import h5py
import keras
import numpy as np
import pandas as pd
import pytest
from conftest import (
    RawData,
    assert_log_matches_saved_weights,
    child_env,
    describe,
    run_script,
    save_npz,
    synthetic_raw,
)
from PIL import Image

import capsulenet
from capsnet import datasets, saving

# Every flag of the original's command line (its README and code), with its default, and this port's.
DEFAULTS = {
    "epochs": 50, "batch_size": 100, "lr": 0.001, "lr_decay": 0.9, "lam_recon": 0.392,
    "routings": 3, "shift_fraction": 0.1, "debug": False, "save_dir": "./result",
    "testing": False, "digit": 5, "weights": None, "dataset": "mnist",
}
FLAGS = ("--epochs", "--batch_size", "--lr", "--lr_decay", "--lam_recon", "-r", "--routings",
         "--shift_fraction", "--debug", "--save_dir", "-t", "--testing", "--digit", "-w",
         "--weights", "--dataset")
TEST_ACC = re.compile(r"Test acc: (0\.\d{4})\b")
RANDOM_WEIGHTS = "No weights are provided. Will test using random initialized weights."


def expected_arrays(raw: RawData) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """What a loader must make of raw uint8 data: x/255 as `[n, 28, 28, 1]` float32, one-hot y."""
    (x_train, y_train), (x_test, y_test) = raw
    eye = np.eye(10, dtype="float32")
    return (x_train[..., None].astype("float32") / 255, eye[y_train],
            x_test[..., None].astype("float32") / 255, eye[y_test])


# ---------------------------------------------------------------------------------------------
# In-process checks (fast)
# ---------------------------------------------------------------------------------------------


def test_parser_keeps_every_original_flag_and_default() -> None:
    args = capsulenet.build_parser().parse_args([])
    assert {k: getattr(args, k) for k in DEFAULTS} == DEFAULTS
    short = capsulenet.build_parser().parse_args(["-r", "1", "-t", "-w", "x.h5"])
    assert (short.routings, short.testing, short.weights) == (1, True, "x.h5")


@pytest.mark.parametrize(("flags", "line"), [
    (["-r", "0"], "error: -r/--routings 0: must be >= 1"),
    (["--epochs", "0"], "error: --epochs 0: must be >= 1"),
    (["--lr", "-1"], "error: --lr -1.0: must be > 0"),
])
def test_bad_flags_exit_2_with_one_line(flags: list[str], line: str, tmp_path: Path,
                                        capsys: pytest.CaptureFixture) -> None:
    """The one line names the flag that was given, its value and its range, exactly."""
    code = capsulenet.main([*flags, "--save_dir", str(tmp_path)])
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines() == [line]


def test_debug_without_tensorboard_is_refused_up_front(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture) -> None:
    """`--debug` needs the tensorboard package; without it the run used to crash after training
    its first epoch."""
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # makes `import tensorboard` fail
    assert capsulenet.main(["--debug", "--save_dir", str(tmp_path)]) == 2
    assert "tensorboard" in capsys.readouterr().err


def test_both_local_loaders_give_the_same_data(small_raw: RawData, small_npz: Path,
                                               small_idx_dir: Path) -> None:
    want = expected_arrays(small_raw)
    for spec in (small_npz, small_idx_dir):
        (x_train, y_train), (x_test, y_test) = datasets.load_dataset(str(spec))
        for got, expected in zip((x_train, y_train, x_test, y_test), want, strict=True):
            assert got.dtype == np.float32
            np.testing.assert_array_equal(got, expected, err_msg=str(spec))


# ---------------------------------------------------------------------------------------------
# End to end (subprocesses)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(small_npz: Path, tmp_path_factory: pytest.TempPathFactory
            ) -> tuple[Path, subprocess.CompletedProcess]:
    """One epoch of training on the small `.npz`, with `--debug`."""
    save_dir = tmp_path_factory.mktemp("cli") / "result"  # not created yet: the CLI must make it
    result = run_script("capsulenet.py", "--epochs", "1", "--batch_size", "50", "--debug",
                        "--dataset", str(small_npz), "--save_dir", str(save_dir))
    return save_dir, result


@pytest.fixture(scope="module")
def tested(trained: tuple[Path, subprocess.CompletedProcess], small_idx_dir: Path
           ) -> subprocess.CompletedProcess:
    """`-t -w <dir>/trained_model.h5` (the original's file name) on the IDX copy of the data."""
    save_dir, result = trained
    assert result.returncode == 0, describe(result)
    return run_script("capsulenet.py", "-t", "-w", str(save_dir / "trained_model.h5"),
                      "--dataset", str(small_idx_dir), "--save_dir", str(save_dir))


def eval_model_from(save_dir: Path) -> keras.Model:
    """The eval model as saved in `trained_model.keras`, loaded safely."""
    return keras.saving.load_model(save_dir / "trained_model.keras", safe_mode=True)


def assert_valid_png(path: Path, size: tuple[int, int] | None = None) -> Image.Image:
    """Opens `path` as a PNG (fully decoded) and checks its size `(width, height)`."""
    with Image.open(path) as image:
        image.load()
    assert image.format == "PNG", path
    if size is not None:
        assert image.size == size, path
    return image


@pytest.mark.slow
def test_training_writes_every_output(trained: tuple[Path, subprocess.CompletedProcess], small_npz: Path
                                      ) -> None:
    save_dir, result = trained
    assert result.returncode == 0, describe(result)
    log = pd.read_csv(save_dir / "log.csv")
    for column in ("epoch", "loss", "capsnet_accuracy", "val_capsnet_accuracy", "learning_rate"):
        assert column in log.columns, list(log.columns)
    assert len(log) == 1 and log["epoch"][0] == 0
    assert log["learning_rate"][0] == pytest.approx(0.001)
    assert np.isfinite(log["loss"][0]) and log["loss"][0] > 0
    for column in ("capsnet_accuracy", "val_capsnet_accuracy"):
        assert 0 <= log[column][0] <= 1
    assert_log_matches_saved_weights(save_dir, small_npz, routings=3)
    assert_valid_png(save_dir / "log.png")
    events = [p for p in (save_dir / "tensorboard-logs").rglob("*") if "events" in p.name]
    assert events, "--debug wrote no TensorBoard event file"


@pytest.mark.slow
def test_training_weights_files_hold_the_trained_model(
        trained: tuple[Path, subprocess.CompletedProcess]) -> None:
    """After one epoch the best checkpoint, the final weights and the full model are the same."""
    save_dir, result = trained
    assert result.returncode == 0, describe(result)
    saved = eval_model_from(save_dir)
    for name in ("weights-01.weights.h5", "trained_model.weights.h5"):
        assert h5py.is_hdf5(save_dir / name), name
        keras.utils.set_random_seed(3)
        target, _, _ = capsulenet.CapsNet((28, 28, 1), 10, 3)
        saving.load_weights(target, str(save_dir / name))
        for layer in ("conv1", "primarycap_conv2d", "digitcaps", "decoder"):
            for got, want in zip(target.get_layer(layer).get_weights(),
                                 saved.get_layer(layer).get_weights(), strict=True):
                np.testing.assert_array_equal(got, want, err_msg=f"{name}: {layer}")


@pytest.mark.slow
def test_testing_prints_accuracy_and_writes_both_images(
        trained: tuple[Path, subprocess.CompletedProcess], tested: subprocess.CompletedProcess,
        small_raw: RawData) -> None:
    save_dir, _ = trained
    assert tested.returncode == 0, describe(tested)
    match = TEST_ACC.search(tested.stdout)
    assert match, describe(tested)
    # The printed accuracy is the trained model's, computed here independently.
    _, _, x_test, y_test = expected_arrays(small_raw)
    lengths, _ = eval_model_from(save_dir).predict(x_test, verbose=0)
    accuracy = np.mean(np.argmax(lengths, 1) == np.argmax(y_test, 1))
    assert float(match.group(1)) == pytest.approx(accuracy, abs=1e-4)
    recon = assert_valid_png(save_dir / "real_and_recon.png", (280, 280))
    assert recon.mode == "L"
    # Top five rows: the first 50 test images, in order.
    tiles = np.asarray(recon, dtype=float).reshape(10, 28, 10, 28).transpose(0, 2, 1, 3)
    np.testing.assert_allclose(tiles.reshape(100, 28, 28)[:50] / 255, x_test[:50, ..., 0],
                               atol=0.5 / 255 + 1e-6)
    manipulated = assert_valid_png(save_dir / "manipulate-5.png", (308, 448))
    assert manipulated.mode == "L"


@pytest.mark.slow
def test_testing_without_weights_warns_and_runs(small_npz: Path, tmp_path: Path) -> None:
    result = run_script("capsulenet.py", "-t", "--dataset", str(small_npz), "--save_dir", str(tmp_path))
    assert result.returncode == 0, describe(result)
    assert RANDOM_WEIGHTS in result.stdout.splitlines(), describe(result)
    assert TEST_ACC.search(result.stdout), describe(result)
    assert_valid_png(tmp_path / "real_and_recon.png", (280, 280))
    assert_valid_png(tmp_path / "manipulate-5.png", (308, 448))


@pytest.mark.slow
def test_help_lists_every_flag() -> None:
    result = run_script("capsulenet.py", "-h", timeout=120)
    assert result.returncode == 0, describe(result)
    listed = set(re.findall(r"(?<![\w-])(--?[a-z_]+)", result.stdout))
    missing = [flag for flag in FLAGS if flag not in listed]
    assert not missing, result.stdout


# ---------------------------------------------------------------------------------------------
# --debug: TensorBoard events
# ---------------------------------------------------------------------------------------------


def read_events(folder: Path) -> tuple[dict[str, list[tuple[int, float]]], dict[str, list[Any]]]:
    """Every scalar and histogram in the TensorBoard event files under `folder`, read with TensorBoard's
    own reader: `{tag: [(step, value)]}` and `{tag: [(step, (min, max, num))]}`. Both the classic
    summaries (`simple_value`, `histo`) and TensorFlow 2's tensor summaries are understood, so the test
    holds whichever writer made the files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    scalars: dict[str, list[tuple[int, float]]] = {}
    histograms: dict[str, list[Any]] = {}
    files = sorted(p for p in folder.rglob("*") if p.is_file() and "tfevents" in p.name)
    for path in files:
        events = EventAccumulator(str(path), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
        events.Reload()
        tags = events.Tags()
        for tag in tags.get("scalars", []):
            scalars.setdefault(tag, []).extend((e.step, float(e.value)) for e in events.Scalars(tag))
        for tag in tags.get("histograms", []):
            histograms.setdefault(tag, []).extend(
                (e.step, (e.histogram_value.min, e.histogram_value.max, e.histogram_value.num))
                for e in events.Histograms(tag))
        for tag in tags.get("tensors", []):
            plugin = events.SummaryMetadata(tag).plugin_data.plugin_name
            for e in events.Tensors(tag):
                value = tensor_util.make_ndarray(e.tensor_proto)
                if plugin == "scalars":
                    scalars.setdefault(tag, []).append((e.step, float(value)))
                elif plugin == "histograms":  # [k, 3]: left edge, right edge, count
                    summary = (float(value[:, 0].min()), float(value[:, 1].max()), float(value[:, 2].sum()))
                    histograms.setdefault(tag, []).append((e.step, summary))
    return scalars, histograms


@pytest.mark.slow
def test_debug_events_hold_the_logged_scalars_and_weight_histograms(
        trained: tuple[Path, subprocess.CompletedProcess]) -> None:
    """`--debug` (the `trained` fixture): TensorBoard's reader finds, at step 0, every value of the
    epoch's log.csv row, and a histogram of conv1's kernel whose count, min and max are those of the
    trained kernel in trained_model.keras (one epoch: the final weights are the epoch's)."""
    save_dir, result = trained
    assert result.returncode == 0, describe(result)
    scalars, histograms = read_events(save_dir / "tensorboard-logs")
    row = pd.read_csv(save_dir / "log.csv").iloc[0]
    assert {"loss", "val_capsnet_accuracy", "learning_rate"} <= set(row.index)
    for column in row.index.drop("epoch"):
        assert column in scalars, sorted(scalars)
        assert len(scalars[column]) == 1, scalars[column]
        step, value = scalars[column][0]
        assert step == 0
        assert value == pytest.approx(row[column], rel=1e-6, abs=1e-7), column
    kernel = eval_model_from(save_dir).get_layer("conv1").get_weights()[0]
    found = [h for series in histograms.values() for step, h in series if step == 0 and h[2] == kernel.size]
    assert found, f"no histogram of {kernel.size} values (conv1's kernel) among {sorted(histograms)}"
    assert any(lo == pytest.approx(kernel.min(), abs=1e-6) and hi == pytest.approx(kernel.max(), abs=1e-6)
               for lo, hi, _ in found), (found, kernel.min(), kernel.max())


# ---------------------------------------------------------------------------------------------
# Other image sizes and colour
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rgb_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """32x32 RGB data through `capsulenet.main` (the command line, in this process to spare
    TensorFlow's start-up): one epoch of 2 steps, then `-t -w trained_model.weights.h5`."""
    folder = tmp_path_factory.mktemp("rgb")
    raw = synthetic_raw(40, 50, size=32, channels=3, seed=5)
    npz = save_npz(folder / "rgb.npz", raw)
    save_dir = folder / "result"
    common = ["-r", "1", "--dataset", str(npz), "--save_dir", str(save_dir)]
    train_code = capsulenet.main(["--epochs", "1", "--batch_size", "20", "--seed", "2", *common])
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        test_code = capsulenet.main(["-t", "-w", str(save_dir / "trained_model.weights.h5"),
                                     "--batch_size", "25", *common])
    return {"raw": raw, "save_dir": save_dir, "train_code": train_code, "test_code": test_code,
            "stdout": stdout.getvalue()}


@pytest.mark.slow
def test_rgb_32x32_trains_and_tests(rgb_run: dict[str, Any]) -> None:
    """Training and testing on 32x32x3 images: `real_and_recon.png` is 10x10 RGB tiles of 32x32
    (320x320), the first 50 test images on top and the model's reconstructions below;
    `manipulate-5.png` is 16x11 RGB tiles (352x512)."""
    assert rgb_run["train_code"] == 0 and rgb_run["test_code"] == 0, rgb_run["stdout"][-3000:]
    save_dir = rgb_run["save_dir"]
    assert TEST_ACC.search(rgb_run["stdout"]), rgb_run["stdout"][-3000:]
    image = assert_valid_png(save_dir / "real_and_recon.png", (320, 320))
    assert image.mode == "RGB"
    (_, _), (x_test, _) = rgb_run["raw"]
    tiles = np.asarray(image, dtype=float).reshape(10, 32, 10, 32, 3).transpose(0, 2, 1, 3, 4)
    tiles = tiles.reshape(100, 32, 32, 3) / 255
    np.testing.assert_allclose(tiles[:50], x_test[:50] / 255, atol=0.5 / 255 + 1e-6)
    model = eval_model_from(save_dir)
    assert tuple(model.inputs[0].shape) == (None, 32, 32, 3)
    _, recon = model.predict(x_test[:50].astype("float32") / 255, verbose=0)
    np.testing.assert_allclose(tiles[50:], recon, atol=1 / 255 + 1e-6)
    manipulated = assert_valid_png(save_dir / "manipulate-5.png", (352, 512))
    assert manipulated.mode == "RGB"


def test_images_smaller_than_25x25_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    npz = save_npz(tmp_path / "small.npz", synthetic_raw(40, 20, size=24))
    code = capsulenet.main(["--batch_size", "20", "--dataset", str(npz),
                            "--save_dir", str(tmp_path / "result")])
    assert code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: --dataset {npz}: "), lines
    assert "(24, 24)" in lines[0] and "need at least 25x25" in lines[0], lines


# ---------------------------------------------------------------------------------------------
# Without internet
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_offline_mnist_is_one_line_naming_dataset_path(tmp_path: Path) -> None:
    """No cached MNIST (an empty KERAS_HOME) and every download through a proxy that refuses
    connections (port 9, discard, is closed): exit 2 and one `error:` line that says to pass local data
    with `--dataset PATH`."""
    dead = "http://127.0.0.1:9"
    env = child_env(KERAS_HOME=str(tmp_path / "keras-home"), HTTPS_PROXY=dead, HTTP_PROXY=dead,
                    https_proxy=dead, http_proxy=dead, NO_PROXY="", no_proxy="")
    result = run_script("capsulenet.py", "--dataset", "mnist", "--save_dir", str(tmp_path / "result"),
                        env=env, timeout=300)
    assert result.returncode == 2, describe(result)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, describe(result)
    assert lines[0].startswith("error: could not load mnist through keras.datasets ("), lines[0]
    assert "without internet pass local data with --dataset PATH" in lines[0], lines[0]
    assert "Traceback" not in result.stdout


def test_fashion_mnist_falls_back_to_the_debian_files(fashion_raw: RawData,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """When the download fails, `--dataset fashion_mnist` reads Debian's files: the arrays equal the
    IDX files as conftest's own reader decodes them (x/255, one-hot labels)."""
    import keras

    def offline() -> None:
        raise Exception("URL fetch failure: no internet in this test")  # what keras raises

    monkeypatch.setattr(keras.datasets.fashion_mnist, "load_data", offline)
    (x_train, y_train), (x_test, y_test) = fashion_raw
    (got_x_train, got_y_train), (got_x_test, got_y_test) = datasets.load_labelled_dataset("fashion_mnist")[0]
    eye = np.eye(10, dtype="float32")
    np.testing.assert_array_equal(got_y_train, eye[y_train])
    np.testing.assert_array_equal(got_y_test, eye[y_test])
    np.testing.assert_allclose(got_x_test, x_test[..., None] / 255.0, atol=1e-7)
    np.testing.assert_allclose(got_x_train, x_train[..., None] / 255.0, atol=1e-7)
