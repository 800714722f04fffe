"""Reproduces the original's MNIST table: runs `capsulenet.py` itself for CapsNet-v1…v4 (and the paper's
baseline CNN and MultiMNIST), K seeds, E epochs, then writes a markdown table of the test errors beside
the original's and the paper's.

Each run is the real command line (`python capsulenet.py --routings R --lam_recon L --epochs E --seed S
--dataset D --save_dir OUT/vN-seedS ...`, started with this interpreter in the repository root, with this
environment, so `KERAS_BACKEND=jax` passes through) in its own folder, its output in `stdout.log`. The
table (`OUT/results.md`) is rebuilt from the run folders every time: per run the final and best-epoch test
error from `log.csv`, per variant mean ± std over seeds, seconds per epoch, backend, device, library
versions, dates and the exact commands. A failed run is reported with its exit code and last error line,
and the harness then exits 1. Rerunning the same command skips completed runs and resumes the others
(the CLI resumes a run from its `backup/`).

For short GPU windows, `--stop_after SECONDS` ends the invocation within that time: each run stops
right after an epoch end when its next epoch would not fit, every run still going gets SIGTERM
`--stop_margin` seconds before the end (it keeps its completed epochs), and no run starts that could
not complete an epoch; the exit status is then 75 and the next invocation of the same command resumes
them. Each invocation's start and outcome are appended to `OUT/campaign.log`.

Usage (from the repository root)::

    python experiments/reproduce.py --dataset ../shared/data/mnist.npz --seeds 0,1,2 --epochs 50 \\
        --out experiments/runs/mnist                       # v4, v1, v2, v3, one run at a time
    KERAS_BACKEND=jax python experiments/reproduce.py --dataset ../shared/data/mnist.npz --variants v4 \\
        --parallel 3 --out experiments/runs/mnist-jax      # 3 runs at once sharing one GPU
    python experiments/reproduce.py ... --dry_run          # print the commands only
    python experiments/reproduce.py ... -- --batch_size 50 --mixed_precision   # extra CLI flags
    python experiments/reproduce.py --table_only --out experiments/runs/mnist  # rebuild results.md
    KERAS_BACKEND=jax python experiments/reproduce.py --dataset mnist.npz --variants v1,v2,v3,baseline \
        --parallel 6 --stop_after 780 --out experiments/runs/mnist-jax \
        -- --steps_per_execution 20     # one GPU window: rerun it in the next window to continue

The harness imports neither Keras nor a backend: it starts processes and reads CSV files, so that it
works the same whichever backend the runs use.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

REPO = Path(__file__).resolve().parents[1]
CLI = "capsulenet.py"



@dataclasses.dataclass(frozen=True)
class Variant:
    """A row of the table: the CLI flags that make it, and the numbers it is compared with (test error
    in %, (mean, std) or (value, None); None where there is none)."""

    label: str
    flags: tuple[str, ...]
    routing: str  # as the original's table shows it
    reconstruction: str
    original: tuple[float, float | None] | None  # the original project's 3 trials of 50 epochs
    paper: tuple[float, float | None] | None


def _capsnet(label: str, routings: int, lam_recon: float, original: tuple[float, float],
             paper: tuple[float, float]) -> Variant:
    return Variant(label, ("--routings", str(routings), "--lam_recon", str(lam_recon)), str(routings),
                   "yes" if lam_recon else "no", original, paper)


# The original's table (the paper's section 5) and the paper's MultiMNIST (section 6).
VARIANTS: dict[str, Variant] = {
    "v1": _capsnet("CapsNet-v1", 1, 0.0, (0.39, 0.024), (0.34, 0.032)),
    "v2": _capsnet("CapsNet-v2", 1, 0.392, (0.36, 0.009), (0.29, 0.011)),
    "v3": _capsnet("CapsNet-v3", 3, 0.0, (0.40, 0.016), (0.35, 0.036)),
    "v4": _capsnet("CapsNet-v4", 3, 0.392, (0.34, 0.016), (0.25, 0.005)),
    "baseline": Variant("baseline CNN", ("--model", "baseline"), "–", "–", None, (0.39, None)),
    "multimnist": Variant("MultiMNIST CapsNet", ("--multimnist", "--routings", "3", "--lam_recon", "0.392"),
                          "3", "yes", None, (5.2, None)),
}
DEFAULT_VARIANTS = ("v4", "v1", "v2", "v3")  # v4 (the CLI's defaults) first: it is the headline

# Flags the harness sets itself; passing them after `--` would contradict the run's folder name.
OWN_FLAGS = ("--routings", "-r", "--lam_recon", "--epochs", "--seed", "--dataset", "--save_dir",
             "-t", "--testing", "--model", "--multimnist")
# Environment variables shown in front of the commands: the ones that change what a run does.
SHOWN_ENV = ("KERAS_BACKEND", "CUDA_VISIBLE_DEVICES", "XLA_PYTHON_CLIENT_PREALLOCATE",
             "TF_FORCE_GPU_ALLOW_GROWTH")

RUN_FOLDER = re.compile(rf"^({'|'.join(VARIANTS)})-seed(\d+)$")
# The CLI's per-epoch summary, e.g. "13s - loss: 0.0412 - ...": whole seconds of training + validation.
EPOCH_LINE = re.compile(r"^(\d+(?:\.\d+)?)s - loss:")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
# The CLI's line at the start of each epoch, printed after the previous epoch's backup was saved.
EPOCH_START = re.compile(r"^Epoch (\d+)/(\d+)$")
# Exit status when --stop_after stopped runs or left some unstarted: rerun to continue (sysexits'
# EX_TEMPFAIL, "try again later").
EXIT_DEADLINE = 75
# Written to stdout.log before each attempt, so that a failure's last error line comes from this attempt.
ATTEMPT_MARKER = "=== reproduce.py: "

# Weights, backups and TensorBoard logs stay out of git; log.csv, stdout.log, run.json, log.png and
# results.md are what a published run keeps.
GITIGNORE = "*.h5\n*.keras\nbackup*/\ntensorboard-logs/\n"

# Prints the library versions of the runs' environment without importing them (package metadata), so
# that it takes milliseconds; falls back to importing a module whose distribution has another name.
VERSIONS_PROBE = r"""
import importlib, importlib.metadata as md, json, os, platform
def version(module, *dists):
    for dist in dists:
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            pass
    try:
        return getattr(importlib.import_module(module), "__version__", "?")
    except ImportError:
        return None
