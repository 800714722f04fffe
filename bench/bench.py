"""Speed benchmark: this project's CapsNet against the original formulation and the FLOP floor.

One process builds every variant on synthetic MNIST-shaped data (28x28x1, 10 classes, batch 100) and
measures them in interleaved rounds (variant A, B, C, then again), so that a machine that slows down
or speeds up during the run affects every variant alike:

- the floor: training FLOPs (`flops.analytic_flops`, checked on the traced step) over the best fp32
  matrix product measured in the same run, each product checked against float64 NumPy and against
  the CPU's theoretical peak (`flops.measure_floor`); every variant as a ratio to it;
- training step: median ms after warm-up, samples/s, projected 60k-image epoch;
- end-to-end epochs: each project's own loop with its augmentation and a validation pass, every
  step's time taken inside the loop; projected to 60k training + 10k validation images from the
  median step;
- inference ms per 100 images (`eval_model.predict`), the 16 x 11 manipulation grid;
- peak memory of a training process, one child process per variant (RSS high-water `VmHWM`, and the
  TensorFlow allocator's peak on a GPU): the high-water of one process that holds every variant
  cannot be split between them;
- on a CPU, TensorFlow thread settings, each in a child process (they cannot change once TensorFlow
  has started).

Variants: `product` (as shipped: `capsulenet.CapsNet`, `training.make_optimizer`,
`backends.TensorFlowSteps`, jit_compile=False), `product-xla` (the same with jit_compile=True),
`product-mp` (`--mixed_precision`: bfloat16), `baseline` (bench/original_formulation.py: tile +
per-sample map_fn, Python-side shifts, `model.fit` on a generator, 176 batch-1 predicts). The
training-step rows time every variant through the same `TensorFlowSteps.train_step`, so they compare
the model formulations; the end-to-end rows run each project's own loop.

Usage:
    python bench/bench.py              # full run, writes bench/RESULTS.md
    python bench/bench.py --quick      # short run (~10 min on 2 CPU cores, meant to be < 3 on a GPU)
    python bench/bench.py --steps 20 --rounds 5 --variants product,baseline
    python bench/bench.py --quick --no_write   # print only
    python bench/bench.py --only steps,inference --variants product,product-xla   # some rows
    python bench/bench.py --peak_gflops 240    # when the CPU's peak is known better than estimated
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import io
import json
import platform
import shlex
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import common
import flops
import numpy as np
import report
from common import BATCH, EPOCH_IMAGES, INPUT_SHAPE, N_CLASS, ROUTINGS

common.use_repo()  # the product's modules, imported below by bare name as the product imports them

try:
    import tensorflow as tf
except ImportError as e:
    raise ImportError("bench/bench.py needs TensorFlow (pip install -r requirements.txt); on a machine "
                      "without it, bench/backend_epoch.py measures the model on JAX or PyTorch") from e
import keras  # noqa: E402
import original_formulation as original  # noqa: E402

import capsulenet  # noqa: E402
from capsnet import backends, training  # noqa: E402
from capsnet.backup import Backup  # noqa: E402

VARIANTS = ("product", "baseline", "product-xla", "product-mp")
PHASES = ("steps", "epoch", "inference", "manipulation", "memory", "threads")


# ---------------------------------------------------------------------------------------------
# Variants
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Variant:
    """One formulation under test: its three models, the step it is timed through and, for the
    product, the training loop it ships with (`trainer`)."""

    name: str
    kind: str  # 'product' or 'baseline'
    train_model: keras.Model
    eval_model: keras.Model
    manipulate_model: keras.Model
    steps: backends.TensorFlowSteps
    trainer: training.Trainer | None
    note: str = ""


def train_config(save_dir: str) -> training.TrainConfig:
    """The product's default flags (batch 100, lr 0.001 x 0.9 per epoch, lam_recon 0.392, shifts 0.1)."""
    return training.TrainConfig(batch_size=BATCH, seed=0, save_dir=save_dir)


@contextlib.contextmanager
def precision_policy(name: str | None) -> Iterator[None]:
    """Sets Keras' global dtype policy for the models built inside, then restores float32."""
    if name is None:
        yield
        return
    keras.mixed_precision.set_global_policy(name)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy("float32")


