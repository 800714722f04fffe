"""The reproduction harness (`experiments/reproduce.py`): the commands it runs for CapsNet-v1…v4, the
table it computes from run folders (hand-made `log.csv` files, no training), skipping completed runs,
`--dry_run`, `--table_only`, and one tiny real campaign of two runs through the CLI."""

from __future__ import annotations

import csv
import datetime
import importlib.util
import json
import re
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import REPO_ROOT, child_env, describe, run_script, save_npz, synthetic_raw

HARNESS = "experiments/reproduce.py"
LOG_COLUMNS = ("epoch", "loss", "capsnet_loss", "decoder_loss", "capsnet_accuracy", "val_loss",
               "val_capsnet_loss", "val_decoder_loss", "val_capsnet_accuracy", "learning_rate")


def _load_harness():
    """The harness as a module (it is a script in a folder that is no package)."""
    spec = importlib.util.spec_from_file_location("reproduce", REPO_ROOT / HARNESS)
    module = importlib.util.module_from_spec(spec)
    sys.modules["reproduce"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


reproduce = _load_harness()


def write_log(folder: Path, val_accuracies: list[float]) -> None:
    """A `log.csv` as the CLI writes it, with the given test accuracies (other columns: filler)."""
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "log.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(LOG_COLUMNS)
        for epoch, accuracy in enumerate(val_accuracies):
            writer.writerow([epoch, 0.1, 0.05, 0.1, 0.99, 0.1, 0.05, 0.1, accuracy, 0.001 * 0.9**epoch])


def write_stdout(folder: Path, seconds: list[int]) -> None:
    """A `stdout.log` with the CLI's per-epoch summary lines."""
    lines = []
    for epoch, second in enumerate(seconds, start=1):
        lines += [f"Epoch {epoch}/{len(seconds)}",
                  f"600/600 ━━━━━━━━━━━━━━━━━━━━ {second}s 9ms/step - loss: 0.1000",
                  f"{second}s - loss: 0.1000 - capsnet_loss: 0.0500 - val_capsnet_accuracy: 0.9960"]
    (folder / "stdout.log").write_text("\n".join(lines) + "\n")


def write_record(folder: Path, **record: object) -> None:
    (folder / "run.json").write_text(json.dumps(record))


def harness_env(**extra: str) -> dict[str, str]:
    """The test's environment without a `KERAS_BACKEND` of its own, plus `extra`."""
    env = {k: v for k, v in child_env().items() if k != "KERAS_BACKEND"}
    env.update(extra)
    return env


JAX_H200 = {"backend": "jax", "device": "NVIDIA H200",
            "versions": {"python": "3.11.7", "keras": "3.15.1", "numpy": "2.4.6", "jax": "0.11.2"}}


@pytest.fixture
def campaign(tmp_path: Path) -> Path:
    """A campaign folder by hand: v4 × 3 seeds completed, v1 × 1 completed, v2 failed, v3 unfinished.

    Test errors (%) = 100 × (1 − accuracy):
      v4-seed0 0.50 0.32 0.35 -> final 0.35, best 0.32 (epoch 2), epoch seconds 13 11 12
      v4-seed1 0.40 0.38 0.30 -> final 0.30, best 0.30 (epoch 3), epoch seconds 10 10 20
      v4-seed2 0.45 0.34 0.40 -> final 0.40, best 0.34 (epoch 2), no stdout.log
      v4: final mean 0.35, std sqrt((0² + 0.05² + 0.05²) / 2) = 0.05; best mean 0.32, std 0.02;
          s/epoch median of 13 11 12 10 10 20 = 11.5
      v1-seed0 1.00 0.40 0.40 -> final 0.40, best 0.40 (the first epoch that reached it: 2)
    """
    out = tmp_path / "campaign"
    for seed, accuracies in enumerate([[0.9950, 0.9968, 0.9965], [0.9960, 0.9962, 0.9970],
                                       [0.9955, 0.9966, 0.9960]]):
        folder = out / f"v4-seed{seed}"
        write_log(folder, accuracies)
        write_record(folder, variant="v4", seed=seed, epochs=3, returncode=0, environment=JAX_H200,
                     command=f"KERAS_BACKEND=jax python capsulenet.py --seed {seed}",
                     started=f"2026-11-2{seed + 1}T10:00:00+00:00",
                     finished=f"2026-11-2{seed + 1}T11:00:00+00:00", wall_seconds=3600.0,
                     harness="python experiments/reproduce.py --epochs 3")
    write_stdout(out / "v4-seed0", [13, 11, 12])
    write_stdout(out / "v4-seed1", [10, 10, 20])
    write_log(out / "v1-seed0", [0.9900, 0.9960, 0.9960])
    write_log(out / "v2-seed0", [0.9800])
    write_record(out / "v2-seed0", variant="v2", seed=0, epochs=3, returncode=3, environment=JAX_H200,
                 error="error: training stopped, loss became nan at epoch 2, step 7")
    write_log(out / "v3-seed0", [0.9900, 0.9950])
    (out / "v3-seed0" / "backup").mkdir()
    (out / "not-a-run").mkdir()  # ignored: only vN-seedS folders are runs
    return out


# ---------------------------------------------------------------------------------------------
# The commands
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant, flags", [
    ("v1", ["--routings", "1", "--lam_recon", "0.0"]),
    ("v2", ["--routings", "1", "--lam_recon", "0.392"]),
    ("v3", ["--routings", "3", "--lam_recon", "0.0"]),
    ("v4", ["--routings", "3", "--lam_recon", "0.392"]),
])
def test_each_variant_runs_the_cli_with_the_originals_flags(variant: str, flags: list[str]) -> None:
    out = REPO_ROOT / "experiments" / "runs" / "x"
    run = reproduce.Run(variant, 2, 50, "../shared/data/mnist.npz", out, ("--batch_size", "50"))
    assert run.cli_args() == ["capsulenet.py", *flags, "--epochs", "50", "--seed", "2",
                              "--dataset", "../shared/data/mnist.npz",
                              "--save_dir", f"experiments/runs/x/{variant}-seed2", "--batch_size", "50"]
    assert run.save_dir == out / f"{variant}-seed2"
    assert run.command({"KERAS_BACKEND": "jax"}) == "KERAS_BACKEND=jax python " + " ".join(run.cli_args())


