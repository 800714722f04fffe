"""Data-parallel training on the JAX backend: `keras.distribution.DataParallel`, over several processes
joined by `jax.distributed`.

- One machine: the first `--gpus` GPUs (or `--cpu`: as many CPU devices split from the processor);
  each batch is sharded over them and XLA all-reduces the gradients.
- Several processes (`JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`): each process
  contributes its `--gpus` GPUs (or with `--cpu` as many CPU devices, whose collectives then run over
  gloo); the distribution spans every process's devices, so each global batch is sharded over all of
  them. `JaxEngine` is the adapter for `flow.train`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

from capsnet.distributed.cluster import Cluster
from capsnet.errors import UserError

# A peer that stops sending heartbeats for this long fails the others (JAX's default is minutes).
HEARTBEAT_TIMEOUT_S = 20
# Everyone has met before `initialize` (`rendezvous.meet`): this only bounds a peer that dies between.
INITIALIZATION_TIMEOUT_S = 120
# What a failed collective says (JAX raises it as XlaRuntimeError / JaxRuntimeError from a step, as
# ValueError from `device_put` onto other processes' devices, ...): gloo's closed connection, or the
# coordination service's verdict.
LOST_PEER_SIGNS = ("Gloo", "Connection closed", "heartbeat", "UNAVAILABLE", "DEADLINE_EXCEEDED")


def use_cpu(devices: int) -> None:
    """Makes JAX compute on `devices` CPU devices; must run before JAX initialises."""
    import jax

    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", devices)


def local_devices(cpu: bool, gpus: int) -> list[Any]:
    """This machine's devices to train on: the first `gpus` GPUs, or with `cpu` as many CPU devices.

    Raises:
        UserError: more GPUs are asked for than are visible, or JAX was initialised already.
    """
    import jax

    try:
        if cpu:
            use_cpu(gpus)
            return jax.devices("cpu")[:gpus]
        visible = [d for d in jax.devices() if d.platform == "gpu"]
    except RuntimeError as e:  # JAX was initialised earlier in this process
        raise UserError(f"--gpus/--cpu: devices can no longer be configured ({e})") from e
    if gpus > len(visible):
        seen = (f"only {len(visible)} GPU(s) are visible ({', '.join(str(g) for g in visible)})"
                if visible else "no GPU is visible")
        raise UserError(f"--gpus {gpus}: {seen}; ask for fewer, or add --cpu to train on {gpus} CPU devices")
    return visible[:gpus]


def check_batch(batch_size: int, devices: int, where: str = "") -> None:
    """Each device takes an equal share of the global batch."""
    if batch_size % devices:
        raise UserError(f"--batch_size {batch_size}: must be a multiple of the number of devices "
                        f"({devices}{where}) on the JAX backend; each takes an equal share")


@contextlib.contextmanager
def data_parallel(devices: list[Any]) -> Iterator[None]:
    """Keras' `DataParallel` distribution over `devices` while the block runs."""
    import keras

    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
    try:
        yield
    finally:
        keras.distribution.set_distribution(None)


def lost_peer(error: BaseException) -> bool:
    """Whether `error` is a collective that failed because another process is gone."""
    return (type(error).__name__ in ("XlaRuntimeError", "JaxRuntimeError")
            or any(sign in str(error) for sign in LOST_PEER_SIGNS))


class JaxEngine:
    """`flow.Engine` for `jax.distributed`."""

    def __init__(self, cluster: Cluster, cpu: bool, gpus: int) -> None:
        self.cluster, self.cpu, self.gpus = cluster, cpu, gpus
        self.devices: list[Any] = []

    def join(self) -> None:
        """Joins the processes (before JAX initialises its devices).

        Raises:
            UserError: on GPUs, this process sees fewer than `gpus` devices.
        """
        import jax

        if self.cpu:
            use_cpu(self.gpus)
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        cluster = self.cluster
        jax.distributed.initialize(cluster.coordinator, cluster.size, cluster.rank,
                                   initialization_timeout=INITIALIZATION_TIMEOUT_S,
                                   heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S)
        if not self.cpu and len(jax.local_devices()) < self.gpus:
            raise UserError(f"--gpus {self.gpus}: {cluster.name} sees {len(jax.local_devices())} "
                            "device(s); ask for fewer")
        self.devices = self.all_devices()

    @staticmethod
    def all_devices() -> list[Any]:
        """Every process's devices (on GPUs all those each process sees: limit them with
        CUDA_VISIBLE_DEVICES or JAX_LOCAL_DEVICE_IDS)."""
        import jax

        return jax.devices()

    def sum(self, values: Sequence[int]) -> list[int]:
        import numpy as np
        from jax.experimental import multihost_utils

        # int32: JAX computes in 32 bits by default (seeds are drawn below 2**31).
        gathered = multihost_utils.process_allgather(np.asarray(values, np.int32))
        return [int(v) for v in np.asarray(gathered).reshape(-1, len(values)).sum(axis=0)]

    def lost_peer(self, error: BaseException) -> bool:
        return lost_peer(error)

    def check_batch(self, batch_size: int) -> None:
        check_batch(batch_size, len(self.devices), f" over {self.cluster.size} processes")

    def describe(self) -> str:
        return (f"Data-parallel on {len(self.devices)} replica(s) over {self.cluster.size} processes "
                "(jax.distributed + keras.distribution.DataParallel; coordinator "
                f"{self.cluster.coordinator})")

    def training(self) -> contextlib.AbstractContextManager:
        return data_parallel(self.devices)
