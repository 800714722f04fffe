"""Speed benchmark: this port's CapsNet against the original formulation and the FLOP floor.

One process builds every variant on synthetic MNIST-shaped data (28x28x1, 10 classes, batch 100) and
measures them in interleaved rounds (variant A, B, C, then again), so that a machine that slows down
or speeds up during the run affects every variant alike:

- training step: median ms after warm-up, samples/s, projected 60k-image epoch;
- end-to-end epochs of two fixed lengths (S and 2S steps): data pipeline with augmentation,
  training and a validation pass, projected to 60k training + 10k validation images;
- inference ms per 100 images (`eval_model.predict`), the 16 x 11 manipulation grid;
- the floor: training FLOPs counted analytically (and cross-checked on the traced graph) divided by
  the machine's best fp32 matmul rate measured in the same run; every variant as a ratio to it and
  as a speed-up over the baseline;
- peak memory of a training process, measured in a child process per variant (RSS high-water
  `VmHWM` from /proc/self/status, and the TensorFlow allocator's peak on a GPU), because the
  high-water of one process that holds every variant cannot be split between them;
- on a CPU, TensorFlow thread settings, each in a child process (they cannot change once
  TensorFlow has started).

Variants: `product` (this port as shipped: `capsulenet.Trainer`, jit_compile=False),
`product-xla` (the same with jit_compile=True), `product-mp` (`--mixed_precision`: bfloat16
everywhere), `baseline` (bench/original_formulation.py: tile + per-sample map_fn,
Python-side shifts, `model.fit` on a generator, 176 batch-1 predicts). The training-step rows time
every variant through the same `Trainer.train_step`, so they compare the model formulations; the
end-to-end rows run each project's own loop (the product's `Trainer.run_epoch` + `evaluate`, the
original's `model.fit(generator, validation_data=...)`). `proposal` in the manipulation rows
encodes the image once and decodes the 176 perturbed capsules in one batch, in a `tf.function`
built once (a lower bound for the product's `manipulate_latent`, which builds its models per call).

Usage:
    python bench/bench.py              # full run, writes bench/RESULTS.md
    python bench/bench.py --quick      # short run (~10 min on 2 CPU cores, meant to be < 3 on a GPU)
    python bench/bench.py --steps 20 --rounds 5 --variants product,baseline
    python bench/bench.py --quick --no_write   # print only
    python bench/bench.py --only steps,inference --variants product,product-xla   # some rows
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import io
import json
import math
import os
import platform
import re
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

try:
    import tensorflow as tf
except ImportError:
    sys.exit("bench/bench.py needs TensorFlow (pip install -r requirements.txt); on a machine "
             "without it, bench/backend_epoch.py measures the model on JAX or PyTorch.")
import keras  # noqa: E402
import numpy as np  # noqa: E402

if keras.backend.backend() != "tensorflow":
    sys.exit(f"bench/bench.py measures the product's TensorFlow training path (capsulenet.Trainer, "
             f"tf.data); KERAS_BACKEND is {keras.backend.backend()!r}. Unset it, or use "
             "bench/backend_epoch.py for other backends.")

import capsulenet  # noqa: E402
import utils  # noqa: E402


def _load_sibling(name: str) -> ModuleType:
    """A module of bench/ loaded by path, without putting bench/ on sys.path (where this file,
    `bench.py`, would shadow anything named `bench`)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, BENCH_DIR / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


original = _load_sibling("original_formulation")
results_md = _load_sibling("results_md")

RESULTS_PATH = BENCH_DIR / "RESULTS.md"
BENCH_INTRO = ("\n## Single-device speed (`python bench/bench.py`)\n\n"
               "Written by bench/bench.py, one section per device; rerun it to refresh.\n\n")
INPUT_SHAPE = (28, 28, 1)
N_CLASS = 10
ROUTINGS = 3
BATCH = 100
EPOCH_IMAGES = 60_000  # MNIST training set
VALID_IMAGES = 10_000  # MNIST test set, the validation data
GEMM_N = 4096
VARIANTS = ("product", "baseline", "product-xla", "product-mp")
# The targets, measured side by side: (row, threshold, how it is compared).
TARGETS = {
    "step_vs_floor": 1.15,  # product step time / floor, at most
    "epoch_speedup": 1.5,  # baseline end-to-end epoch / product, at least
    "inference_speedup": 1.3,
    "manipulation_speedup": 20.0,
}


# ---------------------------------------------------------------------------------------------
# Device
# ---------------------------------------------------------------------------------------------


def enable_memory_growth() -> None:
    """Lets the parent and its child probes share a GPU (TensorFlow would otherwise take it all)."""
    for gpu in tf.config.list_physical_devices("GPU"):
        with contextlib.suppress(RuntimeError, ValueError):
            tf.config.experimental.set_memory_growth(gpu, True)


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (or `platform.processor()` elsewhere)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_cores() -> int:
    """Cores this process may run on."""
    with contextlib.suppress(AttributeError):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def describe_device() -> dict[str, Any]:
    """`{'kind': 'GPU'|'CPU', 'name', 'cpu', 'cores', 'key'}`; the GPU's name from TensorFlow."""
    gpus = tf.config.list_physical_devices("GPU")
    cpu = f"{cpu_model()} ({cpu_cores()} cores)"
    if gpus:
        details = tf.config.experimental.get_device_details(gpus[0])
        name = details.get("device_name", gpus[0].name)
        if len(gpus) > 1:
            name = f"{name} (x{len(gpus)}, the benchmark uses one)"
        kind = "GPU"
    else:
        name, kind = cpu, "CPU"
    key = re.sub(r"[^a-z0-9]+", "-", f"{kind} {name}".lower()).strip("-")
    return {"kind": kind, "name": name, "cpu": cpu, "cores": cpu_cores(), "key": key}


# ---------------------------------------------------------------------------------------------
# FLOPs
# ---------------------------------------------------------------------------------------------


def conv_macs(in_hw: int, kernel: int, stride: int, c_in: int, c_out: int) -> tuple[int, int]:
    """Multiply-adds of a square 'valid' convolution per image, and its output size."""
    out_hw = (in_hw - kernel) // stride + 1
    return out_hw * out_hw * c_out * kernel * kernel * c_in, out_hw