def test_dry_run_prints_every_command_and_creates_nothing(tmp_path: Path) -> None:
    out = tmp_path / "runs"
    args = ["--dataset", "mnist", "--variants", "v4,v1", "--seeds", "0,1", "--epochs", "5", "--out", str(out),
            "--dry_run", "--", "--batch_size", "20", "--mixed_precision"]
    result = run_script(HARNESS, *args, env=harness_env(), timeout=60)
    assert result.returncode == 0, describe(result)
    save_dir = reproduce.display_path(out)
    assert result.stdout.splitlines() == [
        f"python capsulenet.py --routings {r} --lam_recon {lam} --epochs 5 --seed {seed} --dataset mnist "
        f"--save_dir {save_dir}/{variant}-seed{seed} --batch_size 20 --mixed_precision"
        for variant, r, lam in [("v4", 3, 0.392), ("v1", 1, 0.0)] for seed in (0, 1)]
    assert not out.exists()

    # Several runs at once on the JAX backend: the children must not preallocate the GPU each.
    result = run_script(HARNESS, *args[:-4], "--parallel", "3", env=harness_env(KERAS_BACKEND="jax"),
                        timeout=60)
    assert result.returncode == 0, describe(result)
    lines = result.stdout.splitlines()
    assert len(lines) == 4
    assert all(line.startswith("KERAS_BACKEND=jax XLA_PYTHON_CLIENT_PREALLOCATE=false python capsulenet.py ")
               for line in lines)


@pytest.mark.parametrize("extra", [["--seed", "3"], ["-r", "2"], ["-r2"], ["--epochs=3"], ["--rout", "2"],
                                   ["--save_dir", "x"], ["--lam_recon", "0"]])
