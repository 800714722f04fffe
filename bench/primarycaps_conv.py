"""The PrimaryCaps convolution (9x9, stride 2, 256 -> 256 channels on `[batch, 20, 20, 256]`, ~94% of a
training step's FLOPs): `keras.layers.Conv2D` against `capsulelayers.im2col_conv2d`, against the GEMM
floor, and the whole training step with either, on the TensorFlow backend.

Every comparison is interleaved in one process (A, B, C, A, B, C, ...; medians), so that a machine
shared with other work slows every variant alike: on a busy machine the absolute times mean little,
the ratios much more.

- forward + backward (input, kernel and bias gradients) of the layer, `implementation="conv"` (the
  parent's `ops.conv`) and `"im2col"`, float32, and bfloat16 with `--mixed_precision`;
- the GEMM floor: the three matrix products of the same shapes (`patches @ W`, `patches^T @ dY`,
  `dY @ W^T`) through `tf.matmul`, one after the other, each result checked against NumPy on a
  sample of rows;
- conv1 (9x9, stride 1, 1 -> 256 channels on the 28x28 image; kernel and bias gradients only, as in
  training) both ways, to show whether im2col pays there too;
- one training step of the product's train model (`backends.TensorFlowSteps`, Adam, random data) with
  the PrimaryCaps convolution each way, as the CLI runs it (`autotune.tune_model` choosing, from its
  cache or timed; the line it prints is the CLI's), and the original formulation's step
  (bench/original_formulation.py, the same weights), all in float32 (and the product's in bfloat16
  with `--mixed_precision`), interleaved with a checked 4096x4096 fp32 `tf.matmul`, whose rate times
  the step's FLOPs is the step floor;
- with `--onednn`: those steps in two child processes, `TF_ENABLE_ONEDNN_OPTS=1` and `=0` (TensorFlow
  reads it once, at start-up), side by side.

Usage::

    python bench/primarycaps_conv.py                      # batch 100, 5 rounds
    python bench/primarycaps_conv.py --batch_size 100 --rounds 7 --mixed_precision
    python bench/primarycaps_conv.py --no_step            # the convolutions only
    python bench/primarycaps_conv.py --onednn --rounds 3  # the steps, oneDNN on and off
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]

ROWS, CHANNELS, KERNEL, STRIDE, FILTERS = 20, 256, 9, 2, 256  # PrimaryCaps on conv1's output
OUT = (ROWS - KERNEL) // STRIDE + 1  # 6
TAPS = KERNEL * KERNEL * CHANNELS  # 20736


def primarycaps_flops(batch: int) -> int:
    """FLOPs of the PrimaryCaps convolution's forward + both gradients: three GEMMs of
    `2 * (batch * 36) * 20736 * 256`."""
    return 3 * 2 * batch * OUT * OUT * TAPS * FILTERS


def conv1_flops(batch: int) -> int:
    """FLOPs of conv1's forward + kernel gradient: two GEMMs of `2 * (batch * 400) * 81 * 256`."""
    return 2 * 2 * batch * 20 * 20 * KERNEL * KERNEL * 1 * 256


def interleave(fns: dict[str, Callable[[], Any]], rounds: int) -> dict[str, list[float]]:
    """Seconds of every function, one call each per round, the order rotating round after round."""
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return times


def report(times: dict[str, list[float]], flops: dict[str, int], reference: str) -> None:
    """One line per variant: median and quartiles, GFLOP/s, and its ratio to `reference`."""
    base = statistics.median(times[reference])
    for name, values in times.items():
        median = statistics.median(values)
        rate = f"{flops[name] / median / 1e9:7.1f} GFLOP/s" if name in flops else " " * 15
        print(f"  {name:28s} {median * 1e3:8.1f} ms (min {min(values) * 1e3:7.1f}, max "
              f"{max(values) * 1e3:7.1f}) {rate}  {median / base:5.2f}x {reference}")


# ---------------------------------------------------------------------------------------------
# The convolution alone
# ---------------------------------------------------------------------------------------------