def build_product(config: training.TrainConfig, name: str = "product", jit_compile: bool = False,
                  policy: str | None = None) -> Variant:
    """The product as `capsulenet.run` builds it (model, optimizer, compile), its steps and its loop."""
    with precision_policy(policy):
        model, eval_model, manipulate_model = capsulenet.CapsNet(INPUT_SHAPE, N_CLASS, ROUTINGS)
        optimizer = training.make_optimizer(config.lr, config.lr_decay, EPOCH_IMAGES // BATCH)
    capsulenet.compile_like_original(model, optimizer, config.lam_recon)
    if jit_compile:
        eval_model.jit_compile = True  # inference through XLA too
    steps = backends.TensorFlowSteps(model, optimizer, config.lam_recon, config.batch_size,
                                     jit_compile=jit_compile)
    steps.build_optimizer()
    # is_chief=False: no progress bar; the backup folder is never written by train_epoch/evaluate.
    trainer = training.Trainer(model, optimizer, steps, config, Backup(Path(config.save_dir) / "backup"),
                               is_chief=False, weights_model=eval_model)
    note = f"jit_compile={jit_compile}" + (f", policy {policy}" if policy else "")
    return Variant(name, "product", model, eval_model, manipulate_model, steps, trainer, note)


def build_baseline(config: training.TrainConfig, source: keras.Model | None = None) -> Variant:
    """The original formulation, compiled as the original (its `model.fit` losses), without XLA
    (TensorFlow 1.x had none); `source`'s weights copied in when given."""
    model, eval_model, manipulate_model = original.OriginalCapsNet(INPUT_SHAPE, N_CLASS, ROUTINGS)
    if source is not None:
        original.copy_weights(source, model)
    optimizer = training.make_optimizer(config.lr, config.lr_decay, EPOCH_IMAGES // BATCH)
    capsulenet.compile_like_original(model, optimizer, config.lam_recon)
    for m in (model, eval_model, manipulate_model):
        m.jit_compile = False  # "auto" would pick XLA on a GPU
    steps = backends.TensorFlowSteps(model, optimizer, config.lam_recon, config.batch_size)
    steps.build_optimizer()
    note = f"tile + map_fn u_hat, {original.shift_backend()} per-image shifts, no XLA"
    return Variant("baseline", "baseline", model, eval_model, manipulate_model, steps, None, note)


def build_variant(name: str, config: training.TrainConfig, source: keras.Model | None) -> Variant:
    """`product`, `product-xla`, `product-mp` or `baseline` (with `source`'s weights)."""
    if name == "product":
        return build_product(config, name)
    if name == "product-xla":
        return build_product(config, name, jit_compile=True)
    if name == "product-mp":
        return build_product(config, name, policy=capsulenet.mixed_precision_policy())
    if name == "baseline":
        return build_baseline(config, source)
    raise ValueError(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")


# ---------------------------------------------------------------------------------------------
# One measurement each
# ---------------------------------------------------------------------------------------------


def train_step_seconds(variant: Variant, x: Any, y: Any) -> float:
    """One training step on tensors `x [100, 28, 28, 1]`, `y [100, 10]`; reading the losses back
    waits for it (also on a GPU)."""
    start = time.perf_counter()
    [float(v) for v in variant.steps.train_step(x, y)]
    return time.perf_counter() - start


class StepClock:
    """When each training step of a loop started and ended (`time.perf_counter` seconds)."""

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.ends: list[float] = []

    def in_loop(self) -> list[float]:
        """Each step's time in the loop: from its start to the next step's start (waiting for the
        next batch included); the last step has no successor and is left out."""
        return list(np.diff(self.starts))

    def calls(self) -> list[float]:
        """Each step call alone, the wait for data excluded."""
        return [end - start for start, end in zip(self.starts, self.ends, strict=True)]


class ClockedSteps:
    """The product's steps object with each `train` call recorded on a `StepClock`, so that
    `training.Trainer.train_epoch` runs unchanged while its steps are timed from inside."""

    def __init__(self, steps: Any, clock: StepClock) -> None:
        self.inner = steps
        self.clock = clock

    def train(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        self.clock.starts.append(time.perf_counter())
        values = self.inner.train(x, y)  # NumPy values: the step has finished
        self.clock.ends.append(time.perf_counter())
        return values

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class ClockCallback(keras.callbacks.Callback):
    """The same for `model.fit`: records every training batch and the validation pass.

    Overriding `on_train_batch_end` makes Keras call it synchronously with the logs converted to
    Python numbers, i.e. after the step has finished.
    """

    def __init__(self, clock: StepClock) -> None:
        super().__init__()
        self.clock = clock
        self.valid = (0.0, 0.0)

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        self.clock.starts.append(time.perf_counter())

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self.clock.ends.append(time.perf_counter())

    def on_test_begin(self, logs: dict | None = None) -> None:
        self.valid = (time.perf_counter(), 0.0)

    def on_test_end(self, logs: dict | None = None) -> None:
        self.valid = (self.valid[0], time.perf_counter())


def epoch_data(steps: int, valid_images: int, seed: int) -> dict[str, np.ndarray]:
    """Synthetic training data for `steps` batches and `valid_images` validation images."""
    x, y = common.synthetic_data(steps * BATCH + valid_images, seed=seed)
    n = steps * BATCH
    return {"x_train": x[:n], "y_train": y[:n], "x_valid": x[n:], "y_valid": y[n:]}


def run_epoch(variant: Variant, data: dict[str, np.ndarray], epoch: int) -> dict[str, Any]:
    """One epoch end to end as each project runs it: shifted training batches, then validation.

    The product: `Trainer.train_epoch` (shuffled batches shifted by `batches.shift_images`, made
    ahead in a thread) and `Trainer.evaluate`; the baseline: `model.fit` on the original's Python
    generator with `validation_data`, as the original did. No checkpoints or logs in either.

    Returns:
        `{'seconds'` (the whole epoch), `'steps'` (from the first step's start to the last one's
        end), `'valid'` (the validation pass), `'in_loop'`, `'calls'` (per step, see `StepClock`)`}`.
    """
    clock = StepClock()
    start = time.perf_counter()
    if variant.kind == "product":
        trainer = variant.trainer
        trainer.steps = ClockedSteps(variant.steps, clock)
        try:
            trainer.train_epoch(data["x_train"], data["y_train"], epoch=epoch, seed=0)
        finally:
            trainer.steps = variant.steps
        valid_start = time.perf_counter()
        trainer.evaluate(data["x_valid"], data["y_valid"])
        end = time.perf_counter()
        valid = end - valid_start
    else:
        x_train, y_train, x_valid, y_valid = (data[k] for k in ("x_train", "y_train", "x_valid", "y_valid"))
        callback = ClockCallback(clock)
        generator = original.train_generator(x_train, y_train, BATCH, 0.1, seed=epoch)
        variant.train_model.fit(generator, steps_per_epoch=len(x_train) // BATCH, epochs=1,
                                validation_data=((x_valid, y_valid), (y_valid, x_valid)),
                                validation_batch_size=BATCH, shuffle=False, verbose=0,
                                callbacks=[callback])
        end = time.perf_counter()
        valid = callback.valid[1] - callback.valid[0]
    return {"seconds": end - start, "steps": clock.ends[-1] - clock.starts[0], "valid": valid,
            "in_loop": clock.in_loop(), "calls": clock.calls()}


def project_epoch(per_step: float, other: float, valid: float, valid_images: int) -> float:
    """Seconds of a 60k-image epoch with its 10k-image validation: 600 x the median step in the loop,
    the epoch's `other` seconds (neither steps nor validation: set-up, teardown), and `valid` seconds
    to validate `valid_images` images scaled to 10k."""
    return other + EPOCH_IMAGES / BATCH * per_step + valid * common.VALID_IMAGES / valid_images


def summarize_epochs(records: list[dict[str, Any]], steps: int, valid_images: int) -> dict[str, Any]:
    """The epochs of one variant (`run_epoch` records): per-step statistics pooled over all of them,
    medians of the rest, and the projected 60k + 10k epoch."""
    per_step = common.summarize([t for r in records for t in r["in_loop"]])
    other = statistics.median(r["seconds"] - r["steps"] - r["valid"] for r in records)
    valid = statistics.median(r["valid"] for r in records)
    return {"n": len(records), "steps": steps, "per_step": per_step,
            "call": common.summarize([t for r in records for t in r["calls"]]),
            "seconds": common.summarize([r["seconds"] for r in records]),
            "other": other, "valid": valid,
            "projected": project_epoch(per_step["median"], other, valid, valid_images)}


def predict_seconds(variant: Variant, x: np.ndarray) -> float:
    """`eval_model.predict` over `x` in batches of 100, as the test command does."""
    return common.timed(lambda: variant.eval_model.predict(x, batch_size=BATCH, verbose=0))


def manipulation_seconds(variant: Variant, x: np.ndarray, y: np.ndarray, save_dir: str) -> float:
    """The 16 x 11 grid including `manipulate-5.png`: the product's `capsulenet.manipulate_latent`
    or the original's (176 predicts of 1), on the same randomly picked sample."""
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    if variant.kind == "product":
        with contextlib.redirect_stdout(io.StringIO()):  # its begin/end banner lines
            capsulenet.manipulate_latent(variant.manipulate_model, (x, y), common.DIGIT, save_dir, rng=rng)
    else:
        original.manipulate_latent(variant.manipulate_model, x, y, common.DIGIT, save_dir, rng)
    return time.perf_counter() - start


# ---------------------------------------------------------------------------------------------
# Phases: every variant, interleaved
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Config:
    """How much to measure; `--quick` and the device pick the defaults."""

    steps: int
    rounds: int
    warmup: int
    epoch_steps: int
    epoch_rounds: int
    valid_images: int
    inference_images: int
    gemm_sizes: tuple[int, ...]
    gemm_repeats: int
    memory_steps: int
    min_slow_steps: int  # per round, for a variant over 3x slower than the fastest
    inference_calls: int  # predicts per variant and round
    thread_rounds: int


def make_config(args: argparse.Namespace, gpu: bool) -> Config:
    """Defaults per mode and device (a GPU step is ~50x shorter, so it affords more steps)."""
    if args.quick:
        config = Config(steps=20 if gpu else 3, rounds=2, warmup=3 if gpu else 1,
                        epoch_steps=50 if gpu else 8, epoch_rounds=2,
                        valid_images=1000 if gpu else 200, inference_images=1000 if gpu else 200,
                        gemm_sizes=(4096,) if gpu else (2048,), gemm_repeats=3, memory_steps=3,
                        min_slow_steps=1, inference_calls=3, thread_rounds=1)
    else:
        config = Config(steps=50 if gpu else 10, rounds=3, warmup=5 if gpu else 2,
                        epoch_steps=200 if gpu else 30, epoch_rounds=2,
                        valid_images=2000 if gpu else 1000, inference_images=2000 if gpu else 500,
                        gemm_sizes=(4096, 8192) if gpu else (2048, 4096), gemm_repeats=5,
                        memory_steps=5, min_slow_steps=2, inference_calls=3, thread_rounds=2)
    for name in ("steps", "rounds", "epoch_steps", "epoch_rounds"):
        if getattr(args, name) is not None:
            setattr(config, name, getattr(args, name))
    return config


def measure_floor(config: Config, device: dict[str, Any], peak_gflops: float | None) -> dict[str, Any]:
    """`flops.measure_floor` on this device (TF32 allowed on a GPU where TensorFlow allows it)."""
    gpu = device["kind"] == "GPU"
    tf32 = gpu and tf.config.experimental.tensor_float_32_execution_enabled()
    peak = None if gpu else flops.cpu_peak(override_gflops=peak_gflops)
    return flops.measure_floor(config.gemm_sizes, config.gemm_repeats, gpu=gpu, tf32=tf32, peak=peak)


def count_flops(product: Variant, x: Any, y: Any) -> dict[str, Any]:
    """The analytic count, and the same counted on the product's traced training step."""
    counts = flops.analytic_flops()
    traced = flops.graph_flops(product.steps.train_step.get_concrete_function(x, y))
    counts["graph_train_per_image"] = sum(traced.values()) / BATCH
    counts["graph_by_op"] = traced
    return counts


def measure_steps(variants: dict[str, Variant], config: Config, x: Any, y: Any,
                  log: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    """Median training-step time per variant, interleaved (XLA variants among themselves, after the
    others); slow variants time fewer steps per round so that they do not dominate the run."""
    first, warm = {}, {}
    for name, v in variants.items():
        first[name] = train_step_seconds(v, x, y)
        warm[name] = min(train_step_seconds(v, x, y) for _ in range(config.warmup))
        log(f"  {name}: first call {first[name]:.1f} s, warm step {warm[name] * 1e3:.0f} ms")
    fastest = min(warm.values())
    counts = {name: config.steps if t < 3 * fastest else max(config.min_slow_steps, config.steps // 4)
              for name, t in warm.items()}
    # XLA variants after the others, not interleaved with them: measured here, a step of the product
    # right after an XLA step ran ~20% slower (906 against 743 ms, 2026-11-28, 2-core Xeon), as XLA's
    # own CPU threads still held the cores.
    xla = [name for name, v in variants.items() if v.note.startswith("jit_compile=True")]
    samples: dict[str, list[float]] = {}
    for group in ([name for name in variants if name not in xla], xla):
        if group:
            samples.update(common.interleave(group, config.rounds,
                                             lambda name, r: [train_step_seconds(variants[name], x, y)
                                                              for _ in range(counts[name])], log))
    return {name: {**common.summarize(samples[name]), "first_call": first[name],
                   "note": variants[name].note} for name in variants}


def measure_epochs(variants: dict[str, Variant], config: Config, log: Callable[[str], None]
                   ) -> dict[str, dict[str, Any]]:
    """End-to-end epochs of `product` and `baseline`, interleaved, after a 2-step warm-up epoch that
    traces every function; see `run_epoch` and `summarize_epochs`."""
    names = [n for n in ("product", "baseline") if n in variants]
    data = epoch_data(config.epoch_steps, config.valid_images, seed=3)
    for name in names:
        run_epoch(variants[name], epoch_data(2, config.valid_images, seed=5), epoch=99)
    records: dict[str, list[dict[str, Any]]] = {name: [] for name in names}

    def measure(name: str, r: int) -> list[float]:
        records[name].append(run_epoch(variants[name], data, epoch=r))
        return records[name][-1]["in_loop"]

    common.interleave(names, config.epoch_rounds, measure, log)
    return {name: summarize_epochs(records[name], config.epoch_steps, config.valid_images)
            for name in names}


def measure_inference(variants: dict[str, Variant], config: Config, log: Callable[[str], None]
                      ) -> dict[str, dict[str, Any]]:
    """ms per 100 images of `eval_model.predict`, product vs baseline, interleaved; each round
    makes `inference_calls` predicts of `inference_images` images per variant."""
    names = [n for n in ("product", "baseline") if n in variants]
    x, _ = common.synthetic_data(config.inference_images, seed=4)
    for name in names:
        predict_seconds(variants[name], x[:BATCH])
    samples = common.interleave(names, max(2, config.rounds), lambda name, r: [
        predict_seconds(variants[name], x) * BATCH / len(x) for _ in range(config.inference_calls)], log)
    return {name: common.summarize(samples[name]) for name in names}


def measure_manipulation(variants: dict[str, Variant], config: Config, log: Callable[[str], None]
                         ) -> dict[str, dict[str, Any]]:
    """The manipulation grid, product vs baseline, interleaved (the first call of each untimed)."""
    names = [n for n in ("product", "baseline") if n in variants]
    x, y = common.synthetic_data(200, seed=5)
    with tempfile.TemporaryDirectory() as tmp:
        def run(name: str, r: int) -> list[float]:
            return [manipulation_seconds(variants[name], x, y, tmp)]

        for name in names:
            run(name, 0)
        samples = common.interleave(names, max(2, config.rounds), run, log)
    return {name: common.summarize(samples[name]) for name in names}


def measure_memory(names: Sequence[str], config: Config, log: Callable[[str], None]
                   ) -> dict[str, dict[str, Any]]:
    """Peak memory of one training process per variant, each in a fresh child process. They run
    side by side (each measures only itself; nothing is timed), which keeps a GPU run short."""
    children = {name: common.start_child("bench.py", ["--probe", "memory", "--variant", name,
                                                      "--steps", str(config.memory_steps)])
                for name in names}
    memory = {}
    for name, child in children.items():
        memory[name] = common.finish_child(child)
        log(f"  {name}: {memory[name]}")
    return memory


def thread_configs(cores: int) -> list[tuple[str, int, int, dict[str, str]]]:
    """(label, inter_op, intra_op, extra environment) to try; 0 means TensorFlow's default."""
    half = max(1, cores // 2)
    configs = [("default", 0, 0, {})]
    for inter, intra in ((1, cores), (2, cores), (1, half), (2, half), (1, 1)):
        label = f"inter={inter}, intra={intra}"
        if all(c[0] != label for c in configs):
            configs.append((label, inter, intra, {}))
    configs.append(("default, TF_ENABLE_ONEDNN_OPTS=0", 0, 0, {"TF_ENABLE_ONEDNN_OPTS": "0"}))
    return configs


def measure_threads(config: Config, cores: int, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """The product's step under each thread setting, one child process per setting and round,
    the settings in a rotated order each round; the step times of all rounds are pooled."""
    configs = thread_configs(cores)
    times: dict[str, list[float]] = {label: [] for label, *_ in configs}
    errors: dict[str, str] = {}
    for r in range(config.thread_rounds):
        shift = r % len(configs)
        for label, inter, intra, env in configs[shift:] + configs[:shift]:
            result = common.run_child("bench.py", ["--probe", "threads", "--inter", str(inter), "--intra",
                                                   str(intra), "--steps", str(max(3, config.steps))], env=env)
            if "error" in result:
                errors[label] = result["error"]
            else:
                times[label].extend(result["times"])
            log(f"  round {r + 1}/{config.thread_rounds} {label}: "
                + (result.get("error") or f"median {statistics.median(result['times']):.3f} s"))
    return [{"label": label, **(common.summarize(times[label]) if times[label]
                                else {"error": errors.get(label, "no result")})}
            for label, *_ in configs]


# ---------------------------------------------------------------------------------------------
# Child processes: peak memory and thread settings
# ---------------------------------------------------------------------------------------------


def gpu_peak_mb() -> float | None:
    """Peak bytes of TensorFlow's allocator on GPU:0, MiB; None without a GPU."""
    if not tf.config.list_physical_devices("GPU"):
        return None
    return tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**20


def probe_memory(variant_name: str, steps: int) -> dict[str, Any]:
    """Child: builds one variant, trains `steps` steps end to end and validates 100 images."""
    before = common.rss_mb()  # TensorFlow and Keras imported, nothing built
    with tempfile.TemporaryDirectory() as tmp:
        variant = build_variant(variant_name, train_config(tmp), source=None)
        built = common.rss_mb()
        run_epoch(variant, epoch_data(steps, BATCH, seed=1), epoch=0)
    return {"variant": variant_name, "rss_before_build_mb": before, "rss_after_build_mb": built,
            "peak_rss_mb": common.peak_rss_mb(), "gpu_peak_mb": gpu_peak_mb()}


def probe_threads(inter: int, intra: int, steps: int) -> dict[str, Any]:
    """Child: the product's training step under the given TensorFlow thread settings."""
    tf.config.threading.set_inter_op_parallelism_threads(inter)
    tf.config.threading.set_intra_op_parallelism_threads(intra)
    with tempfile.TemporaryDirectory() as tmp:
        variant = build_product(train_config(tmp))
        x, y = (tf.constant(a) for a in common.synthetic_data(BATCH, seed=2))
        for _ in range(2):  # trace, then one warm step
            train_step_seconds(variant, x, y)
        times = [train_step_seconds(variant, x, y) for _ in range(steps)]
    return {"inter": inter, "intra": intra, "times": times}


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def describe_device() -> dict[str, Any]:
    """`{'kind': 'GPU'|'CPU', 'name', 'cpu', 'cores', 'key'}`; the GPU's name from TensorFlow."""
    gpus = tf.config.list_physical_devices("GPU")
    cpu = f"{common.cpu_model()} ({common.cpu_cores()} cores)"
    if gpus:
        details = tf.config.experimental.get_device_details(gpus[0])
        name = details.get("device_name", gpus[0].name)
        if len(gpus) > 1:
            name = f"{name} (x{len(gpus)}, the benchmark uses one)"
        kind = "GPU"
    else:
        name, kind = cpu, "CPU"
    return {"kind": kind, "name": name, "cpu": cpu, "cores": common.cpu_cores(),
            "key": common.machine_key(f"{kind} {name}")}


def enable_memory_growth() -> None:
    """Lets the parent and its child probes share a GPU (TensorFlow would otherwise take it all)."""
    for gpu in tf.config.list_physical_devices("GPU"):
        with contextlib.suppress(RuntimeError, ValueError):
            tf.config.experimental.set_memory_growth(gpu, True)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line; `--probe` and the flags after it are internal (child processes)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short run")
    parser.add_argument("--steps", type=int, help="timed training steps per variant and round")
    parser.add_argument("--rounds", type=int, help="interleaved rounds")
    parser.add_argument("--epoch_steps", type=int, help="training steps per end-to-end epoch")
    parser.add_argument("--epoch_rounds", type=int, help="interleaved rounds of end-to-end epochs")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated, from {', '.join(VARIANTS)}")
    parser.add_argument("--threads", choices=("auto", "yes", "no"), default="auto",
                        help="thread-setting sweep (auto: on CPUs only)")
    parser.add_argument("--only", type=lambda v: [p.strip() for p in v.split(",") if p.strip()],
                        help=f"comma-separated phases to run, from {', '.join(PHASES)}")
    parser.add_argument("--peak_gflops", type=float,
                        help="the CPU's theoretical fp32 peak, when known better than the estimate "
                             "from /proc/cpuinfo (matrix products above it are refused as the floor)")
    parser.add_argument("--no_memory", action="store_true", help="skip the memory probes")
    parser.add_argument("--no_write", action="store_true", help="do not write bench/RESULTS.md")
    parser.add_argument("--write", action="store_true",
                        help="write bench/RESULTS.md even for a partial run (--only)")
    parser.add_argument("--results", default=str(common.RESULTS_PATH), help="Markdown file to update")
    parser.add_argument("--json", help="also write the raw results to this JSON file")
    parser.add_argument("--remark", default="", help="a note written under the heading")
    parser.add_argument("--probe", choices=("memory", "threads"), help=argparse.SUPPRESS)
    parser.add_argument("--variant", default="product", help=argparse.SUPPRESS)
    parser.add_argument("--inter", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--intra", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.variant_list = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(args.variant_list) - set(VARIANTS))
    if unknown:
        parser.error(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    unknown = sorted(set(args.only or ()) - set(PHASES))
    if unknown:
        parser.error(f"--only: unknown {unknown}; choose from {', '.join(PHASES)}")
    return args


def selected_phases(args: argparse.Namespace, gpu: bool) -> list[str]:
    """`--only`, else every phase; memory unless `--no_memory`; threads on CPUs unless `--threads`."""
    phases = [p for p in PHASES if p in args.only] if args.only else list(PHASES)
    if args.no_memory and "memory" in phases:
        phases.remove("memory")
    wanted = args.threads == "yes" or (args.threads == "auto" and not gpu)
    if "threads" in phases and not wanted and not args.only:
        phases.remove("threads")
    return phases


def run_phase(results: dict[str, Any], name: str, measure: Callable[[], Any],
              log: Callable[[str], None]) -> None:
    """Stores `measure()` under `name`; an exception is logged and recorded, not raised, so that
    one failing measurement (e.g. on a device this was never run on) keeps the others."""
    log(f"{report.PHASE_TITLES[name]} ...")
    try:
        results[name] = measure()
    except Exception as e:  # any failure: report it and go on
        traceback.print_exc()
        message = " ".join(f"{type(e).__name__}: {e}".split())
        results.setdefault("errors", {})[name] = message[:300]


def log_floor(floor: dict[str, Any], log: Callable[[str], None]) -> None:
    for c in floor["candidates"]:
        log(f"  {c['library']} n={c['n']}: {c['gflops']:.0f} GFLOP/s, error {c['error']:.1e}"
            + (f", refused: {c['refused']}" if "refused" in c else ""))
    if floor["peak"]:
        log(f"  theoretical peak {floor['peak']['gflops']:.0f} GFLOP/s ({floor['peak']['how']})")


def run_benchmark(args: argparse.Namespace, argv: Sequence[str]) -> dict[str, Any]:
    """Every measurement in one process (children only for memory and thread settings)."""
    device = describe_device()
    gpu = device["kind"] == "GPU"
    config = make_config(args, gpu)
    phases = selected_phases(args, gpu)
    log = print
    log(f"Device: {device['kind']} {device['name']} (CPU: {device['cpu']}); phases: "
        f"{', '.join(phases)}; variants: {', '.join(args.variant_list)}")
    keras.utils.set_random_seed(0)
    results: dict[str, Any] = {"meta": {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python bench/bench.py " + shlex.join(argv),
        "mode": "quick" if args.quick else "full", "device": device,
        "tensorflow": tf.__version__, "keras": keras.__version__, "numpy": np.__version__,
        "python": platform.python_version(), "remark": args.remark,
        "rounds": f"{config.rounds} (steps), {config.epoch_rounds} (epochs)",
        "epoch_config": {"steps": config.epoch_steps, "valid_images": config.valid_images},
        "inference_images": config.inference_images, "memory_steps": config.memory_steps,
        "config": dataclasses.asdict(config)}}
    log("Floor: best fp32 matrix product ...")
    results["floor"] = measure_floor(config, device, args.peak_gflops)
    log_floor(results["floor"], log)
    in_process = [p for p in phases if p in ("steps", "epoch", "inference", "manipulation")]
    with tempfile.TemporaryDirectory() as tmp:
        variants: dict[str, Variant] = {}
        for name in args.variant_list:
            source = variants["product"].train_model if "product" in variants else None
            variants[name] = build_variant(name, train_config(tmp), source)
        x, y = (tf.constant(a) for a in common.synthetic_data(BATCH, seed=6))
        results["flops"] = count_flops(variants["product"], x, y) if "product" in variants \
            else flops.analytic_flops()
        measures = {
            "steps": lambda: measure_steps(variants, config, x, y, log),
            "epoch": lambda: measure_epochs(variants, config, log),
            "inference": lambda: measure_inference(variants, config, log),
            "manipulation": lambda: measure_manipulation(variants, config, log),
        }
        for phase in in_process:
            run_phase(results, phase, measures[phase], log)
    # The products again after the work, in case the machine was busier at the start; best of both.
    log("Floor again ...")
    results["floor"] = flops.merge_floors(results["floor"],
                                          measure_floor(config, device, args.peak_gflops))
    log_floor(results["floor"], log)
    memory_names = [n for n in ("product", "baseline") if n in args.variant_list]
    if "memory" in phases:
        run_phase(results, "memory", lambda: measure_memory(memory_names, config, log), log)
    if "threads" in phases:
        run_phase(results, "threads", lambda: measure_threads(config, device["cores"], log), log)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if keras.backend.backend() != "tensorflow":
        sys.exit(f"bench/bench.py measures the product's TensorFlow training path; KERAS_BACKEND is "
                 f"{keras.backend.backend()!r}. Unset it, or use bench/backend_epoch.py for other backends.")
    if args.probe == "threads":  # before anything starts TensorFlow's thread pools
        print(json.dumps(probe_threads(args.inter, args.intra, args.steps or 5)))
        return 0
    enable_memory_growth()
    if args.probe == "memory":
        print(json.dumps(probe_memory(args.variant, args.steps or 3)))
        return 0
    results = run_benchmark(args, argv)
    section = report.render(results)
    print()
    print(section)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    if args.no_write or (args.only and not args.write):
        # A partial run would replace this device's full section with a few rows.
        print(f"Not written to {args.results}" + (" (partial run: add --write)" if args.only else ""))
    else:
        report.write_results(section, results["meta"]["device"]["key"], Path(args.results))
        print(f"Written to {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
