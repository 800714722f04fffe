"""Failures are cheap and clear: resume after SIGKILL or SIGTERM, best checkpoints across a resume,
atomic writes and a full disk, input checks, seeds, real non-finite losses, safe loading."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pandas as pd
import pytest
from conftest import describe, run_script, save_npz, start_script, synthetic_raw, weights_in

import capsulenet
from capsnet import datasets, errors, plots, saving, training
from capsnet.backup import Backup, RunState
from capsnet.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def make_npz(path: Path, n_train: int = 120, n_test: int = 40, n_class: int = 10, seed: int = 0,
             **overrides: np.ndarray) -> Path:
    """A small learnable dataset (conftest's `synthetic_raw`) as an `.npz`."""
    return save_npz(path, synthetic_raw(n_train, n_test, n_class=n_class, seed=seed), **overrides)


@pytest.fixture(scope="module")
def npz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_npz(tmp_path_factory.mktemp("data") / "tiny.npz")


@pytest.fixture(scope="module")
def five_class_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _, eval_model, _ = capsulenet.CapsNet((28, 28, 1), 5, 3)
    path = tmp_path_factory.mktemp("w") / "five.weights.h5"
    eval_model.save_weights(path)
    return path


def run_main(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    code = capsulenet.main(argv)
    return code, capsys.readouterr().err


def cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return run_script("capsulenet.py", *args, timeout=timeout)


# ---------------------------------------------------------------------------------------------
# Flags are checked before any long work
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--epochs", "0"], "--epochs"),
        (["--batch_size", "0"], "--batch_size"),
        (["-r", "0"], "--routings"),
        (["--routings", "-2"], "--routings"),
        (["--lr", "0"], "--lr"),
        (["--lr", "-0.1"], "--lr"),
        (["--lr", "nan"], "--lr"),
        (["--lr_decay", "0"], "--lr_decay"),
        (["--lr_decay", "1.5"], "--lr_decay"),
        (["--lam_recon", "-1"], "--lam_recon"),
        (["--shift_fraction", "0.5"], "--shift_fraction"),
        (["--shift_fraction", "-0.1"], "--shift_fraction"),
        (["--digit", "-1"], "--digit"),
        (["--seed", "-1"], "--seed"),
    ],
)
def test_bad_flag_is_one_line_exit_2(argv: list[str], flag: str, npz: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture) -> None:
    code, err = run_main([*argv, "--dataset", str(npz), "--save_dir", str(tmp_path)], capsys)
    assert code == errors.EXIT_BAD_INPUT
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and flag in lines[0]
    assert "must be" in lines[0]