def test_flags_the_harness_sets_are_refused_after_the_separator(extra: list[str]) -> None:
    result = run_script(HARNESS, "--dry_run", "--", *extra, env=harness_env(), timeout=60)
    assert result.returncode == 2
    assert "the harness sets it for each run" in result.stderr


def test_completed_runs_are_skipped(tmp_path: Path) -> None:
    out = tmp_path / "runs"
    write_log(out / "v1-seed0", [0.99, 0.995])  # complete: 2 epochs, no backup
    write_log(out / "v2-seed0", [0.99, 0.995])  # its last epoch was logged, but the run failed after it
    write_record(out / "v2-seed0", epochs=2, returncode=1, error="error: disk full")
    write_log(out / "v3-seed0", [0.99, 0.995])  # killed before its backup was removed
    (out / "v3-seed0" / "backup").mkdir()
    write_log(out / "v4-seed0", [0.99])  # one epoch short
    common = ["--dataset", "mnist", "--epochs", "2", "--seeds", "0", "--out", str(out)]

    result = run_script(HARNESS, *common, "--variants", "v1,v2,v3,v4", "--dry_run", env=harness_env(),
                        timeout=60)
    assert result.returncode == 0, describe(result)
    skipped = [line.startswith("# complete, would be skipped: ") for line in result.stdout.splitlines()]
    assert skipped == [True, False, False, False]

    # A real invocation whose runs are all complete starts nothing and writes the table; its exit code is
    # about the runs it was asked for (v2-seed0's failure is in the table, not in this exit code).
    result = run_script(HARNESS, *common, "--variants", "v1", env=harness_env(), timeout=60)
    assert result.returncode == 0, describe(result)
    assert "v1-seed0: complete (2 epochs logged, no backup), skipped" in result.stdout
    assert not (out / "v1-seed0" / "stdout.log").exists()
    assert "| v1-seed0 | ok | 2 | 0.50 | 0.50 | 2 |" in (out / "results.md").read_text()
    assert (out / ".gitignore").read_text().split() == ["*.h5", "*.keras", "backup*/", "tensorboard-logs/"]


# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------


def test_log_summary_final_and_best_epoch_error(tmp_path: Path) -> None:
    write_log(tmp_path, [0.9950, 0.9968, 0.9965])
    log = reproduce.read_log(tmp_path / "log.csv")
    assert log.epochs == 3 and log.best_epoch == 2
    assert log.final_error == pytest.approx(0.35) and log.best_error == pytest.approx(0.32)
    assert reproduce.read_log(tmp_path / "missing.csv") is None


def test_mean_std_uses_ddof_1_and_says_when_there_is_one_run() -> None:
    assert reproduce.mean_std([0.35, 0.30, 0.40]) == "0.350 ± 0.050"
    assert reproduce.mean_std([0.30, 0.32]) == "0.310 ± 0.014"  # sqrt(0.01² × 2 / 1)
    assert reproduce.mean_std([0.4]) == "0.400 (1 run)"
    assert reproduce.mean_std([]) == "—"


