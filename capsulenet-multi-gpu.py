"""Data-parallel CapsNet training on several GPUs, several logical CPUs or several machines.

The flags, model, losses, training loop and test are those of `capsulenet.py` (its `run` and the modules
it calls: `capsnet_model.py`, `training.py`, `evaluation.py`); this script only chooses how the devices
share the work:

- TensorFlow, one machine: `tf.distribute.MirroredStrategy` over the first `--gpus` GPUs (or, with
  `--cpu`, `--gpus` logical CPU devices carved out of the processor, to try the same path without GPUs);
- TensorFlow, several machines: when the standard `TF_CONFIG` variable is set,
  `tf.distribute.MultiWorkerMirroredStrategy` over every worker's GPUs (one CPU device per worker
  with `--cpu`). Only the chief (task `chief`, or `worker` 0 without one) writes checkpoints,
  logs, plots and test outputs; every worker keeps its own resumable backup;
- JAX (`KERAS_BACKEND=jax`), one machine: `keras.distribution.DataParallel` over the first `--gpus`
  GPUs (or `--cpu`: as many CPU devices); each batch is sharded and XLA all-reduces the gradients.
  Several machines: `jax.distributed.initialize` from `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`
  and `JAX_PROCESS_ID`, the batch sharded over every process's devices (`jax_distributed.py`).
  `TF_CONFIG` is refused on JAX.
- PyTorch (`KERAS_BACKEND=torch`): one process per GPU (or per CPU share with `--cpu`) joined by
  `torch.distributed`, the gradients all-reduced in each step (`torch_distributed.py`); `--gpus N`
  starts `torchrun --standalone --nproc_per_node N` on this machine, and several machines are
  started with torchrun (its standard variables: `WORLD_SIZE`, `RANK`, `MASTER_ADDR`, `MASTER_PORT`).

Each step splits the global batch (`--batch_size`, 300 by default) across the replicas and
all-reduces the gradients (the Keras optimizer sums them over the replicas). After training it saves
the weights and the `.keras` model, then the chief runs the same test as
`capsulenet.py -t -w save_dir/trained_model.weights.h5`, on one device. Files written by either
script load in the other. A worker that loses a peer stops with one line and exit code 1; rerun every
worker with the same flags to resume from the last completed epoch (all workers use the chief's
`--seed`, so the resumed data order is the same).

Usage:
    python capsulenet-multi-gpu.py --gpus 2
    python capsulenet-multi-gpu.py --cpu --gpus 2 --dataset data.npz --epochs 1
    TF_CONFIG='{"cluster": {"worker": ["10.0.0.1:12345", "10.0.0.2:12345"]},
                "task": {"type": "worker", "index": 0}}' python capsulenet-multi-gpu.py --seed 1
    python capsulenet-multi-gpu.py -t -w result/trained_model.weights.h5
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's start-up chatter out of the CLI

import capsulenet  # noqa: E402 - imports TensorFlow but initialises no device
from capsnet import plots  # noqa: E402
from capsnet.backup import agree_on_resume_point as agree_on_backups  # noqa: E402
from capsnet.errors import UserError  # noqa: E402

TASK_TYPES = ("chief", "worker")


@dataclass(frozen=True)
class Task:
    """This process' place in a `TF_CONFIG` cluster."""

    type: str
    index: int
    is_chief: bool
    n_workers: int

    @property
    def backup_dir_name(self) -> str:
        """The chief keeps `capsulenet`'s `backup` folder; every other worker its own."""
        return capsulenet.BACKUP_DIR if self.is_chief else f"backup-{self.type}-{self.index}"


