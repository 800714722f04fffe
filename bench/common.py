"""What every benchmark script shares: the repository on the import path, the workload and its data,
the product's models built as the command line builds them, statistics, memory probes, child
processes, and the one writer of `bench/RESULTS.md`.

The scripts of `bench/` run as `python bench/SCRIPT.py`, so Python puts `bench/` on the import path
and they import each other by bare name (`import common`); the product's package lives one folder up.
Importing this module puts it on the path (`use_repo`) and imports Keras (through the training
defaults); nothing here builds a model or picks a device.

Usage::

    import common

    x, y = common.synthetic_data(100, seed=0)              # [100, 28, 28, 1], [100, 10]
    built = common.build_product()                         # training.build with the CLI's defaults
    stats = common.summarize([0.5, 0.6, 0.55])             # {'median', 'q1', 'q3', 'n'}
    common.write_section(common.RESULTS_PATH, "layers", common.machine_slug(), text, intro)
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_PATH = BENCH_DIR / "RESULTS.md"


def use_repo() -> Path:
    """Puts the repository root first on `sys.path` (once), so that `capsnet` and `capsulenet` import
    from this clone; returns the root."""
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    return REPO_ROOT


use_repo()
from capsnet import machine  # noqa: E402  (no Keras at import)
from capsnet.training import DEFAULTS  # noqa: E402, F401  (the workload's flags: lr, lam_recon, ...)

# The workload: MNIST-shaped data, the command line's default model and batch.
INPUT_SHAPE = (28, 28, 1)
N_CLASS = 10
ROUTINGS = DEFAULTS.routings
BATCH = DEFAULTS.batch_size
EPOCH_IMAGES = 60_000  # MNIST training set: 600 steps per epoch
VALID_IMAGES = 10_000  # MNIST test set, the validation data
DIGIT = 5  # the class of the manipulation grid (the CLI's default --digit)


def synthetic_data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """MNIST-shaped data: `x` float32 `[n, 28, 28, 1]` in [0, 1], about 80% zeros like MNIST's
    background; `y` one-hot `[n, 10]` cycling through the classes so that every class occurs."""
    rng = np.random.default_rng(seed)
    x = (rng.random((n,) + INPUT_SHAPE, dtype=np.float32)
         * (rng.random((n,) + INPUT_SHAPE) < 0.2)).astype("float32")
    y = np.eye(N_CLASS, dtype="float32")[np.arange(n) % N_CLASS]
    return x, y


# ---------------------------------------------------------------------------------------------
# The models, as the command line builds them
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def precision_policy(name: str | None) -> Iterator[None]:
    """Sets Keras' global dtype policy for the models built inside, then restores float32."""
    import keras

    if name is None:
        yield
        return
    keras.mixed_precision.set_global_policy(name)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy("float32")