backend = os.environ.get("KERAS_BACKEND", "tensorflow")
out = {"python": platform.python_version(), "keras": version("keras", "keras"),
       "numpy": version("numpy", "numpy")}
if backend == "tensorflow":
    out["tensorflow"] = version("tensorflow", "tensorflow", "tensorflow-cpu", "tf-nightly")
elif backend == "jax":
    out["jax"] = version("jax", "jax")
    out["jaxlib"] = version("jaxlib", "jaxlib")
else:
    out[backend] = version(backend, backend)
print(json.dumps(out))
"""


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run: a variant with a seed, in its own folder under the campaign's `out`."""

    variant: str
    seed: int
    epochs: int
    dataset: str  # as the CLI receives it (a path relative to the repository root, or a name)
    out: Path  # absolute
    extra: tuple[str, ...] = ()  # further CLI flags, the same for every run

    @property
    def name(self) -> str:
        return f"{self.variant}-seed{self.seed}"

    @property
    def save_dir(self) -> Path:
        return self.out / self.name

    def cli_args(self) -> list[str]:
        """The CLI's arguments, script first; run from the repository root."""
        return [CLI, *VARIANTS[self.variant].flags, "--epochs", str(self.epochs), "--seed", str(self.seed),
                "--dataset", self.dataset, "--save_dir", display_path(self.save_dir), *self.extra]

    def command(self, shown_env: Mapping[str, str]) -> str:
        """The command as a user would type it in the repository root."""
        prefix = "".join(f"{key}={shlex.quote(value)} " for key, value in shown_env.items())
        return prefix + shlex.join(["python", *self.cli_args()])


@dataclasses.dataclass(frozen=True)
class LogSummary:
    """A run's `log.csv` in test errors: 100 × (1 − val_capsnet_accuracy), the test set being the
    validation data, as in the original."""

    epochs: int
    final_error: float
    best_error: float
    best_epoch: int  # 1-based, as in weights-NN.weights.h5


@dataclasses.dataclass(frozen=True)
class RunResult:
    """What the table says about one run folder."""

    name: str
    variant: str
    seed: int
    status: str
    ok: bool
    failed: bool
    log: LogSummary | None
    seconds: tuple[float, ...]  # per epoch, from stdout.log
    record: dict[str, Any]  # run.json, empty when the folder was not made by this harness
    folder: Path | None = None


# ---------------------------------------------------------------------------------------------
# Paths, environment and machine
# ---------------------------------------------------------------------------------------------


def display_path(path: Path) -> str:
    """`path` as seen from the repository root: relative inside it or beside it (`../shared/...`),
    absolute elsewhere (a relative `../../../tmp/x` would only obscure it)."""
    path = Path(os.path.abspath(path))
    if path == REPO or REPO in path.parents:
        return str(path.relative_to(REPO))
    if REPO.parent in path.parents:
        return os.path.relpath(path, REPO)
    return str(path)


