"""This machine, and how to time alternatives on it fairly.

- The fingerprint: what a measured decision depends on (CPU model, a digest of its feature flags, the
  usable cores, the accelerators, the Keras backend and library versions). `autotune` keys its cache
  by `machine_key()`; `bench/` names the machine in its reports with `cpu_model()` and `cpu_cores()`.
- `layer_step`: one forward + backward of a built layer on the current backend, the unit that
  `autotune` and `bench/layers.py` time.
- `interleave`: the one timer of the project. It calls every alternative once per round, rotating the
  order round after round, so that other work on the machine (or a CPU whose clock drifts) slows every
  alternative alike: the ratios then stand even where the absolute times do not.

The CPU part of the fingerprint does not import Keras: `bench/` scripts name the machine before any
backend starts.

Usage::

    key = machine_key()                      # {"cpu": ..., "cpu_flags": ..., "cores": 2, ...}
    timings = interleave({"a": fa, "b": fb}, rounds=5)
    medians = timings.medians()              # {"a": 0.41, "b": 0.57}
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

# ---------------------------------------------------------------------------------------------
# The fingerprint
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def cpu_fields() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (`model name`, `flags`, ...); empty elsewhere."""
    fields: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                break  # the end of the first processor
            name, _, value = line.partition(":")
            fields[name.strip()] = value.strip()
    return fields


def cpu_flags() -> set[str]:
    """The CPU's feature flags (x86 `flags`, Arm `Features`); empty where /proc/cpuinfo is missing."""
    fields = cpu_fields()
    return set((fields.get("flags") or fields.get("Features") or "").split())


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo, else what `platform` knows)."""
    return cpu_fields().get("model name") or platform.processor() or platform.machine()


def cpu_cores() -> int:
    """The cores this process may run on (its affinity, not the machine's count)."""
    with contextlib.suppress(AttributeError):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def cpu_description() -> dict[str, Any]:
    """CPU model, a digest of its sorted flags (the full list is ~100 words) and usable cores."""
    flags = " ".join(sorted(cpu_flags()))
    return {"cpu": cpu_model(), "cpu_flags": hashlib.sha256(flags.encode()).hexdigest()[:16],
            "cores": cpu_cores()}


def accelerators() -> list[dict[str, str]]:
    """The GPUs the Keras backend computes on: `[{"name": ..., "compute_capability": "9.0"}]`; [] on CPU."""
    import keras

    backend = keras.backend.backend()
    found = []
    if backend == "tensorflow":
        import tensorflow as tf

        for device in tf.config.list_physical_devices("GPU"):
            details = tf.config.experimental.get_device_details(device)
            capability = details.get("compute_capability")
            found.append({"name": str(details.get("device_name", device.name)),
                          "compute_capability": ".".join(map(str, capability)) if capability else ""})
    elif backend == "jax":
        import jax

        for device in jax.devices():
            if device.platform == "gpu":
                found.append({"name": device.device_kind,
                              "compute_capability": str(getattr(device, "compute_capability", ""))})
    elif backend == "torch":
        import torch

        for i in range(torch.cuda.device_count()):
            found.append({"name": torch.cuda.get_device_name(i),
                          "compute_capability": ".".join(map(str, torch.cuda.get_device_capability(i)))})
    return found


def backend_versions() -> dict[str, str]:
    """The Keras backend and the versions of the libraries that compute."""
    import keras
    import numpy as np

    backend = keras.backend.backend()
    versions = {"backend": backend, "keras": keras.__version__, "numpy": np.__version__}
    module = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}.get(backend)
    if module:
        versions[module] = __import__(module).__version__
    if backend == "tensorflow":  # oneDNN on or off changes the CPU kernels
        versions["TF_ENABLE_ONEDNN_OPTS"] = os.environ.get("TF_ENABLE_ONEDNN_OPTS", "")
    return versions


def machine_key() -> dict[str, Any]:
    """Everything about this machine and software that a measured decision depends on."""
    return {**cpu_description(), "accelerators": accelerators(), **backend_versions()}


# ---------------------------------------------------------------------------------------------
# A layer's forward + backward
# ---------------------------------------------------------------------------------------------