def build_parser() -> argparse.ArgumentParser:
    """`capsulenet.py`'s flags with the original multi-GPU defaults, plus `--gpus` and `--cpu`."""
    parser = capsulenet.build_parser(
        "Capsule Network on MNIST, trained data-parallel on several GPUs (or logical CPUs, or "
        "machines configured by TF_CONFIG).", batch_size=300)
    parser.add_argument("--gpus", default=2, type=int,
                        help="Number of GPUs to train on (per machine under TF_CONFIG); the global "
                             "batch is split across them")
    parser.add_argument("--cpu", action="store_true",
                        help="Use --gpus logical CPU devices instead of GPUs (to try or test the "
                             "data-parallel path without GPUs; under TF_CONFIG each worker uses "
                             "one CPU device)")
    return parser


def read_tf_config(environ: Mapping[str, str] = os.environ) -> Task | None:
    """Parses `TF_CONFIG`; None when it is unset or empty.

    Raises:
        UserError: it is not JSON, or lacks the cluster or this task.
    """
    raw = environ.get("TF_CONFIG", "").strip()
    if not raw:
        return None
    try:
        config = json.loads(raw)
        cluster, task = config["cluster"], config["task"]
        task_type, index = str(task["type"]), int(task["index"])
        members = {t: list(cluster.get(t, [])) for t in TASK_TYPES}
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise UserError(f"TF_CONFIG: expected JSON {{\"cluster\": {{\"worker\": [\"host:port\", "
                        f"...]}}, \"task\": {{\"type\": \"worker\", \"index\": 0}}}} ({e!r})") from e
    others = sorted(set(cluster) - set(TASK_TYPES))
    if others:
        raise UserError(f"TF_CONFIG: task types {others} are not supported; "
                        "MultiWorkerMirroredStrategy takes 'chief' and 'worker' tasks only")
    if task_type not in TASK_TYPES or not 0 <= index < len(members[task_type]):
        raise UserError(f"TF_CONFIG: task {task_type} {index} is not in the cluster {members}")
    is_chief = task_type == "chief" or (task_type == "worker" and index == 0
                                        and not members["chief"])
    return Task(task_type, index, is_chief, len(members["chief"]) + len(members["worker"]))


def hide_gpus() -> None:
    """Leaves TensorFlow only the CPU; must run before it initialises its devices."""
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        tf.config.set_visible_devices([], "GPU")


def configure_devices(args: argparse.Namespace, multi_worker: bool) -> list[str]:
    """Makes the devices to train on visible; must run before TensorFlow initialises its devices.

    Returns:
        the device names for `MirroredStrategy` (unused under `TF_CONFIG`).

    Raises:
        UserError: more GPUs are asked for than are visible.
    """
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    try:
        if args.cpu:
            hide_gpus()
            if multi_worker:  # MultiWorkerMirroredStrategy uses CPU:0 alone without GPUs
                return ["/cpu:0"]
            cpu = tf.config.list_physical_devices("CPU")[0]
            tf.config.set_logical_device_configuration(
                cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(args.gpus)])
            return [f"/cpu:{i}" for i in range(args.gpus)]
        if args.gpus > len(gpus):
            visible = (f"only {len(gpus)} GPU(s) are visible ({', '.join(g.name for g in gpus)})"
                       if gpus else "no GPU is visible")
            raise UserError(f"--gpus {args.gpus}: {visible}; ask for fewer, or add --cpu to "
                            f"train on {args.gpus} logical CPU devices")
        tf.config.set_visible_devices(gpus[: args.gpus], "GPU")
    except RuntimeError as e:  # TensorFlow was initialised earlier in this process
        raise UserError(f"--gpus/--cpu: devices can no longer be configured ({e})") from e
    return [f"/gpu:{i}" for i in range(args.gpus)]


def make_strategy(args: argparse.Namespace, task: Task | None) -> Any:
    """`MultiWorkerMirroredStrategy` under `TF_CONFIG`, else `MirroredStrategy` over the devices."""
    import tensorflow as tf

    devices = configure_devices(args, multi_worker=task is not None)
    if task is None:
        return tf.distribute.MirroredStrategy(devices)
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    # Its preemption notifier takes SIGTERM over and swallows it: hand it back to Python, so that
    # `kill` stops a worker as Ctrl-C does (capsulenet.main's handler).
    handler = signal.getsignal(signal.SIGTERM)
    if handler is not None:
        signal.signal(signal.SIGTERM, handler)
    return strategy


