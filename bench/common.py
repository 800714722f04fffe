"""What every benchmark script shares: the repository on the import path, the benchmark's data, the
machine's description, timing and memory probes, and child processes.

The scripts of `bench/` run as `python bench/SCRIPT.py`, so Python puts `bench/` on the import path
and they import each other by bare name (`import common`); the product's modules live one folder up.
Nothing here runs at import: a script calls `use_repo()` before importing the product.

Usage::

    import common

    common.use_repo()                                # now `import capsulenet` works
    x, y = common.synthetic_data(100, seed=0)        # [100, 28, 28, 1], [100, 10]
    seconds = common.timed(lambda: model.predict(x))
    stats = common.summarize([0.5, 0.6, 0.55])       # {'median', 'q1', 'q3', 'n'}
    result = common.run_child("bench.py", ["--probe", "memory"])   # its last JSON line
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_PATH = BENCH_DIR / "RESULTS.md"

# The benchmark's workload: MNIST-shaped data, the product's default model and batch.
INPUT_SHAPE = (28, 28, 1)
N_CLASS = 10
ROUTINGS = 3
BATCH = 100
EPOCH_IMAGES = 60_000  # MNIST training set: 600 steps per epoch
VALID_IMAGES = 10_000  # MNIST test set, the validation data
DIGIT = 5  # the class of the manipulation grid (the CLI's default --digit)


def use_repo() -> Path:
    """Puts the repository root first on `sys.path` (once), so that the product's modules
    (`capsulenet`, `training`, ...) import by bare name as in the product itself; returns the root."""
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    return REPO_ROOT


def synthetic_data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """MNIST-shaped data: `x` float32 `[n, 28, 28, 1]` in [0, 1], about 80% zeros like MNIST's
    background; `y` one-hot `[n, 10]` cycling through the classes so that every class occurs."""
    rng = np.random.default_rng(seed)
    x = (rng.random((n,) + INPUT_SHAPE, dtype=np.float32)
         * (rng.random((n,) + INPUT_SHAPE) < 0.2)).astype("float32")
    y = np.eye(N_CLASS, dtype="float32")[np.arange(n) % N_CLASS]
    return x, y


# ---------------------------------------------------------------------------------------------
# The machine
# ---------------------------------------------------------------------------------------------


def cpu_info() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (`model name`, `flags`, ...); empty elsewhere."""
    fields: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                break  # the end of the first processor
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
    return fields


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (or `platform.processor()` elsewhere)."""
    return cpu_info().get("model name") or platform.processor() or platform.machine()


def cpu_cores() -> int:
    """Cores this process may run on."""
    with contextlib.suppress(AttributeError):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def machine_key(text: str) -> str:
    """A RESULTS.md section key from a machine's description: `'CPU Xeon (2 cores)'` ->
    `'cpu-xeon-2-cores'`."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


def timed(fn: Callable[[], Any]) -> float:
    """Wall seconds of one call of `fn`; `fn` must wait for its device itself (read a result back)."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def timed_calls(fn: Callable[[], Any], repeats: int) -> list[float]:
    """Wall seconds of each of `repeats` calls of `fn`."""
    return [timed(fn) for _ in range(repeats)]


def summarize(values: Sequence[float]) -> dict[str, float]:
    """Median, quartiles and count of a list of seconds."""
    if len(values) == 1:
        return {"median": values[0], "q1": values[0], "q3": values[0], "n": 1}
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return {"median": median, "q1": q1, "q3": q3, "n": len(values)}


def interleave(names: Sequence[str], rounds: int, measure: Callable[[str, int], list[float]],
               log: Callable[[str], None]) -> dict[str, list[float]]:
    """Runs `measure(name, round)` for every name, round after round, rotating the order, so that a
    machine that slows down or speeds up during the run affects every name alike.

    Returns:
        every name's samples of all rounds, pooled.
    """
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        order = list(names[r % len(names):]) + list(names[: r % len(names)])
        for name in order:
            values = measure(name, r)
            samples[name].extend(values)
            log(f"  round {r + 1}/{rounds} {name}: median {statistics.median(values):.3f} s of "
                f"{len(values)}")
    return samples


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
