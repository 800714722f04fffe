"""Multi-host training on the JAX backend: processes joined by `jax.distributed.initialize`.

`capsulenet-multi-gpu.py` on `KERAS_BACKEND=jax` comes here when `JAX_COORDINATOR_ADDRESS` is set.
Every process runs the same command with three standard variables:

- `JAX_COORDINATOR_ADDRESS`: `host:port` where process 0 serves JAX's coordination service (JAX reads
  this one itself);
- `JAX_NUM_PROCESSES`: how many processes in all;
- `JAX_PROCESS_ID`: this process, 0 to `JAX_NUM_PROCESSES - 1` (0 is the chief).

Each process contributes its `--gpus` GPUs (or with `--cpu` as many CPU devices, whose collectives then
run over gloo); `keras.distribution.DataParallel` spans every process's devices, so each global batch is
sharded over all of them and XLA all-reduces the gradients across the machines. Every process reads the
same data and draws the same batches (all take the chief's `--seed`); only the chief writes logs,
checkpoints and the test; each keeps its own backup (`save_dir/backup`, `save_dir/backup-process-P`),
and all agree on the epoch to resume from.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from capsnet.backup import agree_on_resume_point as agree_on_backups
from capsnet.errors import UserError

ENV_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
# A peer that stops sending heartbeats for this long fails the others (JAX's default is minutes).
HEARTBEAT_TIMEOUT_S = 20


@dataclass(frozen=True)
class Cluster:
    """This process's place among the JAX processes."""

    coordinator: str
    processes: int
    process_id: int

    @property
    def is_chief(self) -> bool:
        return self.process_id == 0

    @property
    def backup_dir_name(self) -> str:
        return "backup" if self.is_chief else f"backup-process-{self.process_id}"


def read_env(environ: Mapping[str, str] = os.environ) -> Cluster | None:
    """The cluster the standard variables describe; None when `JAX_COORDINATOR_ADDRESS` is unset.

    Raises:
        UserError: a variable is missing or out of range.
    """
    coordinator = environ.get("JAX_COORDINATOR_ADDRESS", "").strip()
    if not coordinator:
        return None
    try:
        processes, process_id = int(environ["JAX_NUM_PROCESSES"]), int(environ["JAX_PROCESS_ID"])
    except (KeyError, ValueError) as e:
        raise UserError("JAX_COORDINATOR_ADDRESS is set: multi-host JAX also needs JAX_NUM_PROCESSES "
                        "(processes in all) and JAX_PROCESS_ID (this one, from 0) as integers") from e
    if processes < 1 or not 0 <= process_id < processes:
        raise UserError(f"JAX_PROCESS_ID {process_id}: must be in [0, JAX_NUM_PROCESSES = {processes})")
    return Cluster(coordinator, processes, process_id)


def join(cluster: Cluster, cpu: bool, gpus: int) -> list[Any]:
    """Joins the processes (before JAX initialises its devices) and returns every process's devices.

    With `cpu`, each process has `gpus` CPU devices and the collectives run over gloo.

    Raises:
        UserError: on GPUs, this process sees fewer than `gpus` devices.
    """
    import jax

    if cpu:
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", gpus)
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(cluster.coordinator, cluster.processes, cluster.process_id,
                               heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S)
    if not cpu and len(jax.local_devices()) < gpus:
        raise UserError(f"--gpus {gpus}: process {cluster.process_id} sees {len(jax.local_devices())} "
                        "device(s); ask for fewer")
    # Every process's devices (on GPUs all those each process sees: limit them with
    # CUDA_VISIBLE_DEVICES or JAX_LOCAL_DEVICE_IDS).
    return jax.devices()


def agree_on_seed(cluster: Cluster, seed: int | None) -> int:
    """The chief's `--seed` (drawn when absent) on every process."""
    import numpy as np
    from jax.experimental import multihost_utils

    if seed is None:
        seed = int(np.random.default_rng().integers(2**31))
    return int(multihost_utils.broadcast_one_to_all(np.int32(seed)))


def agree_on_resume_point(cluster: Cluster, backup_dir: Path, epochs: int) -> None:
    """Every process resumes after the same epoch, the earliest any backed up."""
    import numpy as np
    from jax.experimental import multihost_utils

    agree_on_backups(
        backup_dir, epochs, lambda latest: int(np.min(multihost_utils.process_allgather(np.int32(latest)))))


# What a failed collective says (JAX raises it as XlaRuntimeError / JaxRuntimeError from a step, as
# ValueError from `device_put` onto other processes' devices, ...): gloo's closed connection, or the
# coordination service's verdict.
LOST_PEER_SIGNS = ("Gloo", "Connection closed", "heartbeat", "UNAVAILABLE", "DEADLINE_EXCEEDED")


def lost_peer(error: Exception) -> bool:
    """Whether `error` is a collective that failed because another process is gone."""
    if isinstance(error, UserError):
        return False
    return (type(error).__name__ in ("XlaRuntimeError", "JaxRuntimeError")
            or any(sign in str(error) for sign in LOST_PEER_SIGNS))


def train(cluster: Cluster, *, cpu: bool, gpus: int, batch_size: int, save_dir: str, seed: int | None,
          epochs: int, run: Callable[[int, bool, str], None], test_alone: Callable[[], None]) -> None:
    """Trains data-parallel over every process's devices, then the chief tests on one device.

    Args:
        cluster: from `read_env`.
        cpu, gpus: this process' devices (`join`); batch_size: the global batch, a multiple of
            the device count; save_dir: where the backups go; seed: this process' `--seed` (the chief's
            wins); epochs: the run's length (the resume point is agreed against it).
        run: trains with `(seed, is_chief, backup_dir)` (the script's `capsulenet.run`);
        test_alone: the chief's one-device test after training.
    """
    import keras
    from jax.experimental import multihost_utils

    devices = join(cluster, cpu, gpus)
    if batch_size % len(devices):
        raise UserError(f"--batch_size {batch_size}: must be a multiple of the number of devices "
                        f"({len(devices)} over {cluster.processes} processes) on the JAX backend")
    backup_dir = Path(save_dir) / cluster.backup_dir_name
    try:
        seed = agree_on_seed(cluster, seed)
        agree_on_resume_point(cluster, backup_dir, epochs)
        keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
        if cluster.is_chief:
            print(f"Data-parallel on {len(devices)} replica(s) over {cluster.processes} processes "
                  f"(jax.distributed + keras.distribution.DataParallel; coordinator "
                  f"{cluster.coordinator})")
        run(seed, cluster.is_chief, str(backup_dir))
        keras.distribution.set_distribution(None)
        if cluster.is_chief:
            test_alone()
        multihost_utils.sync_global_devices("capsnet: done")  # leave together
    except Exception as e:
        if not lost_peer(e):
            raise
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        print(f"error: process {cluster.process_id} lost contact with the other processes ({reason}); "
              f"rerun every process with the same flags to resume from the last completed epoch "
              f"(state in {backup_dir})", file=sys.stderr)
        # Not SystemExit: at exit JAX's own shutdown barrier would wait for the lost peer, then abort
        # the process with a C++ stack trace. The backups are already on disk.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
