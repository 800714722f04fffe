"""Data-parallel training on the TensorFlow backend: `tf.distribute`.

- One machine: `MirroredStrategy` over the first `--gpus` GPUs (or, with `--cpu`, `--gpus` logical CPU
  devices carved out of the processor, to try the same path without GPUs).
- Several machines: when `TF_CONFIG` is set, `MultiWorkerMirroredStrategy` over every worker's GPUs (one
  CPU device per worker with `--cpu`); `TFEngine` is its adapter for `flow.train`.

Each step splits the global batch across the replicas and all-reduces the gradients (the Keras
optimizer sums them over the replicas).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

from capsnet.distributed import flow
from capsnet.distributed.cluster import Cluster
from capsnet.errors import UserError


def hide_gpus() -> None:
    """Leaves TensorFlow only the CPU; must run before it initialises its devices."""
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        tf.config.set_visible_devices([], "GPU")


def configure_devices(cpu: bool, gpus: int, multi_worker: bool) -> list[str]:
    """Makes the devices to train on visible; must run before TensorFlow initialises its devices.

    Args:
        cpu: logical CPU devices instead of GPUs; gpus: how many devices.
        multi_worker: under `TF_CONFIG`, where each worker trains on its GPUs or on one CPU device.

    Returns:
        the device names for `MirroredStrategy` (unused under `TF_CONFIG`).

    Raises:
        UserError: more GPUs are asked for than are visible.
    """
    import tensorflow as tf

    visible = tf.config.list_physical_devices("GPU")
    try:
        if cpu:
            hide_gpus()
            if multi_worker:  # MultiWorkerMirroredStrategy uses CPU:0 alone without GPUs
                return ["/cpu:0"]
            device = tf.config.list_physical_devices("CPU")[0]
            tf.config.set_logical_device_configuration(
                device, [tf.config.LogicalDeviceConfiguration() for _ in range(gpus)])
            return [f"/cpu:{i}" for i in range(gpus)]
        if gpus > len(visible):
            seen = (f"only {len(visible)} GPU(s) are visible ({', '.join(g.name for g in visible)})"
                    if visible else "no GPU is visible")
            raise UserError(f"--gpus {gpus}: {seen}; ask for fewer, or add --cpu to "
                            f"train on {gpus} logical CPU devices")
        tf.config.set_visible_devices(visible[:gpus], "GPU")
    except RuntimeError as e:  # TensorFlow was initialised earlier in this process
        raise UserError(f"--gpus/--cpu: devices can no longer be configured ({e})") from e
    return [f"/gpu:{i}" for i in range(gpus)]


def mirrored_strategy(cpu: bool, gpus: int) -> Any:
    """`MirroredStrategy` over this machine's devices (see `configure_devices`)."""
    import tensorflow as tf

    return tf.distribute.MirroredStrategy(configure_devices(cpu, gpus, multi_worker=False))


def check_batch(strategy: Any, batch_size: int) -> None:
    """Every replica needs at least one sample of each batch."""
    replicas = strategy.num_replicas_in_sync
    if batch_size < replicas:
        raise UserError(f"--batch_size {batch_size}: must be at least the number of "
                        f"replicas ({replicas}); it is split across them")


def describe(strategy: Any, cluster: Cluster | None) -> str:
    """One line naming the replicas, e.g. for the log."""
    devices = ", ".join(strategy.extended.worker_devices)
    where = f"{cluster.name} of {cluster.size}" if cluster else "this machine"
    if cluster and cluster.kind == "chief":
        where = f"chief of {cluster.size}"
    kind = "MultiWorkerMirroredStrategy" if cluster else type(strategy).__name__
    return f"Data-parallel on {strategy.num_replicas_in_sync} replica(s) ({kind}; {where}: {devices})"


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


class TFEngine:
    """`flow.Engine` for `MultiWorkerMirroredStrategy`, which reads `TF_CONFIG` itself."""

    def __init__(self, cluster: Cluster, cpu: bool, gpus: int) -> None:
        self.cluster, self.cpu, self.gpus = cluster, cpu, gpus
        self.strategy: Any = None

    def join(self) -> None:
        import tensorflow as tf

        configure_devices(self.cpu, self.gpus, multi_worker=True)
        self.strategy = tf.distribute.MultiWorkerMirroredStrategy()

    def sum(self, values: Sequence[int]) -> list[int]:
        return sum_over_workers(self.strategy, values)

    def lost_peer(self, error: BaseException) -> bool:
        import tensorflow as tf

        return isinstance(error, (tf.errors.UnavailableError, tf.errors.AbortedError,
                                  tf.errors.CancelledError, tf.errors.DeadlineExceededError))

    def check_batch(self, batch_size: int) -> None:
        check_batch(self.strategy, batch_size)

    def describe(self) -> str:
        return describe(self.strategy, self.cluster)

    def training(self) -> contextlib.AbstractContextManager:
        return flow.nothing()