def cli_dataset(dataset: str) -> str:
    """The `--dataset` value for a CLI started in the repository root: an existing path is re-expressed
    from there; anything else (`mnist`, `fashion_mnist`) is passed unchanged."""
    return display_path(Path(dataset)) if os.path.exists(dataset) else dataset


def child_environment(base: Mapping[str, str], parallel: int, gpu: bool
                      ) -> tuple[dict[str, str], dict[str, str]]:
    """The runs' environment (`base` plus what sharing one GPU needs) and the part shown in commands.

    Several runs at once on one GPU: JAX would otherwise preallocate 75% of the GPU memory in the first
    process and fail in the next, TensorFlow would map all of it (a CPU-only TensorFlow needs nothing).
    """
    env = dict(base)
    backend = env.get("KERAS_BACKEND", "tensorflow")
    if parallel > 1 and backend == "jax":
        env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    if parallel > 1 and backend == "tensorflow" and gpu:
        env.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")
    env["PYTHONUNBUFFERED"] = "1"  # each epoch's line reaches stdout.log when it is printed
    return env, {key: env[key] for key in SHOWN_ENV if key in env}


def device_name() -> str:
    """The GPU(s) `nvidia-smi` lists, else the CPU model and the CPUs this process may use."""
    if shutil.which("nvidia-smi"):
        try:
            names = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                                   capture_output=True, text=True, timeout=30, check=True).stdout.split("\n")
            names = [name.strip() for name in names if name.strip()]
            if names:
                return names[0] if len(names) == 1 else f"{len(names)} × {names[0]}"
        except (OSError, subprocess.SubprocessError):
            pass  # a driver without a GPU: describe the CPU
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{model}, {cpus} CPUs"


