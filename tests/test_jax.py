"""The same command line on Keras' JAX backend, on the CPU, with TensorFlow blocked.

Each JAX run here is a subprocess (the backend is chosen when Keras is imported) through
`tests/without_tensorflow.py`, which makes `import tensorflow` fail as on a machine without it: every
file the TensorFlow path writes must appear all the same. XLA's CPU convolution backward is slow
(seconds per step), so the data are tiny: 20 training images, 2 steps of 10.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
from conftest import child_env, describe, run_script, save_npz, synthetic_raw

import capsulenet
import errors

# The columns the TensorFlow path writes (README, "Training writes").
LOG_COLUMNS = ["epoch", "loss", "capsnet_loss", "decoder_loss", "capsnet_accuracy", "val_loss",
               "val_capsnet_loss", "val_decoder_loss", "val_capsnet_accuracy", "learning_rate"]
TRAIN_FLAGS = ["--epochs", "1", "--batch_size", "10", "-r", "1", "--seed", "4"]
TEST_ACC = re.compile(r"Test acc: (\d\.\d{4})")


def run_jax(script: str, *args: str) -> subprocess.CompletedProcess:
    """`KERAS_BACKEND=jax python SCRIPT ARGS` with TensorFlow blocked."""
    return run_script("tests/without_tensorflow.py", script, *args,
                      env=child_env(KERAS_BACKEND="jax"), timeout=600)


def test_accuracy(result: subprocess.CompletedProcess) -> float:
    found = TEST_ACC.findall(result.stdout)
    assert found, describe(result)
    return float(found[-1])


test_accuracy.__test__ = False  # a helper, not a test


@pytest.fixture(scope="module")
def tiny_npz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_npz(tmp_path_factory.mktemp("jax") / "tiny.npz", synthetic_raw(20, 10))


@pytest.fixture(scope="module")
def jax_trained(tiny_npz: Path, tmp_path_factory: pytest.TempPathFactory
                ) -> tuple[Path, subprocess.CompletedProcess]:
    save_dir = tmp_path_factory.mktemp("jax") / "result"
    result = run_jax("capsulenet.py", *TRAIN_FLAGS, "--debug", "--dataset", str(tiny_npz),
                     "--save_dir", str(save_dir))
    return save_dir, result


@pytest.mark.slow
def test_jax_training_writes_every_output_without_tensorflow(
        jax_trained: tuple[Path, subprocess.CompletedProcess]) -> None:
    save_dir, result = jax_trained
    assert result.returncode == 0, describe(result)
    assert "Warning: JAX is running on the CPU" in result.stdout  # and names the faster backend
    assert "unset KERAS_BACKEND" in result.stdout
    log = pd.read_csv(save_dir / "log.csv")
    assert list(log.columns) == LOG_COLUMNS
    assert log["epoch"].tolist() == [0] and np.isfinite(log.drop(columns="epoch").to_numpy()).all()
    for name in ("weights-01.weights.h5", "trained_model.weights.h5", "trained_model.keras", "log.png"):
        assert (save_dir / name).is_file(), name
    assert not (save_dir / "backup").exists()
    # --debug: TensorBoard events, written without TensorFlow.
    assert list((save_dir / "tensorboard-logs").glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_jax_weights_test_the_same_on_tensorflow(jax_trained: tuple[Path, subprocess.CompletedProcess],
                                                 tiny_npz: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    """Weights trained on JAX, tested on TensorFlow (this process): the accuracy the JAX run logged
    for the same test set (validation accuracy is the longest capsule's, as `-t` reports)."""
    save_dir, result = jax_trained
    assert result.returncode == 0, describe(result)
    code = capsulenet.main(["-t", "-w", str(save_dir / "trained_model.weights.h5"), "--dataset",
                            str(tiny_npz), "--save_dir", str(tmp_path), "-r", "1"])
    assert code == 0
    accuracy = float(TEST_ACC.findall(capsys.readouterr().out)[-1])
    logged = pd.read_csv(save_dir / "log.csv")["val_capsnet_accuracy"].iloc[-1]
    assert accuracy == pytest.approx(logged, abs=1e-4)


@pytest.mark.slow
def test_tensorflow_weights_test_the_same_on_jax(tiny_npz: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    """Weights trained on TensorFlow (this process), tested with `-t -w` on JAX without TensorFlow:
    the same accuracy, and the manipulation and reconstruction images."""
    tf_dir, jax_dir = tmp_path / "tf", tmp_path / "jax"
    assert capsulenet.main([*TRAIN_FLAGS, "--dataset", str(tiny_npz), "--save_dir", str(tf_dir)]) == 0
    assert capsulenet.main(["-t", "-w", str(tf_dir / "trained_model.weights.h5"), "--dataset",
                            str(tiny_npz), "--save_dir", str(tf_dir), "-r", "1"]) == 0
    tf_accuracy = float(TEST_ACC.findall(capsys.readouterr().out)[-1])
    result = run_jax("capsulenet.py", "-t", "-w", str(tf_dir / "trained_model.keras"), "--digit", "3",
                     "-r", "1", "--dataset", str(tiny_npz), "--save_dir", str(jax_dir))
    assert result.returncode == 0, describe(result)
    assert test_accuracy(result) == pytest.approx(tf_accuracy, abs=1e-4)
    assert (jax_dir / "real_and_recon.png").is_file() and (jax_dir / "manipulate-3.png").is_file()


@pytest.mark.slow
def test_jax_data_parallel_on_two_cpu_devices_equals_one_device(
        jax_trained: tuple[Path, subprocess.CompletedProcess], tiny_npz: Path, tmp_path: Path) -> None:
    """`capsulenet-multi-gpu.py --cpu --gpus 2` on JAX: keras.distribution shards each batch over two
    devices; the log equals the one-device run with the same seed and global batch."""
    one_device, _ = jax_trained
    save_dir = tmp_path / "result"
    result = run_jax("capsulenet-multi-gpu.py", "--cpu", "--gpus", "2", *TRAIN_FLAGS, "--dataset",
                     str(tiny_npz), "--save_dir", str(save_dir))
    assert result.returncode == 0, describe(result)
    assert "Data-parallel on 2 replica(s) (keras.distribution.DataParallel" in result.stdout
    two = pd.read_csv(save_dir / "log.csv")
    one = pd.read_csv(one_device / "log.csv")
    np.testing.assert_allclose(two.to_numpy(), one.to_numpy(), rtol=1e-4, atol=1e-6)
    logged = two["val_capsnet_accuracy"].iloc[-1]
    assert test_accuracy(result) == pytest.approx(logged, abs=1e-4)  # then it tested, on one device


def test_other_backends_are_refused_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(keras.backend, "backend", lambda: "torch")
    assert capsulenet.main(["--save_dir", str(tmp_path)]) == errors.EXIT_BAD_INPUT
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: KERAS_BACKEND=torch: not supported; this project trains and tests on tensorflow "
        "(the default) or jax (KERAS_BACKEND=jax)"]


@pytest.mark.slow
def test_jax_batch_must_divide_over_the_devices(tiny_npz: Path, tmp_path: Path) -> None:
    result = run_jax("capsulenet-multi-gpu.py", "--cpu", "--gpus", "2", "--batch_size", "5", "--dataset",
                     str(tiny_npz), "--save_dir", str(tmp_path))
    assert result.returncode == 2, describe(result)
    assert result.stderr.strip().splitlines()[-1] == (
        "error: --batch_size 5: must be a multiple of the number of devices (2) on the JAX backend; "
        "each takes an equal share")