def analytic_flops(
    input_shape: Sequence[int] = INPUT_SHAPE, n_class: int = N_CLASS, routings: int = ROUTINGS
) -> dict[str, Any]:
    """FLOPs per image of CapsNet (2 per multiply-add; matmul-like operations only).

    Counts conv1, the PrimaryCaps conv, `u_hat`, the routing contractions (`s = sum c u_hat` each
    iteration, the agreement `v . u_hat` in all but the last) and the decoder's three Dense layers.
    Training = forward + gradient w.r.t. the inputs + gradient w.r.t. the weights, each as costly
    as the forward, except: conv1 needs no input gradient (the image), and the first routing
    iteration's coupling coefficients are the constant softmax(0) = 1/n_class, so no gradient is
    computed for them. `spec_train` is the SPEC's convention, which keeps that last term
    (1202.6 MFLOP per image, 120.3 GFLOP per batch-100 step for MNIST).

    Returns:
        `{'forward': {part: flops}, 'train': {part: flops}, 'forward_total', 'train_total',
        'spec_train_total'}` per image.
    """
    rows, _, channels = (int(d) for d in input_shape)
    conv1, hw1 = conv_macs(rows, 9, 1, channels, 256)
    primary, hw2 = conv_macs(hw1, 9, 2, 256, 256)
    n_primary = hw2 * hw2 * 32  # 8-dimensional capsules, 32 types
    u_hat = n_class * n_primary * 16 * 8
    weighted_sum = n_class * n_primary * 16  # s_j = sum_i c_ij u_hat_ij, one iteration
    agreement = n_class * n_primary * 16  # b_ij += u_hat_ij . v_j
    decoder = 16 * n_class * 512 + 512 * 1024 + 1024 * rows * rows * channels
    forward = {
        "conv1": 2 * conv1,
        "primarycaps": 2 * primary,
        "u_hat": 2 * u_hat,
        "routing": 2 * (routings * weighted_sum + (routings - 1) * agreement),
        "decoder": 2 * decoder,
    }
    train = {part: 3 * flops for part, flops in forward.items()}
    train["conv1"] -= forward["conv1"]  # no gradient w.r.t. the input image
    first_coupling_grad = 2 * weighted_sum  # d/dc of the first iteration: c is a constant
    spec_train_total = sum(train.values())
    train["routing"] -= first_coupling_grad
    return {
        "forward": forward,
        "train": train,
        "forward_total": sum(forward.values()),
        "train_total": sum(train.values()),
        "spec_train_total": spec_train_total,
    }


def _einsum_flops(op: Any) -> int:
    """2 x the product of every index's size: the multiply-adds of a contraction."""
    equation = op.get_attr("equation").decode()
    inputs, _ = equation.split("->")
    sizes: dict[str, int] = {}
    for letters, tensor in zip(inputs.split(","), op.inputs, strict=True):
        for letter, dim in zip(letters, tensor.shape.as_list(), strict=True):
            sizes[letter] = int(dim)
    return 2 * math.prod(sizes.values())


def _conv_backprop_flops(op: Any) -> int:
    """A convolution's gradient costs its forward: 2 x output elements x kernel volume.

    `Conv2DBackpropInput(input_sizes, filter, out_backprop)` reads the filter shape from its
    operand, `Conv2DBackpropFilter(input, filter_sizes, out_backprop)` from its output.
    """
    filter_tensor = op.outputs[0] if op.type == "Conv2DBackpropFilter" else op.inputs[1]
    filter_shape = filter_tensor.shape.as_list()
    out_backprop = op.inputs[2].shape.as_list()
    return 2 * math.prod(out_backprop) * math.prod(filter_shape[:3])


def _live_ops(graph: Any) -> set[str]:
    """Names of the ops that a function's outputs or side effects depend on (dead code is pruned
    by TensorFlow before running, e.g. the gradient w.r.t. the input image)."""
    stack = [t.op for t in graph.outputs] + list(graph.control_outputs)
    seen: set[str] = set()
    while stack:
        op = stack.pop()
        if op.name not in seen:
            seen.add(op.name)
            stack.extend(t.op for t in op.inputs)
            stack.extend(op.control_inputs)
    return seen


def graph_flops(concrete_function: Any) -> dict[str, int]:
    """FLOPs of the live matmul-like ops of a traced function, by op type.

    `Conv2D` and `MatMul`/`BatchMatMul` use TensorFlow's own registered counts; `Einsum` (which has
    none) is counted from its equation; the conv gradients from their operand shapes (TensorFlow's
    registered count for them ignores the stride). The graph must not hold loops (`map_fn`).
    """
    from tensorflow.python.framework import ops as tf_ops
    from tensorflow.python.util import deprecation

    graph = concrete_function.graph
    live = _live_ops(graph)
    totals: dict[str, int] = {}
    for op in graph.get_operations():
        if op.name not in live:
            continue
        if op.type in ("While", "StatelessWhile"):
            raise ValueError("graph_flops cannot count loops; trace a graph without map_fn")
        if op.type == "Einsum":
            flops = _einsum_flops(op)
        elif op.type in ("Conv2DBackpropInput", "Conv2DBackpropFilter"):
            flops = _conv_backprop_flops(op)
        elif op.type in ("Conv2D", "MatMul", "BatchMatMulV2", "BatchMatMulV3"):
            with deprecation.silence():  # the registered counters use a TF1 shape helper
                flops = int(tf_ops.get_stats_for_node_def(graph, op.node_def, "flops").value)
        else:
            continue
        totals[op.type] = totals.get(op.type, 0) + flops
    return totals


# ---------------------------------------------------------------------------------------------
# The floor: the machine's best fp32 matmul
# ---------------------------------------------------------------------------------------------


def numpy_gemm_gflops(n: int = GEMM_N, repeats: int = 5) -> float:
    """Best GFLOP/s of a float32 `n x n` NumPy matmul (OpenBLAS/MKL, every core) of `repeats`."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    a @ b  # first call: thread pool start-up
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def tf_gemm_gflops(n: int = GEMM_N, repeats: int = 5, chain: int = 10) -> float:
    """Best GFLOP/s of a float32 `n x n` `tf.matmul` on TensorFlow's default device.

    `chain` dependent matmuls run in one `tf.function` (so grappler cannot merge them and a GPU's
    launch latency is amortised); reading the result back waits for the device.
    """
    a = tf.random.normal((n, n), stddev=1 / math.sqrt(n), seed=1)

    @tf.function
    def run(c: Any) -> Any:
        for _ in range(chain):
            c = tf.matmul(c, a)
        return tf.reduce_sum(c)

    float(run(a))
    best = min(_timed(lambda: float(run(a))) for _ in range(repeats))
    return 2 * n**3 * chain / best / 1e9


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# ---------------------------------------------------------------------------------------------
# Data and variants
# ---------------------------------------------------------------------------------------------


def synthetic_data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """MNIST-shaped data: `x` float32 `[n, 28, 28, 1]` in [0, 1], about 80% zeros like MNIST's
    background; `y` one-hot `[n, 10]` cycling through the classes so that every class occurs."""
    rng = np.random.default_rng(seed)
    x = (rng.random((n,) + INPUT_SHAPE, dtype=np.float32)
         * (rng.random((n,) + INPUT_SHAPE) < 0.2)).astype("float32")
    y = np.eye(N_CLASS, dtype="float32")[np.arange(n) % N_CLASS]
    return x, y


@dataclass
class Variant:
    """One formulation under test, with the models and the training step it is timed through."""

    name: str
    kind: str  # 'product' or 'baseline'
    train_model: keras.Model
    eval_model: keras.Model
    manipulate_model: keras.Model
    trainer: capsulenet.Trainer
    note: str = ""
    times: dict[str, list[float]] = field(default_factory=dict)


def train_args(save_dir: str) -> argparse.Namespace:
    """The product's default flags (batch 100, lr 0.001, lam_recon 0.392, shift 0.1, 3 routings)."""
    return capsulenet.build_parser().parse_args(["--save_dir", save_dir])


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