def probe_environment(env: Mapping[str, str]) -> dict[str, Any]:
    """Backend, device and library versions as the runs see them (asked from a child with `env`)."""
    result = subprocess.run([sys.executable, "-c", VERSIONS_PROBE], env=dict(env), capture_output=True,
                            text=True, timeout=120)
    try:
        versions = json.loads(result.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        versions = {"error": (result.stderr.strip().splitlines() or ["no output"])[-1]}
    return {"backend": env.get("KERAS_BACKEND", "tensorflow"), "device": device_name(),
            "versions": versions, "python_executable": sys.executable}


# ---------------------------------------------------------------------------------------------
# Run folders: state on disk
# ---------------------------------------------------------------------------------------------


def read_log(path: Path) -> LogSummary | None:
    """The test errors of a `log.csv`; None when it is missing or has no epoch yet."""
    if not path.is_file():
        return None
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return None
    errors = [100 * (1 - float(row["val_capsnet_accuracy"])) for row in rows]
    best = errors.index(min(errors))  # the first epoch to reach it, as the best checkpoint
    return LogSummary(len(rows), errors[-1], errors[best], int(rows[best]["epoch"]) + 1)


def read_record(save_dir: Path) -> dict[str, Any]:
    """The run's `run.json` (written by this harness), or {}."""
    try:
        return json.loads((save_dir / "run.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def is_complete(save_dir: Path, epochs: int) -> bool:
    """Whether a run needs no (re)start: `epochs` epochs logged, no backup of an unfinished run, and no
    failure recorded (a run that failed after its last epoch is retried)."""
    log = read_log(save_dir / "log.csv")
    record = read_record(save_dir)
    return (log is not None and log.epochs >= epochs and not (save_dir / "backup").exists()
            and record.get("returncode") in (None, 0))


def clean_line(text: str) -> str:
    """One line of terminal output as it finally looks: colours removed, and of a progress bar
    redrawn with carriage returns and backspaces only the last drawing (keeps stdout.log small)."""
    text = ANSI.sub("", text).rstrip("\r\n")
    text = text.rsplit("\r", 1)[-1]
    chars: list[str] = []
    for char in text:
        if char == "\b":
            if chars:
                chars.pop()
        else:
            chars.append(char)
    return "".join(chars).rstrip()


def epoch_seconds(stdout_log: Path) -> tuple[float, ...]:
    """The seconds of each epoch in the CLI's output (its per-epoch summary line), all attempts."""
    if not stdout_log.is_file():
        return ()
    lines = stdout_log.read_text(errors="replace").split("\n")
    matches = (EPOCH_LINE.match(clean_line(line)) for line in lines)
    return tuple(float(match.group(1)) for match in matches if match)


def last_error_line(stdout_log: Path) -> str:
    """The last attempt's error: the CLI's `error: ...` line if it printed one, else its last line (the
    exception of a traceback)."""
    if not stdout_log.is_file():
        return ""
    text = stdout_log.read_text(errors="replace").rsplit(ATTEMPT_MARKER, 1)[-1]
    lines = [clean_line(line) for line in text.split("\n")[1:]]
    lines = [line for line in lines if line]
    errors = [line for line in lines if line.startswith("error:")]
    return ((errors or lines or [""])[-1])[:300]


def write_text_atomic(path: Path, text: str) -> None:
    """Writes `text` to a temporary name, then renames it: a reader never sees half a file."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def collect(out: Path, epochs_wanted: int | None = None) -> list[RunResult]:
    """The state of every `vN-seedS` folder in `out`, sorted by variant and seed.

    `epochs_wanted` is what a run must reach to count as complete when its run.json does not say
    (a folder made by hand); without either, a log without `backup/` is complete.
    """
    results = []
    folders = [p for p in (out.iterdir() if out.is_dir() else ()) if p.is_dir() and RUN_FOLDER.match(p.name)]
    for folder in folders:
        variant, seed = RUN_FOLDER.match(folder.name).groups()
        record = read_record(folder)
        log = read_log(folder / "log.csv")
        wanted = record.get("epochs") or epochs_wanted
        returncode = record.get("returncode")
        failed = returncode not in (None, 0) and record.get("stopped") != "deadline"
        if returncode not in (None, 0) and not failed:
            done = log.epochs if log else 0
            status = f"paused at the deadline ({done}/{wanted or '?'} epochs; the next invocation resumes it)"
        elif failed:
            kind = "interrupted" if returncode in (130, 143, -signal.SIGINT, -signal.SIGTERM) else "failed"
            status = f"{kind} (exit {returncode}): {record.get('error') or '?'}"
        elif log is None:
            status = "running" if record and "finished" not in record else "no log.csv"
        elif (folder / "backup").exists() or (wanted and log.epochs < wanted):
            status = f"incomplete ({log.epochs}/{wanted or '?'} epochs)"
        else:
            status = "ok"
        results.append(RunResult(folder.name, variant, int(seed), status, status == "ok", failed, log,
                                 epoch_seconds(folder / "stdout.log"), record, folder))
    return sorted(results, key=lambda r: (r.variant, r.seed))


# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------


def mean_std(values: Sequence[float]) -> str:
    """`mean ± std` (std with ddof=1, as the original's table) in %, `x (1 run)`, or `—`."""
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.3f} (1 run)"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def reference_text(value: tuple[float, float | None] | None) -> str:
    """A published error: `mean ± std`, the value alone, or `—`."""
    if value is None:
        return "—"
    mean, std = value
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.3f}"


def flag_value(flags: Sequence[str], name: str) -> str:
    """The value after `name` in `flags`, or `—`."""
    return flags[flags.index(name) + 1] if name in flags else "—"


def cell(text: object) -> str:
    """Text safe inside a markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def median_text(seconds: Sequence[float]) -> str:
    return f"{statistics.median(seconds):g}" if seconds else "—"


def environment_lines(results: Sequence[RunResult]) -> list[str]:
    """One line per distinct environment the runs recorded (normally one)."""
    groups: dict[str, list[str]] = {}
    for result in results:
        environment = result.record.get("environment")
        if environment:
            shared = {k: v for k, v in environment.items() if k != "python_executable"}
            key = json.dumps(shared, sort_keys=True)
            groups.setdefault(key, []).append(result.name)
    lines = []
    for key, names in groups.items():
        environment = json.loads(key)
        first = ["python", "keras", "numpy"]
        libraries = first + sorted(set(environment["versions"]) - set(first))
        versions = ", ".join(f"{name} {environment['versions'][name]}" for name in libraries
                             if name in environment["versions"])
        which = "all runs" if len(names) == len(results) else ", ".join(names)
        lines.append(f"- backend **{environment['backend']}** on **{environment['device']}**; {versions} "
                     f"({which})")
    unknown = [r.name for r in results if not r.record.get("environment")]
    if unknown:
        lines.append(f"- not recorded (not started by this harness): {', '.join(unknown)}")
    return lines


def render(out: Path, results: Sequence[RunResult], now: datetime.datetime) -> str:
    """`results.md`: the per-variant table beside the original's and the paper's, the runs, the
    environment and the commands."""
    lines = [f"# CapsNet-v1…v4, baseline, MultiMNIST: `{display_path(out)}`", "",
             "Test error (%) = 100 × (1 − `val_capsnet_accuracy`) of each run's `log.csv` (the test set is "
             "the validation data, as in the original). *final*: after the last epoch; *best*: the best "
             "epoch's, which the best checkpoint holds (chosen on the test set, as the original's "
             "checkpoint: optimistic). Mean ± std (ddof=1) over the seeds of the runs that completed. "
             "s/epoch: median of the CLI's per-epoch lines (whole seconds, training + validation); "
             "wall: the whole run with start-up and saving, all attempts of a resumed run.", "",
             "| variant | routings | lam_recon | runs ok | epochs | final error (%) | best error (%) "
             "| s/epoch | original, 50 epochs, 3 runs | paper |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for variant in VARIANTS:
        runs = [r for r in results if r.variant == variant]
        if not runs:
            continue
        done = [r for r in runs if r.ok and r.log]
        epochs = sorted({r.log.epochs for r in done})
        seconds = [s for r in done for s in r.seconds]
        flags = VARIANTS[variant].flags
        routings, lam_recon = (flag_value(flags, name) for name in ("--routings", "--lam_recon"))
        lines.append(
            f"| {variant} | {routings} | {lam_recon} | {len(done)}/{len(runs)} | "
            f"{', '.join(map(str, epochs)) or '—'} | {mean_std([r.log.final_error for r in done])} | "
            f"{mean_std([r.log.best_error for r in done])} | {median_text(seconds)} | "
            f"{reference_text(VARIANTS[variant].original)} | {reference_text(VARIANTS[variant].paper)} |")
    lines += ["", "## Runs", "",
              "| run | status | epochs | final error (%) | best error (%) | best epoch | s/epoch | wall (s) "
              "| log |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        log = r.log
        wall = r.record.get("wall_seconds")
        link = f"[log.csv]({r.name}/log.csv)" if log else "—"
        lines.append(
            f"| {r.name} | {cell(r.status)} | {log.epochs if log else '—'} | "
            f"{f'{log.final_error:.2f}' if log else '—'} | {f'{log.best_error:.2f}' if log else '—'} | "
            f"{log.best_epoch if log else '—'} | {median_text(r.seconds)} | "
            f"{f'{wall:.0f}' if wall is not None else '—'} | {link} |")
    started = [r.record["started"] for r in results if r.record.get("started")]
    finished = [r.record["finished"] for r in results if r.record.get("finished")]
    lines += ["", "## Environment", "", *environment_lines(results)]
    if started:
        lines.append(f"- runs from {min(started)} to {max(finished) if finished else '(unfinished)'}")
    lines.append(f"- table written {now.isoformat(timespec='seconds')}")
    lines += ["", "## Commands", "",
              "Each run, from the repository root (`python`: the interpreter that ran the harness):", "",
              "```bash"]
    lines += [f"{r.record.get('command', '# (not recorded)')}  # {r.name}" for r in results]
    lines += ["```"]
    harness = sorted({r.record["harness"] for r in results if r.record.get("harness")})
    if harness:
        lines += ["", "Started by:", "", "```bash", *harness, "```"]
    return "\n".join(lines) + "\n"


def write_table(out: Path, epochs_wanted: int | None = None) -> list[RunResult]:
    """Rebuilds `out/results.md` from the run folders; returns what it found."""
    results = collect(out, epochs_wanted)
    write_text_atomic(out / "results.md", render(out, results, datetime.datetime.now().astimezone()))
    return results


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Job:
    """A started run."""

    run: Run
    process: subprocess.Popen
    copier: threading.Thread | None
    record: dict[str, Any]
    start: float
    # When each "Epoch k/N" line of this attempt appeared (monotonic seconds): every one after the first
    # marks the previous epoch as complete and backed up (the CLI prints it after the backup).
    epoch_starts: list[float] = dataclasses.field(default_factory=list)
    stopped: str | None = None  # why the harness stopped it ("deadline"), if it did


@dataclasses.dataclass(frozen=True)
class Deadline:
    """`--stop_after`: every run has exited by `end`; a run is sent SIGTERM by `end - margin` at the
    latest, and earlier, right after an epoch end, when its next epoch would not end before that.

    A run stopped right after an epoch end loses only the seconds of the epoch it had begun; one still
    running at `end - margin` loses its partial epoch, and keeps every completed one (the CLI stops on
    SIGTERM as on Ctrl-C). The next invocation resumes both from `backup/`.
    """

    end: float  # time.monotonic() seconds
    margin: float

    @property
    def stop_at(self) -> float:
        return self.end - self.margin

    def stop_after_epoch(self, epoch_starts: Sequence[float]) -> bool:
        """Whether a run whose epochs began at `epoch_starts` should stop at its latest epoch end: the
        epoch it has begun, as long as the one before, would end after `stop_at`."""
        if len(epoch_starts) < 2:
            return False  # no epoch ended in this attempt yet: no backup to stop at, no duration known
        return epoch_starts[-1] + (epoch_starts[-1] - epoch_starts[-2]) > self.stop_at

    def may_start(self, now: float, first_epoch: float) -> bool:
        """Whether a new run started `now` could complete an epoch (`first_epoch` seconds from start,
        0 when none was measured yet) before `stop_at`."""
        return now + first_epoch < self.stop_at


def now_text() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def copy_output(stream: IO[bytes], path: Path, epoch_starts: list[float] | None = None) -> None:
    """Copies a child's output to `path` line by line, each reduced to its final look (`clean_line`),
    noting in `epoch_starts` when each "Epoch k/N" line came."""
    with path.open("a", encoding="utf-8") as log:
        for raw in stream:
            line = clean_line(raw.decode("utf-8", errors="replace"))
            if epoch_starts is not None and EPOCH_START.match(line):
                epoch_starts.append(time.monotonic())
            log.write(line + "\n")
            log.flush()


def start(run: Run, env: Mapping[str, str], shown_env: Mapping[str, str], environment: dict[str, Any],
          harness: str) -> Job:
    """Starts `run`'s CLI in the repository root; its output goes to `save_dir/stdout.log`."""
    run.save_dir.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, *run.cli_args()]
    # A resumed run counts its earlier attempts in its start date and its wall time.
    earlier = read_record(run.save_dir) if (run.save_dir / "backup").exists() else {}
    record = {"variant": run.variant, "seed": run.seed, "epochs": run.epochs,
              "command": run.command(shown_env), "argv": argv, "harness": harness,
              "environment": environment, "started": earlier.get("started", now_text()),
              "attempts": earlier.get("attempts", 0) + 1, "returncode": None,
              "earlier_wall_seconds": earlier.get("wall_seconds", 0.0)}
    write_text_atomic(run.save_dir / "run.json", json.dumps(record, indent=1) + "\n")
    stdout_log = run.save_dir / "stdout.log"
    with stdout_log.open("a") as log:  # appended: a resumed run keeps its earlier epochs' lines
        log.write(f"{ATTEMPT_MARKER}{now_text()}: {record['command']}\n")
    # Same process group as the harness: whatever stops the harness's group stops the runs too.
    process = subprocess.Popen(argv, cwd=REPO, env=dict(env), stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    job = Job(run, process, None, record, time.monotonic())
    job.copier = threading.Thread(target=copy_output, args=(process.stdout, stdout_log, job.epoch_starts),
                                  daemon=True)
    job.copier.start()
    return job


def finish(job: Job) -> dict[str, Any]:
    """Records the ended run's exit code, last error line and times in its run.json."""
    returncode = job.process.wait()
    job.copier.join()
    record = {**job.record, "returncode": returncode, "finished": now_text(),
              "wall_seconds": round(job.record["earlier_wall_seconds"] + time.monotonic() - job.start, 1),
              "error": last_error_line(job.run.save_dir / "stdout.log") if returncode else None,
              "stopped": job.stopped}
    write_text_atomic(job.run.save_dir / "run.json", json.dumps(record, indent=1) + "\n")
    return record


def stop(jobs: Sequence[Job]) -> None:
    """Stops running CLIs the way Ctrl-C does (each keeps its last completed epoch and can resume): they
    get a few seconds to react to a terminal's Ctrl-C, which reached them too, then a SIGTERM of their
    own (not SIGINT: a background job of a non-interactive shell inherits SIGINT ignored)."""
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(job.process.poll() is None for job in jobs):
            time.sleep(0.2)
        for job in jobs:
            if job.process.poll() is None:
                job.process.send_signal(signal.SIGTERM)
        for job in jobs:
            job.process.wait(timeout=120)
    except (subprocess.TimeoutExpired, KeyboardInterrupt):  # stuck, or a second Ctrl-C: no more waiting
        for job in jobs:
            if job.process.poll() is None:
                job.process.kill()
    for job in jobs:
        finish(job)


def stop_for_deadline(jobs: Sequence[Job], deadline: Deadline) -> None:
    """SIGTERM to every run still going, then until `deadline.end` for them to exit; a run that has
    not by then is killed (its last backup stays)."""
    for job in jobs:
        if job.process.poll() is None and job.stopped is None:
            job.stopped = "deadline"
            job.process.send_signal(signal.SIGTERM)
    for job in jobs:
        try:
            job.process.wait(timeout=max(0.0, deadline.end - time.monotonic()))
        except subprocess.TimeoutExpired:
            job.process.kill()


def execute(runs: Sequence[Run], env: Mapping[str, str], shown_env: Mapping[str, str], parallel: int,
            environment: dict[str, Any], harness: str, deadline: Deadline | None = None) -> str:
    """Runs `runs`, at most `parallel` at a time, in order.

    Returns:
        "done", "interrupted" (Ctrl-C or SIGTERM to the harness) or "deadline" (`deadline` stopped
        runs or left some unstarted).
    """
    pending, running = list(runs), []
    total = len(runs)
    first_epoch = 0.0  # the longest start-to-first-epoch-end seen: what a new run needs at least
    outcome = "done"

    def on_sigterm(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_sigterm)  # `timeout` and schedulers send SIGTERM
    try:
        while pending or running:
            now = time.monotonic()
            if deadline is not None and now >= deadline.stop_at:
                stop_for_deadline(running, deadline)
            while pending and len(running) < parallel and (deadline is None
                                                           or deadline.may_start(now, first_epoch)):
                run = pending.pop(0)
                print(f"[{total - len(pending)}/{total}] {run.name}: {run.command(shown_env)}", flush=True)
                running.append(start(run, env, shown_env, environment, harness))
            for job in running:
                if len(job.epoch_starts) >= 2:
                    first_epoch = max(first_epoch, job.epoch_starts[1] - job.start)
                if (deadline is not None and job.stopped is None and job.process.poll() is None
                        and deadline.stop_after_epoch(job.epoch_starts)):
                    print(f"{job.run.name}: stopping after its epoch {len(job.epoch_starts) - 1} of this "
                          "attempt: the next would end after the deadline", flush=True)
                    job.stopped = "deadline"
                    job.process.send_signal(signal.SIGTERM)
            for job in [job for job in running if job.process.poll() is not None]:
                running.remove(job)
                record = finish(job)
                result = ("done" if record["returncode"] == 0 else "stopped for the deadline" if job.stopped
                          else f"FAILED (exit {record['returncode']}): {record['error']}")
                print(f"{job.run.name}: {result} after {record['wall_seconds']:.0f} s", flush=True)
                outcome = "deadline" if job.stopped else outcome
            if deadline is not None and pending and not running and not deadline.may_start(now, first_epoch):
                print(f"deadline: {len(pending)} run(s) not started ({', '.join(r.name for r in pending)})",
                      flush=True)
                return "deadline"
            time.sleep(0.2)
    except KeyboardInterrupt:
        print("interrupted: stopping the runs; rerun the same command to resume them", file=sys.stderr,
              flush=True)
        stop(running)
        return "interrupted"
    finally:
        signal.signal(signal.SIGTERM, previous)
    return outcome


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Runs capsulenet.py for CapsNet-v1..v4 x seeds and writes OUT/results.md.",
        epilog="Flags after `--` go to every capsulenet.py run, e.g. `-- --batch_size 50 --mixed_precision`.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--dataset", default="mnist", help="capsulenet.py's --dataset (a name or a path)")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                        help="comma-separated, run in this order: v1 = routings 1, no reconstruction; "
                             "v2 = 1, recon; v3 = 3, none; v4 = 3, recon (the CLI's defaults); "
                             "baseline = the paper's baseline CNN (--model baseline); multimnist = v4 on "
                             "MultiMNIST (--multimnist)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated --seed values")
    parser.add_argument("--epochs", default=50, type=int)
    parser.add_argument("--parallel", default=1, type=int, help="runs at once (they share the GPU)")
    parser.add_argument("--out", default=None,
                        help="campaign folder (default experiments/runs/DATASET-BACKEND-EPOCHSep)")
    parser.add_argument("--stop_after", type=float, default=None, metavar="SECONDS",
                        help="stop cleanly within SECONDS (a GPU window): runs stop at an epoch end when "
                             "their next epoch would not fit, all are sent SIGTERM --stop_margin seconds "
                             "before the end, no run starts that could not finish an epoch; rerun the same "
                             "command to resume them (exit status 75 while runs remain)")
    parser.add_argument("--stop_margin", type=float, default=60.0, metavar="SECONDS",
                        help="with --stop_after: the time the runs get to stop")
    parser.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
    parser.add_argument("--table_only", action="store_true",
                        help="rebuild OUT/results.md from its run folders")
    return parser


