"""The paper's baseline CNN (`capsnet/baseline.py`, `--model baseline`): its layers' shapes and
parameter counts against values computed by hand from the paper's sizes, its cross-entropy against
NumPy, and short runs of the real command line on tiny synthetic data: it learns, its `log.csv`
agrees with its saved model evaluated here, and it resumes from its backup.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
from conftest import save_npz, synthetic_raw

import capsulenet
from capsnet import losses
from capsnet.backup import Backup
from capsnet.baseline import baseline_cnn

# (layer, output shape without the batch, parameters), by hand: a 5x5 convolution from c to k channels
# has 25·c·k + k parameters; a dense layer from n to m has n·m + m. 'same' padding keeps 28x28.
MNIST_LAYERS = [
    ("conv1", (28, 28, 256), 25 * 1 * 256 + 256),  # 6,656
    ("conv2", (28, 28, 256), 25 * 256 * 256 + 256),  # 1,638,656
    ("conv3", (28, 28, 128), 25 * 256 * 128 + 128),  # 819,328
    ("flatten", (100352,), 0),  # 28 * 28 * 128
    ("fc1", (328,), 100352 * 328 + 328),  # 32,915,784
    ("fc2", (192,), 328 * 192 + 192),  # 63,168
    ("dropout", (192,), 0),
    ("softmax", (10,), 192 * 10 + 10),  # 1,930
]


def test_layers_shapes_and_parameters_are_the_papers() -> None:
    model = baseline_cnn((28, 28, 1), 10)
    layers = [layer for layer in model.layers if layer.name != "input_image"]
    found = [(layer.name, tuple(layer.output.shape[1:]), layer.count_params()) for layer in layers]
    assert found == MNIST_LAYERS
    assert model.count_params() == 35_445_522  # the paper: 35.4M
    assert [layer.kernel_size for layer in layers[:3]] == [(5, 5)] * 3
    assert [layer.strides for layer in layers[:3]] == [(1, 1)] * 3
    assert layers[6].rate == 0.5
    x = np.random.default_rng(0).random((3, 28, 28, 1), dtype=np.float32)
    probabilities = np.asarray(model(x))
    assert probabilities.shape == (3, 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


def test_smaller_sizes_and_other_inputs() -> None:
    model = baseline_cnn((32, 32, 3), 5, conv_channels=(4, 6), dense_units=(7,), dropout=0.25)
    # 25·3·4 + 4 = 304; 25·4·6 + 6 = 606; 32·32·6 = 6144 -> 7: 43,015; 7 -> 5: 40.
    assert model.count_params() == 304 + 606 + 43_015 + 40
    assert tuple(model.output.shape) == (None, 5)


def test_classifier_terms_are_cross_entropy_zero_decoder_and_accuracy() -> None:
    y = np.eye(3, dtype="float32")[[0, 2, 1]]
    p = np.array([[0.7, 0.2, 0.1], [0.5, 0.25, 0.25], [0.1, 0.8, 0.1]], dtype="float32")
    loss, class_loss, decoder, correct = (np.asarray(t) for t in losses.classifier_terms(y, p))
    expected = -np.log([0.7, 0.25, 0.8])  # -log of the label's probability
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    np.testing.assert_allclose(class_loss, expected, rtol=1e-5)
    np.testing.assert_array_equal(decoder, [0, 0, 0])
    np.testing.assert_array_equal(correct, [1, 0, 1])  # the second's most probable class is 0, not 2


# ---------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------

FLAGS = ["--model", "baseline", "--batch_size", "20", "--seed", "3", "--lr", "0.0005"]


@pytest.fixture(scope="module")
def tiny_npz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_npz(tmp_path_factory.mktemp("baseline") / "tiny.npz", synthetic_raw(100, 40, seed=2))


def read_test_set(npz: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(npz) as f:
        return f["x_test"][..., None].astype("float32") / 255, f["y_test"].astype(int)


@pytest.mark.slow
def test_baseline_learns_and_its_log_is_its_saved_model(tiny_npz: Path, tmp_path: Path) -> None:
    """2 epochs of 5 steps: well above chance (10%) on the 40 test images, and the last row of
    `log.csv` is the saved model's cross-entropy and accuracy computed here in NumPy."""
    save_dir = tmp_path / "run"
    code = capsulenet.main([*FLAGS, "--epochs", "2", "--dataset", str(tiny_npz), "--save_dir", str(save_dir)])
    assert code == 0
    log = pd.read_csv(save_dir / "log.csv")
    assert list(log["epoch"]) == [0, 1]
    np.testing.assert_allclose(log["learning_rate"], [0.0005, 0.00045], rtol=1e-6)
    assert (log["decoder_loss"] == 0).all() and (log["val_decoder_loss"] == 0).all()
    np.testing.assert_allclose(log["loss"], log["capsnet_loss"])
    assert log["val_capsnet_accuracy"].iloc[-1] >= 0.5

    x, labels = read_test_set(tiny_npz)
    model = keras.saving.load_model(save_dir / "trained_model.keras")
    p = np.asarray(model.predict(x, verbose=0), dtype=np.float64)
    cross_entropy = -np.log(np.clip(p[np.arange(len(x)), labels], 1e-7, 1))
    last = log.iloc[-1]
    assert last["val_capsnet_accuracy"] == pytest.approx(np.mean(p.argmax(1) == labels))
    assert last["val_loss"] == pytest.approx(cross_entropy.mean(), rel=1e-4)


@pytest.mark.slow
def test_baseline_resumes_from_its_backup(tiny_npz: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture) -> None:
    """A run whose backup of epoch 1 was left behind (as a killed run leaves it) continues from there
    when rerun with more epochs; its backup records `--model baseline`, so a CapsNet run refuses it."""
    save_dir = tmp_path / "run"
    common = [*FLAGS, "--dataset", str(tiny_npz), "--save_dir", str(save_dir)]
    with monkeypatch.context() as patch:
        patch.setattr(Backup, "remove", lambda self: None)
        assert capsulenet.main([*common, "--epochs", "1"]) == 0
    first = pd.read_csv(save_dir / "log.csv")
    assert (save_dir / "backup" / "state.json").is_file()
    shutil.copytree(save_dir, tmp_path / "copy")

    capsys.readouterr()
    code = capsulenet.main([*capsulenet_flags_for_capsnet(tmp_path / "copy"), "--dataset", str(tiny_npz)])
    assert code == 2
    assert "--model was baseline, now None" in capsys.readouterr().err

    assert capsulenet.main([*common, "--epochs", "2"]) == 0
    assert "Resuming after epoch 1" in capsys.readouterr().out
    log = pd.read_csv(save_dir / "log.csv")
    assert list(log["epoch"]) == [0, 1]
    pd.testing.assert_frame_equal(log.iloc[:1], first)  # epoch 1 was not trained again
    assert not (save_dir / "backup").exists()


def capsulenet_flags_for_capsnet(save_dir: Path) -> list[str]:
    return ["--batch_size", "20", "--seed", "3", "--lr", "0.0005", "-r", "1", "--epochs", "2",
            "--save_dir", str(save_dir)]


@pytest.mark.parametrize("flag", [["-t"], ["--multimnist"], ["--export", "onnx", "-w", "x"]])
def test_baseline_refuses_what_it_does_not_do(flag: list[str], tmp_path: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    code = capsulenet.main(["--model", "baseline", *flag, "--save_dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: --model baseline: ") and len(err.strip().splitlines()) == 1
    assert f"drop {flag[0]}" in err