def layer_step(layer: Any, x: Any, upstream: Any, input_grad: bool) -> Callable[[], Any]:
    """A `tf.function` of forward + backward of `layer` on `x` (gradients of `sum(layer(x) *
    upstream)` for the kernel, the bias and, with `input_grad`, the input), returning the loss and the
    gradients' sums. The loss must be returned: no gradient needs the forward product, which TensorFlow
    would otherwise prune (and time the backward pass alone)."""
    import tensorflow as tf

    @tf.function
    def step() -> Any:
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(tf.cast(layer(x), "float32") * upstream)
        grads = tape.gradient(loss, [*layer.trainable_variables] + ([x] if input_grad else []))
        return [loss] + [tf.reduce_sum(tf.cast(g, "float32")) for g in grads]

    return lambda: [v.numpy() for v in step()]


def gemm_floor(batch: int, rng: np.random.Generator) -> Callable[[], Any]:
    """The three GEMMs of the PrimaryCaps convolution's shapes through `tf.matmul`, after checking
    each against NumPy (float64) on 16 sampled rows: a product that skipped work cannot be the floor."""
    import flops
    import tensorflow as tf

    patches = rng.standard_normal((batch * OUT * OUT, TAPS), dtype=np.float32)
    weights = rng.standard_normal((TAPS, FILTERS), dtype=np.float32)
    upstream = rng.standard_normal((batch * OUT * OUT, FILTERS), dtype=np.float32)
    p, w, d = (tf.constant(a) for a in (patches, weights, upstream))

    @tf.function
    def products() -> Any:
        # One after the other, as a sum of three GEMM times: run side by side, three products share
        # the same cores and measured slower here.
        forward = tf.matmul(p, w)
        with tf.control_dependencies([forward]):
            kernel_grad = tf.matmul(p, d, transpose_a=True)
        with tf.control_dependencies([kernel_grad]):
            patches_grad = tf.matmul(d, w, transpose_b=True)
        return forward, kernel_grad, patches_grad

    @tf.function
    def timed_products() -> Any:  # the products' first elements: no 300 MB copies back to NumPy
        return [r[0, 0] for r in products()]

    forward, kernel_grad, patches_grad = (r.numpy() for r in products())
    rows = np.random.default_rng(1).choice(len(patches), 16, replace=False)
    taps = np.random.default_rng(2).choice(TAPS, 16, replace=False)
    checks = (
        (forward[rows], patches[rows].astype(np.float64) @ weights),
        (kernel_grad[taps], patches[:, taps].T.astype(np.float64) @ upstream),
        (patches_grad[rows], upstream[rows].astype(np.float64) @ weights.T),
    )
    for got, want in checks:
        flops.check_fp32_product(got, want)
    return lambda: [r.numpy() for r in timed_products()]