def test_digit_outside_the_classes(npz: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, err = run_main(["-t", "--digit", "10", "--dataset", str(npz), "--save_dir", str(tmp_path)],
                         capsys)
    assert code == 2 and "--digit 10" in err and "0..9" in err


def test_gpus_must_be_positive(tmp_path: Path) -> None:
    result = run_script("capsulenet-multi-gpu.py", "--gpus", "0", "--save_dir", str(tmp_path))
    assert result.returncode == 2, describe(result)
    assert result.stderr.strip().splitlines() == ["error: --gpus 0: must be >= 1"]


def test_unwritable_save_dir(npz: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code, err = run_main(["--dataset", str(npz), "--save_dir", str(blocker / "out")], capsys)
    assert code == 2 and "--save_dir" in err and "not writable" in err
    assert blocker.read_text() == "not a folder"


def test_missing_weights_file(npz: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, err = run_main(["-t", "-w", str(tmp_path / "nope.h5"), "--dataset", str(npz),
                          "--save_dir", str(tmp_path)], capsys)
    assert code == 2 and "nope.h5: no such file" in err


# ---------------------------------------------------------------------------------------------
# Weights files that do not fit are refused with the file and the reason
# ---------------------------------------------------------------------------------------------


def _bad_weights(kind: str, tmp_path: Path, five_class_weights: Path) -> tuple[Path, str]:
    if kind == "classes":
        return five_class_weights, "digitcaps needs weights of shape (10, 1152, 16, 8)"
    if kind == "truncated":
        path = tmp_path / "cut.weights.h5"
        path.write_bytes(five_class_weights.read_bytes()[:50_000])
        return path, "cannot be loaded"
    if kind == "garbage":
        path = tmp_path / "junk.weights.h5"
        path.write_bytes(os.urandom(4096))
        return path, ": not an HDF5 file"
    if kind == "not_zip":  # Keras itself would say "File not found" of a file that exists
        path = tmp_path / "broken.keras"
        path.write_text("not a zip archive")
        return path, ": not a Keras model file"
    if kind == "format":
        path = tmp_path / "weights.pkl"
        path.write_bytes(b"\x80\x04")
        return path, "unknown weights format"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["classes", "truncated", "garbage", "not_zip", "format"])
def test_bad_weights_file(kind: str, npz: Path, tmp_path: Path, five_class_weights: Path,
                          capsys: pytest.CaptureFixture) -> None:
    path, reason = _bad_weights(kind, tmp_path, five_class_weights)
    before = path.read_bytes()
    code, err = run_main(["-t", "-w", str(path), "--dataset", str(npz), "--save_dir", str(tmp_path)],
                         capsys)
    assert code == 2
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: -w ") and str(path) in line and reason in line
    assert "Traceback" not in err
    assert path.read_bytes() == before  # the user's file is never touched


def test_wrong_input_shape_weights(tmp_path: Path) -> None:
    _, eval_model, _ = capsulenet.CapsNet((32, 32, 1), 10, 3)
    path = tmp_path / "big.weights.h5"
    eval_model.save_weights(path)
    model, _, _ = capsulenet.CapsNet((28, 28, 1), 10, 3)
    with pytest.raises(UserError, match=r"digitcaps needs weights of shape \(10, 1152, 16, 8\)"):
        saving.load_weights(model, str(path))


def test_keras_file_with_lambda_is_refused(tmp_path: Path) -> None:
    x = keras.Input((28, 28, 1))
    marker = tmp_path / "executed"
    # If this function ever ran during loading, the marker file would appear.
    # Built from source so it closes over nothing (Keras serializes a lambda's closure).
    touch = eval(f"lambda t: (open({str(marker)!r}, 'w').write('ran'), t * 2)[1]")  # noqa: S307
    y = keras.layers.Lambda(touch, name="conv1")(x)
    path = tmp_path / "evil.keras"
    keras.Model(x, y).save(path)
    marker.unlink(missing_ok=True)
    model, _, _ = capsulenet.CapsNet((28, 28, 1), 10, 3)
    with pytest.raises(UserError, match="refused, the model contains a Lambda layer"):
        saving.load_weights(model, str(path))
    assert not marker.exists()


def test_no_pickle_loading_in_the_project() -> None:
    sources = [p for p in REPO.rglob("*.py") if "tests" not in p.parts and ".venv" not in p.parts]
    assert sources
    for path in sources:
        text = path.read_text()
        assert "allow_pickle=True" not in text, path
        assert "safe_mode=False" not in text, path
        assert "enable_unsafe_deserialization" not in text, path


# ---------------------------------------------------------------------------------------------
# Local datasets are checked
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"x_train": np.zeros((120, 28), np.uint8)}, "images must be"),
        ({"y_train": np.arange(119) % 10}, "120 images but 119 labels"),
        ({"y_test": np.full(40, 12)}, "test label 12 is out of range"),
        ({"y_train": -(np.arange(120) % 10)}, "labels must be >= 0"),
        ({"x_test": np.full((40, 28, 28), np.nan, np.float32)}, "NaN"),
        ({"x_test": np.full((40, 28, 28), 7.0, np.float32)}, "must lie in [0, 1]"),
        ({"x_test": np.zeros((40, 30, 30), np.uint8)}, "train images are (28, 28, 1) but test images are"),
        ({"y_train": np.full(120, 0.5)}, "whole class numbers"),
        ({"y_train": np.array([object()] * 120)}, "object arrays are refused"),
    ],
)
def test_bad_local_dataset(overrides: dict, reason: str, tmp_path: Path) -> None:
    if overrides.get("y_train") is not None and overrides["y_train"].dtype == object:
        path = tmp_path / "pickled.npz"
        np.savez(path, x_train=np.zeros((120, 28, 28), np.uint8), y_train=overrides["y_train"],
                 x_test=np.zeros((40, 28, 28), np.uint8), y_test=np.arange(40) % 10)
    else:
        path = make_npz(tmp_path / "bad.npz", **overrides)
    with pytest.raises(datasets.DataError) as info:
        datasets.load_dataset(str(path))
    assert reason in str(info.value)
    assert "\n" not in str(info.value)