def jax_devices(args: argparse.Namespace) -> list[Any]:
    """The JAX devices to train on: the first `--gpus` GPUs, or with `--cpu` as many CPU devices
    (split from the processor, as TensorFlow's logical devices); must run before JAX initialises.

    Raises:
        UserError: more GPUs are asked for than are visible.
    """
    import jax

    try:
        if args.cpu:
            jax.config.update("jax_platforms", "cpu")
            jax.config.update("jax_num_cpu_devices", args.gpus)
            return jax.devices("cpu")[: args.gpus]
        gpus = [d for d in jax.devices() if d.platform == "gpu"]
    except RuntimeError as e:  # JAX was initialised earlier in this process
        raise UserError(f"--gpus/--cpu: devices can no longer be configured ({e})") from e
    if args.gpus > len(gpus):
        visible = (f"only {len(gpus)} GPU(s) are visible ({', '.join(str(g) for g in gpus)})"
                   if gpus else "no GPU is visible")
        raise UserError(f"--gpus {args.gpus}: {visible}; ask for fewer, or add --cpu to "
                        f"train on {args.gpus} CPU devices")
    return gpus[: args.gpus]


def train_data_parallel_jax(args: argparse.Namespace, task: Task | None) -> None:
    """The JAX backend: `keras.distribution.DataParallel` over the devices (the batch is sharded,
    XLA all-reduces the gradients), then the same test on one device."""
    import keras

    from capsnet.distributed import jax_distributed

    if task is not None:
        raise UserError("TF_CONFIG: on JAX, start every machine with JAX_COORDINATOR_ADDRESS, "
                        "JAX_NUM_PROCESSES and JAX_PROCESS_ID (jax.distributed); TF_CONFIG is TensorFlow's")
    cluster = jax_distributed.read_env()
    if cluster is not None and not (args.testing or args.predict is not None or args.export is not None):
        jax_distributed.train(cluster, cpu=args.cpu, gpus=args.gpus, batch_size=args.batch_size,
                              save_dir=args.save_dir, seed=args.seed, epochs=args.epochs,
                              run=lambda *where: run_on_process(args, *where),
                              test_alone=lambda: test_alone(args))
        return
    devices = jax_devices(args)
    if args.batch_size % len(devices):
        raise UserError(f"--batch_size {args.batch_size}: must be a multiple of the number of devices "
                        f"({len(devices)}) on the JAX backend; each takes an equal share")
    if args.testing or args.predict is not None or args.export is not None:  # no replicas needed
        capsulenet.run(args)
        return
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
    print(f"Data-parallel on {len(devices)} replica(s) (keras.distribution.DataParallel; this machine: "
          f"{', '.join(str(d) for d in devices)})")
    capsulenet.run(args, on_model=lambda model: plots.plot_model(model, Path(args.save_dir) / "model.png"))
    keras.distribution.set_distribution(None)
    test_alone(args)


