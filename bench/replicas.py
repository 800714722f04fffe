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
    python bench/replicas.py                   # writes its block in bench/RESULTS.md
    python bench/replicas.py --steps 20 --gpu_batch 300 --no_cpu

Only the block between `<!-- replicas:start -->` and `<!-- replicas:end -->` of RESULTS.md is
written (one section per machine, replaced on a rerun there); everything else is kept.
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
import report

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
    common.use_repo()
    import capsulenet
    from capsnet import backends, batches, training

    batch, warmup, steps = config["batch"], config["warmup"], config["steps"]
    x, y = common.synthetic_data(batch * (warmup + steps), seed=0)
    train = training.TrainConfig(batch_size=batch, seed=0)
    # As capsulenet.run: model, optimizer and compile inside the strategy's scope (an optimizer made
    # outside it keeps the default strategy and refuses to apply under MirroredStrategy).
    with strategy.scope():
        model, _, _ = capsulenet.CapsNet(common.INPUT_SHAPE, common.N_CLASS, common.ROUTINGS)
        optimizer = training.make_optimizer(train.lr, train.lr_decay, warmup + steps)
        capsulenet.compile_like_original(model, optimizer, train.lam_recon)
    step = backends.TensorFlowSteps(model, optimizer, train.lam_recon, batch, strategy)
    step.build_optimizer()
    batches = batches.train_batches(x, y, batch, train.shift_fraction, seed=0, epoch=0)
    times = []
    for i, (xb, yb) in enumerate(batches):
        start = time.perf_counter()
        step.train(xb, yb)  # NumPy values back: the step has finished
        if i >= warmup:
            times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    return {"replicas": strategy.num_replicas_in_sync, "devices": devices,
            "strategy": type(strategy).__name__, "ms_per_step": 1000 * seconds,
            "samples_per_s": batch / seconds}


# ---------------------------------------------------------------------------------------------
# Parent: the configurations, the report
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
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(json.loads(args.child))))
        return 0
    tf_info = query_tensorflow()
    cpu = f"{common.cpu_model()} ({common.cpu_cores()} cores)"
    gpu = tf_info["name"]
    machine = f"{gpu} x{tf_info['count']} + {cpu}" if gpu else cpu
    rows = []
    for config in plan(args, tf_info["count"]):
        row = run_config(config, args.timeout)
        rows.append(row)
        print(json.dumps(row), flush=True)
    text = report.render_replicas(rows, machine, common.cpu_cores(), gpu, tf_info["versions"],
                                  datetime.date.today().isoformat())
    print(text)
    common.use_repo()  # report.write_section writes through the product's atomic writer
    report.write_section(args.results, "replicas", common.machine_key(machine), text,
                         report.REPLICAS_INTRO)
    print(f"Written to {args.results}")
    return 0 if all("error" not in row for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