def build_product(args: argparse.Namespace, name: str, jit_compile: bool = False,
                  policy: str | None = None) -> Variant:
    """The product's models (`capsulenet.build_models`) and its `Trainer`."""
    data = synthetic_data(BATCH, seed=0)
    with precision_policy(policy):
        model, eval_model, manipulate_model = capsulenet.build_models(args, (data, data), 600)
    if jit_compile:
        eval_model.jit_compile = True
    trainer = capsulenet.Trainer(model, args, is_chief=False, jit_compile=jit_compile,
                                 weights_model=eval_model)
    trainer.optimizer.build(model.trainable_variables)
    note = f"jit_compile={jit_compile}" + (f", policy {policy}" if policy else "")
    return Variant(name, "product", model, eval_model, manipulate_model, trainer, note)


def build_baseline(args: argparse.Namespace, source: keras.Model | None = None) -> Variant:
    """The original formulation, compiled as the original (`model.fit` losses), without XLA."""
    model, eval_model, manipulate_model = original.OriginalCapsNet(INPUT_SHAPE, N_CLASS, ROUTINGS)
    if source is not None:
        original.copy_weights(source, model)
    model.compile(optimizer=capsulenet.make_optimizer(args, 600),
                  loss=[capsulenet.margin_loss, "mse"], loss_weights=[1.0, args.lam_recon],
                  metrics=[["accuracy"], []], jit_compile=False)
    for m in (eval_model, manipulate_model):
        m.jit_compile = False  # TF 1.x had no XLA
    trainer = capsulenet.Trainer(model, args, is_chief=False, weights_model=eval_model)
    trainer.optimizer.build(model.trainable_variables)
    note = f"tile + map_fn u_hat, {original.shift_backend()} per-image shifts, no XLA"
    return Variant("baseline", "baseline", model, eval_model, manipulate_model, trainer, note)


def build_variant(name: str, args: argparse.Namespace, source: keras.Model | None) -> Variant:
    """`product`, `product-xla`, `product-mp` or `baseline`."""
    if name == "product":
        return build_product(args, name)
    if name == "product-xla":
        return build_product(args, name, jit_compile=True)
    if name == "product-mp":
        return build_product(args, name, policy=capsulenet.mixed_precision_policy())
    if name == "baseline":
        return build_baseline(args, source)
    raise ValueError(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")


# ---------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------


def train_step_seconds(variant: Variant, x: Any, y: Any) -> float:
    """One training step; reading the losses back waits for it (also on a GPU)."""
    start = time.perf_counter()
    values = variant.trainer.train_step(x, y)
    [float(v) for v in values]
    return time.perf_counter() - start


def epoch_seconds(variant: Variant, data: dict[str, Any], epoch: int) -> float:
    """A fixed-size epoch end to end: augmentation, training steps and a validation pass.

    The product runs `Trainer.run_epoch` (tf.data with RandomTranslation and prefetch) and
    `Trainer.evaluate`; the baseline runs `model.fit` on the original's Python generator with
    `validation_data`, as the original did (no checkpoint or log callbacks in either).
    """
    start = time.perf_counter()
    if variant.kind == "product":
        variant.trainer.run_epoch(data["x_train_tf"], data["y_train_tf"], epoch, seed=epoch)
        variant.trainer.evaluate(data["x_valid"], data["y_valid"])
    else:
        x_train, y_train = data["x_train"], data["y_train"]
        generator = original.train_generator(x_train, y_train, BATCH, 0.1, seed=epoch)
        x_valid, y_valid = data["x_valid"], data["y_valid"]
        variant.train_model.fit(generator, steps_per_epoch=len(x_train) // BATCH, epochs=1,
                                validation_data=((x_valid, y_valid), (y_valid, x_valid)),
                                validation_batch_size=BATCH, shuffle=False, verbose=0)
    return time.perf_counter() - start


def predict_seconds(variant: Variant, x: np.ndarray) -> float:
    """`eval_model.predict` over `x` in batches of 100, as the test command does."""
    start = time.perf_counter()
    variant.eval_model.predict(x, batch_size=BATCH, verbose=0)
    return time.perf_counter() - start


class EncoderOnceGrid:
    """The manipulation grid as a lower bound: encode the image once, decode the 176 perturbed
    capsules in one batch, in a `tf.function` traced once. Gives the same images as
    `capsulenet.manipulate_latent`."""

    def __init__(self, eval_model: keras.Model) -> None:
        self.encoder = keras.Model(eval_model.input, eval_model.get_layer("digitcaps").output)
        self.decoder = eval_model.get_layer("decoder")
        n_perturb = len(capsulenet.PERTURBATIONS)
        noise = np.zeros((capsulenet.CAPSULE_DIM, n_perturb, N_CLASS, capsulenet.CAPSULE_DIM),
                         dtype="float32")
        for dim in range(capsulenet.CAPSULE_DIM):
            noise[dim, :, :, dim] = capsulenet.PERTURBATIONS[:, None]
        self.noise = tf.constant(noise.reshape(-1, N_CLASS, capsulenet.CAPSULE_DIM))
        self.grid = tf.function(self._grid)

    def _grid(self, x: Any, y: Any) -> Any:
        """`x` `[1, 28, 28, 1]`, `y` `[1, n_class]` -> `[176, 28, 28, 1]`."""
        capsules = tf.cast(self.encoder(x, training=False), "float32")  # [1, n_class, 16]
        masked = (capsules + self.noise) * y[:, :, None]  # [176, n_class, 16]
        flat = tf.reshape(masked, (tf.shape(masked)[0], -1))
        return self.decoder(flat, training=False)

    def __call__(self, x_test: np.ndarray, y_test: np.ndarray, digit: int, save_dir: str,
                 rng: np.random.Generator) -> np.ndarray:
        candidates = np.flatnonzero(np.argmax(y_test, 1) == digit)
        index = candidates[rng.integers(len(candidates))]
        recons = self.grid(tf.constant(x_test[index : index + 1]),
                           tf.constant(y_test[index : index + 1])).numpy()
        image = utils.combine_images(recons, height=capsulenet.CAPSULE_DIM)
        utils.save_image(image, Path(save_dir) / f"manipulate-{digit}.png")
        return recons


def manipulation_seconds(name: str, variant: Variant, grid: EncoderOnceGrid | None,
                         data: dict[str, Any], save_dir: str) -> float:
    """The 16 x 11 grid including `manipulate-5.png`: the product's `manipulate_latent`, the
    original's (176 predicts of 1) or the encoder-once `proposal`."""
    x, y = data["x_valid"], data["y_valid"]
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    if name == "proposal":
        grid(x, y, 5, save_dir, rng)
    elif variant.kind == "product":
        margs = argparse.Namespace(digit=5, save_dir=save_dir)
        with contextlib.redirect_stdout(io.StringIO()):
            capsulenet.manipulate_latent(variant.manipulate_model, (x, y), margs, rng=rng)
    else:
        original.manipulate_latent(variant.manipulate_model, x, y, 5, save_dir, rng)
    return time.perf_counter() - start


def interleave(names: Sequence[str], rounds: int, measure: Callable[[str, int], list[float]],
               log: Callable[[str], None]) -> dict[str, list[float]]:
    """Runs `measure(name, round)` for every name, round after round, rotating the order."""
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        order = list(names[r % len(names):]) + list(names[: r % len(names)])
        for name in order:
            values = measure(name, r)
            samples[name].extend(values)
            log(f"  round {r + 1}/{rounds} {name}: median {statistics.median(values):.3f} s of "
                f"{len(values)}")
    return samples


def summarize(values: Sequence[float]) -> dict[str, float]:
    """Median, quartiles and count of a list of seconds."""
    if len(values) == 1:
        return {"median": values[0], "q1": values[0], "q3": values[0], "n": 1}
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return {"median": median, "q1": q1, "q3": q3, "n": len(values)}


# ---------------------------------------------------------------------------------------------
# Child processes: peak memory and thread settings
# ---------------------------------------------------------------------------------------------


def start_child(argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    """Starts this script with `argv` in a child process."""
    command = [sys.executable, str(Path(__file__).resolve())] + argv
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})}, cwd=str(ROOT))


