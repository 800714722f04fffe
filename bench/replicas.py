"""Training throughput with 1 vs 2 data-parallel replicas (`capsulenet-multi-gpu.py`'s path).

Each configuration runs in its own child process, since TensorFlow splits a device into logical
ones only before it initialises: the step is `capsulenet.Trainer.train_step` (`strategy.run` +
`GradientTape` + the Keras optimizer, which all-reduces the gradients) over
`strategy.experimental_distribute_dataset` of `capsulenet.train_dataset`, i.e. exactly what both
scripts train with. Configurations:

- CPU: 1 device (the default strategy, as `capsulenet.py`) and 2 logical CPU devices
  (`MirroredStrategy`, as `capsulenet-multi-gpu.py --cpu --gpus 2`). Both slice the same cores, so
  on a small CPU this measures the overhead of the data-parallel path, not a speedup.
- GPU, when TensorFlow sees one: 1 GPU, and 2 GPUs when there are two, else 2 logical GPUs carved
  out of the one (a shared chip: again overhead, not speedup).

Usage:
    python bench/replicas.py                   # writes its block in bench/RESULTS.md
    python bench/replicas.py --steps 20 --gpu_batch 300 --no_cpu

Only the block between `<!-- replicas:start -->` and `<!-- replicas:end -->` of RESULTS.md is
written (one section per machine, replaced on a rerun there); everything else is kept.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS_PATH = REPO / "bench" / "RESULTS.md"
INTRO = (
    "\n## Data-parallel replicas (`python bench/replicas.py`)\n\n"
    "Training throughput of `capsulenet.Trainer.train_step` (the step both scripts run) with 1 and "
    "2 replicas at the same global batch, one section per machine; rerun it to refresh. "
    "Median over the measured steps, after warm-up steps that include tracing.\n\n"
)


# ---------------------------------------------------------------------------------------------
# Child: one configuration
# ---------------------------------------------------------------------------------------------


def configure(kind: str, replicas: int) -> tuple[Any, list[str]]:
    """Sets the devices up (before TensorFlow initialises) and returns the strategy and devices."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if kind == "cpu":
        if gpus:
            tf.config.set_visible_devices([], "GPU")
        if replicas > 1:
            cpu = tf.config.list_physical_devices("CPU")[0]
            tf.config.set_logical_device_configuration(
                cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(replicas)])
        devices = [f"/cpu:{i}" for i in range(replicas)]
    elif kind == "gpu":
        tf.config.set_visible_devices(gpus[:replicas], "GPU")
        devices = [f"/gpu:{i}" for i in range(replicas)]
    elif kind == "gpu-logical":  # several logical GPUs on the first physical one
        total = tf.config.experimental.get_device_details(gpus[0]).get("memory_limit_mb", 16_000)
        tf.config.set_visible_devices(gpus[:1], "GPU")
        tf.config.set_logical_device_configuration(gpus[0], [
            tf.config.LogicalDeviceConfiguration(memory_limit=int(total * 0.8 / replicas))
            for _ in range(replicas)])
        devices = [f"/gpu:{i}" for i in range(replicas)]
    else:
        raise ValueError(f"unknown device kind {kind!r}")
    if replicas == 1:
        return tf.distribute.get_strategy(), devices
    return tf.distribute.MirroredStrategy(devices), devices


def measure(config: dict[str, Any]) -> dict[str, Any]:
    """Times `config['steps']` training steps after `config['warmup']` ones."""
    import numpy as np
    import tensorflow as tf

    strategy, devices = configure(config["kind"], config["replicas"])
    sys.path.insert(0, str(REPO))
    import capsulenet

    batch, warmup, steps = config["batch"], config["warmup"], config["steps"]
    n = batch * (warmup + steps)
    rng = np.random.default_rng(0)
    x = rng.random((n, 28, 28, 1), dtype=np.float32)
    y = np.eye(10, dtype=np.float32)[rng.integers(10, size=n)]
    data = ((x, y), (x[:batch], y[:batch]))
    with tempfile.TemporaryDirectory() as save_dir:
        args = capsulenet.build_parser().parse_args(
            ["--batch_size", str(batch), "--seed", "0", "--save_dir", save_dir])
        with strategy.scope():
            model, _, _ = capsulenet.build_models(args, data, steps_per_epoch=warmup + steps)
            model.optimizer.build(model.trainable_variables)
        trainer = capsulenet.Trainer(model, args, strategy=strategy)
        batches = iter(strategy.experimental_distribute_dataset(capsulenet.train_dataset(
            tf.constant(x), tf.constant(y), batch, args.shift_fraction, seed=0, epoch=0)))
        times = []
        for step in range(warmup + steps):
            xb, yb = next(batches)
            start = time.perf_counter()
            float(trainer.train_step(xb, yb)[0])  # float() waits for the step to finish
            if step >= warmup:
                times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    return {"replicas": strategy.num_replicas_in_sync, "devices": devices,
            "strategy": type(strategy).__name__, "ms_per_step": 1000 * seconds,
            "samples_per_s": batch / seconds}


# ---------------------------------------------------------------------------------------------
# Parent: the configurations, the report
# ---------------------------------------------------------------------------------------------


def cpu_model() -> str:
    """The CPU's model name and the cores this process may use."""
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{name} ({cores} cores)"


def count_gpus() -> tuple[int, str | None]:
    """GPUs TensorFlow sees, and the first one's name (asked in a child, to keep this process
    free of TensorFlow's device set-up)."""
    code = ("import json, tensorflow as tf; g = tf.config.list_physical_devices('GPU'); "
            "d = tf.config.experimental.get_device_details(g[0]).get('device_name') if g else None; "
            "print(json.dumps([len(g), d]))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300, env=child_env())
    if result.returncode != 0:
        raise SystemExit("bench/replicas.py needs TensorFlow (tf.distribute), which does not load "
                         f"here: {last_line(result.stderr)}")
    count, name = json.loads(result.stdout.strip().splitlines()[-1])
    return count, name


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:200] if lines else "no output"


