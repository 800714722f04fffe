"""Writes README.md's results table from the run folders under `experiments/runs/`.

Every campaign folder of `reproduce.py` (`experiments/runs/NAME/` holding `vN-seedS/`, `baseline-seedS/`,
`multimnist-seedS/` run folders) counts. A row is a variant trained for the table's number of epochs
(50, as the original's table; `--epochs`) over `--seeds` seeds (3); runs of the same variant for another
number of epochs (e.g. v4 for 300) get a row of their own after it. The cell shows the final epoch's
test error, mean (std, ddof=1) over the complete runs, as the original's table does, and the best
epoch's beside it; a row that is not complete says how many seeds are done and how far the others
are. MultiMNIST says after how many training pairs. The original's and the paper's numbers stand
beside each row.

The table replaces what stands between the marker lines `<!-- results-table:start -->` and
`<!-- results-table:end -->` in README.md; without the markers it is printed, and the script says so.

Usage (from the repository root)::

    python experiments/results_table.py                   # update README.md
    python experiments/results_table.py --print           # print the table only
    python experiments/results_table.py --runs other/runs --readme other/README.md --epochs 3
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import reproduce  # noqa: E402

START = "<!-- results-table:start -->"
END = "<!-- results-table:end -->"
# Rows in the order of the original's table, then the paper's MultiMNIST (section 6).
ROW_ORDER = ("baseline", "v1", "v2", "v3", "v4", "multimnist")
# The paper's MultiMNIST CNN baseline (section 6): no run of it exists here, its row says so.
MULTIMNIST_CNN = ("MultiMNIST baseline CNN", "8.1")
# The last drawing of the CLI's progress bar, e.g. "600/600 ━━━━ 3s 5ms/step": steps per epoch.
PROGRESS = re.compile(r"^(\d+)/(\d+) ")
DEFAULT_BATCH = 100


@dataclasses.dataclass(frozen=True)
class Row:
    """The runs of one variant trained for one number of epochs, one per seed."""

    variant: str
    epochs: int
    runs: tuple[reproduce.RunResult, ...]


def wanted_epochs(result: reproduce.RunResult) -> int:
    """The epochs a run was started for (its run.json), else the epochs its log holds."""
    return int(result.record.get("epochs") or (result.log.epochs if result.log else 0))


def complete(result: reproduce.RunResult) -> bool:
    return result.ok and result.log is not None and result.log.epochs >= wanted_epochs(result)


def gather(runs_dir: Path) -> list[Row]:
    """Every run under `runs_dir`'s campaign folders, grouped by (variant, epochs); of two runs of the
    same variant, epochs and seed (two campaigns), the complete one, else the one further along."""
    best: dict[tuple[str, int, int], reproduce.RunResult] = {}
    campaigns = sorted(p for p in runs_dir.iterdir() if p.is_dir()) if runs_dir.is_dir() else []
    for campaign in campaigns:
        for result in reproduce.collect(campaign):
            key = (result.variant, wanted_epochs(result), result.seed)
            progress = (complete(result), result.log.epochs if result.log else 0)
            other = best.get(key)
            if other is None or progress > (complete(other), other.log.epochs if other.log else 0):
                best[key] = result
    groups: dict[tuple[str, int], list[reproduce.RunResult]] = {}
    for (variant, epochs, _), result in sorted(best.items()):
        groups.setdefault((variant, epochs), []).append(result)
    return [Row(variant, epochs, tuple(runs)) for (variant, epochs), runs in groups.items()]


def mean_std(values: Sequence[float], digits: int = 3) -> str:
    """`mean (std)` as the original's table writes it; `x (1 run)` for one value."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f} (1 run)"
    return f"{statistics.mean(values):.{digits}f} ({statistics.stdev(values):.{digits}f})"


def pairs_seen(result: reproduce.RunResult) -> int | None:
    """MultiMNIST training pairs a run has trained on: steps per epoch (the last progress bar in its
    stdout.log) x batch size (its command, else the CLI's default) x epochs logged."""
    log_path = result.folder / "stdout.log" if result.folder else None
    if log_path is None or not log_path.is_file() or result.log is None:
        return None
    steps = [int(m.group(2)) for line in log_path.read_text(errors="replace").splitlines()
             if (m := PROGRESS.match(reproduce.clean_line(line))) and m.group(1) == m.group(2)]
    if not steps:
        return None
    argv = result.record.get("argv", [])
    batch = int(argv[argv.index("--batch_size") + 1]) if "--batch_size" in argv else DEFAULT_BATCH
    return steps[-1] * batch * result.log.epochs