def layer_step(layer: Any, input_shape: tuple[int, ...], input_grad: bool, weight_grads: bool = True
               ) -> Callable[[], Any] | None:
    """Forward + backward of a built `layer` on random inputs of `input_shape`: the gradients of
    `sum(layer(x) * upstream)` for its weights (unless `weight_grads` is False) and, with
    `input_grad`, for `x` (as in training, where only the first layer's input needs none); neither:
    the forward alone. None on a backend without a timer here."""
    import keras
    import numpy as np

    rng = np.random.default_rng(0)
    x_np = rng.standard_normal(input_shape).astype("float32")
    upstream_np = rng.standard_normal(layer.compute_output_shape(input_shape)).astype("float32")
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        x, upstream = tf.constant(x_np), tf.constant(upstream_np)
        targets = (list(layer.trainable_variables) if weight_grads else []) + ([x] if input_grad else [])

        @tf.function
        def step() -> Any:
            with tf.GradientTape() as tape:
                tape.watch(x)
                # The loss is returned: no gradient needs the forward product, which TensorFlow would
                # otherwise prune (and time the backward pass alone).
                loss = tf.reduce_sum(tf.cast(layer(x), "float32") * upstream)
            grads = tape.gradient(loss, targets) if targets else []
            return [loss] + [tf.reduce_sum(tf.cast(g, "float32")) for g in grads]

        return lambda: [v.numpy() for v in step()]
    if backend == "jax":
        import jax
        import jax.numpy as jnp

        x, upstream = jnp.asarray(x_np), jnp.asarray(upstream_np)
        trainable = [v.value for v in layer.trainable_variables]
        frozen = [v.value for v in layer.non_trainable_variables]

        def loss(trainable: Any, x: Any) -> Any:
            outputs, _ = layer.stateless_call(trainable, frozen, x)
            return jnp.sum(outputs.astype("float32") * upstream)

        argnums = (0,) * weight_grads + (1,) * input_grad
        step = jax.jit(jax.value_and_grad(loss, argnums=argnums) if argnums else loss)
        return lambda: jax.block_until_ready(step(trainable, x))
    if backend == "torch":
        import torch

        # On Keras' device (a GPU when there is one); eager, as TorchSteps trains.
        x = keras.ops.convert_to_tensor(x_np).requires_grad_(input_grad)
        upstream = keras.ops.convert_to_tensor(upstream_np)
        targets = ([v.value for v in layer.trainable_variables] if weight_grads else []) + (
            [x] if input_grad else [])

        def torch_step() -> Any:
            loss = torch.sum(layer(x).float() * upstream)
            if targets:
                torch.autograd.grad(loss, targets)
            if x.is_cuda:  # kernels run asynchronously: wait for them, or only the launches are timed
                torch.cuda.synchronize(x.device)
            return loss.item()

        return torch_step
    return None


# ---------------------------------------------------------------------------------------------
# The interleaved timer
# ---------------------------------------------------------------------------------------------


class Timings(NamedTuple):
    """What `interleave` measured: each name's untimed first calls and its timed samples (seconds)."""

    first: dict[str, float]
    samples: dict[str, list[float]]

    def medians(self) -> dict[str, float]:
        """The median sample of each name that has samples."""
        return {name: statistics.median(values) for name, values in self.samples.items() if values}


def interleave(fns: dict[str, Callable[[], Any]], rounds: int, warmup: int = 1, self_timed: bool = False,
               until: Callable[[Timings], bool] | None = None,
               log: Callable[[str], None] | None = None) -> Timings:
    """Times every function in `rounds` rounds, the order rotating round after round.

    Args:
        fns: the alternatives by name; each call must wait for its device (read a result back).
        rounds: timed rounds; each calls every function once.
        warmup: untimed calls of each function first (tracing, compilation, first-touch allocation);
            the first one's seconds are kept in `Timings.first`.
        self_timed: each call returns its own list of seconds (e.g. several steps, or steps timed
            inside a loop), pooled as the samples, instead of being timed as a whole.
        until: checked after the warm-up and after every round; True ends the timing (e.g. once one
            alternative is clearly slower: more calls of it would not change a choice).
        log: one line per function and round.

    Returns:
        the first calls and the samples.
    """
    names = list(fns)
    timings = Timings({}, {name: [] for name in names})
    for name in names:
        for i in range(warmup):
            start = time.perf_counter()
            fns[name]()
            if i == 0:
                timings.first[name] = time.perf_counter() - start
    if until is not None and until(timings):
        return timings
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            result = fns[name]()
            values = list(result) if self_timed else [time.perf_counter() - start]
            timings.samples[name].extend(values)
            if log is not None:
                log(f"  round {r + 1}/{rounds} {name}: median {statistics.median(values):.3f} s of "
                    f"{len(values)}")
        if until is not None and until(timings):
            break
    return timings
