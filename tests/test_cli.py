"""The command line: flags and defaults, the two local data formats, and `python capsulenet.py` end
to end as a subprocess (train one epoch on a small local dataset, then test, as a user would).

The subprocesses are few on purpose: each pays TensorFlow's start-up (5-10 s)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import h5py
import keras
import numpy as np
import pandas as pd
import pytest
from conftest import RawData, describe, run_script
from PIL import Image

import capsulenet
import saving
import utils

# Every flag of the issue and SPEC section 1, with its default.
DEFAULTS = {
    "epochs": 50, "batch_size": 100, "lr": 0.001, "lr_decay": 0.9, "lam_recon": 0.392,
    "routings": 3, "shift_fraction": 0.1, "debug": False, "save_dir": "./result",
    "testing": False, "digit": 5, "weights": None, "dataset": "mnist",
}
FLAGS = ("--epochs", "--batch_size", "--lr", "--lr_decay", "--lam_recon", "-r", "--routings",
         "--shift_fraction", "--debug", "--save_dir", "-t", "--testing", "--digit", "-w",
         "--weights", "--dataset")
TEST_ACC = re.compile(r"Test acc: (0\.\d{4})\b")


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


@pytest.mark.parametrize("flags", [["-r", "0"], ["--epochs", "0"], ["--lr", "-1"]])
def test_bad_flags_exit_2_with_one_line(flags: list[str], tmp_path: Path,
                                        capsys: pytest.CaptureFixture) -> None:
    code = capsulenet.main([*flags, "--save_dir", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1
    assert flags[0] in err or flags[0].lstrip("-") in err


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
        (x_train, y_train), (x_test, y_test) = utils.load_dataset(str(spec))
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
def test_training_writes_every_output(trained: tuple[Path, subprocess.CompletedProcess]) -> None:
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
    output = result.stdout + result.stderr
    assert re.search(r"random", output, re.IGNORECASE), describe(result)
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
