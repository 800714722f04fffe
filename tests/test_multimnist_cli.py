"""`--multimnist` through the command line: train, resume after an interrupt, test, and the
two-digit model that training uses (every layer shared with the single-digit models).

In-process (`capsulenet.main`) on a tiny synthetic dataset: 40 training digits (2 steps of 20 per
epoch), 10 test digits with 2 partners each.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import save_npz, synthetic_raw
from PIL import Image

import capsulenet
from capsnet import datasets, errors, losses, multimnist, saving, training

FLAGS = ["--multimnist", "--multimnist_test_pairs", "2", "--epochs", "2", "--batch_size", "20",
         "-r", "1", "--seed", "3"]


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_npz(tmp_path_factory.mktemp("mm") / "digits.npz", synthetic_raw(40, 10))


@pytest.fixture(scope="module")
def straight(digits: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted two-epoch MultiMNIST run."""
    save_dir = tmp_path_factory.mktemp("mm") / "straight"
    assert capsulenet.main([*FLAGS, "--dataset", str(digits), "--save_dir", str(save_dir)]) == 0
    return save_dir


def test_two_digit_model_shares_every_layer_and_decodes_each_label() -> None:
    model, eval_model, _ = capsulenet.CapsNet((36, 36, 1), 10, 1)
    two = capsulenet.two_digit_train_model(model)
    assert {w.path for w in two.weights} == {w.path for w in model.weights}  # nothing new to train
    rng = np.random.default_rng(0)
    x = rng.random((3, 36, 36, 1), dtype=np.float32)
    eye = np.eye(10, dtype="float32")
    lengths, first, second = (np.asarray(t) for t in two([x, eye[[1, 2, 3]], eye[[4, 5, 6]]]))
    # Each reconstruction is the single-digit train model's for that label alone.
    np.testing.assert_allclose(first, np.asarray(model([x, eye[[1, 2, 3]]])[1]), atol=1e-6)
    np.testing.assert_allclose(second, np.asarray(model([x, eye[[4, 5, 6]]])[1]), atol=1e-6)
    np.testing.assert_allclose(lengths, np.asarray(eval_model(x)[0]), atol=1e-7)


def test_two_digit_terms_by_hand() -> None:
    """Margin loss with a two-hot label, the two MSEs added, and 'correct' only when the two longest
    capsules are exactly the two labels (hand-computed)."""
    y = np.zeros((2, 10), "float32")
    y[:, [1, 4]] = 1
    lengths = np.full((2, 10), 0.1, "float32")
    lengths[0, [1, 4]] = 0.9  # both right: margin 0
    lengths[1, [1, 7]] = 0.9  # one right: present 4 at 0.1 -> 0.8^2; absent 7 at 0.9 -> 0.5 * 0.8^2
    first = np.zeros((2, 36, 36, 1), "float32")
    second = np.ones((2, 36, 36, 1), "float32")
    recon_first = np.full_like(first, 0.5)  # MSE 0.25
    recon_second = np.full_like(second, 0.9)  # MSE 0.01
    total, margin, mse, correct = (np.asarray(t) for t in losses.two_digit_terms(
        first, y, first, second, lengths, recon_first, recon_second, lam_recon=2.0))
    np.testing.assert_allclose(margin, [0.0, 0.64 + 0.32], atol=1e-6)
    np.testing.assert_allclose(mse, [0.26, 0.26], atol=1e-6)
    np.testing.assert_allclose(total, margin + 2.0 * 0.26, atol=1e-6)
    np.testing.assert_array_equal(correct, [1.0, 0.0])