def millions(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 100_000 else f"{n:,}"


def measured(row: Row, seeds: int) -> str:
    """The cell of this project's numbers."""
    done = [r for r in row.runs if complete(r)]
    others = [r for r in row.runs if not complete(r)]
    digits = 2 if row.variant == "multimnist" else 3
    text = ""
    if done:
        finals = [r.log.final_error for r in done]
        bests = [r.log.best_error for r in done]
        text = f"**{mean_std(finals, digits)}**; best epoch {mean_std(bests, digits)}"
        if row.variant == "multimnist":
            pairs = [p for p in (pairs_seen(r) for r in done) if p]
            if pairs:
                text += f"; after {millions(min(pairs))} training pairs"
    if len(done) >= seeds and not others:
        return f"{text}; {len(done)} seeds × {row.epochs} epochs"
    progress = ", ".join(f"seed {r.seed} at {r.log.epochs if r.log else 0}/{row.epochs}" for r in others)
    status = f"unfinished: {len(done)} of {seeds} seeds × {row.epochs} epochs done"
    status += f" ({progress})" if progress else ""
    return f"{text} ({status})" if text else status


def table(rows: Sequence[Row], seeds: int, epochs: int) -> str:
    """The markdown table: every variant of `ROW_ORDER` (those without runs say so), each beside the
    original's and the paper's numbers."""
    lines = ["| method | routing | reconstruction | this project | original CapsNet-Keras | paper |",
             "|---|---|---|---|---|---|"]
    for variant in ROW_ORDER:
        info = reproduce.VARIANTS[variant]
        matching = sorted((r for r in rows if r.variant == variant), key=lambda r: r.epochs != epochs)
        if not any(r.epochs == epochs for r in matching):
            matching.insert(0, Row(variant, epochs, ()))
        for row in matching:
            label = info.label if row.epochs == epochs else f"{info.label}, {row.epochs} epochs"
            cell = measured(row, seeds) if row.runs else "not run yet"
            lines.append(f"| {label} | {info.routing} | {info.reconstruction} | {cell} | "
                         f"{reference(info.original)} | {reference(info.paper)} |")
        if variant == "multimnist":
            lines.append(f"| {MULTIMNIST_CNN[0]} | – | – | not run yet | – | {MULTIMNIST_CNN[1]} |")
    return "\n".join(lines) + "\n"


def reference(value: tuple[float, float | None] | None) -> str:
    """A published error as the original's table writes it: `0.34 (0.016)`, `0.39`, or `–`."""
    if value is None:
        return "–"
    mean, std = value
    return f"{mean:g}" if std is None else f"{mean:.2f} ({std:.3f})"


def replace_between_markers(text: str, block: str) -> str | None:
    """`text` with what stands between the markers replaced by `block`; None without both markers
    (in that order)."""
    start, end = text.find(START), text.find(END)
    if start < 0 or end < start:
        return None
    head = text[: start + len(START)]
    return f"{head}\n{block}{text[end:]}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--runs", default=str(reproduce.REPO / "experiments" / "runs"),
                        help="the folder of campaign folders")
    parser.add_argument("--readme", default=str(reproduce.REPO / "README.md"))
    parser.add_argument("--epochs", type=int, default=50, help="the epochs of the table's rows")
    parser.add_argument("--seeds", type=int, default=3, help="the seeds a row needs to be complete")
    parser.add_argument("--print", action="store_true", help="print the table, write nothing")
    args = parser.parse_args(argv)
    block = table(gather(Path(args.runs)), args.seeds, args.epochs)
    if args.print:
        print(block, end="")
        return 0
    readme = Path(args.readme)
    text = readme.read_text() if readme.is_file() else ""
    updated = replace_between_markers(text, block)
    if updated is None:
        print(block, end="")
        print(f"{readme}: no '{START}' ... '{END}' lines, so the table above was only printed; add them "
              "where the table belongs", file=sys.stderr)
        return 0
    if updated != text:
        reproduce.write_text_atomic(readme, updated)
    print(f"Table written into {reproduce.display_path(readme)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