def test_table_maths_failed_and_unfinished_runs(campaign: Path) -> None:
    results = reproduce.write_table(campaign, epochs_wanted=3)
    names = ["v1-seed0", "v2-seed0", "v3-seed0", "v4-seed0", "v4-seed1", "v4-seed2"]
    assert [r.name for r in results] == names
    table = (campaign / "results.md").read_text()

    # Per variant: mean ± std over the completed runs only, beside the original's and the paper's.
    v4 = "| v4 | 3 | 0.392 | 3/3 | 3 | 0.350 ± 0.050 | 0.320 ± 0.020 | 11.5 |"
    assert f"{v4} 0.34 ± 0.016 | 0.25 ± 0.005 |" in table
    v1 = "| v1 | 1 | 0.0 | 1/1 | 3 | 0.400 (1 run) | 0.400 (1 run) | — |"
    assert f"{v1} 0.39 ± 0.024 | 0.34 ± 0.032 |" in table
    assert "| v2 | 1 | 0.392 | 0/1 | — | — | — | — | 0.36 ± 0.009 | 0.29 ± 0.011 |" in table
    assert "| v3 | 3 | 0.0 | 0/1 | — | — | — | — | 0.40 ± 0.016 | 0.35 ± 0.036 |" in table

    # Per run: final and best-epoch error, best epoch, median seconds per epoch, wall time, log link.
    assert "| v4-seed0 | ok | 3 | 0.35 | 0.32 | 2 | 12 | 3600 | [log.csv](v4-seed0/log.csv) |" in table
    assert "| v4-seed1 | ok | 3 | 0.30 | 0.30 | 3 | 10 | 3600 |" in table
    assert "| v4-seed2 | ok | 3 | 0.40 | 0.34 | 2 | — | 3600 |" in table
    assert "| v1-seed0 | ok | 3 | 0.40 | 0.40 | 2 | — | — |" in table
    nan = "error: training stopped, loss became nan at epoch 2, step 7"
    assert f"| v2-seed0 | failed (exit 3): {nan} | 1 | 2.00 | 2.00 | 1 |" in table
    assert "| v3-seed0 | incomplete (2/3 epochs) | 2 | 0.50 | 0.50 | 2 |" in table

    # Environment, dates and commands as the runs recorded them.
    assert ("- backend **jax** on **NVIDIA H200**; python 3.11.7, keras 3.15.1, numpy 2.4.6, jax 0.11.2 "
            "(v2-seed0, v4-seed0, v4-seed1, v4-seed2)") in table
    assert "- not recorded (not started by this harness): v1-seed0, v3-seed0" in table
    assert "- runs from 2026-11-21T10:00:00+00:00 to 2026-11-23T11:00:00+00:00" in table
    assert "KERAS_BACKEND=jax python capsulenet.py --seed 1  # v4-seed1" in table
    assert "python experiments/reproduce.py --epochs 3" in table
    assert [r.failed for r in results] == [False, True, False, False, False, False]


def test_table_only_rebuilds_the_table_and_fails_on_a_failed_run(campaign: Path) -> None:
    result = run_script(HARNESS, "--table_only", "--out", str(campaign), env=harness_env(), timeout=60)
    assert result.returncode == 1, describe(result)  # v2-seed0 failed
    table = (campaign / "results.md").read_text()
    assert "| v4 | 3 | 0.392 | 3/3 | 3 | 0.350 ± 0.050 | 0.320 ± 0.020 | 11.5 |" in table
    # Without run.json nor --epochs, an unfinished run is known by its backup/ alone.
    assert "| v3-seed0 | incomplete (2/? epochs) |" in table

    write_record(campaign / "v2-seed0", variant="v2", seed=0, epochs=1, returncode=0)
    result = run_script(HARNESS, "--table_only", "--out", str(campaign), env=harness_env(), timeout=60)
    assert result.returncode == 0, describe(result)
    assert "| v2 | 1 | 0.392 | 1/1 | 1 | 2.000 (1 run) |" in (campaign / "results.md").read_text()


def test_output_parsing_of_progress_bars_and_errors(tmp_path: Path) -> None:
    # What a Keras progress bar leaves in a file: redraws with backspaces, carriage returns, colours.
    bar = "\x1b[1m1/2\x1b[0m \x1b[32m━━\x1b[0m 1s/step - loss: 0.9"
    raw = (f"Epoch 1/1\n{bar}\b\b\b\b\r\x1b[1m2/2\x1b[0m 6s 1s/step - loss: 0.8   \n"
           "7s - loss: 0.8100 - val_capsnet_accuracy: 0.1500\n")
    assert reproduce.clean_line(raw.split("\n")[1]) == "2/2 6s 1s/step - loss: 0.8"
    (tmp_path / "stdout.log").write_text(raw + "Epoch 1/1\n13s - loss: 0.7\n")
    assert reproduce.epoch_seconds(tmp_path / "stdout.log") == (7.0, 13.0)

    marker = reproduce.ATTEMPT_MARKER
    (tmp_path / "stdout.log").write_text(
        f"{marker}first: python capsulenet.py\nerror: an earlier attempt's error\n"
        f"{marker}second: python capsulenet.py\nEpoch 1/1\nTraceback (most recent call last):\n"
        "  File \"capsulenet.py\", line 1\nValueError: something\n\n")
    assert reproduce.last_error_line(tmp_path / "stdout.log") == "ValueError: something"


