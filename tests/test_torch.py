"""The same command line on Keras' PyTorch backend, on the CPU, with TensorFlow and JAX blocked.

Each PyTorch run is a subprocess (the backend is chosen when Keras is imported) through
`tests/without_tensorflow.py --also-block jax`, which makes `import tensorflow` and `import jax` fail as
on a machine with neither: every file the TensorFlow path writes must appear all the same. The data
are tiny (20 training images, 2 steps of 10). Skipped where PyTorch is not installed
(`requirements/torch.txt`; CI installs it).

That a weights file computes the same on PyTorch as on TensorFlow (the layout of every weight) is
checked output for output in test_backends.py; here the same `-t` accuracy both ways, on JAX too.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import child_env, describe, run_script, save_npz, synthetic_raw
from PIL import Image

import capsulenet

pytestmark = pytest.mark.skipif(importlib.util.find_spec("torch") is None,
                                reason="PyTorch is not installed (pip install -r requirements/torch.txt)")

# The columns the TensorFlow path writes (README, "Training writes").
LOG_COLUMNS = ["epoch", "loss", "capsnet_loss", "decoder_loss", "capsnet_accuracy", "val_loss",
               "val_capsnet_loss", "val_decoder_loss", "val_capsnet_accuracy", "learning_rate"]
TRAIN_FLAGS = ["--epochs", "1", "--batch_size", "10", "-r", "1", "--seed", "4"]
TEST_ACC = re.compile(r"Test acc: (\d\.\d{4})")


def run_torch(script: str, *args: str) -> subprocess.CompletedProcess:
    """`KERAS_BACKEND=torch python SCRIPT ARGS` with TensorFlow and JAX blocked."""
    return run_script("tests/without_tensorflow.py", "--also-block", "jax", script, *args,
                      env=child_env(KERAS_BACKEND="torch"), timeout=600)


def accuracy_of(output: str) -> float:
    found = TEST_ACC.findall(output)
    assert found, output[-3000:]
    return float(found[-1])


@pytest.fixture(scope="module")
def tiny_npz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_npz(tmp_path_factory.mktemp("torch") / "tiny.npz", synthetic_raw(20, 10))


@pytest.fixture(scope="module")
def torch_trained(tiny_npz: Path, tmp_path_factory: pytest.TempPathFactory
                  ) -> tuple[Path, subprocess.CompletedProcess]:
    save_dir = tmp_path_factory.mktemp("torch") / "result"
    result = run_torch("capsulenet.py", *TRAIN_FLAGS, "--debug", "--dataset", str(tiny_npz),
                       "--save_dir", str(save_dir))
    return save_dir, result


@pytest.mark.slow
def test_torch_training_writes_every_output_without_tensorflow_or_jax(
        torch_trained: tuple[Path, subprocess.CompletedProcess]) -> None:
    save_dir, result = torch_trained
    assert result.returncode == 0, describe(result)
    log = pd.read_csv(save_dir / "log.csv")
    assert list(log.columns) == LOG_COLUMNS
    assert log["epoch"].tolist() == [0] and np.isfinite(log.drop(columns="epoch").to_numpy()).all()
    for name in ("weights-01.weights.h5", "trained_model.weights.h5", "trained_model.keras", "log.png"):
        assert (save_dir / name).is_file(), name
    assert not (save_dir / "backup").exists()
    assert list((save_dir / "tensorboard-logs").glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_torch_weights_test_the_same_on_tensorflow(torch_trained: tuple[Path, subprocess.CompletedProcess],
                                                   tiny_npz: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    """Weights trained on PyTorch, tested on TensorFlow (this process): the accuracy the PyTorch run
    logged for the same test set."""
    save_dir, result = torch_trained
    assert result.returncode == 0, describe(result)
    code = capsulenet.main(["-t", "-w", str(save_dir / "trained_model.weights.h5"), "--dataset",
                            str(tiny_npz), "--save_dir", str(tmp_path), "-r", "1"])
    assert code == 0
    logged = pd.read_csv(save_dir / "log.csv")["val_capsnet_accuracy"].iloc[-1]
    assert accuracy_of(capsys.readouterr().out) == pytest.approx(logged, abs=1e-4)


@pytest.mark.slow
def test_torch_weights_test_the_same_on_jax(torch_trained: tuple[Path, subprocess.CompletedProcess],
                                            tiny_npz: Path, tmp_path: Path) -> None:
    if importlib.util.find_spec("jax") is None:
        pytest.skip("JAX is not installed")
    save_dir, result = torch_trained
    assert result.returncode == 0, describe(result)
    jax = run_script("tests/without_tensorflow.py", "capsulenet.py", "-t", "-w",
                     str(save_dir / "trained_model.keras"), "-r", "1", "--dataset", str(tiny_npz),
                     "--save_dir", str(tmp_path), env=child_env(KERAS_BACKEND="jax"), timeout=600)
    assert jax.returncode == 0, describe(jax)
    logged = pd.read_csv(save_dir / "log.csv")["val_capsnet_accuracy"].iloc[-1]
    assert accuracy_of(jax.stdout) == pytest.approx(logged, abs=1e-4)


@pytest.mark.slow
def test_tensorflow_weights_test_and_predict_the_same_on_torch(tiny_npz: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    """Weights trained on TensorFlow (this process), then on PyTorch without TensorFlow: `-t -w` gives
    the same accuracy and writes the manipulation and reconstruction images, and `--predict` the
    capsule lengths and classes TensorFlow's eval model gives the same pictures."""
    tf_dir, torch_dir = tmp_path / "tf", tmp_path / "torch"
    assert capsulenet.main([*TRAIN_FLAGS, "--dataset", str(tiny_npz), "--save_dir", str(tf_dir)]) == 0
    assert capsulenet.main(["-t", "-w", str(tf_dir / "trained_model.weights.h5"), "--dataset",
                            str(tiny_npz), "--save_dir", str(tf_dir), "-r", "1"]) == 0
    tf_accuracy = accuracy_of(capsys.readouterr().out)
    result = run_torch("capsulenet.py", "-t", "-w", str(tf_dir / "trained_model.keras"), "--digit", "3",
                       "-r", "1", "--dataset", str(tiny_npz), "--save_dir", str(torch_dir))
    assert result.returncode == 0, describe(result)
    assert accuracy_of(result.stdout) == pytest.approx(tf_accuracy, abs=1e-4)
    assert (torch_dir / "real_and_recon.png").is_file() and (torch_dir / "manipulate-3.png").is_file()

    images = np.load(tiny_npz)["x_test"][:4]
    paths = []
    for i, image in enumerate(images):
        paths.append(tmp_path / f"digit{i}.png")
        Image.fromarray(image).save(paths[-1])
    predicted = run_torch("capsulenet.py", "-w", str(tf_dir / "trained_model.keras"), "--predict",
                          *map(str, paths), "--save_dir", str(torch_dir / "predict"))
    assert predicted.returncode == 0, describe(predicted)
    table = pd.read_csv(torch_dir / "predict" / "predictions.csv")
    eval_model = capsulenet.deploy.load_eval_model(str(tf_dir / "trained_model.keras"), build=None)[0]
    lengths, _ = eval_model.predict(images[..., None].astype("float32") / 255, verbose=0)
    assert table["class"].tolist() == lengths.argmax(axis=1).tolist(), table
    lengths_on_torch = table[[c for c in table.columns if c.startswith("length_")]].to_numpy()
    np.testing.assert_allclose(lengths_on_torch, lengths, rtol=1e-4, atol=1e-7)