def convolutions(batch: int, rounds: int, mixed_precision: bool) -> None:
    import keras
    import tensorflow as tf

    from capsnet.layers import Conv2D

    rng = np.random.default_rng(0)
    x = tf.constant(rng.standard_normal((batch, ROWS, ROWS, CHANNELS), dtype=np.float32))
    upstream = tf.constant(rng.standard_normal((batch, OUT, OUT, FILTERS), dtype=np.float32))
    image = tf.constant(rng.random((batch, 28, 28, 1), dtype=np.float32))
    upstream1 = tf.constant(rng.standard_normal((batch, 20, 20, 256), dtype=np.float32))
    fns: dict[str, Callable[[], Any]] = {}
    flops: dict[str, int] = {}
    for dtype in ("float32", "mixed_bfloat16") if mixed_precision else ("float32",):
        for implementation in ("conv", "im2col"):
            layer = Conv2D(FILTERS, KERNEL, strides=STRIDE, implementation=implementation, dtype=dtype)
            layer.build(x.shape)
            name = f"primarycaps {implementation} {dtype.removeprefix('mixed_')}"
            fns[name] = layer_step(layer, x, upstream, input_grad=True)
            flops[name] = primarycaps_flops(batch)
    fns["GEMM floor float32"] = gemm_floor(batch, rng)
    flops["GEMM floor float32"] = primarycaps_flops(batch)
    for dtype in ("float32", "mixed_bfloat16") if mixed_precision else ("float32",):
        for implementation in ("conv", "im2col"):
            layer = Conv2D(256, KERNEL, activation="relu", implementation=implementation, dtype=dtype)
            layer.build(image.shape)
            name = f"conv1 {implementation} {dtype.removeprefix('mixed_')}"
            fns[name] = layer_step(layer, image, upstream1, input_grad=False)
            flops[name] = conv1_flops(batch)
    keras.mixed_precision.set_global_policy("float32")
    for fn in fns.values():  # trace and warm up
        fn()
    times = interleave(fns, rounds)
    print(f"Convolutions, forward + backward, batch {batch}, {rounds} interleaved rounds:")
    primary = {k: v for k, v in times.items() if not k.startswith("conv1")}
    report(primary, flops, reference="GEMM floor float32")
    report({k: v for k, v in times.items() if k.startswith("conv1")}, flops,
           reference="conv1 conv float32")
    ratio = statistics.median(times["primarycaps conv float32"]) / statistics.median(
        times["primarycaps im2col float32"])
    print(f"  im2col is {ratio:.2f}x faster than Conv2D (float32)")


# ---------------------------------------------------------------------------------------------
# The training step
# ---------------------------------------------------------------------------------------------