def test_render_marks_a_run_without_log_and_survives_pipes_in_errors(tmp_path: Path) -> None:
    out = tmp_path / "runs"
    (out / "v1-seed0").mkdir(parents=True)
    write_record(out / "v1-seed0", epochs=1, returncode=2, error="error: a | b")
    results = reproduce.collect(out)
    text = reproduce.render(out, results, datetime.datetime(2026, 1, 1))
    assert "| v1-seed0 | failed (exit 2): error: a \\| b | — | — | — | — | — | — | — |" in text
    assert "table written 2026-01-01T00:00:00" in text


# ---------------------------------------------------------------------------------------------
# The real thing, tiny
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def tiny_npz(tmp_path: Path) -> Path:
    return save_npz(tmp_path / "tiny.npz", synthetic_raw(40, 20))


@pytest.mark.slow
def test_tiny_campaign_end_to_end(tiny_npz: Path, tmp_path: Path) -> None:
    """v1 and v4 × 1 seed × 1 epoch, two at once, through the real CLI (TensorFlow, CPU)."""
    out = tmp_path / "runs"
    args = ["--dataset", str(tiny_npz), "--variants", "v1,v4", "--seeds", "0", "--epochs", "1",
            "--parallel", "2", "--out", str(out), "--", "--batch_size", "20", "--shift_fraction", "0"]
    env = harness_env(KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="3")
    result = run_script(HARNESS, *args, env=env, timeout=300)
    assert result.returncode == 0, describe(result)
    table = (out / "results.md").read_text()

    for variant, flags in [("v1", "--routings 1 --lam_recon 0.0"), ("v4", "--routings 3 --lam_recon 0.392")]:
        folder = out / f"{variant}-seed0"
        log = pd.read_csv(folder / "log.csv")
        errors = 100 * (1 - log["val_capsnet_accuracy"])
        seconds = re.findall(r"^(\d+)s - loss:", (folder / "stdout.log").read_text(), flags=re.MULTILINE)
        assert len(log) == 1 and len(seconds) == 1
        final, best = f"{errors.iloc[-1]:.2f}", f"{errors.min():.2f}"
        assert f"| {variant}-seed0 | ok | 1 | {final} | {best} | 1 | {seconds[0]} |" in table
        command = (f"KERAS_BACKEND=tensorflow python capsulenet.py {flags} --epochs 1 --seed 0 "
                   f"--dataset {reproduce.display_path(tiny_npz)} "
                   f"--save_dir {reproduce.display_path(folder)} --batch_size 20 --shift_fraction 0")
        assert f"{command}  # {variant}-seed0" in table
        record = json.loads((folder / "run.json").read_text())
        assert record["returncode"] == 0 and record["command"] == command
        assert record["environment"]["versions"]["tensorflow"]
    assert "- backend **tensorflow** on **" in table

    # Rerun: both complete, nothing is started again.
    result = run_script(HARNESS, *args, env=env, timeout=60)
    assert result.returncode == 0, describe(result)
    assert result.stdout.count("skipped") == 2


@pytest.mark.slow
def test_a_failing_run_is_reported_and_the_harness_exits_non_zero(tiny_npz: Path, tmp_path: Path) -> None:
    out = tmp_path / "runs"
    result = run_script(HARNESS, "--dataset", str(tiny_npz), "--variants", "v1", "--seeds", "0",
                        "--epochs", "1", "--out", str(out), "--", "--lr_decay", "1.5",
                        env=harness_env(TF_CPP_MIN_LOG_LEVEL="3"), timeout=120)
    assert result.returncode == 1, describe(result)
    assert "v1-seed0: FAILED (exit 2): error: --lr_decay 1.5: must be in (0, 1]" in result.stdout
    assert ("| v1-seed0 | failed (exit 2): error: --lr_decay 1.5: must be in (0, 1] | — |"
            in (out / "results.md").read_text())


