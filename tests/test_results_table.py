"""README's results table (`experiments/results_table.py`) from hand-made run folders: the numbers
of each row by hand, unfinished rows, two campaigns holding the same seed, a longer run's own row,
MultiMNIST's training pairs, and the README written between its markers (or only printed without)."""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT, child_env, describe, run_script

SCRIPT = "experiments/results_table.py"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


results_table = sys.modules.get("results_table") or _load("results_table")


def make_run(folder: Path, accuracies: list[float], epochs: int, backup: bool = False,
             returncode: int = 0, **record: object) -> None:
    """A run folder as reproduce.py leaves it: log.csv with these test accuracies, run.json."""
    folder.mkdir(parents=True)
    with (folder / "log.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["epoch", "loss", "val_capsnet_accuracy"])
        writer.writerows([epoch, 0.1, accuracy] for epoch, accuracy in enumerate(accuracies))
    (folder / "run.json").write_text(json.dumps({"epochs": epochs, "returncode": returncode, **record}))
    if backup:
        (folder / "backup").mkdir()


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    """Campaigns for a table of 3-epoch rows over 3 seeds. Test errors (%) = 100 (1 - accuracy):

    v4 (campaign a): finals 0.35, 0.30, 0.40 -> mean 0.350, std sqrt((0 + 0.05² + 0.05²) / 2) = 0.050;
        bests 0.32, 0.30, 0.34 -> 0.320 (0.020).
    v1: seed 0 complete (final 0.40, best 0.40); seed 1 paused at 1/3 in campaign a, at 2/3 in
        campaign b (the further one counts); seed 2 absent.
    v4 for 5 epochs (campaign long): seed 0 at 2/5, its own row.
    baseline: finals 0.39, 0.42, 0.40 -> mean 0.40333, std sqrt((0.01333² + 0.01667² + 0.00333²) / 2)
        = 0.015275; bests the same (each log's second epoch is its best).
    multimnist: seed 0, finals 5.00 after 3 epochs of 6 steps of 50 pairs = 900 pairs.
    """
    root = tmp_path / "runs"
    a = root / "a"
    for seed, accuracies in enumerate([[0.9950, 0.9968, 0.9965], [0.9960, 0.9962, 0.9970],
                                       [0.9955, 0.9966, 0.9960]]):
        make_run(a / f"v4-seed{seed}", accuracies, 3)
    make_run(a / "v1-seed0", [0.99, 0.996, 0.996], 3)
    make_run(a / "v1-seed1", [0.98], 3, backup=True, returncode=130, stopped="deadline")
    make_run(root / "b" / "v1-seed1", [0.98, 0.99], 3, backup=True, returncode=130, stopped="deadline")
    make_run(root / "long" / "v4-seed0", [0.99, 0.995], 5, backup=True)
    for seed, final in enumerate([0.9961, 0.9958, 0.9960]):
        make_run(a / f"baseline-seed{seed}", [0.98, final, final], 3)
    make_run(a / "multimnist-seed0", [0.80, 0.90, 0.95], 3,
             argv=["python", "capsulenet.py", "--multimnist", "--batch_size", "50"])
    bar = "6/6 ━━━━━━━━━━━━━━━━━━━━ 1s 90ms/step - loss: 0.2000"
    (a / "multimnist-seed0" / "stdout.log").write_text(
        "".join(f"Epoch {e}/3\n3/6 ━━━━━━━━━━ 0s - loss: 0.3\r{bar}\n" for e in (1, 2, 3)))
    (root / "notes.md").write_text("not a campaign")
    return root


def test_rows_by_hand(runs: Path) -> None:
    text = results_table.table(results_table.gather(runs), seeds=3, epochs=3)
    lines = text.splitlines()
    assert lines[:2] == [
        "| method | routing | reconstruction | this project | original CapsNet-Keras | paper |",
        "|---|---|---|---|---|---|"]
    assert lines[2:] == [
        "| baseline CNN | – | – | **0.403 (0.015)**; best epoch 0.403 (0.015); 3 seeds × 3 epochs | – "
        "| 0.39 |",
        "| CapsNet-v1 | 1 | no | **0.400 (1 run)**; best epoch 0.400 (1 run) (unfinished: 1 of 3 seeds × 3 "
        "epochs done (seed 1 at 2/3)) | 0.39 (0.024) | 0.34 (0.032) |",
        "| CapsNet-v2 | 1 | yes | not run yet | 0.36 (0.009) | 0.29 (0.011) |",
        "| CapsNet-v3 | 3 | no | not run yet | 0.40 (0.016) | 0.35 (0.036) |",
        "| CapsNet-v4 | 3 | yes | **0.350 (0.050)**; best epoch 0.320 (0.020); 3 seeds × 3 epochs | "
        "0.34 (0.016) | 0.25 (0.005) |",
        "| CapsNet-v4, 5 epochs | 3 | yes | unfinished: 0 of 3 seeds × 5 epochs done (seed 0 at 2/5) | "
        "0.34 (0.016) | 0.25 (0.005) |",
        "| MultiMNIST CapsNet | 3 | yes | **5.00 (1 run)**; best epoch 5.00 (1 run); after 900 training "
        "pairs (unfinished: 1 of 3 seeds × 3 epochs done) | – | 5.2 |",
        "| MultiMNIST baseline CNN | – | – | not run yet | – | 8.1 |",
    ]


def test_no_runs_at_all(tmp_path: Path) -> None:
    text = results_table.table(results_table.gather(tmp_path / "missing"), seeds=3, epochs=50)
    assert text.count("not run yet") == 7


README = ("# Title\n\nBefore.\n\n<!-- results-table:start -->\n| old | table |\n<!-- results-table:end -->\n"
          "\nAfter.\n")


def test_readme_is_written_between_the_markers_only(runs: Path, tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(README)
    args = ["--runs", str(runs), "--readme", str(readme), "--epochs", "3"]
    result = run_script(SCRIPT, *args, env=child_env(), timeout=60)
    assert result.returncode == 0, describe(result)
    expected = results_table.table(results_table.gather(runs), seeds=3, epochs=3)
    assert readme.read_text() == README.replace("| old | table |\n", expected)
    # Again: the same file (the table replaces itself, nothing accumulates).
    assert run_script(SCRIPT, *args, env=child_env(), timeout=60).returncode == 0
    assert readme.read_text() == README.replace("| old | table |\n", expected)


def test_without_markers_the_table_is_printed_and_the_readme_untouched(runs: Path, tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("# Title\n\nNo markers here.\n")
    result = run_script(SCRIPT, "--runs", str(runs), "--readme", str(readme), "--epochs", "3",
                        env=child_env(), timeout=60)
    assert result.returncode == 0, describe(result)
    assert result.stdout == results_table.table(results_table.gather(runs), seeds=3, epochs=3)
    assert "no '<!-- results-table:start -->' ... '<!-- results-table:end -->' lines" in result.stderr
    assert readme.read_text() == "# Title\n\nNo markers here.\n"


def test_the_repository_readme_holds_the_generated_table() -> None:
    """README.md's table is what the generator makes of experiments/runs/ (rerun it after a campaign)."""
    text = (REPO_ROOT / "README.md").read_text()
    expected = results_table.table(results_table.gather(REPO_ROOT / "experiments" / "runs"), 3, 50)
    assert results_table.replace_between_markers(text, expected) == text
