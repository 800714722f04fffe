"""The same command line on Keras' JAX and PyTorch backends, on the CPU, with the other engines hidden.

Each run is a subprocess (the backend is chosen when Keras is imported) through
`tests/without_tensorflow.py` (`conftest.run_on_backend`): on JAX `import tensorflow` fails, on PyTorch
`import jax` too, as on a machine without them. Every file the TensorFlow path writes must appear all
the same, weights move between the backends with the same `-t` accuracy, and a resumed run ends where an
uninterrupted one does. XLA's CPU convolution backward is slow (seconds per step), so the data are
tiny: 20 training images, 2 steps of 10. A backend whose package is missing is skipped
(`requirements/jax.txt`, `requirements/torch.txt`; CI installs both).

What only one backend has stays in `test_jax.py` (its devices, the GPU harness) and `test_torch.py` (the
autotuner's timer); the checks here that only one backend gets say why. That a weights file computes
the same on every backend, output for output and gradient for gradient, is `test_backends.py`.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
from conftest import (
    assert_log_matches_saved_weights,
    backend_available,
    child_entry,
    describe,
    printed_accuracy,
    require_backend,
    run_on_backend,
    save_npz,
    synthetic_raw,
)
from PIL import Image

import capsulenet
from capsnet import errors

OTHER_BACKENDS = ["jax", "torch"]
# The columns the TensorFlow path writes (README, "Training writes").
LOG_COLUMNS = ["epoch", "loss", "capsnet_loss", "decoder_loss", "capsnet_accuracy", "val_loss",
               "val_capsnet_loss", "val_decoder_loss", "val_capsnet_accuracy", "learning_rate"]
TRAIN_FLAGS = ["--epochs", "1", "--batch_size", "10", "-r", "1", "--seed", "4"]
# A resumed run against an uninterrupted one, per backend: the logs' rtol and atol, the final weights'
# largest difference: the bounds each backend's own check had (JAX's looser).
RESUME_TOLERANCE = {"jax": (1e-4, 1e-6, 1e-5), "torch": (1e-5, 1e-7, 1e-6)}
# `trained_on(backend)`: the folder a training run on that backend saved to, and the finished process.
Trained = Callable[[str], tuple[Path, subprocess.CompletedProcess]]


@pytest.fixture(scope="module")
def tiny_npz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_npz(tmp_path_factory.mktemp("other") / "tiny.npz", synthetic_raw(20, 10))


@pytest.fixture(scope="module")
def trained_on(tiny_npz: Path, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """`trained_on(backend)`: one `--debug` training run per backend, on first use (the folder it saved
    to and the finished process)."""
    runs: dict[str, tuple[Path, subprocess.CompletedProcess]] = {}

    def trained(backend: str) -> tuple[Path, subprocess.CompletedProcess]:
        require_backend(backend)
        if backend not in runs:
            save_dir = tmp_path_factory.mktemp(backend) / "result"
            result = run_on_backend(backend, "capsulenet.py", *TRAIN_FLAGS, "--debug", "--dataset",
                                    str(tiny_npz), "--save_dir", str(save_dir))
            runs[backend] = save_dir, result
        save_dir, result = runs[backend]
        assert result.returncode == 0, describe(result)
        return save_dir, result

    return trained


@pytest.fixture(scope="module")
def tensorflow_trained(tiny_npz: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    """Weights trained on TensorFlow (this process) and the accuracy `-t -w` prints for them there."""
    tf_dir = tmp_path_factory.mktemp("tf")
    assert capsulenet.main([*TRAIN_FLAGS, "--dataset", str(tiny_npz), "--save_dir", str(tf_dir)]) == 0
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert capsulenet.main(["-t", "-w", str(tf_dir / "trained_model.weights.h5"), "--dataset",
                                str(tiny_npz), "--save_dir", str(tf_dir), "-r", "1"]) == 0
    return tf_dir, printed_accuracy(printed.getvalue())


@pytest.mark.slow
@pytest.mark.parametrize("backend", OTHER_BACKENDS)
def test_training_writes_every_output_without_the_other_engines(trained_on: Trained, tiny_npz: Path,
                                                                backend: str) -> None:
    save_dir, _ = trained_on(backend)
    log = pd.read_csv(save_dir / "log.csv")
    assert list(log.columns) == LOG_COLUMNS
    assert log["epoch"].tolist() == [0] and np.isfinite(log.drop(columns="epoch").to_numpy()).all()
    assert_log_matches_saved_weights(save_dir, tiny_npz, routings=1)  # weights from BACKEND, checked on TF
    for name in ("weights-01.weights.h5", "trained_model.weights.h5", "trained_model.keras", "log.png"):
        assert (save_dir / name).is_file(), name
    assert not (save_dir / "backup").exists()
    # --debug: TensorBoard events, written without TensorFlow.
    assert list((save_dir / "tensorboard-logs").glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_jax_on_a_cpu_warns_and_names_the_default_backend(trained_on: Trained) -> None:
    """Only JAX is slower than TensorFlow on a CPU: the run says so and how to get the default."""
    _, result = trained_on("jax")
    assert "Warning: JAX is running on the CPU" in result.stdout
    assert "unset KERAS_BACKEND" in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("backend", OTHER_BACKENDS)
def test_weights_test_the_same_on_tensorflow(trained_on: Trained, tiny_npz: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture, backend: str) -> None:
    """Weights trained on BACKEND, tested on TensorFlow (this process): the accuracy the BACKEND run
    logged for the same test set (validation accuracy is the longest capsule's, as `-t` reports)."""
    save_dir, _ = trained_on(backend)
    code = capsulenet.main(["-t", "-w", str(save_dir / "trained_model.weights.h5"), "--dataset",
                            str(tiny_npz), "--save_dir", str(tmp_path), "-r", "1"])
    assert code == 0
    logged = pd.read_csv(save_dir / "log.csv")["val_capsnet_accuracy"].iloc[-1]
    assert printed_accuracy(capsys.readouterr().out) == pytest.approx(logged, abs=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("backend", OTHER_BACKENDS)
def test_tensorflow_weights_test_the_same_on(tensorflow_trained: tuple[Path, float], tiny_npz: Path,
                                             tmp_path: Path, backend: str) -> None:
    """Weights trained on TensorFlow, `-t -w` on BACKEND without TensorFlow: the same accuracy, and the
    manipulation and reconstruction images."""
    require_backend(backend)
    tf_dir, tf_accuracy = tensorflow_trained
    result = run_on_backend(backend, "capsulenet.py", "-t", "-w", str(tf_dir / "trained_model.keras"),
                            "--digit", "3", "-r", "1", "--dataset", str(tiny_npz), "--save_dir",
                            str(tmp_path))
    assert result.returncode == 0, describe(result)
    assert printed_accuracy(result.stdout) == pytest.approx(tf_accuracy, abs=1e-4)
    assert (tmp_path / "real_and_recon.png").is_file() and (tmp_path / "manipulate-3.png").is_file()


@pytest.mark.slow
def test_tensorflow_weights_predict_the_same_on_torch(tensorflow_trained: tuple[Path, float],
                                                      tiny_npz: Path, tmp_path: Path) -> None:
    """`--predict` on PyTorch: the capsule lengths and classes TensorFlow's eval model gives the same
    pictures. (One backend: the prediction path is the eval model `-t` used above on both.)"""
    require_backend("torch")
    tf_dir, _ = tensorflow_trained
    images = np.load(tiny_npz)["x_test"][:4]
    paths = []
    for i, image in enumerate(images):
        paths.append(tmp_path / f"digit{i}.png")
        Image.fromarray(image).save(paths[-1])
    predicted = run_on_backend("torch", "capsulenet.py", "-w", str(tf_dir / "trained_model.keras"),
                               "--predict", *map(str, paths), "--save_dir", str(tmp_path / "predict"))
    assert predicted.returncode == 0, describe(predicted)
    table = pd.read_csv(tmp_path / "predict" / "predictions.csv")
    eval_model = capsulenet.deploy.load_eval_model(str(tf_dir / "trained_model.keras"), build=None)[0]
    lengths, _ = eval_model.predict(images[..., None].astype("float32") / 255, verbose=0)
    assert table["class"].tolist() == lengths.argmax(axis=1).tolist(), table
    lengths_on_torch = table[[c for c in table.columns if c.startswith("length_")]].to_numpy()
    np.testing.assert_allclose(lengths_on_torch, lengths, rtol=1e-4, atol=1e-7)


@pytest.mark.slow
def test_torch_weights_test_the_same_on_jax(trained_on: Trained, tiny_npz: Path, tmp_path: Path) -> None:
    """From one non-TensorFlow backend to the other, neither with TensorFlow: the `.keras` file PyTorch
    wrote tests on JAX to the accuracy PyTorch logged."""
    require_backend("jax")
    save_dir, _ = trained_on("torch")
    jax = run_on_backend("jax", "capsulenet.py", "-t", "-w", str(save_dir / "trained_model.keras"), "-r",
                         "1", "--dataset", str(tiny_npz), "--save_dir", str(tmp_path))
    assert jax.returncode == 0, describe(jax)
    logged = pd.read_csv(save_dir / "log.csv")["val_capsnet_accuracy"].iloc[-1]
    assert printed_accuracy(jax.stdout) == pytest.approx(logged, abs=1e-4)


@pytest.mark.slow
def test_jax_data_parallel_on_two_cpu_devices_equals_one_device(trained_on: Trained, tiny_npz: Path,
                                                                 tmp_path: Path) -> None:
    """`capsulenet-multi-gpu.py --cpu --gpus 2` on JAX: keras.distribution shards each batch over two
    devices; the log equals the one-device run with the same seed and global batch. (JAX alone splits
    one process's CPU into devices; PyTorch's data parallelism is test_multi_process.py's.)"""
    one_device, _ = trained_on("jax")
    save_dir = tmp_path / "result"
    result = run_on_backend("jax", "capsulenet-multi-gpu.py", "--cpu", "--gpus", "2", *TRAIN_FLAGS,
                            "--dataset", str(tiny_npz), "--save_dir", str(save_dir))
    assert result.returncode == 0, describe(result)
    assert "Data-parallel on 2 replica(s) (keras.distribution.DataParallel" in result.stdout
    two = pd.read_csv(save_dir / "log.csv")
    one = pd.read_csv(one_device / "log.csv")
    np.testing.assert_allclose(two.to_numpy(), one.to_numpy(), rtol=1e-4, atol=1e-6)
    logged = two["val_capsnet_accuracy"].iloc[-1]
    assert printed_accuracy(result.stdout) == pytest.approx(logged, abs=1e-4)  # then it tested, on one device


def test_other_backends_are_refused_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(keras.backend, "backend", lambda: "numpy")  # Keras' inference-only backend
    assert capsulenet.main(["--save_dir", str(tmp_path)]) == errors.EXIT_BAD_INPUT
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: KERAS_BACKEND=numpy: not supported; this project trains and tests on tensorflow "
        "(the default), jax (KERAS_BACKEND=jax) or torch (KERAS_BACKEND=torch)"]


def resume_main(data_path: str, out: str) -> None:
    """Child process (JAX or PyTorch): two epochs straight; then one epoch, scrambled weights and
    optimizer, and a second run that must resume from the backup of epoch 1. One model, optimizer and
    steps object serve all three, so XLA compiles the step once (seconds on a CPU); scrambling stands in
    for the fresh process of a real resume. Writes both logs and the final weights' largest difference
    as JSON."""
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
@pytest.mark.parametrize("backend", OTHER_BACKENDS)
def test_resume_continues_as_an_uninterrupted_run(tmp_path: Path, backend: str) -> None:
    """The JAX steps keep the variables outside the model between `reload()` and `sync()`, PyTorch's
    inside it: on both, a run resumed from the backup of epoch 1 must end where an uninterrupted one
    does (2 steps of 5 images per epoch, 5 validation images)."""
    require_backend(backend)
    data = save_npz(tmp_path / "ten.npz", synthetic_raw(10, 5))
    result = run_on_backend(backend, "tests/test_other_backends.py", "--resume", str(data), str(tmp_path))
    assert result.returncode == 0, describe(result)
    found = json.loads((tmp_path / "resume.json").read_text())
    straight, resumed = (np.array(log) for log in found["logs"])
    assert straight.shape == resumed.shape == (2, len(LOG_COLUMNS))
    rtol, atol, weight_tolerance = RESUME_TOLERANCE[backend]
    np.testing.assert_allclose(resumed, straight, rtol=rtol, atol=atol)
    assert found["weight_diff"] < weight_tolerance


def test_every_backend_here_is_installed_in_ci() -> None:
    """CI installs JAX and PyTorch (`.ci/run`): there, a skip above would hide a broken install."""
    if not os.environ.get("CI"):
        pytest.skip("only CI promises every backend")
    assert all(backend_available(b) for b in OTHER_BACKENDS)


if __name__ == "__main__":
    child_entry(resume=resume_main)