def plan(args: argparse.Namespace, n_gpus: int) -> list[dict[str, Any]]:
    """The configurations to measure on this machine."""
    common = {"warmup": args.warmup, "steps": args.steps}
    configs = []
    if not args.no_cpu:
        configs += [{"kind": "cpu", "replicas": r, "batch": args.cpu_batch, **common} for r in (1, 2)]
    if n_gpus:
        configs.append({"kind": "gpu", "replicas": 1, "batch": args.gpu_batch, **common})
        second = "gpu" if n_gpus >= 2 else "gpu-logical"
        configs.append({"kind": second, "replicas": 2, "batch": args.gpu_batch, **common})
    return configs


def run_child(config: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Measures one configuration in a fresh process; a failure becomes an `error` entry."""
    try:
        result = subprocess.run([sys.executable, __file__, "--child", json.dumps(config)],
                                capture_output=True, text=True, timeout=timeout, env=child_env())
    except subprocess.TimeoutExpired:
        return {**config, "error": f"timed out after {timeout:.0f}s"}
    if result.returncode != 0:
        return {**config, "error": last_line(result.stderr)}
    return {**config, **json.loads(result.stdout.strip().splitlines()[-1])}


DEVICE_LABELS = {"cpu": ("1 CPU device", "{r} logical CPU devices"), "gpu": ("1 GPU", "{r} GPUs"),
                 "gpu-logical": ("1 GPU", "{r} logical GPUs on one GPU")}
STRATEGY_NAMES = {"_DefaultDistributionStrategy": "default (one device)"}


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown table; speed-ups against the 1-replica row of the same device kind."""
    lines = ["| replicas | devices | strategy | global batch | ms/step | samples/s | vs 1 replica |",
             "|---:|---|---|---:|---:|---:|---:|"]
    base = {}
    for row in rows:
        kind = row["kind"].split("-")[0]
        label = DEVICE_LABELS[row["kind"]][row["replicas"] > 1].format(r=row["replicas"])
        if "error" in row:
            lines.append(f"| {row['replicas']} | {label} | - | {row['batch']} | failed: "
                         f"{row['error'].replace('|', '/')} | | |")
            continue
        if row["replicas"] == 1:
            base[kind] = row["samples_per_s"]
        ratio = f"{row['samples_per_s'] / base[kind]:.2f}x" if kind in base else "-"
        strategy = STRATEGY_NAMES.get(row["strategy"], row["strategy"])
        lines.append(f"| {row['replicas']} | {label} | {strategy} | {row['batch']} | "
                     f"{row['ms_per_step']:.0f} | {row['samples_per_s']:.1f} | {ratio} |")
    return "\n".join(lines) + "\n"


def section(rows: list[dict[str, Any]], machine: str, gpu: str | None) -> str:
    """This machine's section of the block."""
    import keras
    import tensorflow as tf

    today = datetime.date.today().isoformat()
    cores = cpu_model().rsplit("(", 1)[-1].rstrip(")")
    notes = [f"- Machine: {machine}. TensorFlow {tf.__version__}, Keras {keras.__version__}, "
             f"{today}.",
             f"- The logical CPU devices are slices of the same {cores}: two of them share "
             "those cores, so the 2-replica CPU row measures the cost of the data-parallel path "
             "(split batch, all-reduce, per-replica kernels on fewer threads each), not a speed-up."]
    if gpu:
        notes.append("- Logical GPUs (when only one GPU is present) share one chip likewise; real "
                     "speed-ups need as many physical GPUs as replicas.")
    return f"### {machine}, {today}\n\n" + "\n".join(notes) + "\n\n" + table(rows)


def write_results(text: str, key: str, path: Path = RESULTS_PATH) -> None:
    """Puts `text` as machine `key`'s section between this script's markers (`<!-- replicas:start -->`
    ... `<!-- replicas:end -->`) in `path`, keeping everything else."""
    import importlib.util

    # Loaded by path: bench/ need not be on sys.path when this module is imported elsewhere.
    spec = importlib.util.spec_from_file_location("results_md", REPO / "bench" / "results_md.py")
    results_md = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(results_md)
    results_md.write_section(path, "replicas", key, text, INTRO)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8, help="measured steps per configuration")
    parser.add_argument("--warmup", type=int, default=2, help="steps before measuring (tracing)")
    parser.add_argument("--cpu_batch", type=int, default=32, help="global batch on CPU devices")
    parser.add_argument("--gpu_batch", type=int, default=300,
                        help="global batch on GPUs (the multi-GPU script's default)")
    parser.add_argument("--no_cpu", action="store_true", help="skip the CPU configurations")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per configuration")
    parser.add_argument("--results", type=Path, default=RESULTS_PATH)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(json.loads(args.child))))
        return 0
    n_gpus, gpu = count_gpus()
    machine = f"{gpu} x{n_gpus} + {cpu_model()}" if gpu else cpu_model()
    rows = []
    for config in plan(args, n_gpus):
        row = run_child(config, args.timeout)
        rows.append(row)
        print(json.dumps(row), flush=True)
    key = re.sub(r"[^a-z0-9]+", "-", machine.lower()).strip("-")
    text = section(rows, machine, gpu)
    print(text)
    write_results(text, key, args.results)
    print(f"Written to {args.results}")
    return 0 if all("error" not in row for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