def train_data_parallel_torch(args: argparse.Namespace, task: Task | None) -> None:
    """The PyTorch backend: processes joined by `torch.distributed` (started here through torchrun
    unless torchrun started this one), then the same test on one device."""
    from capsnet.distributed import torch_distributed

    if task is not None:
        raise UserError("TF_CONFIG: on PyTorch, start every machine with torchrun (its variables "
                        "WORLD_SIZE, RANK, MASTER_ADDR and MASTER_PORT say who is who); TF_CONFIG is "
                        "TensorFlow's")
    if args.testing or args.predict is not None or args.export is not None:  # no replicas needed
        capsulenet.run(args)
        return
    if not torch_distributed.launched_by_torchrun():
        import torch

        gpus = torch.cuda.device_count()
        if not args.cpu and args.gpus > gpus:
            visible = f"only {gpus} GPU(s) are visible" if gpus else "no GPU is visible"
            raise UserError(f"--gpus {args.gpus}: {visible}; ask for fewer, or add --cpu to "
                            f"train on {args.gpus} CPU processes")
        raise SystemExit(torch_distributed.relaunch_with_torchrun(args.gpus, sys.argv[1:]))
    torch_distributed.train(cpu=args.cpu, batch_size=args.batch_size, save_dir=args.save_dir, seed=args.seed,
                            epochs=args.epochs, run=lambda *where: run_on_process(args, *where),
                            test_alone=lambda: test_alone(args))


def run_on_process(args: argparse.Namespace, seed: int, is_chief: bool, backup_dir: str) -> None:
    """One process of a multi-process JAX or PyTorch run: trains with the seed every process agreed
    on (recorded in `args` for the backup's flags), writing the user's files on the chief only."""
    args.seed = seed
    capsulenet.run(args, is_chief=is_chief, backup_dir=backup_dir,
                   on_model=(lambda model: plots.plot_model(model, Path(args.save_dir) / "model.png"))
                   if is_chief else None)


def sum_over_workers(strategy: Any, values: Sequence[int]) -> list[int]:
    """Element-wise sum of every worker's `values` (each worker counted once, whatever its number
    of replicas), on every worker; also a barrier."""
    import tensorflow as tf

    per_worker = len(strategy.extended.worker_devices)

    def local(context: Any) -> Any:
        first = context.replica_id_in_sync_group % per_worker == 0
        return tf.constant([v if first else 0 for v in values], tf.int64)

    summed = strategy.reduce(tf.distribute.ReduceOp.SUM,
                             strategy.experimental_distribute_values_from_function(local), axis=None)
    return [int(v) for v in summed.numpy()]


def agree_on_seed(strategy: Any, seed: int | None, is_chief: bool) -> int:
    """The chief's `--seed` (drawn at random when absent) on every worker: the data order and the
    shifts derive from `(seed, epoch)`, so all workers must share one."""
    import numpy as np

    if seed is None:
        seed = int(np.random.default_rng().integers(2**31))
    return sum_over_workers(strategy, [seed if is_chief else 0])[0]


def agree_on_resume_point(strategy: Any, backup_dir: Path, epochs: int) -> None:
    """Makes every worker resume after the same epoch, the earliest any worker backed up
    (`backup.agree_on_resume_point`)."""

    def earliest(latest: int) -> int:  # a sum of one-hot vectors over the workers
        counts = sum_over_workers(strategy, [int(e == latest) for e in range(epochs + 1)])
        return next(e for e, count in enumerate(counts) if count)

    agree_on_backups(backup_dir, epochs, earliest, peer="worker")


def describe(strategy: Any, task: Task | None) -> str:
    """One line naming the replicas, e.g. for the log."""
    devices = ", ".join(strategy.extended.worker_devices)
    where = f"worker {task.index} of {task.n_workers}" if task else "this machine"
    if task and task.type == "chief":
        where = f"chief of {task.n_workers}"
    kind = "MultiWorkerMirroredStrategy" if task else type(strategy).__name__
    return (f"Data-parallel on {strategy.num_replicas_in_sync} replica(s) "
            f"({kind}; {where}: {devices})")


def test_alone(args: argparse.Namespace) -> None:
    """`capsulenet.py -t -w save_dir/trained_model.weights.h5` in this process, on one device.

    A fresh, undistributed model: one built under `MultiWorkerMirroredStrategy` would run `predict`
    as collectives with every worker, and Keras' `predict` under `MirroredStrategy` fails on a last
    batch smaller than the replica count. Testing needs no replicas.
    """
    test_args = argparse.Namespace(**vars(args))
    test_args.testing = True
    test_args.weights = str(Path(args.save_dir) / "trained_model.weights.h5")
    print("Testing the trained weights on one device")
    capsulenet.run(test_args)