def build_product(batch: int = BATCH, policy: str | None = None, jit_compile: bool = False,
                  implementation: str | None = None, strategy: Any = None, tune: bool = True) -> Any:
    """`training.build` with the command line's defaults at `batch`, under dtype `policy`; the
    PrimaryCaps convolution chosen as `capsulenet.py` chooses it (`autotune.tune_model`, from the
    cache or timed, its line printed), or `implementation` ("im2col", "conv") when given.

    Returns:
        `training.Built` (models, optimizer, steps; the optimizer's variables built).
    """
    import dataclasses

    from capsnet import autotune, training

    config = dataclasses.replace(DEFAULTS, batch_size=batch, seed=0)
    with precision_policy(policy):
        built = training.build(INPUT_SHAPE, N_CLASS, config, EPOCH_IMAGES // BATCH, strategy=strategy,
                               jit_compile=jit_compile)
    if implementation is not None:
        autotune.tune_model(built.model, batch, explicit=implementation)
    elif tune:
        replicas = strategy.num_replicas_in_sync if strategy is not None else 1
        autotune.tune_model(built.model, max(1, batch // replicas))
    built.steps.build_optimizer()
    return built


def build_original(batch: int = BATCH, source: Any = None) -> Any:
    """The original formulation (bench/original_formulation.py) through the same `training.build`,
    without XLA (TensorFlow 1.x had none); `source`'s weights copied in when given."""
    import dataclasses

    import original_formulation as original

    from capsnet import training

    config = dataclasses.replace(DEFAULTS, batch_size=batch, seed=0)
    built = training.build(INPUT_SHAPE, N_CLASS, config, EPOCH_IMAGES // BATCH,
                           architecture=original.OriginalCapsNet)
    if source is not None:
        original.copy_weights(source, built.model)
    for model in (built.model, built.eval_model, built.manipulate_model):
        model.jit_compile = False  # "auto" would pick XLA on a GPU
    built.steps.build_optimizer()
    return built


# ---------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------


def summarize(values: Sequence[float]) -> dict[str, float]:
    """Median, quartiles and count of a list of seconds."""
    if len(values) == 1:
        return {"median": values[0], "q1": values[0], "q3": values[0], "n": 1}
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return {"median": median, "q1": q1, "q3": q3, "n": len(values)}


def timed(fn: Callable[[], Any]) -> float:
    """Wall seconds of one call of `fn`; `fn` must wait for its device itself (read a result back)."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleave(fns: dict[str, Callable[[], Any]], rounds: int, log: Callable[[str], None] | None = print,
               self_timed: bool = False, warmup: int = 0) -> dict[str, list[float]]:
    """`machine.interleave`'s samples (the scripts warm up themselves unless `warmup`)."""
    return machine.interleave(fns, rounds, warmup=warmup, self_timed=self_timed, log=log).samples


# ---------------------------------------------------------------------------------------------
# The machine
# ---------------------------------------------------------------------------------------------


def machine_name() -> str:
    """`'<CPU model> (<n> cores)'`."""
    return f"{machine.cpu_model()} ({machine.cpu_cores()} cores)"


def slug(text: str) -> str:
    """A RESULTS.md section key: `'CPU Xeon (2 cores)'` -> `'cpu-xeon-2-cores'`."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def machine_slug() -> str:
    """This machine's section key."""
    return slug(machine_name())


# ---------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------


def _proc_status_mb(field: str) -> float | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return None


def rss_mb() -> float:
    """Resident set size now, MiB (from /proc; 0 where unavailable)."""
    return _proc_status_mb("VmRSS") or 0.0


def peak_rss_mb() -> float:
    """This process's RSS high-water mark, MiB.

    On Linux from `VmHWM` in /proc/self/status: `getrusage`'s `ru_maxrss` would be wrong in a child
    process, because Linux carries over the high-water of the pre-`exec` image, i.e. of the forked
    copy of the parent (so every child would report at least the parent's size).
    """
    peak = _proc_status_mb("VmHWM")
    if peak is not None:
        return peak
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


# ---------------------------------------------------------------------------------------------
# Child processes
# ---------------------------------------------------------------------------------------------


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment for a child benchmark process, without `TF_CONFIG` (a child of a multi-worker
    shell must not join that cluster) and with TensorFlow's C++ notes quieted, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    env.update(extra or {})
    return env


def start_child(script: str, argv: Sequence[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    """Starts `bench/<script> argv...` in a child process (its output piped back)."""
    return _start([str(BENCH_DIR / script), *argv], env)


def _start(python_args: list[str], env: dict[str, str] | None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *python_args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=child_env(env), cwd=str(REPO_ROOT))


def finish_child(child: subprocess.Popen, timeout: float = 900) -> dict[str, Any]:
    """Waits for a child; returns the last JSON object it printed, or `{'error': why}` (its last
    line of stderr, or the timeout)."""
    try:
        stdout, stderr = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        child.kill()
        child.communicate()
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in reversed(stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {"error": last_line(stderr)}


def run_child(script: str, argv: Sequence[str], env: dict[str, str] | None = None,
              timeout: float = 900) -> dict[str, Any]:
    """Runs `bench/<script> argv...` and waits; see `finish_child`."""
    return finish_child(start_child(script, argv, env), timeout)


def run_child_code(code: str, timeout: float = 300) -> dict[str, Any]:
    """Runs `python -c code` and waits; see `finish_child`."""
    return finish_child(_start(["-c", code], None), timeout)


def last_line(text: str) -> str:
    """The last non-empty line of `text` (at most 200 characters), e.g. a child's error."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:200] if lines else "no output"


# ---------------------------------------------------------------------------------------------
# bench/RESULTS.md
# ---------------------------------------------------------------------------------------------


def write_section(path: Path, owner: str, key: str, section: str, intro: str) -> None:
    """Puts `section` as machine `key`'s part of script `owner`'s block in `path`, atomically.

    Each script owns the block between `<!-- OWNER:start -->` and `<!-- OWNER:end -->`; inside it, one
    section per machine sits between `<!-- OWNER:device KEY -->` and `<!-- OWNER:device-end KEY -->`.
    A rerun on a machine replaces that machine's section in place; everything outside the block and
    the other machines' sections are kept. The file, the block (opened by `intro`) and the section
    are created when missing.
    """
    from capsnet import atomic

    start, stop = f"<!-- {owner}:start -->", f"<!-- {owner}:end -->"
    begin, end = f"<!-- {owner}:device {key} -->", f"<!-- {owner}:device-end {key} -->"
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    block = f"{begin}\n{section}{end}\n\n"
    if start in text and stop in text.split(start, 1)[1]:
        head, rest = text.split(start, 1)
        inner, tail = rest.split(stop, 1)
    else:
        head, inner, tail = text.rstrip("\n") + "\n\n", "", "\n"
    if begin in inner and end in inner.split(begin, 1)[1]:
        before, after = inner.split(begin, 1)
        inner = before + block + after.split(end, 1)[1].lstrip("\n")
    else:
        inner = (inner if inner.strip() else intro) + block
    inner = inner if inner.endswith("\n") else inner + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text_atomic(path, head + start + inner + stop + tail)


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """A Markdown table's lines."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