def finish_child(child: subprocess.Popen, timeout: float = 900) -> dict[str, Any]:
    """Waits for a child; returns the JSON it printed last, or `{'error': ...}`."""
    try:
        stdout, stderr = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        child.kill()
        child.communicate()
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in reversed(stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {"error": (stderr.strip().splitlines() or ["no output"])[-1][:200]}


def run_child(argv: list[str], env: dict[str, str] | None = None, timeout: float = 900
              ) -> dict[str, Any]:
    """Runs this script with `argv` and waits; see `finish_child`."""
    return finish_child(start_child(argv, env), timeout)


def rss_mb() -> float:
    """Resident set size now, MiB (from /proc; 0 where unavailable)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def peak_rss_mb() -> float:
    """This process's RSS high-water mark, MiB.

    On Linux from `VmHWM` in /proc/self/status: `getrusage`'s `ru_maxrss` would be wrong in a child
    process, because Linux carries over the high-water of the pre-`exec` image, i.e. of the forked
    copy of the parent (so every child would report at least the parent's size).
    """
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def gpu_peak_mb() -> float | None:
    """Peak bytes of TensorFlow's allocator on GPU:0, MiB; None without a GPU."""
    if not tf.config.list_physical_devices("GPU"):
        return None
    return tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**20


def probe_memory(variant_name: str, steps: int) -> dict[str, Any]:
    """Child: builds one variant, trains `steps` steps end to end and validates 100 images."""
    before = rss_mb()  # TensorFlow and Keras imported, nothing built
    with tempfile.TemporaryDirectory() as tmp:
        args = train_args(tmp)
        variant = build_variant(variant_name, args, source=None)
        x, y = synthetic_data(steps * BATCH + BATCH, seed=1)
        data = {"x_train": x[:-BATCH], "y_train": y[:-BATCH], "x_valid": x[-BATCH:],
                "y_valid": y[-BATCH:], "x_train_tf": tf.constant(x[:-BATCH]),
                "y_train_tf": tf.constant(y[:-BATCH])}
        built = rss_mb()
        epoch_seconds(variant, data, epoch=0)
    return {"variant": variant_name, "rss_before_build_mb": before, "rss_after_build_mb": built,
            "peak_rss_mb": peak_rss_mb(),
            "gpu_peak_mb": gpu_peak_mb()}


def probe_threads(inter: int, intra: int, steps: int) -> dict[str, Any]:
    """Child: the product's training step under the given TensorFlow thread settings."""
    tf.config.threading.set_inter_op_parallelism_threads(inter)
    tf.config.threading.set_intra_op_parallelism_threads(intra)
    with tempfile.TemporaryDirectory() as tmp:
        variant = build_product(train_args(tmp), "product")
        x, y = (tf.constant(a) for a in synthetic_data(BATCH, seed=2))
        for _ in range(2):  # trace, then one warm step
            train_step_seconds(variant, x, y)
        times = [train_step_seconds(variant, x, y) for _ in range(steps)]
    return {"inter": inter, "intra": intra, "times": times}


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


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def render(results: dict[str, Any]) -> str:
    """The Markdown section for one device: settings, floor, and one table per measurement."""
    meta, floor, flops = results["meta"], results["floor"], results["flops"]
    floor_rate = floor["floor_gflops"] * 1e9
    step_floor = flops["train_total"] * BATCH / floor_rate
    lines = [
        f"### {meta['device']['kind']}: {meta['device']['name']}",
        "",
        f"Measured {meta['date']} with `{meta['command']}` ({meta['mode']} mode) - TensorFlow "
        f"{meta['tensorflow']}, Keras {meta['keras']}, NumPy {meta['numpy']}, Python "
        f"{meta['python']}; CPU {meta['device']['cpu']}. Interleaved rounds: {meta['rounds']}. "
        f"Synthetic MNIST-shaped data, batch {BATCH}. {meta['remark']}",
        "",
        f"**Floor.** Training FLOPs per image {flops['train_total'] / 1e6:.1f} M (forward "
        f"{flops['forward_total'] / 1e6:.1f} M; the SPEC's convention, which also counts the "
        f"gradient of the constant first coupling, {flops['spec_train_total'] / 1e6:.1f} M; counted "
        f"on the product's traced training step: {flops['graph_train_per_image'] / 1e6:.1f} M), "
        f"{flops['train_total'] * BATCH / 1e9:.1f} GFLOP per step; per image for training, in "
        "MFLOP: " + ", ".join(f"{part} {value / 1e6:.1f}" for part, value in flops["train"].items())
        + f". Best fp32 {GEMM_N}x{GEMM_N} "
        f"matmul: NumPy {floor['numpy_gflops']:.0f} GFLOP/s, tf.matmul {floor['tf_gflops']:.0f} "
        f"GFLOP/s on {floor['tf_device']}{floor['tf32_note']}; floor = {floor['floor_source']} "
        f"{floor['floor_gflops']:.0f} GFLOP/s, i.e. {step_floor * 1e3:.0f} ms per training step "
        f"(with NumPy's rate: {flops['train_total'] * BATCH / floor['numpy_gflops'] / 1e6:.0f} ms). "
        "Reduced-precision variants are compared with the same fp32 floor.",
        "",
    ]
    for phase, error in results.get("errors", {}).items():
        lines += [f"**{PHASE_TITLES[phase]} failed**: `{error}`", ""]
    lines += _render_steps(results, step_floor)
    for section in (_render_epoch, _render_inference, _render_manipulation, _render_memory,
                    _render_threads, _render_targets):
        lines += section(results, floor_rate)
    return "\n".join(lines).rstrip() + "\n"


def _render_steps(results: dict[str, Any], step_floor: float) -> list[str]:
    steps = results.get("steps")
    if not steps:
        return []
    base = steps.get("baseline", {}).get("median")
    rows = []
    for name, s in steps.items():
        median = s["median"]
        rows.append([
            f"`{name}`", s["note"], f"{median * 1e3:.0f}", f"{s['q1'] * 1e3:.0f}-{s['q3'] * 1e3:.0f}",
            s["n"], f"{s['first_call']:.1f}", f"{BATCH / median:.0f}",
            f"{EPOCH_IMAGES / BATCH * median:.0f}", _ratio(median, step_floor),
            _ratio(base, median),
        ])
    header = ["variant", "settings", "step ms (median)", "IQR ms", "steps", "first call s",
              "samples/s", "60k epoch s (projected)", "x floor", "speed-up vs baseline"]
    return ["**Training step** (batch 100, after warm-up; every variant through "
            "`Trainer.train_step`):", ""] + _table(header, rows) + [""]


def _render_epoch(results: dict[str, Any], floor_rate: float) -> list[str]:
    epoch = results.get("epoch")
    if not epoch:
        return []
    flops, cfg = results["flops"], results["meta"]["epoch_config"]
    steps = cfg["steps"]
    full_work = EPOCH_IMAGES * flops["train_total"] + VALID_IMAGES * flops["forward_total"]
    base = epoch.get("baseline", {})
    isolated = results.get("steps") or {}
    rows = []
    for name, s in epoch.items():
        step = isolated.get(name, {}).get("median")
        rows.append([
            f"`{name}`", f"{s['short']['median']:.1f}", f"{s['long']['median']:.1f}", s["n"],
            f"{s['per_step'] * 1e3:.0f}", _ratio(s["per_step"], step),
            f"{BATCH / s['per_step']:.0f}", f"{s['setup']:.1f}",
            f"{s['valid']:.1f}", f"{s['projected']:.0f}",
            _ratio(s["projected"], full_work / floor_rate),
            _ratio(base.get("projected"), s["projected"]),
            _ratio(base.get("long", {}).get("median"), s["long"]["median"]),
        ])
    header = [
        "variant", f"epoch s, {steps} steps", f"epoch s, {2 * steps} steps", "rounds",
        "ms per step in the loop", "x isolated step", "train images/s", "per-epoch set-up s",
        f"validation s ({cfg['valid_images']} images)", "60k + 10k epoch s (projected)",
        "x floor (projected)", "speed-up vs baseline (projected)",
        f"speed-up vs baseline ({2 * steps} steps, measured)",
    ]
    return [f"**End-to-end epoch**: epochs of {steps} and {2 * steps} steps of {BATCH} with "
            "random shifts (0.1) and a validation pass over "
            f"{cfg['valid_images']} images; the product's `run_epoch` + `evaluate` vs the "
            "original's `model.fit(generator, validation_data)`. The difference of the two "
            "lengths gives the time per step inside the loop (input pipeline included); the rest "
            "of the shorter epoch, less a separately timed validation pass, is the per-epoch "
            "set-up. Projection: set-up + 600 steps + validation scaled to 10k images. 'x isolated "
            "step' compares the step in the loop with the training-step table: above 1 is the "
            "input pipeline's cost; well below 1 means the machine was too noisy for the "
            "difference of two epochs (rerun with more --epoch_rounds / --epoch_steps).", ""
            ] + _table(header, rows) + [""]


def _render_inference(results: dict[str, Any], floor_rate: float) -> list[str]:
    inference = results.get("inference")
    if not inference:
        return []
    per_100_floor = results["flops"]["forward_total"] * BATCH / floor_rate
    base = inference.get("baseline", {}).get("median")
    rows = [[f"`{name}`", f"{s['median'] * 1e3:.0f}", s["n"], f"{BATCH / s['median']:.0f}",
             _ratio(s["median"], per_100_floor), _ratio(base, s["median"])]
            for name, s in inference.items()]
    header = ["variant", "ms per 100 images", "rounds", "images/s", "x floor",
              "speed-up vs baseline"]
    calls = results["meta"]["config"]["inference_calls"]
    return [f"**Inference** (`eval_model.predict`, batch 100, {calls} predicts of "
            f"{results['meta']['inference_images']} images per variant and round):", ""] + _table(
                header, rows) + [""]


def _render_manipulation(results: dict[str, Any], floor_rate: float) -> list[str]:
    grid = results.get("manipulation")
    if not grid:
        return []
    base = grid.get("baseline", {}).get("median")
    notes = {"product": "`capsulenet.manipulate_latent` as shipped",
             "baseline": "176 predicts of batch 1",
             "proposal": "encoder once + one decoder batch of 176 in a cached tf.function "
                         "(bench only)"}
    rows = [[f"`{name}`", notes.get(name, ""), f"{s['median'] * 1e3:.0f}", s["n"],
             _ratio(base, s["median"])] for name, s in grid.items()]
    return ["**Manipulation grid** (16 x 11 reconstructions and `manipulate-5.png`):", ""] + _table(
        ["variant", "how", "ms", "rounds", "speed-up vs baseline"], rows) + [""]


def _render_memory(results: dict[str, Any], floor_rate: float) -> list[str]:
    memory = results.get("memory")
    if not memory:
        return []
    rows = []
    for name, m in memory.items():
        if "error" in m:
            rows.append([f"`{name}`", m["error"], "", "", ""])
            continue
        gpu = "-" if m.get("gpu_peak_mb") is None else f"{m['gpu_peak_mb']:.0f}"
        rows.append([f"`{name}`", f"{m['peak_rss_mb']:.0f}", f"{m['rss_before_build_mb']:.0f}",
                     f"{m['rss_after_build_mb']:.0f}", gpu])
    return ["**Peak memory of a training process**: one child process per variant builds it, "
            f"trains {results['meta']['memory_steps']} steps end to end and validates; RSS "
            "high-water `VmHWM` from /proc/self/status (it includes what importing TensorFlow "
            "takes, shown as RSS before build), GPU peak from "
            "`tf.config.experimental.get_memory_info`.", ""
            ] + _table(["variant", "peak RSS MiB", "RSS before build MiB", "RSS after build MiB",
                        "GPU peak MiB"], rows) + [""]


def _render_threads(results: dict[str, Any], floor_rate: float) -> list[str]:
    threads = results.get("threads")
    if not threads:
        return []
    default = next((t.get("median") for t in threads if t["label"] == "default"), None)
    rows = []
    for t in threads:
        if "error" in t:
            rows.append([t["label"], t["error"], "", ""])
        else:
            rows.append([t["label"], f"{t['median'] * 1e3:.0f}",
                         f"{t['q1'] * 1e3:.0f}-{t['q3'] * 1e3:.0f}", _ratio(t["median"], default)])
    rounds = results["meta"]["config"]["thread_rounds"]
    return ["**TensorFlow thread settings** (`product` training step, one child process per "
            f"setting and round, {rounds} round(s) in rotated order, `tf.config.threading` set "
            "before TensorFlow starts):", ""] + _table(
                ["setting", "step ms (median)", "IQR ms", "x default"], rows) + [""]


def _render_targets(results: dict[str, Any], floor_rate: float) -> list[str]:
    checks = target_checks(results, floor_rate)
    if not checks:
        return []
    rows = [[what, target, f"{value:.2f}x", "met" if ok else "**missed**"]
            for what, target, value, ok in checks]
    return ["**Targets of issue 4**, `product` as shipped:", ""] + _table(
        ["target", "wanted", "measured", ""], rows) + [""]


def target_checks(results: dict[str, Any], floor_rate: float
                  ) -> list[tuple[str, str, float, bool]]:
    """(what, wanted, measured, met) for each target whose rows were measured."""
    checks = []
    step = (results.get("steps") or {}).get("product")
    if step:
        floor = results["flops"]["train_total"] * BATCH / floor_rate
        ratio = step["median"] / floor
        checks.append(("training step / fp32 floor", f"<= {TARGETS['step_vs_floor']}x", ratio,
                       ratio <= TARGETS["step_vs_floor"]))
    epoch = results.get("epoch") or {}
    if "product" in epoch and "baseline" in epoch:
        speedup = epoch["baseline"]["projected"] / epoch["product"]["projected"]
        checks.append(("end-to-end epoch speed-up (projected 60k + 10k)",
                       f">= {TARGETS['epoch_speedup']}x", speedup,
                       speedup >= TARGETS["epoch_speedup"]))
    for key, label, target in (("inference", "inference speed-up", "inference_speedup"),
                               ("manipulation", "manipulation grid speed-up",
                                "manipulation_speedup")):
        rows = results.get(key) or {}
        if "product" in rows and "baseline" in rows:
            speedup = rows["baseline"]["median"] / rows["product"]["median"]
            checks.append((label, f">= {TARGETS[target]}x", speedup, speedup >= TARGETS[target]))
    return checks


def write_results(section: str, key: str, path: Path = RESULTS_PATH) -> None:
    """Puts `section` for device `key` between this script's markers (`<!-- bench:start -->` ...
    `<!-- bench:end -->`) in `path`, keeping everything else (e.g. bench/replicas.py's block)."""
    results_md.write_section(path, "bench", key, section, BENCH_INTRO)


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


@dataclass
class Config:
    """How much to measure; `--quick` and the device pick the defaults."""

    steps: int
    rounds: int
    warmup: int
    epoch_steps: int
    epoch_rounds: int
    valid_images: int
    inference_images: int
    gemm_repeats: int
    memory_steps: int
    min_slow_steps: int  # per round, for a variant over 3x slower than the fastest
    inference_calls: int  # predicts per variant and round
    thread_rounds: int


def make_config(args: argparse.Namespace, gpu: bool) -> Config:
    """Defaults per mode and device (a GPU step is ~50x shorter, so it affords more steps)."""
    if args.quick:
        config = Config(steps=20 if gpu else 3, rounds=2, warmup=3 if gpu else 1,
                        epoch_steps=50 if gpu else 5, epoch_rounds=2,
                        valid_images=1000 if gpu else 200, inference_images=1000 if gpu else 200,
                        inference_calls=3,
                        gemm_repeats=3, memory_steps=3, min_slow_steps=1, thread_rounds=1)
    else:
        config = Config(steps=50 if gpu else 10, rounds=3, warmup=5 if gpu else 2,
                        epoch_steps=200 if gpu else 20, epoch_rounds=2,
                        valid_images=2000 if gpu else 1000,
                        inference_images=2000 if gpu else 500, inference_calls=3,
                        gemm_repeats=5, memory_steps=5,
                        min_slow_steps=2, thread_rounds=2)
    for name in ("steps", "rounds", "epoch_steps", "epoch_rounds"):
        if getattr(args, name) is not None:
            setattr(config, name, getattr(args, name))
    return config


def measure_floor(config: Config, device: dict[str, Any]) -> dict[str, Any]:
    """NumPy's and TensorFlow's best fp32 matmul on this device (see `choose_floor`)."""
    gpu = device["kind"] == "GPU"
    tf32 = gpu and tf.config.experimental.tensor_float_32_execution_enabled()
    return {"numpy_gflops": numpy_gemm_gflops(repeats=config.gemm_repeats),
            "tf_gflops": tf_gemm_gflops(repeats=config.gemm_repeats),
            "tf_device": "GPU:0" if gpu else "CPU",
            "tf32_note": " (TF32 allowed, TensorFlow's default, as in training)" if tf32 else ""}


def choose_floor(floor: dict[str, Any], gpu: bool) -> None:
    """The floor is the fastest fp32 matmul of the device that trains: on a GPU TensorFlow's,
    on a CPU the faster of NumPy's and TensorFlow's."""
    if gpu:
        floor.update(floor_gflops=floor["tf_gflops"], floor_source="tf.matmul on the GPU")
    else:
        best = max(floor["numpy_gflops"], floor["tf_gflops"])
        floor.update(floor_gflops=best,
                     floor_source="NumPy" if best == floor["numpy_gflops"] else "tf.matmul")


def count_flops(product: Variant, x: Any, y: Any) -> dict[str, Any]:
    """The analytic count, and the same counted on the product's traced training step."""
    flops = analytic_flops()
    traced = graph_flops(product.trainer.train_step.get_concrete_function(x, y))
    flops["graph_train_per_image"] = sum(traced.values()) / BATCH
    flops["graph_by_op"] = traced
    return flops


def measure_steps(variants: dict[str, Variant], config: Config, x: Any, y: Any,
                  log: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    """Median training-step time per variant, interleaved; slow variants (e.g. XLA on a CPU) time
    fewer steps per round so that they do not dominate the run."""
    first, warm = {}, {}
    for name, v in variants.items():
        first[name] = train_step_seconds(v, x, y)
        warm[name] = min(train_step_seconds(v, x, y) for _ in range(config.warmup))
        log(f"  {name}: first call {first[name]:.1f} s, warm step {warm[name] * 1e3:.0f} ms")
    fastest = min(warm.values())
    counts = {name: config.steps if t < 3 * fastest else max(config.min_slow_steps,
                                                              config.steps // 4)
              for name, t in warm.items()}
    samples = interleave(list(variants), config.rounds,
                         lambda name, r: [train_step_seconds(variants[name], x, y)
                                          for _ in range(counts[name])], log)
    return {name: {**summarize(samples[name]), "first_call": first[name],
                   "note": variants[name].note} for name in variants}


def epoch_data(steps: int, valid_images: int, seed: int) -> dict[str, Any]:
    """Synthetic training data for `steps` batches (NumPy and tensors) and validation data."""
    x, y = synthetic_data(steps * BATCH + valid_images, seed=seed)
    n = steps * BATCH
    return {"x_train": x[:n], "y_train": y[:n], "x_valid": x[n:], "y_valid": y[n:],
            "x_train_tf": tf.constant(x[:n]), "y_train_tf": tf.constant(y[:n])}


def measure_epochs(variants: dict[str, Variant], config: Config, log: Callable[[str], None]
                   ) -> dict[str, dict[str, Any]]:
    """End-to-end epochs of `product` and `baseline` of S and 2S steps, interleaved, after a
    2-step warm-up epoch that traces every function.

    Two lengths separate the cost per step inside the loop (augmentation and input pipeline
    included) from the cost per epoch (building the pipeline, validation), so that the projection
    to a 600-step epoch does not multiply the per-epoch cost; the validation pass is also timed
    alone.
    """
    names = [n for n in ("product", "baseline") if n in variants]
    steps = config.epoch_steps
    short = epoch_data(steps, config.valid_images, seed=3)
    long = epoch_data(2 * steps, config.valid_images, seed=4)
    for name in names:
        epoch_seconds(variants[name], epoch_data(2, config.valid_images, seed=5), epoch=99)
    pairs: dict[str, list[tuple[float, float]]] = {name: [] for name in names}

    def measure(name: str, r: int) -> list[float]:
        pair = (epoch_seconds(variants[name], short, epoch=2 * r),
                epoch_seconds(variants[name], long, epoch=2 * r + 1))
        pairs[name].append(pair)
        return list(pair)

    interleave(names, config.epoch_rounds, measure, log)
    valid = {name: min(validation_seconds(variants[name], short) for _ in range(2))
             for name in names}
    return {name: epoch_summary(pairs[name], steps, valid[name], config.valid_images)
            for name in names}


def epoch_summary(pairs: list[tuple[float, float]], steps: int, valid: float, valid_images: int
                  ) -> dict[str, Any]:
    """From (S-step, 2S-step) epoch times: seconds per step in the loop, per-epoch cost, and the
    projected 60k-image epoch with a 10k-image validation (`valid` s for `valid_images`)."""
    short = summarize([a for a, _ in pairs])
    long = summarize([b for _, b in pairs])
    per_step = (long["median"] - short["median"]) / steps
    setup = short["median"] - steps * per_step - valid  # pipeline set-up etc., once per epoch
    return {"short": short, "long": long, "per_step": per_step, "valid": valid, "setup": setup,
            "n": len(pairs), "median": long["median"],
            "projected": setup + EPOCH_IMAGES / BATCH * per_step
            + valid * VALID_IMAGES / valid_images}


def validation_seconds(variant: Variant, data: dict[str, Any]) -> float:
    """The validation part of an epoch alone, as each project runs it."""
    start = time.perf_counter()
    x, y = data["x_valid"], data["y_valid"]
    if variant.kind == "product":
        variant.trainer.evaluate(x, y)
    else:
        variant.train_model.evaluate((x, y), (y, x), batch_size=BATCH, verbose=0)
    return time.perf_counter() - start


def measure_inference(variants: dict[str, Variant], config: Config, log: Callable[[str], None]
                      ) -> dict[str, dict[str, Any]]:
    """ms per 100 images of `eval_model.predict`, product vs baseline, interleaved; each round
    makes `inference_calls` predicts of `inference_images` images per variant."""
    names = [n for n in ("product", "baseline") if n in variants]
    x, _ = synthetic_data(config.inference_images, seed=4)
    for name in names:
        predict_seconds(variants[name], x[:BATCH])
    rounds = max(2, config.rounds)
    samples = interleave(names, rounds, lambda name, r: [
        predict_seconds(variants[name], x) * BATCH / len(x)
        for _ in range(config.inference_calls)], log)
    return {name: summarize(samples[name]) for name in names}


def measure_manipulation(variants: dict[str, Variant], config: Config, log: Callable[[str], None]
                         ) -> dict[str, dict[str, Any]]:
    """The manipulation grid: product, baseline and the encoder-once proposal, interleaved."""
    names = [n for n in ("product", "baseline") if n in variants]
    grid = EncoderOnceGrid(variants["product"].eval_model) if "product" in variants else None
    if grid is not None:
        names.append("proposal")
    x, y = synthetic_data(200, seed=5)
    data = {"x_valid": x, "y_valid": y}
    with tempfile.TemporaryDirectory() as tmp:
        def run(name: str, r: int) -> list[float]:
            variant = variants["product" if name == "proposal" else name]
            return [manipulation_seconds(name, variant, grid, data, tmp)]

        for name in names:
            run(name, 0)
        samples = interleave(names, max(2, config.rounds), run, log)
    return {name: summarize(samples[name]) for name in names}


def measure_memory(names: Sequence[str], config: Config, log: Callable[[str], None]
                   ) -> dict[str, dict[str, Any]]:
    """Peak memory of one training process per variant, each in a fresh child process. They run
    side by side (each measures only itself; nothing is timed), which keeps a GPU run short."""
    children = {name: start_child(["--probe", "memory", "--variant", name,
                                   "--steps", str(config.memory_steps)]) for name in names}
    memory = {}
    for name, child in children.items():
        memory[name] = finish_child(child)
        log(f"  {name}: {memory[name]}")
    return memory


def measure_threads(config: Config, cores: int, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """The product's step under each thread setting, one child process per setting and round,
    the settings in a rotated order each round; the step times of all rounds are pooled."""
    configs = thread_configs(cores)
    times: dict[str, list[float]] = {label: [] for label, *_ in configs}
    errors: dict[str, str] = {}
    for r in range(config.thread_rounds):
        shift = r % len(configs)
        for label, inter, intra, env in configs[shift:] + configs[:shift]:
            result = run_child(["--probe", "threads", "--inter", str(inter), "--intra", str(intra),
                                "--steps", str(max(3, config.steps))], env=env)
            if "error" in result:
                errors[label] = result["error"]
            else:
                times[label].extend(result["times"])
            log(f"  round {r + 1}/{config.thread_rounds} {label}: "
                + (result.get("error") or f"median {statistics.median(result['times']):.3f} s"))
    return [{"label": label, **(summarize(times[label]) if times[label]
                                else {"error": errors.get(label, "no result")})}
            for label, *_ in configs]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line; `--probe` is internal (child processes)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short run")
    parser.add_argument("--steps", type=int, help="timed training steps per variant and round")
    parser.add_argument("--rounds", type=int, help="interleaved rounds")
    parser.add_argument("--epoch_steps", type=int, help="S: the end-to-end epochs run S and 2S steps")
    parser.add_argument("--epoch_rounds", type=int, help="interleaved rounds of end-to-end epochs")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated, from {', '.join(VARIANTS)}")
    parser.add_argument("--threads", choices=("auto", "yes", "no"), default="auto",
                        help="thread-setting sweep (auto: on CPUs only)")
    parser.add_argument("--only", type=lambda v: [p.strip() for p in v.split(",") if p.strip()],
                        help=f"comma-separated phases to run, from {', '.join(PHASES)}")
    parser.add_argument("--no_memory", action="store_true", help="skip the memory probes")
    parser.add_argument("--no_write", action="store_true", help="do not write bench/RESULTS.md")
    parser.add_argument("--write", action="store_true",
                        help="write bench/RESULTS.md even for a partial run (--only)")
    parser.add_argument("--results", default=str(RESULTS_PATH), help="Markdown file to update")
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


PHASES = ("steps", "epoch", "inference", "manipulation", "memory", "threads")
PHASE_TITLES = {"steps": "Training step", "epoch": "End-to-end epoch", "inference": "Inference",
                "manipulation": "Manipulation grid", "memory": "Peak memory (child processes)",
                "threads": "Thread settings (child processes)"}


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
    log(f"{PHASE_TITLES[name]} ...")
    try:
        results[name] = measure()
    except Exception as e:  # any failure: report it and go on
        traceback.print_exc()
        message = " ".join(f"{type(e).__name__}: {e}".split())
        results.setdefault("errors", {})[name] = message[:300]


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
        "config": config.__dict__}}
    log("Floor: best fp32 matmul ...")
    results["floor"] = measure_floor(config, device)
    choose_floor(results["floor"], gpu)
    log(f"  NumPy {results['floor']['numpy_gflops']:.0f} GFLOP/s, tf.matmul "
        f"{results['floor']['tf_gflops']:.0f} GFLOP/s")
    in_process = [p for p in phases if p in ("steps", "epoch", "inference", "manipulation")]
    with tempfile.TemporaryDirectory() as tmp:
        targs = train_args(tmp)
        variants: dict[str, Variant] = {}
        for name in args.variant_list:
            source = variants["product"].train_model if "product" in variants else None
            variants[name] = build_variant(name, targs, source)
        x, y = (tf.constant(a) for a in synthetic_data(BATCH, seed=6))
        results["flops"] = analytic_flops()
        if "product" in variants:
            results["flops"] = count_flops(variants["product"], x, y)
        measures = {
            "steps": lambda: measure_steps(variants, config, x, y, log),
            "epoch": lambda: measure_epochs(variants, config, log),
            "inference": lambda: measure_inference(variants, config, log),
            "manipulation": lambda: measure_manipulation(variants, config, log),
        }
        for phase in in_process:
            run_phase(results, phase, measures[phase], log)
    # The matmul again after the work, in case the machine was busier at the start; best of both.
    floor = results["floor"]
    floor["numpy_gflops"] = max(floor["numpy_gflops"], numpy_gemm_gflops(repeats=config.gemm_repeats))
    floor["tf_gflops"] = max(floor["tf_gflops"], tf_gemm_gflops(repeats=config.gemm_repeats))
    choose_floor(floor, gpu)
    memory_names = [n for n in ("product", "baseline") if n in args.variant_list]
    if "memory" in phases:
        run_phase(results, "memory", lambda: measure_memory(memory_names, config, log), log)
    if "threads" in phases:
        run_phase(results, "threads", lambda: measure_threads(config, device["cores"], log), log)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.probe == "threads":
        print(json.dumps(probe_threads(args.inter, args.intra, args.steps or 5)))
        return 0
    enable_memory_growth()
    if args.probe == "memory":
        print(json.dumps(probe_memory(args.variant, args.steps or 3)))
        return 0
    results = run_benchmark(args, argv)
    section = render(results)
    print()
    print(section)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    if args.no_write or (args.only and not args.write):
        # A partial run would replace this device's full section with a few rows.
        print(f"Not written to {args.results}" + (" (partial run: add --write)" if args.only else ""))
    else:
        write_results(section, results["meta"]["device"]["key"], Path(args.results))
        print(f"Written to {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