def step_batch(batch: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A sparse MNIST-like random batch `[batch, 28, 28, 1]` and its one-hot labels."""
    x = (rng.random((batch, 28, 28, 1), dtype=np.float32) * (rng.random((batch, 28, 28, 1)) < 0.2)
         ).astype(np.float32)
    return x, np.eye(10, dtype=np.float32)[np.arange(batch) % 10]


def original_step(x: np.ndarray, y: np.ndarray, weights: list) -> Callable[[], Any]:
    """One training step of the original formulation (bench/original_formulation.py: tile + `map_fn`
    u_hat, the library convolutions, automatic differentiation of the routing) through the same
    `backends.TensorFlowSteps`, from the product's `weights` (copied by layer name)."""
    import keras
    import original_formulation as original

    import capsulenet
    from capsnet import backends, training

    keras.utils.set_random_seed(0)
    source, _, _ = capsulenet.CapsNet((28, 28, 1), 10, routings=3)
    source.set_weights(weights)
    model, _, _ = original.OriginalCapsNet((28, 28, 1), 10, 3)
    original.copy_weights(source, model)
    optimizer = training.make_optimizer(0.001, 0.9, steps_per_epoch=600)
    steps = backends.TensorFlowSteps(model, optimizer, lam_recon=0.392, batch_size=len(x))
    steps.build_optimizer()
    return lambda: steps.train(x, y)


def product_step(x: np.ndarray, y: np.ndarray, weights: list | None,
                 configure: Callable[[Any], None] = lambda model: None) -> tuple[Callable[[], Any], list]:
    """One training step of the product's train model (`backends.TensorFlowSteps`, Adam as shipped)
    under the current precision policy, `configure(train_model)` applied first (it is read when the
    step is traced), starting from `weights` (or the model's seed-0 initial ones).

    Returns:
        the step as a function of no arguments, and the weights it started from.
    """
    import keras

    import capsulenet
    from capsnet import backends, training

    keras.utils.set_random_seed(0)
    train_model, _, _ = capsulenet.CapsNet((28, 28, 1), 10, routings=3)
    configure(train_model)
    weights = weights or train_model.get_weights()
    train_model.set_weights(weights)
    optimizer = training.make_optimizer(0.001, 0.9, steps_per_epoch=600)
    steps = backends.TensorFlowSteps(train_model, optimizer, lam_recon=0.392, batch_size=len(x))
    steps.build_optimizer()
    return lambda: steps.train(x, y), weights


def training_steps(batch: int, rounds: int, mixed_precision: bool) -> dict[str, float]:
    """The product's step with each PrimaryCaps convolution, as the CLI runs it (`autotune.tune_model`
    choosing), and the original formulation's step, interleaved; returns the medians (seconds)."""
    import flops
    import keras

    from capsnet import autotune

    rng = np.random.default_rng(0)
    x, y = step_batch(batch, rng)
    fns: dict[str, Callable[[], Any]] = {}
    weights = None
    choices: dict[str, str] = {}
    for policy in ("float32", "mixed_bfloat16") if mixed_precision else ("float32",):
        keras.mixed_precision.set_global_policy(policy)
        short = policy.removeprefix("mixed_")
        for implementation in ("conv", "im2col"):
            def use(model: Any, implementation: str = implementation) -> None:
                model.get_layer("primarycap_conv2d").implementation = implementation

            fns[f"step {implementation} {short}"], weights = product_step(x, y, weights, use)

        def tune(model: Any, short: str = short) -> None:  # what capsulenet.run does
            choices[short] = autotune.tune_model(model, batch).get("primarycap_conv2d", "not tuned")

        fns[f"step cli {short}"], weights = product_step(x, y, weights, tune)
    keras.mixed_precision.set_global_policy("float32")
    fns["step original float32"] = original_step(x, y, weights)
    fns["GEMM 4096 float32"] = square_gemm(4096, rng)
    for fn in fns.values():  # trace and warm up
        fn()
    times = interleave(fns, rounds)
    print(f"Training step (train model, TensorFlowSteps, Adam), batch {batch}, {rounds} interleaved "
          f"rounds, TF_ENABLE_ONEDNN_OPTS={os.environ.get('TF_ENABLE_ONEDNN_OPTS', '(unset)')}:")
    report(times, {"GEMM 4096 float32": 2 * 4096**3}, reference="step original float32")
    medians = {name: statistics.median(values) for name, values in times.items()}
    for short, choice in choices.items():
        candidates = {k: medians[f"step {k} {short}"] for k in ("conv", "im2col")}
        best = min(candidates, key=candidates.get)
        print(f"  autotune chose {choice} ({short}); the faster step here was {best}: the CLI's step is "
              f"{medians[f'step cli {short}'] / candidates[best]:.2f}x the better candidate's and "
              f"{medians['step original float32'] / medians[f'step cli {short}']:.2f}x faster than the "
              "original formulation's float32 step")
    # The step's training FLOPs (analytic; bench.py checks the count on the traced step).
    step_flops = flops.analytic_flops()["train_total"] * batch
    rate = 2 * 4096**3 / statistics.median(times["GEMM 4096 float32"])
    floor = step_flops / rate
    print(f"  step floor: {step_flops / 1e9:.1f} GFLOP at the 4096x4096 GEMM's "
          f"{rate / 1e9:.0f} GFLOP/s = {floor * 1e3:.0f} ms")
    peak = flops.cpu_peak()
    beyond = (" (the GEMM above it: the cores ran faster than that clock, i.e. boost)"
              if rate / 1e9 > peak["gflops"] else "")
    print(f"  CPU peak estimate: {peak['gflops']:.0f} GFLOP/s = {peak['how']}{beyond}")
    for name, values in times.items():
        if name.startswith("step"):
            print(f"  {name:28s} {statistics.median(values) / floor:5.2f}x the fp32 step floor")
    return medians


def onednn_steps(argv: list[str], rounds: int) -> None:
    """The training steps in one child process per `TF_ENABLE_ONEDNN_OPTS` setting (read when
    TensorFlow starts, so it cannot change inside one process), then the two side by side."""
    import subprocess
    import tempfile

    results = {}
    for setting in ("1", "0"):
        with tempfile.NamedTemporaryFile(suffix=".json") as out:
            env = {**os.environ, "TF_ENABLE_ONEDNN_OPTS": setting}
            print(f"--- child process, TF_ENABLE_ONEDNN_OPTS={setting} ---", flush=True)
            subprocess.run([sys.executable, __file__, *argv, "--no_convolutions", "--step_json", out.name],
                           env=env, check=True)
            results[setting] = json.loads(Path(out.name).read_text())
    # The children run one after the other: on a shared machine the load can change between them, so
    # each step is also given in units of its own child's 4096x4096 GEMM (which oneDNN also runs).
    print(f"oneDNN on vs off (one child each, {rounds} rounds each; medians; 'x GEMM': the step over "
          "the same child's 4096 GEMM):")
    gemm = {k: v["GEMM 4096 float32"] for k, v in results.items()}
    for name in results["1"]:
        on, off = results["1"][name], results["0"].get(name, float("nan"))
        print(f"  {name:28s} on {on * 1e3:8.1f} ms ({on / gemm['1']:5.2f}x GEMM)   off {off * 1e3:8.1f} ms "
              f"({off / gemm['0']:5.2f}x GEMM)   off/on {off / on:5.2f}x")


def square_gemm(n: int, rng: np.random.Generator) -> Callable[[], Any]:
    """A float32 `n x n` `tf.matmul`, checked against NumPy (float64) on 16 rows first: the issue's
    floor is the best square GEMM's rate times the step's FLOPs."""
    import flops
    import tensorflow as tf

    a = rng.standard_normal((n, n), dtype=np.float32)
    b = (rng.standard_normal((n, n), dtype=np.float32) / np.float32(np.sqrt(n)))
    a_tensor, b_tensor = tf.constant(a), tf.constant(b)
    product = tf.function(lambda: tf.matmul(a_tensor, b_tensor))
    rows = np.random.default_rng(3).choice(n, 16, replace=False)
    flops.check_fp32_product(product().numpy()[rows], a[rows].astype(np.float64) @ b)
    corner = tf.function(lambda: product()[0, 0])  # no 64 MB copy back to NumPy
    return lambda: corner().numpy()


def use_tensorflow() -> bool:
    """Puts the repository and bench/ on the path and selects Keras' TensorFlow backend (unless the
    environment chose another, which is then refused in one line): whether the benchmark can run."""
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    for path in (REPO_ROOT, REPO_ROOT / "bench"):
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))
    import keras

    if keras.backend.backend() != "tensorflow":
        print(f"this benchmark needs the TensorFlow backend, not {keras.backend.backend()}")
        return False
    return True