def sets_own_flag(token: str) -> bool:
    """Whether a CLI argument sets one of `OWN_FLAGS`, also as `--flag=x`, `-r3` or an abbreviation
    that argparse would accept (`--rout 1`)."""
    name = token.split("=", 1)[0]
    if name.startswith("--"):
        return len(name) > 2 and any(flag.startswith(name) for flag in OWN_FLAGS if flag.startswith("--"))
    return name[:2] in ("-r", "-t")


def parse(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """The harness's flags, and the CLI flags after `--`; exits 2 with a message on a bad one."""
    argv = list(argv)
    own, extra = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    parser = make_parser()
    args = parser.parse_args(own)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown or not args.variants or len(set(args.variants)) != len(args.variants):
        parser.error(f"--variants {','.join(args.variants)}: give distinct names among {', '.join(VARIANTS)}")
    try:
        args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--seeds {args.seeds}: give comma-separated integers")
    if (not args.seeds or len(set(args.seeds)) != len(args.seeds)
            or not all(0 <= s < 2**31 for s in args.seeds)):
        parser.error(f"--seeds {args.seeds}: give distinct integers in [0, 2**31)")
    if args.epochs < 1 or args.parallel < 1:
        parser.error("--epochs and --parallel must be at least 1")
    if args.stop_after is not None and not 0 <= args.stop_margin < args.stop_after:
        parser.error(f"--stop_after {args.stop_after:g} --stop_margin {args.stop_margin:g}: give "
                     "0 <= margin < seconds")
    clashing = [flag for flag in extra if sets_own_flag(flag)]
    if clashing:
        parser.error(f"{', '.join(clashing)} after `--`: the harness sets it for each run")
    if not args.table_only and not os.path.exists(args.dataset) and (
            os.sep in args.dataset or args.dataset.endswith(".npz")):
        parser.error(f"--dataset {args.dataset}: no such file or folder")
    return args, extra


def default_out(dataset: str, epochs: int, backend: str) -> Path:
    stem = Path(dataset.rstrip("/")).stem if os.path.exists(dataset) else dataset
    return REPO / "experiments" / "runs" / f"{stem}-{backend}-{epochs}ep"


def harness_command(argv: Sequence[str]) -> str:
    """This invocation as typed, with the folder it was typed in when that is not the repository root
    (relative `--out` and `--dataset` depend on it)."""
    if Path.cwd() == REPO:
        return shlex.join(["python", display_path(Path(__file__)), *argv])
    return f"cd {shlex.quote(str(Path.cwd()))} && " + shlex.join(["python", str(Path(__file__)), *argv])


def log_campaign(out: Path, text: str) -> None:
    """Appends a dated line to `out/campaign.log`: what each invocation started, stopped and left."""
    with (out / "campaign.log").open("a") as f:
        f.write(f"{now_text()} {text}\n")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    started = time.monotonic()
    args, extra = parse(argv)
    env, shown_env = child_environment(os.environ, args.parallel, gpu=shutil.which("nvidia-smi") is not None)
    out = (Path(os.path.abspath(args.out)) if args.out
           else default_out(args.dataset, args.epochs, env.get("KERAS_BACKEND", "tensorflow")))
    if args.table_only:
        if not out.is_dir():
            print(f"error: --out {args.out}: no such folder", file=sys.stderr)
            return 2
        results = write_table(out)
        print(f"Table of {len(results)} runs written to {display_path(out / 'results.md')}")
        return 1 if any(r.failed for r in results) else 0

    dataset = cli_dataset(args.dataset)
    runs = [Run(variant, seed, args.epochs, dataset, out, tuple(extra))
            for variant in args.variants for seed in args.seeds]
    if args.dry_run:
        for run in runs:
            done = "# complete, would be skipped: " if is_complete(run.save_dir, run.epochs) else ""
            print(done + run.command(shown_env))
        return 0

    out.mkdir(parents=True, exist_ok=True)
    if not (out / ".gitignore").exists():
        write_text_atomic(out / ".gitignore", GITIGNORE)
    todo = []
    for run in runs:
        if is_complete(run.save_dir, run.epochs):
            print(f"{run.name}: complete ({run.epochs} epochs logged, no backup), skipped")
        else:
            todo.append(run)
    outcome = "done"
    if todo:
        environment = probe_environment(env)
        harness = harness_command(argv)
        deadline = (Deadline(started + args.stop_after, args.stop_margin) if args.stop_after is not None
                    else None)
        log_campaign(out, f"start: {harness}")
        outcome = execute(todo, env, shown_env, args.parallel, environment, harness, deadline)
    results = write_table(out, args.epochs)
    print(f"Table written to {display_path(out / 'results.md')}")
    asked = {run.name for run in runs}
    failed = [r for r in results if r.failed and r.name in asked]
    for r in failed:
        print(f"{r.name}: {r.status}", file=sys.stderr)
    unfinished = [run.name for run in runs if not is_complete(run.save_dir, run.epochs)]
    if todo:
        log_campaign(out, f"end ({outcome}): {len(runs) - len(unfinished)}/{len(runs)} runs complete"
                          + (f"; unfinished: {', '.join(unfinished)}" if unfinished else ""))
    if outcome == "deadline" and not failed:
        print(f"stopped for the deadline: {len(unfinished)} run(s) unfinished ({', '.join(unfinished)}); "
              "rerun the same command to resume them", file=sys.stderr)
        return EXIT_DEADLINE
    return 130 if outcome == "interrupted" else 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