# ---------------------------------------------------------------------------------------------
# The baseline and MultiMNIST rows, and --stop_after
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant, flags", [
    ("baseline", ["--model", "baseline"]),
    ("multimnist", ["--multimnist", "--routings", "3", "--lam_recon", "0.392"]),
])
def test_baseline_and_multimnist_run_the_cli_with_their_flags(variant: str, flags: list[str]) -> None:
    out = REPO_ROOT / "experiments" / "runs" / "x"
    run = reproduce.Run(variant, 1, 50, "mnist", out, ("--steps_per_execution", "10"))
    assert run.cli_args() == ["capsulenet.py", *flags, "--epochs", "50", "--seed", "1", "--dataset",
                              "mnist", "--save_dir", f"experiments/runs/x/{variant}-seed1",
                              "--steps_per_execution", "10"]


@pytest.mark.parametrize("extra", [["--model", "capsnet"], ["--multimnist"]])
def test_variant_flags_are_refused_after_the_separator(extra: list[str]) -> None:
    result = run_script(HARNESS, "--dry_run", "--", *extra, env=harness_env(), timeout=60)
    assert result.returncode == 2 and "the harness sets it for each run" in result.stderr


def test_deadline_stops_at_the_epoch_end_after_which_the_next_would_not_fit() -> None:
    """Deadline at t = 100 s with a 10 s margin: runs must be stopping by t = 90 s."""
    deadline = reproduce.Deadline(end=100.0, margin=10.0)
    assert deadline.stop_at == 90.0
    assert not deadline.stop_after_epoch([])  # still starting
    assert not deadline.stop_after_epoch([5.0])  # in its first epoch: nothing backed up yet
    assert not deadline.stop_after_epoch([5.0, 40.0])  # epoch 2 began at 40, ends ~75 (35 s): fits
    assert deadline.stop_after_epoch([5.0, 50.0])  # began at 50, ends ~95: would not
    assert deadline.stop_after_epoch([5.0, 40.0, 80.0])  # began at 80, ends ~120
    assert not deadline.stop_after_epoch([5.0, 40.0, 60.0])  # the latest epoch's 20 s: ends ~80
    # A new run needs its first epoch (start-up included) before 90 s.
    assert deadline.may_start(70.0, 15.0) and not deadline.may_start(80.0, 15.0)
    assert deadline.may_start(89.0, 0.0) and not deadline.may_start(90.0, 0.0)


def test_a_run_paused_at_the_deadline_is_no_failure(tmp_path: Path) -> None:
    out = tmp_path / "runs"
    write_log(out / "v4-seed0", [0.99, 0.995])
    (out / "v4-seed0" / "backup").mkdir()
    write_record(out / "v4-seed0", epochs=5, returncode=130, stopped="deadline", error="interrupted")
    write_log(out / "v4-seed1", [0.99])
    write_record(out / "v4-seed1", epochs=5, returncode=130, error="interrupted")  # Ctrl-C: not paused
    results = reproduce.collect(out)
    assert [r.status for r in results] == [
        "paused at the deadline (2/5 epochs; the next invocation resumes it)",
        "interrupted (exit 130): interrupted"]
    assert [r.failed for r in results] == [False, True]
    assert not results[0].ok


@pytest.mark.parametrize("flags", [["--stop_after", "10", "--stop_margin", "10"],
                                   ["--stop_after", "10", "--stop_margin", "-1"]])
def test_stop_margin_must_be_below_stop_after(flags: list[str]) -> None:
    result = run_script(HARNESS, "--dry_run", *flags, env=harness_env(), timeout=60)
    assert result.returncode == 2 and "give 0 <= margin < seconds" in result.stderr


@pytest.fixture
def campaign_npz(tmp_path: Path) -> Path:
    return save_npz(tmp_path / "two-hundred.npz", synthetic_raw(200, 40))


CAMPAIGN_CLI = ["--", "--batch_size", "100", "--shift_fraction", "0"]  # 2 steps per epoch


