"""Data-parallel CapsNet training on several GPUs, several logical CPUs or several machines.

The flags, model, losses, training loop and test are those of `capsulenet.py` (its `run` and the modules
it calls); this script only chooses how the devices share the work (`capsnet/distributed/`):

- TensorFlow, one machine: `tf.distribute.MirroredStrategy` over the first `--gpus` GPUs (or, with
  `--cpu`, `--gpus` logical CPU devices carved out of the processor, to try the same path without GPUs);
  several machines: `MultiWorkerMirroredStrategy` when the standard `TF_CONFIG` variable is set.
- JAX (`KERAS_BACKEND=jax`): `keras.distribution.DataParallel` over the first `--gpus` GPUs (or `--cpu`:
  as many CPU devices); several machines: `jax.distributed` from `JAX_COORDINATOR_ADDRESS`,
  `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID`.
- PyTorch (`KERAS_BACKEND=torch`): one process per GPU (or per CPU share with `--cpu`) joined by
  `torch.distributed`; `--gpus N` starts `torchrun --standalone --nproc_per_node N` on this machine,
  and several machines are started with torchrun (`WORLD_SIZE`, `RANK`, `LOCAL_RANK`, `MASTER_ADDR`,
  `MASTER_PORT`).

Each step splits the global batch (`--batch_size`, 300 by default) across the replicas and all-reduces
the gradients. After training it saves the weights and the `.keras` model, then the chief runs the same
test as `capsulenet.py -t -w save_dir/trained_model.weights.h5`, on one device. Files written by either
script load in the other.

With several processes (`capsnet/distributed/flow.py`), the variables are checked before anything joins
(a wrong or partial set is one `error:` line, exit 2); every process waits for the others at most
`--join_timeout` seconds, saying so in one line (exit 1 naming who never came); Ctrl-C or SIGTERM stops
it (exit 130), also while it waits for a peer. A process that loses a peer stops with one line and exit
code 1; rerun every process with the same flags to resume from the last completed epoch (all take the
chief's `--seed`, so the resumed data order is the same).

Usage:
    python capsulenet-multi-gpu.py --gpus 2
    python capsulenet-multi-gpu.py --cpu --gpus 2 --dataset data.npz --epochs 1
    TF_CONFIG='{"cluster": {"worker": ["10.0.0.1:12345", "10.0.0.2:12345"]},
                "task": {"type": "worker", "index": 0}}' python capsulenet-multi-gpu.py --seed 1
    python capsulenet-multi-gpu.py -t -w result/trained_model.weights.h5
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's start-up chatter out of the CLI

import capsulenet  # noqa: E402 - imports TensorFlow but initialises no device
from capsnet import plots  # noqa: E402
from capsnet.distributed import flow, rendezvous  # noqa: E402
from capsnet.distributed.cluster import Cluster, read_cluster  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    """`capsulenet.py`'s flags with the original multi-GPU defaults, plus `--gpus`, `--cpu` and
    `--join_timeout`."""
    parser = capsulenet.build_parser(
        "Capsule Network on MNIST, trained data-parallel on several GPUs (or logical CPUs, or "
        "machines configured by TF_CONFIG, JAX_* or torchrun).", batch_size=300)
    parser.add_argument("--gpus", default=2, type=int,
                        help="Number of GPUs to train on (per machine under TF_CONFIG); the global "
                             "batch is split across them")
    parser.add_argument("--cpu", action="store_true",
                        help="Use --gpus logical CPU devices instead of GPUs (to try or test the "
                             "data-parallel path without GPUs; under TF_CONFIG each worker uses "
                             "one CPU device)")
    parser.add_argument("--join_timeout", default=flow.DEFAULT_JOIN_TIMEOUT_S, type=float,
                        metavar="SECONDS",
                        help="With several processes: how long each waits for the others to start "
                             "before it gives up, naming who never came")
    return parser


def trains(args: argparse.Namespace) -> bool:
    """Whether the flags ask for training; a test, a prediction or an export needs no replicas."""
    return not (args.testing or args.predict is not None or args.export is not None)


def draw(args: argparse.Namespace) -> Any:
    """`on_model` for `capsulenet.run`: the model's plot in `save_dir`."""
    return lambda model: plots.plot_model(model, Path(args.save_dir) / "model.png")


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


