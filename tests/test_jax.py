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
from conftest import (
    assert_log_matches_saved_weights,
    child_env,
    describe,
    run_script,
    save_npz,
    synthetic_raw,
)

import capsulenet
from capsnet import errors

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
        jax_trained: tuple[Path, subprocess.CompletedProcess], tiny_npz: Path) -> None:
    save_dir, result = jax_trained
    assert result.returncode == 0, describe(result)
    assert "Warning: JAX is running on the CPU" in result.stdout  # and names the faster backend
    assert "unset KERAS_BACKEND" in result.stdout
    log = pd.read_csv(save_dir / "log.csv")
    assert list(log.columns) == LOG_COLUMNS
    assert log["epoch"].tolist() == [0] and np.isfinite(log.drop(columns="epoch").to_numpy()).all()
    assert_log_matches_saved_weights(save_dir, tiny_npz, routings=1)  # weights from JAX, checked on TF
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
    monkeypatch.setattr(keras.backend, "backend", lambda: "numpy")  # Keras' inference-only backend
    assert capsulenet.main(["--save_dir", str(tmp_path)]) == errors.EXIT_BAD_INPUT
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: KERAS_BACKEND=numpy: not supported; this project trains and tests on tensorflow "
        "(the default), jax (KERAS_BACKEND=jax) or torch (KERAS_BACKEND=torch)"]


@pytest.mark.slow
def test_jax_batch_must_divide_over_the_devices(tiny_npz: Path, tmp_path: Path) -> None:
    result = run_jax("capsulenet-multi-gpu.py", "--cpu", "--gpus", "2", "--batch_size", "5", "--dataset",
                     str(tiny_npz), "--save_dir", str(tmp_path))
    assert result.returncode == 2, describe(result)
    assert result.stderr.strip().splitlines()[-1] == (
        "error: --batch_size 5: must be a multiple of the number of devices (2) on the JAX backend; "
        "each takes an equal share")


def resume_main(data_path: str, out: str) -> None:
    """Child process (JAX): two epochs straight; then one epoch, scrambled weights and optimizer, and a
    second run that must resume from the backup of epoch 1. One model, optimizer and steps object serve
    all three, so XLA compiles the step once (seconds on a CPU); scrambling stands in for the fresh
    process of a real resume. Writes both logs and the final weights' largest difference as JSON."""
    import json

    from capsnet import backends, datasets, training
    from capsnet.backup import Backup

    data = datasets.load_dataset(data_path)
    keras.utils.set_random_seed(4)
    model, _, _ = capsulenet.CapsNet((28, 28, 1), 10, 1)
    initial = model.get_weights()
    optimizer = training.make_optimizer(0.001, 0.9, steps_per_epoch=2)
    steps = backends.make_steps(model, optimizer, lam_recon=0.392, batch_size=5)

    def scramble(weights: list[np.ndarray]) -> None:
        model.set_weights(weights)
        for variable in optimizer.variables:
            variable.assign(np.zeros(variable.shape, variable.dtype))

    def fit(name: str, epochs: int) -> list:
        Path(out, name).mkdir(exist_ok=True)
        config = training.TrainConfig(epochs=epochs, batch_size=5, seed=4, save_dir=f"{out}/{name}")
        trainer = training.Trainer(model, optimizer, steps, config, Backup(f"{out}/{name}/backup"))
        return trainer.fit(*data).to_numpy().tolist()

    straight = fit("straight", 2)
    final = np.concatenate([np.ravel(w) for w in model.get_weights()])
    scramble(initial)
    fit("resumed", 1)
    scramble([w + 0.01 for w in initial])  # the resumed run must not start from these
    resumed = fit("resumed", 2)
    diff = np.abs(np.concatenate([np.ravel(w) for w in model.get_weights()]) - final).max()
    Path(out, "resume.json").write_text(json.dumps({"logs": [straight, resumed], "weight_diff": float(diff)}))


@pytest.mark.slow
def test_jax_resume_continues_as_an_uninterrupted_run(tmp_path: Path) -> None:
    """The JAX steps keep the variables outside the model between `reload()` and `sync()`: a run
    resumed from the backup of epoch 1 must end where an uninterrupted one does (2 steps of 5 images
    per epoch, 5 validation images)."""
    import json

    data = save_npz(tmp_path / "ten.npz", synthetic_raw(10, 5))
    result = run_jax("tests/test_jax.py", "--resume", str(data), str(tmp_path))
    assert result.returncode == 0, describe(result)
    found = json.loads((tmp_path / "resume.json").read_text())
    straight, resumed = (np.array(log) for log in found["logs"])
    assert straight.shape == resumed.shape == (2, len(LOG_COLUMNS))
    np.testing.assert_allclose(resumed, straight, rtol=1e-4, atol=1e-6)
    assert found["weight_diff"] < 1e-5


if __name__ == "__main__":
    import argparse
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--resume", nargs=2, metavar=("DATASET", "OUT"), required=True)
    resume_main(*parser.parse_args().resume)