@pytest.mark.slow
def test_deadline_at_an_epoch_end_then_the_next_invocation_resumes(
        campaign_npz: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    """v1 × seeds 0 and 1 at once, 2 epochs of 200 images. The first invocation's deadline falls in
    epoch 2 (made certain here whatever the machine's speed: the stopping rule, tested above with
    numbers, is told that the next epoch would not fit as soon as one epoch is backed up): both runs
    stop right after epoch 1, which the second invocation does not train again."""
    out = tmp_path / "runs"
    args = ["--dataset", str(campaign_npz), "--variants", "v1", "--seeds", "0,1", "--epochs", "2",
            "--parallel", "2", "--out", str(out)]
    for key, value in harness_env(TF_CPP_MIN_LOG_LEVEL="3").items():
        monkeypatch.setenv(key, value)
    with monkeypatch.context() as patch:
        patch.setattr(reproduce.Deadline, "stop_after_epoch", lambda self, starts: len(starts) >= 2)
        assert reproduce.main([*args, "--stop_after", "3600", *CAMPAIGN_CLI]) == reproduce.EXIT_DEADLINE
    assert "rerun the same command to resume them" in capsys.readouterr().err
    first = {}
    for seed in (0, 1):
        folder = out / f"v1-seed{seed}"
        record = json.loads((folder / "run.json").read_text())
        assert record["stopped"] == "deadline" and record["returncode"] != 0
        assert json.loads((folder / "backup" / "state.json").read_text())["epoch"] == 1
        first[seed] = pd.read_csv(folder / "log.csv")
        assert list(first[seed]["epoch"]) == [0]
    assert "| v1-seed0 | paused at the deadline (1/2 epochs;" in (out / "results.md").read_text()

    assert reproduce.main([*args, *CAMPAIGN_CLI]) == 0
    for seed in (0, 1):
        folder = out / f"v1-seed{seed}"
        log = pd.read_csv(folder / "log.csv")
        assert list(log["epoch"]) == [0, 1]
        pd.testing.assert_frame_equal(log.iloc[:1], first[seed])
        assert "Resuming after epoch 1" in (folder / "stdout.log").read_text()
        record = json.loads((folder / "run.json").read_text())
        assert record["attempts"] == 2 and record["returncode"] == 0 and not (folder / "backup").exists()
    lines = (out / "campaign.log").read_text().splitlines()
    assert [line.split(" ", 2)[1] for line in lines] == ["start:", "end", "start:", "end"]
    assert lines[1].endswith("end (deadline): 0/2 runs complete; unfinished: v1-seed0, v1-seed1")
    assert lines[3].endswith("end (done): 2/2 runs complete")
    assert "| v1 | 1 | 0.0 | 2/2 | 2 |" in (out / "results.md").read_text()


@pytest.mark.slow
def test_a_deadline_before_any_epoch_end_stops_everything_and_starts_nothing_more(
        campaign_npz: Path, tmp_path: Path) -> None:
    """--stop_after 4 with a 2 s margin: SIGTERM at 2 s, before the CLI can even load its data; the
    second run (one at a time) is never started."""
    out = tmp_path / "runs"
    result = run_script(HARNESS, "--dataset", str(campaign_npz), "--variants", "v1", "--seeds", "0,1",
                        "--epochs", "2", "--out", str(out), "--stop_after", "4", "--stop_margin", "2",
                        *CAMPAIGN_CLI, env=harness_env(TF_CPP_MIN_LOG_LEVEL="3"), timeout=120)
    assert result.returncode == reproduce.EXIT_DEADLINE, describe(result)
    assert "deadline: 1 run(s) not started (v1-seed1)" in result.stdout
    record = json.loads((out / "v1-seed0" / "run.json").read_text())
    assert record["stopped"] == "deadline" and record["returncode"] != 0
    assert not (out / "v1-seed0" / "backup").exists() and not (out / "v1-seed1").exists()
    assert "| v1-seed0 | paused at the deadline (0/2 epochs;" in (out / "results.md").read_text()