def train_processes(args: argparse.Namespace, cluster: Cluster, engine: Any) -> None:
    """Trains as one process of `cluster` (`flow.train`), with the seed every process agreed on
    (recorded in `args` for the backup's flags), writing the user's files on the chief only."""

    def run(seed: int, is_chief: bool, backup_dir: str) -> None:
        args.seed = seed
        capsulenet.run(args, strategy=getattr(engine, "strategy", None), is_chief=is_chief,
                       backup_dir=backup_dir, on_model=draw(args) if is_chief else None)

    flow.train(cluster, engine, join_timeout=args.join_timeout, batch_size=args.batch_size,
               save_dir=args.save_dir, seed=args.seed, epochs=args.epochs, run=run,
               test_alone=lambda: test_alone(args))


def on_tensorflow(args: argparse.Namespace, cluster: Cluster | None) -> None:
    """MirroredStrategy on this machine, or MultiWorkerMirroredStrategy under `TF_CONFIG`."""
    from capsnet.distributed import tf_distribute

    if not trains(args):
        if args.cpu:
            tf_distribute.hide_gpus()
        if cluster is None or cluster.is_chief:
            capsulenet.run(args)
        else:
            print(f"{cluster.name}: -t runs on the chief only; nothing to do here")
        return
    if cluster is not None:
        train_processes(args, cluster, tf_distribute.TFEngine(cluster, args.cpu, args.gpus))
        return
    strategy = tf_distribute.mirrored_strategy(args.cpu, args.gpus)
    tf_distribute.check_batch(strategy, args.batch_size)
    print(tf_distribute.describe(strategy, None))
    capsulenet.run(args, strategy=strategy, on_model=draw(args))
    test_alone(args)


def on_jax(args: argparse.Namespace, cluster: Cluster | None) -> None:
    """`keras.distribution.DataParallel` over this machine's devices, or over every process's
    (`jax.distributed`)."""
    from capsnet.distributed import jax_distributed

    if cluster is not None and trains(args):
        train_processes(args, cluster, jax_distributed.JaxEngine(cluster, args.cpu, args.gpus))
        return
    devices = jax_distributed.local_devices(args.cpu, args.gpus)
    jax_distributed.check_batch(args.batch_size, len(devices))
    if not trains(args):
        capsulenet.run(args)
        return
    with jax_distributed.data_parallel(devices):
        print(f"Data-parallel on {len(devices)} replica(s) (keras.distribution.DataParallel; this machine: "
              f"{', '.join(str(d) for d in devices)})")
        capsulenet.run(args, on_model=draw(args))
    test_alone(args)


def on_torch(args: argparse.Namespace, cluster: Cluster | None) -> None:
    """Processes joined by `torch.distributed`; started here through torchrun unless torchrun (or the
    user, with its variables) started this one."""
    from capsnet.distributed import torch_distributed

    if not trains(args):
        capsulenet.run(args)
        return
    if cluster is None:
        torch_distributed.check_gpus(args.cpu, args.gpus)
        raise SystemExit(torch_distributed.relaunch_with_torchrun(args.gpus, sys.argv[1:]))
    train_processes(args, cluster, torch_distributed.TorchEngine(cluster, args.cpu))


ENGINES = {"tensorflow": on_tensorflow, "jax": on_jax, "torch": on_torch}


def train_distributed(args: argparse.Namespace) -> None:
    """Trains data-parallel as the flags and the engine's variables ask, then the chief tests the
    result on one device; `-t` only tests, on the chief."""
    # Every flag and variable error before an engine starts.
    capsulenet.validate_args(args, extra=[("--gpus", args.gpus >= 1, "must be >= 1"),
                                          ("--join_timeout", args.join_timeout > 0, "must be > 0 seconds")])
    backend = capsulenet.keras.backend.backend()
    ENGINES[backend](args, read_cluster(backend, os.environ))


def main(argv: Sequence[str] | None = None) -> int:
    """Parses `argv` and trains; user errors become one line on stderr and exit code 2."""
    # Under nohup, a scheduler or `tee` stdout is a file or a pipe: without this, Python would hold
    # the status and epoch lines in its buffer until exit.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(line_buffering=True)
    code = capsulenet.main(argv, parser=build_parser(), runner=train_distributed)
    if code and flow.has_joined():  # the engines' exit handlers would wait for the other processes
        rendezvous.end(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