@pytest.mark.slow
def test_training_logs_both_digits_accuracy_and_checkpoints(straight: Path, digits: Path) -> None:
    log = pd.read_csv(straight / "log.csv")
    assert log["epoch"].tolist() == [0, 1]
    assert np.isfinite(log.drop(columns="epoch").to_numpy()).all()
    for name in ("weights-01.weights.h5", "trained_model.weights.h5", "trained_model.keras", "log.png"):
        assert (straight / name).is_file(), name
    # val_capsnet_accuracy is the both-digits-right share of the fixed test pairs, as -t computes it.
    model, eval_model, _ = capsulenet.CapsNet((36, 36, 1), 10, 1)
    saving.load_weights(model, str(straight / "trained_model.weights.h5"))
    (_, _), (x_test, y_test) = datasets.load_dataset(str(digits))
    pairs = multimnist.test_pairs(x_test, y_test, 2)
    lengths = np.asarray(eval_model.predict(pairs.x, verbose=0)[0])
    top2 = np.sort(np.argsort(-lengths, axis=1)[:, :2], axis=1)
    both = float(np.mean((top2 == np.sort(pairs.labels, axis=1)).all(axis=1)))
    assert log["val_capsnet_accuracy"].iloc[-1] == pytest.approx(both, abs=1e-6)


@pytest.mark.slow
def test_interrupted_run_resumes_to_the_same_log(straight: Path, digits: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture) -> None:
    original = training.Trainer.train_epoch

    def interrupted(self: training.Trainer, x: object, y: object, epoch: int, seed: int) -> dict:
        if epoch == 1:
            raise KeyboardInterrupt  # as Ctrl-C inside the second epoch
        return original(self, x, y, epoch, seed)

    argv = [*FLAGS, "--dataset", str(digits), "--save_dir", str(tmp_path)]
    monkeypatch.setattr(training.Trainer, "train_epoch", interrupted)
    assert capsulenet.main(argv) == errors.EXIT_INTERRUPTED
    monkeypatch.setattr(training.Trainer, "train_epoch", original)
    assert capsulenet.main(argv) == 0
    assert "Resuming after epoch 1" in capsys.readouterr().out
    resumed, whole = pd.read_csv(tmp_path / "log.csv"), pd.read_csv(straight / "log.csv")
    np.testing.assert_allclose(resumed.to_numpy(), whole.to_numpy(), rtol=1e-4, atol=1e-6)
    # Another pairing is another run: a backup of MultiMNIST does not resume as single digits.
    monkeypatch.setattr(training.Trainer, "train_epoch", interrupted)
    assert capsulenet.main(argv) == errors.EXIT_INTERRUPTED
    capsys.readouterr()
    single = argv[3:]  # the same flags without --multimnist --multimnist_test_pairs 2
    assert single[0] == "--epochs"
    assert capsulenet.main(single) == errors.EXIT_BAD_INPUT
    assert "--multimnist was True, now None" in capsys.readouterr().err


@pytest.mark.slow
def test_testing_prints_both_metrics_and_draws_two_colours(straight: Path, digits: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    code = capsulenet.main(["--multimnist", "--multimnist_test_pairs", "2", "-r", "1", "-t", "-w",
                            str(straight / "trained_model.weights.h5"), "--dataset", str(digits),
                            "--digit", "3", "--save_dir", str(tmp_path)])
    assert code == 0
    out = capsys.readouterr().out
    both = float(re.search(r"Test acc: (\d\.\d{4}) \(both digits right", out).group(1))
    one = float(re.search(r"Test acc, at least one digit right: (\d\.\d{4})", out).group(1))
    assert 0 <= both <= one <= 1
    logged = pd.read_csv(straight / "log.csv")["val_capsnet_accuracy"].iloc[-1]
    assert both == pytest.approx(logged, abs=1e-4)
    picture = Image.open(tmp_path / "real_and_recon.png")
    # 20 test pairs: 2 rows of 10 inputs, then 2 rows of their reconstructions, 36x36 each, in colour.
    assert picture.mode == "RGB" and picture.size == (360, 4 * 36)
    pixels = np.asarray(picture)
    assert (pixels[:72, :, 0] == pixels[:72, :, 1]).all()  # inputs in gray
    assert (pixels[72:, :, 2] == 0).all()  # reconstructions: red and green only
    assert Image.open(tmp_path / "manipulate-3.png").size == (11 * 36, 16 * 36)