def check_batch(args: argparse.Namespace, strategy: Any) -> None:
    """Every replica needs at least one sample of each batch."""
    replicas = strategy.num_replicas_in_sync
    if args.batch_size < replicas:
        raise UserError(f"--batch_size {args.batch_size}: must be at least the number of "
                        f"replicas ({replicas}); it is split across them")


def train_distributed(args: argparse.Namespace) -> None:
    """Trains data-parallel under the strategy `TF_CONFIG` or the flags ask for, then the chief
    tests the result on one device; `-t` only tests, on the chief."""
    # Every flag error before TensorFlow starts.
    capsulenet.validate_args(args, extra=[("--gpus", args.gpus >= 1, "must be >= 1")])
    task = read_tf_config()
    if capsulenet.keras.backend.backend() == "jax":
        train_data_parallel_jax(args, task)
        return
    if capsulenet.keras.backend.backend() == "torch":
        train_data_parallel_torch(args, task)
        return
    is_chief = task is None or task.is_chief
    if args.testing or args.predict is not None or args.export is not None:
        # A test, a prediction or an export needs neither replicas nor the other workers.
        if args.cpu:
            hide_gpus()
        if is_chief:
            capsulenet.run(args)
        else:
            print(f"{task.type} {task.index}: -t runs on the chief only; nothing to do here")
        return

    def draw(model: Any) -> None:
        plots.plot_model(model, Path(args.save_dir) / "model.png")

    strategy = make_strategy(args, task)
    check_batch(args, strategy)
    if task is not None:
        args.seed = agree_on_seed(strategy, args.seed, is_chief)
    if is_chief:
        print(describe(strategy, task))
    if task is None:
        capsulenet.run(args, strategy=strategy, on_model=draw)
        test_alone(args)
        return
    backup_dir = Path(args.save_dir) / task.backup_dir_name
    with peers_watched(args, task):
        agree_on_resume_point(strategy, backup_dir, args.epochs)
        capsulenet.run(args, strategy=strategy, is_chief=is_chief, backup_dir=str(backup_dir),
                       on_model=draw)
        if is_chief:
            test_alone(args)
        # Leave together: a worker that exits early looks like a crash to the others.
        sum_over_workers(strategy, [1])


def op_error_reason(error: Exception) -> str:
    """The message of a TensorFlow op error without its trace, e.g. `Collective ops is aborted by:
    recvmsg:Connection reset by peer`."""
    skip = ("Graph execution error", "Detected at node", "File ")
    lines = [line.strip() for line in str(getattr(error, "message", error)).splitlines()]
    return next((line for line in lines if line and not line.startswith(skip)), "")[:200]


@contextlib.contextmanager
def peers_watched(args: argparse.Namespace, task: Task) -> Iterator[None]:
    """Turns a lost peer (its collective ops fail) into one line on stderr and exit code 1."""
    import tensorflow as tf

    try:
        yield
    except (tf.errors.UnavailableError, tf.errors.AbortedError, tf.errors.CancelledError,
            tf.errors.DeadlineExceededError) as e:
        reason = op_error_reason(e)
        backup = Path(args.save_dir) / task.backup_dir_name
        print(f"error: {task.type} {task.index} lost contact with the cluster "
              f"({type(e).__name__}: {reason}); restart every worker with the same flags to resume "
              f"from the last completed epoch (state in {backup})", file=sys.stderr)
        raise SystemExit(1) from e


def main(argv: Sequence[str] | None = None) -> int:
    """Parses `argv` and trains; user errors become one line on stderr and exit code 2."""
    return capsulenet.main(argv, parser=build_parser(), runner=train_distributed)


if __name__ == "__main__":
    sys.exit(main())