def layer_bench_parser(description: str, rounds: int) -> argparse.ArgumentParser:
    """The flags of the layer benchmarks (this one and `digitcaps.py`)."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--batch_size", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=rounds, help="interleaved rounds (medians over them)")
    parser.add_argument("--mixed_precision", action="store_true", help="bfloat16 variants too")
    parser.add_argument("--no_step", action="store_true", help="skip the training steps")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = layer_bench_parser(__doc__.split("\n\n")[0], rounds=5)
    parser.add_argument("--no_convolutions", action="store_true", help="skip the convolutions alone")
    parser.add_argument("--onednn", action="store_true",
                        help="the training steps with TF_ENABLE_ONEDNN_OPTS=1 and =0, a child process each")
    parser.add_argument("--step_json", default=None, help=argparse.SUPPRESS)  # a child's medians
    args = parser.parse_args(argv)
    if args.onednn:
        child = ["--batch_size", str(args.batch_size), "--rounds", str(args.rounds)]
        onednn_steps(child + (["--mixed_precision"] if args.mixed_precision else []), args.rounds)
        return 0
    if not use_tensorflow():
        return 2
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the start (a busy machine "
          "slows every variant: compare the ratios)")
    if not args.no_convolutions:
        convolutions(args.batch_size, args.rounds, args.mixed_precision)
    if not args.no_step:
        medians = training_steps(args.batch_size, args.rounds, args.mixed_precision)
        if args.step_json:
            Path(args.step_json).write_text(json.dumps(medians))
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
