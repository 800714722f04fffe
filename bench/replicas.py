"""Training throughput with 1 vs 2 data-parallel replicas (`capsulenet-multi-gpu.py`'s path).

Each configuration runs in its own child process, since TensorFlow splits a device into logical
ones only before it initialises: the step is `backends.TensorFlowSteps.train` (`strategy.run` +
`GradientTape` + the Keras optimizer, which all-reduces the gradients; each replica takes its slice
of the global batch) on the product's shifted NumPy batches (`batches.train_batches`), i.e. exactly
what both scripts train with. Configurations:

- CPU: 1 device (the default strategy, as `capsulenet.py`) and 2 logical CPU devices
  (`MirroredStrategy`, as `capsulenet-multi-gpu.py --cpu --gpus 2`). Both slice the same cores, so
  on a small CPU this measures the overhead of the data-parallel path, not a speedup.
- GPU, when TensorFlow sees one: 1 GPU, and 2 GPUs when there are two, else 2 logical GPUs carved
  out of the one (a shared chip: again overhead, not speedup).

Usage:
    python bench/replicas.py --write           # rewrites this machine's section of bench/RESULTS.md
    python bench/replicas.py --steps 20 --gpu_batch 300 --no_cpu
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import common

INTRO = ("\n## Data-parallel replicas (`python bench/replicas.py`)\n\n"
         "Training throughput of `backends.TensorFlowSteps.train` (the step both command lines run) with 1 "
         "and 2 replicas at the same global batch, one section per machine, rewritten in place by "
         "`--write`. Median over the measured steps, after warm-up steps that include tracing.\n\n")

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
    """Times `config['steps']` training steps after `config['warmup']` ones (tracing included)."""
    strategy, devices = configure(config["kind"], config["replicas"])
    from capsnet import batches

    batch, warmup, steps = config["batch"], config["warmup"], config["steps"]
    x, y = common.synthetic_data(batch * (warmup + steps), seed=0)
    step = common.build_product(batch, strategy=strategy).steps  # as capsulenet.run_train builds it
    times = []
    for i, (xb, yb) in enumerate(batches.train_batches(x, y, batch, common.DEFAULTS.shift_fraction,
                                                        seed=0, epoch=0)):
        start = time.perf_counter()
        step.train(xb, yb)  # NumPy values back: the step has finished
        if i >= warmup:
            times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    return {"replicas": strategy.num_replicas_in_sync, "devices": devices,
            "strategy": type(strategy).__name__, "ms_per_step": 1000 * seconds,
            "samples_per_s": batch / seconds}


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------


DEVICE_LABELS = {"cpu": ("1 CPU device", "{r} logical CPU devices"), "gpu": ("1 GPU", "{r} GPUs"),
                 "gpu-logical": ("1 GPU", "{r} logical GPUs on one GPU")}
STRATEGY_NAMES = {"_DefaultDistributionStrategy": "default (one device)"}


def replicas_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of `replicas.py`'s configurations; speed-ups against the 1-replica row of the
    same device kind. Each row: `kind`, `replicas`, `batch`, and `ms_per_step`, `samples_per_s`,
    `strategy` or `error`."""
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


def render_replicas(rows: list[dict[str, Any]], machine: str, cores: int, gpu: str | None,
                    versions: str, today: str) -> str:
    """`replicas.py`'s section for one machine: notes, then `replicas_table(rows)`."""
    notes = [f"- Machine: {machine}. {versions}, {today}.",
             f"- The logical CPU devices are slices of the same {cores} cores: two of them share "
             "those cores, so the 2-replica CPU row measures the cost of the data-parallel path "
             "(split batch, all-reduce, per-replica kernels on fewer threads each), not a speed-up."]
    if gpu:
        notes.append("- Logical GPUs (when only one GPU is present) share one chip likewise; real "
                     "speed-ups need as many physical GPUs as replicas.")
    return f"### {machine}, {today}\n\n" + "\n".join(notes) + "\n\n" + replicas_table(rows)


# ---------------------------------------------------------------------------------------------
# Parent: the configurations
# ---------------------------------------------------------------------------------------------

GPU_QUERY = ("import json, keras, tensorflow as tf; g = tf.config.list_physical_devices('GPU'); "
             "d = tf.config.experimental.get_device_details(g[0]).get('device_name') if g else None; "
             "print(json.dumps({'count': len(g), 'name': d, 'versions': "
             "f'TensorFlow {tf.__version__}, Keras {keras.__version__}'}))")


def query_tensorflow() -> dict[str, Any]:
    """GPUs TensorFlow sees, the first one's name, and the versions (asked in a child, to keep this
    process free of TensorFlow's device set-up).

    Raises:
        SystemExit: TensorFlow does not load here.
    """
    result = common.run_child_code(GPU_QUERY)
    if "error" in result:
        raise SystemExit("bench/replicas.py needs TensorFlow (tf.distribute), which does not load "
                         f"here: {result['error']}")
    return result


def plan(args: argparse.Namespace, n_gpus: int) -> list[dict[str, Any]]:
    """The configurations to measure on this machine."""
    same = {"warmup": args.warmup, "steps": args.steps}
    configs = []
    if not args.no_cpu:
        configs += [{"kind": "cpu", "replicas": r, "batch": args.cpu_batch, **same} for r in (1, 2)]
    if n_gpus:
        configs.append({"kind": "gpu", "replicas": 1, "batch": args.gpu_batch, **same})
        second = "gpu" if n_gpus >= 2 else "gpu-logical"
        configs.append({"kind": second, "replicas": 2, "batch": args.gpu_batch, **same})
    return configs


def run_config(config: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Measures one configuration in a fresh process; a failure becomes an `error` entry."""
    return {**config, **common.run_child("replicas.py", ["--child", json.dumps(config)], timeout=timeout)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8, help="measured steps per configuration")
    parser.add_argument("--warmup", type=int, default=2, help="steps before measuring (tracing)")
    parser.add_argument("--cpu_batch", type=int, default=32, help="global batch on CPU devices")
    parser.add_argument("--gpu_batch", type=int, default=300,
                        help="global batch on GPUs (the multi-GPU script's default)")
    parser.add_argument("--no_cpu", action="store_true", help="skip the CPU configurations")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per configuration")
    parser.add_argument("--results", type=Path, default=common.RESULTS_PATH)
    parser.add_argument("--write", action="store_true", help="rewrite this machine's section of --results")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(json.loads(args.child))))
        return 0
    tf_info = query_tensorflow()
    cpu = common.machine_name()
    gpu = tf_info["name"]
    machine = f"{gpu} x{tf_info['count']} + {cpu}" if gpu else cpu
    rows = []
    for config in plan(args, tf_info["count"]):
        row = run_config(config, args.timeout)
        rows.append(row)
        print(json.dumps(row), flush=True)
    text = render_replicas(rows, machine, common.machine.cpu_cores(), gpu, tf_info["versions"],
                           datetime.date.today().isoformat())
    print(text)
    if args.write:
        common.write_section(args.results, "replicas", common.slug(machine), text, INTRO)
        print(f"Written to {args.results}")
    return 0 if all("error" not in row for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