def test_bad_dataset_through_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = make_npz(tmp_path / "bad.npz", y_train=np.arange(119) % 10)
    code, err = run_main(["--dataset", str(path), "--save_dir", str(tmp_path / "out")], capsys)
    assert code == 2 and "120 images but 119 labels" in err and len(err.strip().splitlines()) == 1


def test_missing_idx_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "data").mkdir()
    code, err = run_main(["--dataset", str(tmp_path / "data"), "--save_dir", str(tmp_path)], capsys)
    assert code == 2 and "missing train-images-idx3-ubyte.gz" in err


# ---------------------------------------------------------------------------------------------
# Atomic outputs
# ---------------------------------------------------------------------------------------------


def test_crash_during_save_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, eval_model, _ = capsulenet.CapsNet((28, 28, 1), 10, 1)
    path = tmp_path / "trained_model.weights.h5"
    saving.save_weights(eval_model, path)
    good = path.read_bytes()

    def crash(self: keras.Model, filepath: str, *args: object, **kwargs: object) -> None:
        with open(filepath, "wb") as f:
            f.write(good[: len(good) // 3])  # half-written, then the disk fills up
        raise OSError(28, "No space left on device", filepath)

    monkeypatch.setattr(keras.Model, "save_weights", crash)
    with pytest.raises(OSError, match="No space left"):
        saving.save_weights(eval_model, path)
    assert path.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trained_model.weights.h5"]


def test_crash_during_image_save_keeps_the_old_png(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "real_and_recon.png"
    plots.save_image(np.zeros((28, 28)), path)
    good = path.read_bytes()
    from PIL import Image

    def crash(self: Image.Image, fp: str, *args: object, **kwargs: object) -> None:
        Path(fp).write_bytes(b"\x89PNG partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", crash)
    with pytest.raises(OSError):
        plots.save_image(np.ones((28, 28)), path)
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["real_and_recon.png"]


def test_resume_trims_log_rows_beyond_the_backup(tmp_path: Path) -> None:
    pd.DataFrame({"epoch": [0, 1, 2], "loss": [3.0, 2.0, 1.0]}).to_csv(tmp_path / "log.csv", index=False)
    # Only the log reader is used: no model, optimizer, steps or backup.
    trainer = training.Trainer(None, None, None, training.TrainConfig(save_dir=str(tmp_path)), None)
    assert trainer._read_log(completed=2)["epoch"].tolist() == [0, 1]
    assert trainer._read_log(completed=0).empty


# ---------------------------------------------------------------------------------------------
# NaN stops training, the good checkpoint stays
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(npz: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture) -> None:
    original = training.Trainer.train_epoch
    saved: dict[str, bytes] = {}

    def poisoned(self: training.Trainer, x: object, y: object, epoch: int, seed: int) -> dict:
        if epoch == 1:
            saved["best"] = (tmp_path / "weights-01.weights.h5").read_bytes()
            saved["state"] = (tmp_path / "backup" / "state.json").read_bytes()
            real_step = self.steps.train
            self.steps.train = lambda xb, yb: real_step(xb, yb) * np.nan
        return original(self, x, y, epoch, seed)

    monkeypatch.setattr(training.Trainer, "train_epoch", poisoned)
    code = capsulenet.main(["--dataset", str(npz), "--save_dir", str(tmp_path), "--epochs", "3",
                            "--batch_size", "40", "--seed", "1", "-r", "1"])
    err = capsys.readouterr().err
    assert code == errors.EXIT_DIVERGED
    assert "loss became nan at epoch 2, step 1" in err
    assert (tmp_path / "weights-01.weights.h5").read_bytes() == saved["best"]
    assert (tmp_path / "backup" / "state.json").read_bytes() == saved["state"]
    assert pd.read_csv(tmp_path / "log.csv")["epoch"].tolist() == [0]
    assert not (tmp_path / "trained_model.weights.h5").exists()


# ---------------------------------------------------------------------------------------------
# A real non-finite loss: --lr 1e30
# ---------------------------------------------------------------------------------------------


def good_files(save_dir: Path) -> dict[str, str]:
    """Fills `save_dir` with the files of an earlier good run (final weights, a best checkpoint, a
    log) and a weights file to pass with `-w`; returns `files_in(save_dir)`."""
    save_dir.mkdir(parents=True, exist_ok=True)
    _, eval_model, _ = capsulenet.CapsNet((28, 28, 1), 10, 1)
    saving.save_weights(eval_model, save_dir / "trained_model.weights.h5")
    for name in ("weights-01.weights.h5", "start.weights.h5"):
        shutil.copyfile(save_dir / "trained_model.weights.h5", save_dir / name)
    (save_dir / "log.csv").write_text("epoch,loss,val_capsnet_accuracy\n0,0.5,0.75\n")
    return files_in(save_dir)


def files_in(folder: Path) -> dict[str, str]:
    """Every file under `folder`, by path relative to it, with the SHA-256 of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_overflowing_loss_stops_at_step_2_and_keeps_every_file(npz: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    """`--lr 1e30`: Adam's first step moves every weight by about the learning rate, so the second
    step's loss overflows (its first was computed before any update, hence finite). Exit 3, the line
    names epoch 1 and step 2, and the earlier run's files and the `-w` file are byte-identical, with
    nothing added (no checkpoint, no backup, no temporary file)."""
    save_dir = tmp_path / "result"
    before = good_files(save_dir)
    code = capsulenet.main(["--lr", "1e30", "-w", str(save_dir / "start.weights.h5"), "--epochs", "2",
                            "--batch_size", "20", "-r", "1", "--seed", "1", "--dataset", str(npz),
                            "--save_dir", str(save_dir)])
    err = capsys.readouterr().err
    assert code == errors.EXIT_DIVERGED, err[-2000:]
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err[-2000:]
    assert re.search(r"\bloss became (nan|inf|-inf) at epoch 1, step 2\b", lines[0]), lines[0]
    assert files_in(save_dir) == before


@pytest.mark.slow
def test_non_finite_validation_loss_stops_with_exit_3(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """One step per epoch (20 training images, batch 20) at `--lr 1e30`: the step's loss is computed
    before the update and is finite; the validation after the update is not. Exit 3 with "validation
    loss became", and no file of the earlier run changes (the log row of the bad epoch is not written)."""
    data = make_npz(tmp_path / "twenty.npz", n_train=20, n_test=20)
    save_dir = tmp_path / "result"
    before = good_files(save_dir)
    code = capsulenet.main(["--lr", "1e30", "--epochs", "2", "--batch_size", "20", "-r", "1", "--seed", "1",
                            "--dataset", str(data), "--save_dir", str(save_dir)])
    err = capsys.readouterr().err
    assert code == errors.EXIT_DIVERGED, err[-2000:]
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err[-2000:]
    assert re.search(r"\bvalidation loss became (nan|inf|-inf) at epoch 1\b", lines[0]), lines[0]
    assert "step" not in lines[0]  # the training step itself was fine
    assert files_in(save_dir) == before


# ---------------------------------------------------------------------------------------------
# A full disk through the command line
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def small_filesystem(folder: Path, size_bytes: int) -> Iterator[bool]:
    """Mounts a tmpfs of `size_bytes` on `folder` (root only); yields whether it was mounted."""
    folder.mkdir(parents=True, exist_ok=True)
    size_kib = -(-size_bytes // 1024)
    mount = shutil.which("mount")
    mounted = mount is not None and subprocess.run(
        [mount, "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(folder)],
        capture_output=True).returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", str(folder)], capture_output=True)


def _file_size_limit(limit: int) -> Callable[[], None]:
    def limit_file_size() -> None:  # runs in the child, before exec
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills it instead of EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return limit_file_size


@pytest.mark.slow
def test_full_disk_is_one_line_exit_1_and_keeps_the_good_files(npz: Path, tmp_path: Path) -> None:
    """The disk fills up while the first checkpoint is written: exit 1, one line `error: FILE: REASON`
    naming a file of save_dir and the OS's reason, and the earlier run's checkpoint and final weights
    byte-identical, no temporary file left.

    A real full disk where the test may mount (root): save_dir is a tmpfs with room for the earlier
    run's two weights files plus 8 MB, less than one more weights file (33 MB), so the write fails
    with ENOSPC "No space left on device". Where mounting is not permitted, the child runs under
    `RLIMIT_FSIZE` of 20 MB with SIGXFSZ ignored, so the same write fails with EFBIG "File too large".
    """
    save_dir = tmp_path / "result"
    weights = tmp_path / "good.weights.h5"
    _, eval_model, _ = capsulenet.CapsNet((28, 28, 1), 10, 1)
    saving.save_weights(eval_model, weights)
    size = weights.stat().st_size
    with small_filesystem(save_dir, 2 * size + 8 * 2**20) as mounted:
        for name in ("weights-01.weights.h5", "trained_model.weights.h5"):
            shutil.copyfile(weights, save_dir / name)
        before = files_in(save_dir)
        preexec = None if mounted else _file_size_limit(20 * 2**20)
        with (tmp_path / "out.txt").open("w") as out, (tmp_path / "err.txt").open("w") as err:
            proc = start_script("capsulenet.py", "--epochs", "1", "--batch_size", "40", "-r", "1",
                                "--seed", "1", "--dataset", str(npz), "--save_dir", str(save_dir),
                                stdout=out, stderr=err, preexec_fn=preexec)
            proc.wait(timeout=600)
        stderr = (tmp_path / "err.txt").read_text()
        after = files_in(save_dir)
    reason = "No space left on device" if mounted else "File too large"
    assert proc.returncode == errors.EXIT_OS_ERROR, f"exit {proc.returncode}\n{stderr[-3000:]}"
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr[-3000:]
    # The OS's reason, then possibly how much room there was and was needed.
    assert re.fullmatch(rf"error: {re.escape(str(save_dir))}/\S+: {reason}( \(.*\))?", lines[0]), lines[0]
    for name in ("weights-01.weights.h5", "trained_model.weights.h5"):
        assert after[name] == before[name], name
    assert not [name for name in after if name.startswith(".tmp")], list(after)


# ---------------------------------------------------------------------------------------------
# Resume after SIGKILL or SIGTERM, repeatable runs, best checkpoints
# ---------------------------------------------------------------------------------------------

TRAIN_FLAGS = ["--epochs", "3", "--batch_size", "30", "--seed", "5", "-r", "1"]
BEST = re.compile(r"weights-(\d\d)\.weights\.h5")


def _stopped_mid_epoch(args: list[str], save_dir: Path, after_epochs: int, sig: signal.Signals,
                       output: Path) -> int:
    """Starts training, waits until `after_epochs` epochs are backed up and the next has begun, then
    sends `sig`; returns the exit code (stdout and stderr go to `output`.out/.err)."""
    state = save_dir / "backup" / "state.json"
    with output.with_suffix(".out").open("w") as out, output.with_suffix(".err").open("w") as err:
        proc = start_script("capsulenet.py", *args, stdout=out, stderr=err)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if state.exists() and f'"epoch": {after_epochs}' in state.read_text():
                break
            time.sleep(0.05)
        assert proc.poll() is None, "training ended before it could be stopped"
        time.sleep(0.5)  # inside the next epoch, which takes seconds (10 steps and a validation)
        proc.send_signal(sig)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode


def expected_checkpoints(log: pd.DataFrame) -> set[str]:
    """The checkpoint names a log calls for: the epochs whose val_capsnet_accuracy beat every earlier
    epoch's (the first always does)."""
    best, names = -np.inf, set()
    for epoch, accuracy in zip(log["epoch"], log["val_capsnet_accuracy"], strict=True):
        if accuracy > best:
            best = accuracy
            names.add(f"weights-{epoch + 1:02d}.weights.h5")
    return names


def checkpoints_in(save_dir: Path) -> set[str]:
    return {p.name for p in save_dir.iterdir() if BEST.fullmatch(p.name)}


@pytest.fixture(scope="module")
def npz_300(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Ten steps of 30 per epoch: long enough to be killed inside one."""
    return make_npz(tmp_path_factory.mktemp("data") / "300.npz", n_train=300)


@pytest.fixture(scope="module")
def straight(npz_300: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The save_dir of one uninterrupted run with TRAIN_FLAGS: what every resumed run must match."""
    save_dir = tmp_path_factory.mktemp("straight") / "result"
    done = cli(*TRAIN_FLAGS, "--dataset", str(npz_300), "--save_dir", str(save_dir))
    assert done.returncode == 0, describe(done)
    return save_dir


@pytest.mark.slow
def test_sigkill_then_resume_matches_an_uninterrupted_run(npz_300: Path, straight: Path, tmp_path: Path
                                                          ) -> None:
    npz = npz_300
    again, resumed = tmp_path / "again", tmp_path / "resumed"
    done = cli(*TRAIN_FLAGS, "--dataset", str(npz), "--save_dir", str(again))
    assert done.returncode == 0, done.stderr[-2000:]

    # Same seed, same machine: the same log (to float tolerance).
    log_a, log_b = pd.read_csv(straight / "log.csv"), pd.read_csv(again / "log.csv")
    assert list(log_a.columns) == list(log_b.columns)
    np.testing.assert_allclose(log_a.to_numpy(), log_b.to_numpy(), rtol=1e-4, atol=1e-6)

    args = [*TRAIN_FLAGS, "--dataset", str(npz), "--save_dir", str(resumed)]
    code = _stopped_mid_epoch(args, resumed, after_epochs=1, sig=signal.SIGKILL, output=tmp_path / "killed")
    assert code == -signal.SIGKILL
    assert pd.read_csv(resumed / "log.csv")["epoch"].tolist() == [0]
    done = cli(*args)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Resuming after epoch 1" in done.stdout

    log_r = pd.read_csv(resumed / "log.csv")
    assert log_r["epoch"].tolist() == [0, 1, 2]
    np.testing.assert_allclose(log_r.to_numpy(), log_a.to_numpy(), rtol=1e-4, atol=1e-6)
    final_a, final_r = weights_in(straight / "trained_model.weights.h5"), weights_in(
        resumed / "trained_model.weights.h5")
    assert final_a.keys() == final_r.keys()
    for name in final_a:
        np.testing.assert_allclose(final_r[name], final_a[name], rtol=1e-3, atol=1e-5, err_msg=name)
    assert not (resumed / "backup").exists()  # a finished run leaves no backup behind
    assert checkpoints_in(resumed) == expected_checkpoints(log_r)


@pytest.fixture(scope="module")
def sigterm_run(npz_300: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A run stopped by SIGTERM during its second epoch, then rerun with the same command.

    Between the two, the backup's best score is read (to check it against the log) and then raised
    to 1.0, a score no epoch can beat (a checkpoint needs a strictly higher one): the rerun must keep
    the best of the backup, so it writes no checkpoint at all."""
    folder = tmp_path_factory.mktemp("sigterm")
    save_dir = folder / "result"
    args = [*TRAIN_FLAGS, "--dataset", str(npz_300), "--save_dir", str(save_dir)]
    code = _stopped_mid_epoch(args, save_dir, after_epochs=1, sig=signal.SIGTERM, output=folder / "stopped")
    state_path = save_dir / "backup" / "state.json"
    state = json.loads(state_path.read_text())
    run = {"save_dir": save_dir, "code": code, "stderr": (folder / "stopped.err").read_text(),
           "log_after_stop": pd.read_csv(save_dir / "log.csv"), "backed_up_best": state["best"],
           "checkpoints_after_stop": checkpoints_in(save_dir), "backed_up_epoch": state["epoch"]}
    state["best"] = 1.0
    state_path.write_text(json.dumps(state))
    run["rerun"] = cli(*args)
    return run


@pytest.mark.slow
def test_sigterm_mid_epoch_exits_130_and_the_same_command_resumes(sigterm_run: dict[str, Any],
                                                                  straight: Path) -> None:
    """SIGTERM ends like Ctrl-C: exit 130 and the message to rerun; rerunning the same command resumes
    after the backed-up epoch and ends with the uninterrupted run's log."""
    assert sigterm_run["code"] == errors.EXIT_INTERRUPTED, sigterm_run["stderr"][-3000:]
    assert "interrupted: rerun the same command to resume" in sigterm_run["stderr"]
    assert "Traceback" not in sigterm_run["stderr"]
    completed = sigterm_run["backed_up_epoch"]
    assert completed == 1  # stopped inside the second epoch
    assert sigterm_run["log_after_stop"]["epoch"].tolist() == [0]
    rerun = sigterm_run["rerun"]
    assert rerun.returncode == 0, describe(rerun)
    assert f"Resuming after epoch {completed}" in rerun.stdout
    log, want = pd.read_csv(sigterm_run["save_dir"] / "log.csv"), pd.read_csv(straight / "log.csv")
    assert list(log.columns) == list(want.columns)
    assert log["epoch"].tolist() == [0, 1, 2]
    np.testing.assert_allclose(log.to_numpy(), want.to_numpy(), rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_checkpoints_only_for_epochs_that_improve(straight: Path) -> None:
    """`weights-NN.weights.h5` exists exactly for the epochs whose val_capsnet_accuracy beat every
    earlier epoch's, as read from the run's own log.csv."""
    log = pd.read_csv(straight / "log.csv")
    assert checkpoints_in(straight) == expected_checkpoints(log)


class ScriptedSteps:
    """Stands in for `backends.make_steps` in `training.Trainer`: each training step sets the model's
    bias to the number of steps taken so far (so a weights file tells which epoch it was saved after),
    and each validation reports the next of `accuracies` (one validation batch per epoch)."""

    def __init__(self, model: keras.Model, optimizer: Any, accuracies: list[float]) -> None:
        self.model, self.optimizer, self.accuracies, self.taken = model, optimizer, list(accuracies), 0

    def build_optimizer(self) -> None:
        self.optimizer.build(self.model.trainable_variables)

    def reload(self) -> None:
        pass

    def sync(self) -> None:
        pass

    def train(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        self.taken += 1
        self.model.layers[-1].bias.assign(np.full(2, float(self.taken), "float32"))
        return np.full(len(training.SUMS), 0.5 * len(x))

    def evaluate(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return np.array([1.0, 1.0, 1.0, self.accuracies.pop(0)]) * len(x)


def test_checkpoints_only_for_epochs_that_improve_scripted(tmp_path: Path) -> None:
    """The epoch loop itself, with validation accuracies scripted to fall, tie and rise: a checkpoint
    after epochs 1 and 4 only (a tie is no improvement), each holding that epoch's weights."""
    accuracies = [0.5, 0.4, 0.5, 0.7, 0.6]
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    optimizer = training.make_optimizer(0.001, 0.9, steps_per_epoch=1)
    config = training.TrainConfig(epochs=len(accuracies), batch_size=10, save_dir=str(tmp_path))
    trainer = training.Trainer(model, optimizer, ScriptedSteps(model, optimizer, accuracies), config,
                               Backup(tmp_path / "backup"))
    images = np.zeros((10, 28, 28, 1), "float32")
    labels = np.eye(10, dtype="float32")
    log = trainer.fit((images, labels), (images, labels))

    np.testing.assert_allclose(log["val_capsnet_accuracy"], accuracies)
    assert checkpoints_in(tmp_path) == {"weights-01.weights.h5", "weights-04.weights.h5"}
    assert checkpoints_in(tmp_path) == expected_checkpoints(pd.read_csv(tmp_path / "log.csv"))
    for epoch in (1, 4):  # one step per epoch: the bias counts the epochs trained
        bias = [a for name, a in weights_in(tmp_path / f"weights-{epoch:02d}.weights.h5").items()
                if a.shape == (2,)]
        np.testing.assert_array_equal(bias, [[epoch, epoch]])


@pytest.mark.slow
def test_the_best_score_survives_a_resume(sigterm_run: dict[str, Any]) -> None:
    """Before the stop: the first epoch's checkpoint, and a backup whose best score is that epoch's
    val_capsnet_accuracy from log.csv. After the rerun (best raised to 1.0 in the backup, see
    `sigterm_run`): no new checkpoint, although the resumed epochs' accuracies beat the first
    epoch's or at least -inf, which a run that forgot the backed-up score would compare against."""
    log = sigterm_run["log_after_stop"]
    assert sigterm_run["checkpoints_after_stop"] == {"weights-01.weights.h5"}
    assert sigterm_run["backed_up_best"] == pytest.approx(log["val_capsnet_accuracy"].max(), abs=1e-12)
    assert sigterm_run["rerun"].returncode == 0, describe(sigterm_run["rerun"])
    assert checkpoints_in(sigterm_run["save_dir"]) == {"weights-01.weights.h5"}


def test_main_puts_the_callers_sigterm_handler_back(tmp_path: Path) -> None:
    """`main` turns SIGTERM into Ctrl-C while it runs, and gives the caller's handler back on every
    way out (in pytest, a handler left behind turned a `timeout` kill into one failed test)."""
    received: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    callers = signal.getsignal(signal.SIGTERM)

    def killed(args: Any) -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler interrupts this at once

    def refused(args: Any) -> None:
        raise UserError("bad flag")

    try:
        argv = ["--save_dir", str(tmp_path)]
        assert capsulenet.main(argv, runner=killed) == errors.EXIT_INTERRUPTED
        assert signal.getsignal(signal.SIGTERM) is callers
        assert capsulenet.main(argv, runner=refused) == errors.EXIT_BAD_INPUT
        assert signal.getsignal(signal.SIGTERM) is callers
        assert capsulenet.main(argv, runner=lambda args: None) == 0
        assert signal.getsignal(signal.SIGTERM) is callers
        assert received == []  # main's own handler took the kill
        os.kill(os.getpid(), signal.SIGTERM)
        assert received == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.mark.slow
def test_resume_with_other_flags_is_refused(npz_300: Path, tmp_path: Path) -> None:
    save_dir = tmp_path / "result"
    args = [*TRAIN_FLAGS, "--dataset", str(npz_300), "--save_dir", str(save_dir)]
    _stopped_mid_epoch(args, save_dir, after_epochs=1, sig=signal.SIGKILL, output=tmp_path / "killed")
    done = cli(*[a if a != "30" else "20" for a in args])
    assert done.returncode == 2
    assert "--batch_size was 30, now 20" in done.stderr
    assert (save_dir / "backup" / "state.json").exists()


def test_backup_keeps_two_epochs_and_rolls_back(tmp_path: Path) -> None:
    model, _, _ = capsulenet.CapsNet((28, 28, 1), 10, 1)
    optimizer = training.make_optimizer(0.001, 0.9, steps_per_epoch=10)
    optimizer.build(model.trainable_variables)
    flags = {"batch_size": 100, "lr": 0.001}
    backup = Backup(tmp_path / "backup", flags=flags)
    bias = model.get_layer("conv1").bias
    for epoch in (1, 2, 3):
        bias.assign(np.full(bias.shape, float(epoch), "float32"))
        backup.save(RunState(epoch=epoch, best=epoch / 10, seed=3, flags=flags), model, optimizer)
    assert backup.epochs() == [2, 3]
    assert backup.latest_epoch() == 3

    backup.roll_back(2)
    assert backup.latest_epoch() == 2
    bias.assign(np.zeros(bias.shape, "float32"))
    state = backup.restore(model, optimizer)
    assert (state.epoch, state.best, state.seed) == (2, 0.2, 3)
    np.testing.assert_array_equal(np.asarray(bias), 2.0)

    with pytest.raises(UserError, match="--lr was 0.001, now 0.002"):
        Backup(tmp_path / "backup", flags={**flags, "lr": 0.002}).restore(model, optimizer)
    with pytest.raises(UserError, match="--batch_size was 100, now None"):  # flags named: all compared
        Backup(tmp_path / "backup", flags={}).restore(model, optimizer)
    # A caller that names no flags (its own script) resumes what the folder holds.
    assert Backup(tmp_path / "backup").restore(model, optimizer).epoch == 2

    backup.roll_back(0)  # epoch 0: start over
    assert not backup.directory.exists() and backup.latest_epoch() == 0
    assert backup.restore(model, optimizer) is None