@pytest.mark.slow
def test_torch_resume_continues_as_an_uninterrupted_run(tmp_path: Path) -> None:
    """The steps of test_jax.py's resume check on PyTorch: a run resumed from the backup of epoch 1
    (weights and optimizer scrambled in between) ends where an uninterrupted one does."""
    import json

    data = save_npz(tmp_path / "ten.npz", synthetic_raw(10, 5))
    result = run_torch("tests/test_jax.py", "--resume", str(data), str(tmp_path))
    assert result.returncode == 0, describe(result)
    found = json.loads((tmp_path / "resume.json").read_text())
    straight, resumed = (np.array(log) for log in found["logs"])
    assert straight.shape == resumed.shape == (2, len(LOG_COLUMNS))
    np.testing.assert_allclose(resumed, straight, rtol=1e-5, atol=1e-7)
    assert found["weight_diff"] < 1e-6


def test_the_autotuner_times_both_convolutions_on_pytorch(tmp_path: Path) -> None:
    """`autotune`'s PyTorch timer (forward + backward, eager as `TorchSteps`): both candidates are timed
    and the faster one is what `tune_model` chooses, on PyTorch alone."""
    script = tmp_path / "tune.py"
    script.write_text(
        "import json, sys\n"
        f"sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})\n"
        "import keras, capsulelayers\nfrom capsnet import autotune\n"
        "x = keras.Input((9, 9, 3))\n"
        "h = capsulelayers.Conv2D(4, 3, name='first')(x)\n"
        "model = keras.Model(x, capsulelayers.Conv2D(4, 3, strides=2, name='primary')(h))\n"
        "seconds = {}\n"
        "def timer(config, input_shape, input_grad=True, policy=None):\n"
        "    seconds[config['name']] = autotune.time_conv_candidates(config, input_shape, input_grad,\n"
        "                                                            policy, rounds=1)\n"
        "    return seconds[config['name']]\n"
        "import pathlib; cache = autotune.DecisionCache(pathlib.Path(sys.argv[1]))\n"
        "choices = autotune.tune_model(model, 2, cache=cache, timer=timer)\n"
        "print('RESULT', json.dumps({'seconds': seconds, 'choices': choices}))\n")
    result = run_script("tests/without_tensorflow.py", "--also-block", "jax", str(script),
                        str(tmp_path / "decisions.json"),
                        env=child_env(KERAS_BACKEND="torch", CAPSNET_AUTOTUNE="on"), timeout=600)
    assert result.returncode == 0, describe(result)
    found = json.loads(result.stdout.split("RESULT ", 1)[1])
    assert set(found["seconds"]) == {"first", "primary"}
    for name, seconds in found["seconds"].items():
        assert set(seconds) == {"im2col", "conv"} and all(0 < s < 60 for s in seconds.values())
        assert found["choices"][name] == min(seconds, key=seconds.get)
