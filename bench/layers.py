"""Where the training step's time goes: each part of the CLI's step in ms against its own floor, and
the layers' candidate formulations against each other, on the TensorFlow backend.

**The breakdown** (default): the step's parts, each timed alone, forward + backward as in training,
interleaved in one process (`capsnet.machine.interleave`) on the model `capsulenet.py` builds
(`training.build`, the PrimaryCaps convolution chosen by `autotune.tune_model`):

- conv1: forward + kernel gradient (the image needs none); floor: its FLOPs at the GEMM rate;
- PrimaryCaps forward, backward-input ((forward + input gradient) - forward) and backward-weights
  ((forward + kernel gradient) - forward); floor: the forward's FLOPs each, at the GEMM rate;
- u_hat = W u (`CapsuleLayer.predictions`, gradients for W and u); floor: its FLOPs at the GEMM rate,
  or û written once and read twice at the copy rate;
- routing (`dynamic_routing` on û, gradient for û); floor: its FLOPs, or every contraction reading
  û at the copy rate;
- decoder (the three Dense layers, gradients for weights and input): its FLOPs at the GEMM rate;
- losses (margin + lam_recon x MSE, gradients for lengths and reconstruction): their bytes at the
  copy rate;
- Adam (one update of every variable, fixed gradients): 7 passes over the parameters (read w, g, m,
  v; write w, m, v) at the copy rate;
- data (one batch of `batches.train_batches`: gather + shifts): the batch read and written;
- whole step (`steps.train` as the CLI runs it): the step's FLOPs at the GEMM rate.

The GEMM rate is the best checked fp32 matrix product of `flops.measure_floor`, the copy rate
`flops.memory_bandwidth`, both measured in the same run; a part's floor is the larger of its two
(FLOPs, bytes) times. The backward parts of the PrimaryCaps convolution are differences of
interleaved medians: noisy where the machine is busy.

**The candidates** (`--candidates`): the PrimaryCaps convolution and conv1 as im2col and as the
library convolution, against the PrimaryCaps convolution's three GEMMs (checked against NumPy), in
float32 and, with `--mixed_precision`, bfloat16; the DigitCaps layer as the product computes it (one
batched product for û, the hand-written routing gradient) against the paper's equations as `einsum`s
differentiated automatically.

Usage::

    python bench/layers.py --write                  # the breakdown, this machine's section rewritten
    python bench/layers.py --candidates --mixed_precision
    python bench/layers.py --batch_size 2 --rounds 1 --gemm_size 256 --copy_mb 8   # a quick check
"""

from __future__ import annotations

import argparse
import datetime
import functools
import itertools
import os
import sys
from collections.abc import Callable
from typing import Any

import common
import flops
import numpy as np

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

INTRO = ("\n## Where the step's time goes (`python bench/layers.py`)\n\n"
         "Each part of the CLI's training step, forward + backward, against its own floor; written by "
         "`bench/layers.py --write`, one section per machine, rewritten in place.\n\n")
ROWS, CHANNELS, KERNEL, STRIDE, FILTERS = 20, 256, 9, 2, 256  # PrimaryCaps on conv1's output
OUT = (ROWS - KERNEL) // STRIDE + 1  # 6
TAPS = KERNEL * KERNEL * CHANNELS  # 20736
FLOAT = 4  # bytes


class Part:
    """One part of the step: how to run it once, and its work (FLOPs, bytes that must move)."""

    def __init__(self, run: Callable[[], Any], gflop: float, megabytes: float) -> None:
        self.run, self.gflop, self.megabytes = run, gflop, megabytes

    def floor(self, gemm_gflops: float, copy_gbytes: float) -> float:
        """Seconds at the better of the two rates the part can be bound by."""
        return max(self.gflop / gemm_gflops, self.megabytes / 1e3 / copy_gbytes)


def tf_gradient_step(fn: Callable[..., Any], *inputs: Any, weights: tuple = ()) -> Callable[[], Any]:
    """A `tf.function` of `fn(*inputs)` and the gradients of `sum(output * upstream)` for `inputs`
    and `weights`, returning the loss and the gradients' sums (the loss keeps the forward un-pruned:
    no gradient needs it)."""
    import tensorflow as tf

    rng = np.random.default_rng(1)
    shape = fn(*inputs).shape
    upstream = tf.constant(rng.standard_normal(shape, dtype=np.float32))

    @tf.function
    def step() -> Any:
        with tf.GradientTape() as tape:
            for x in inputs:
                tape.watch(x)
            loss = tf.reduce_sum(tf.cast(fn(*inputs), "float32") * upstream)
        grads = tape.gradient(loss, [*inputs, *weights])
        return [loss] + [tf.reduce_sum(tf.cast(g, "float32")) for g in grads if g is not None]

    return lambda: [v.numpy() for v in step()]


# ---------------------------------------------------------------------------------------------
# The breakdown
# ---------------------------------------------------------------------------------------------


def breakdown_parts(batch: int) -> dict[str, Part]:
    """Every part of the CLI's step at `batch`, built and ready to time (see the module's table)."""
    import tensorflow as tf

    from capsnet import batches, losses, machine
    from capsnet.layers import dynamic_routing

    built = common.build_product(batch)
    model = built.model
    per_image = flops.analytic_flops()
    forward, train = per_image["forward"], per_image["train"]
    rng = np.random.default_rng(0)
    parts: dict[str, Part] = {}

    conv1 = model.get_layer("conv1")
    parts["conv1"] = Part(machine.layer_step(conv1, (batch, *common.INPUT_SHAPE), input_grad=False),
                          train["conv1"] * batch / 1e9, 0)
    primary = model.get_layer("primarycap_conv2d")
    shape = (batch, ROWS, ROWS, CHANNELS)
    one = forward["primarycaps"] * batch / 1e9
    parts["PrimaryCaps forward"] = Part(machine.layer_step(primary, shape, False, weight_grads=False), one, 0)
    parts["PrimaryCaps forward + backward-input"] = Part(
        machine.layer_step(primary, shape, True, weight_grads=False), 2 * one, 0)
    parts["PrimaryCaps forward + backward-weights"] = Part(
        machine.layer_step(primary, shape, False, weight_grads=True), 2 * one, 0)

    digitcaps = model.get_layer("digitcaps")
    u = tf.constant(rng.standard_normal((batch, 1152, 8), dtype=np.float32) * 0.3)
    u_hat_mb = batch * common.N_CLASS * 1152 * 16 * FLOAT / 1e6
    parts["u_hat = W u"] = Part(tf_gradient_step(digitcaps.predictions, u, weights=(digitcaps.W,)),
                                train["u_hat"] * batch / 1e9, 3 * u_hat_mb)
    u_hat = tf.constant(rng.standard_normal((batch, common.N_CLASS, 1152, 16), dtype=np.float32) * 0.1)
    routing_gflop = train["routing"] * batch / 1e9
    # Each contraction over û costs 2 FLOPs per element of û and must read it: 2 bytes per FLOP.
    parts["routing"] = Part(tf_gradient_step(lambda v: dynamic_routing(v, common.ROUTINGS), u_hat),
                            routing_gflop, routing_gflop * 1e3 * FLOAT / 2)
    decoder = model.get_layer("decoder")
    parts["decoder"] = Part(machine.layer_step(decoder, (batch, 16 * common.N_CLASS), True),
                            train["decoder"] * batch / 1e9, 0)

    x, y = common.synthetic_data(batch, seed=0)
    images = tf.constant(x)
    labels = tf.constant(y)
    lengths = tf.constant(rng.random((batch, common.N_CLASS), dtype=np.float32))
    recon = tf.constant(rng.random(x.shape, dtype=np.float32))
    parts["losses"] = Part(tf_gradient_step(
        lambda lengths, recon: losses.per_sample_terms(images, labels, lengths, recon,
                                                       common.DEFAULTS.lam_recon)[0], lengths, recon),
        0, 3 * x.nbytes / 1e6)

    variables = model.trainable_variables
    gradients = [tf.constant(rng.standard_normal(v.shape, dtype=np.float32) * 1e-3) for v in variables]
    apply = tf.function(lambda: built.optimizer.apply(gradients, variables))
    params_mb = sum(int(np.prod(v.shape)) for v in variables) * FLOAT / 1e6
    parts["Adam"] = Part(lambda: (apply(), built.optimizer.iterations.numpy()), 0, 7 * params_mb)

    pool_x, pool_y = common.synthetic_data(batch * 8, seed=1)
    epochs = itertools.count()
    state = {"batches": iter(())}

    def next_batch() -> Any:
        for _ in range(2):
            try:
                return next(state["batches"])
            except StopIteration:
                state["batches"] = batches.train_batches(pool_x, pool_y, batch,
                                                         common.DEFAULTS.shift_fraction, seed=0,
                                                         epoch=next(epochs))
        raise RuntimeError("no batch")

    parts["data (one batch + shifts)"] = Part(next_batch, 0, 2 * x.nbytes / 1e6)
    parts["whole step"] = Part(lambda: built.steps.train(x, y), per_image["train_total"] * batch / 1e9, 0)
    return parts


def breakdown(batch: int, rounds: int, gemm_size: int, copy_mb: int) -> dict[str, Any]:
    """Times the parts interleaved, then the floors' two rates.

    Returns:
        `{"rows": [{"part", "ms", "floor_ms", "bound"}], "gemm_gflops", "copy_gbytes", "batch",
        "rounds"}`; the PrimaryCaps backward rows are differences of medians.
    """
    parts = breakdown_parts(batch)
    medians = common.machine.interleave({name: part.run for name, part in parts.items()}, rounds,
                                        log=print).medians()
    floor = flops.measure_floor((gemm_size,), repeats=3, gpu=False)
    gemm = floor["floor_gflops"] or max(c["gflops"] for c in floor["candidates"])
    copy = flops.memory_bandwidth(copy_mb) / 1e9
    seconds = dict(medians)
    for which in ("input", "weights"):
        seconds[f"PrimaryCaps backward-{which}"] = (medians[f"PrimaryCaps forward + backward-{which}"]
                                                    - medians["PrimaryCaps forward"])
    one = parts["PrimaryCaps forward"]
    parts["PrimaryCaps backward-input"] = parts["PrimaryCaps backward-weights"] = one
    order = ["conv1", "PrimaryCaps forward", "PrimaryCaps backward-input", "PrimaryCaps backward-weights",
             "u_hat = W u", "routing", "decoder", "losses", "Adam", "data (one batch + shifts)", "whole step"]
    rows = []
    for name in order:
        part = parts[name]
        by_flops = part.gflop / gemm >= part.megabytes / 1e3 / copy
        rows.append({"part": name, "ms": seconds[name] * 1e3, "floor_ms": part.floor(gemm, copy) * 1e3,
                     "bound": f"{part.gflop:.2f} GFLOP" if by_flops else f"{part.megabytes:.0f} MB"})
    return {"rows": rows, "gemm_gflops": gemm, "copy_gbytes": copy, "batch": batch, "rounds": rounds,
            "sum_of_parts_ms": sum(r["ms"] for r in rows if r["part"] != "whole step")}


def render_breakdown(result: dict[str, Any], meta: dict[str, str]) -> str:
    """The RESULTS.md section of one breakdown."""
    rows = [[r["part"], f"{r['ms']:.1f}", f"{r['floor_ms']:.1f}",
             f"{r['ms'] / r['floor_ms']:.2f}x" if r["floor_ms"] > 0 else "-", r["bound"]]
            for r in result["rows"]]
    lines = [f"### {meta['machine']}, {meta['date']}", "",
             f"Measured with `{meta['command']}`: batch {result['batch']}, {result['rounds']} interleaved "
             f"rounds (medians); {meta['versions']}. Floors at the run's best checked fp32 GEMM, "
             f"{result['gemm_gflops']:.0f} GFLOP/s, and NumPy's copy rate, {result['copy_gbytes']:.1f} GB/s.",
             ""]
    lines += common.table(["part", "ms", "floor ms", "x floor", "floor from"], rows)
    whole = next(r["ms"] for r in result["rows"] if r["part"] == "whole step")
    lines += ["", f"The parts add up to {result['sum_of_parts_ms']:.0f} ms against the whole step's "
                  f"{whole:.0f} ms (the rest: the step's own glue, and what runs concurrently)."]
    return "\n".join(lines) + "\n\n"


# ---------------------------------------------------------------------------------------------
# The candidates
# ---------------------------------------------------------------------------------------------


def primarycaps_flops(batch: int) -> int:
    """FLOPs of the PrimaryCaps convolution's forward + both gradients: three GEMMs of
    `2 * (batch * 36) * 20736 * 256`."""
    return 3 * 2 * batch * OUT * OUT * TAPS * FILTERS


def gemm_floor(batch: int, rng: np.random.Generator) -> Callable[[], Any]:
    """The three GEMMs of the PrimaryCaps convolution's shapes through `tf.matmul`, after checking
    each against NumPy (float64) on 16 sampled rows: a product that skipped work cannot be the floor."""
    import tensorflow as tf

    patches = rng.standard_normal((batch * OUT * OUT, TAPS), dtype=np.float32)
    weights = rng.standard_normal((TAPS, FILTERS), dtype=np.float32)
    upstream = rng.standard_normal((batch * OUT * OUT, FILTERS), dtype=np.float32)
    p, w, d = (tf.constant(a) for a in (patches, weights, upstream))

    @tf.function
    def products() -> Any:
        # One after the other: run side by side, three products share the same cores and measure slower.
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
    rows = np.random.default_rng(1).choice(len(patches), min(16, len(patches)), replace=False)
    taps = np.random.default_rng(2).choice(TAPS, 16, replace=False)
    for got, want in ((forward[rows], patches[rows].astype(np.float64) @ weights),
                      (kernel_grad[taps], patches[:, taps].T.astype(np.float64) @ upstream),
                      (patches_grad[rows], upstream[rows].astype(np.float64) @ weights.T)):
        flops.check_fp32_product(got, want)
    return lambda: [r.numpy() for r in timed_products()]


def plain_digitcaps(w: Any, u: Any) -> Any:
    """The paper's equations as `einsum`s, differentiated automatically: û, then Procedure 1."""
    from keras import ops

    from capsnet.layers import squash

    u_hat = ops.einsum("jiod,bid->bjio", w, u)
    logits = ops.zeros_like(u_hat[..., 0])
    for iteration in range(common.ROUTINGS):
        outputs = squash(ops.einsum("bji,bjio->bjo", ops.softmax(logits, axis=1), u_hat))
        if iteration < common.ROUTINGS - 1:
            logits = logits + ops.einsum("bjo,bjio->bji", outputs, u_hat)
    return outputs


def candidates(batch: int, rounds: int, mixed_precision: bool) -> list[str]:
    """The report lines of the candidates' comparison (see the module's docstring)."""
    import keras
    import tensorflow as tf

    from capsnet import machine
    from capsnet.layers import CapsuleLayer, Conv2D

    fns: dict[str, Callable[[], Any]] = {}
    work: dict[str, int] = {}
    for dtype in ("float32", "mixed_bfloat16") if mixed_precision else ("float32",):
        for implementation in ("conv", "im2col"):
            short = dtype.removeprefix("mixed_")
            layer = Conv2D(FILTERS, KERNEL, strides=STRIDE, implementation=implementation, dtype=dtype)
            layer.build((batch, ROWS, ROWS, CHANNELS))
            fns[f"primarycaps {implementation} {short}"] = machine.layer_step(layer, (batch, ROWS, ROWS,
                                                                                      CHANNELS), True)
            work[f"primarycaps {implementation} {short}"] = primarycaps_flops(batch)
            layer = Conv2D(256, KERNEL, activation="relu", implementation=implementation, dtype=dtype)
            layer.build((batch, *common.INPUT_SHAPE))
            fns[f"conv1 {implementation} {short}"] = machine.layer_step(layer, (batch, *common.INPUT_SHAPE),
                                                                        False)
            work[f"conv1 {implementation} {short}"] = 2 * 2 * batch * 20 * 20 * KERNEL * KERNEL * 256
    keras.mixed_precision.set_global_policy("float32")
    fns["primarycaps GEMM floor float32"] = gemm_floor(batch, np.random.default_rng(0))
    work["primarycaps GEMM floor float32"] = primarycaps_flops(batch)
    digitcaps = CapsuleLayer(common.N_CLASS, 16, routings=common.ROUTINGS)
    digitcaps.build((None, 1152, 8))
    u = tf.constant(np.random.default_rng(0).standard_normal((batch, 1152, 8), dtype=np.float32) * 0.3)
    fns["digitcaps plain"] = tf_gradient_step(functools.partial(plain_digitcaps, digitcaps.W), u,
                                              weights=(digitcaps.W,))
    fns["digitcaps product"] = tf_gradient_step(digitcaps, u, weights=(digitcaps.W,))
    plain, product = fns["digitcaps plain"](), fns["digitcaps product"]()
    error = max(abs(a - b) / max(abs(a), 1e-6) for a, b in zip(plain, product, strict=True))
    medians = machine.interleave(fns, rounds, log=print).medians()
    lines = [f"Forward + backward, batch {batch}, {rounds} interleaved rounds (medians); the two DigitCaps "
             f"formulations' loss and gradient sums agree within {error:.1e} (relative):", ""]
    for group, reference in (("primarycaps", "primarycaps GEMM floor float32"),
                             ("conv1", "conv1 conv float32"), ("digitcaps", "digitcaps plain")):
        rows = [[name, f"{seconds * 1e3:.1f}",
                 f"{work[name] / seconds / 1e9:.0f}" if name in work else "-",
                 f"{seconds / medians[reference]:.2f}x"]
                for name, seconds in medians.items() if name.startswith(group)]
        lines += common.table(["variant", "ms", "GFLOP/s", f"x {reference}"], rows) + [""]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--batch_size", type=int, default=common.BATCH)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (medians over them)")
    parser.add_argument("--gemm_size", type=int, default=4096, help="square GEMM of the floor's rate")
    parser.add_argument("--copy_mb", type=int, default=256, help="array copied for the memory floor")
    parser.add_argument("--candidates", action="store_true", help="the formulations' comparison instead")
    parser.add_argument("--mixed_precision", action="store_true", help="--candidates: bfloat16 too")
    parser.add_argument("--write", action="store_true", help="rewrite this machine's section of RESULTS.md")
    parser.add_argument("--results", default=str(common.RESULTS_PATH))
    args = parser.parse_args(argv)
    import keras

    if keras.backend.backend() != "tensorflow":
        print(f"bench/layers.py times TensorFlow's kernels; KERAS_BACKEND is {keras.backend.backend()!r}")
        return 2
    print(f"{common.machine_name()}, load average {os.getloadavg()[0]:.1f} at the start")
    shown = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--write"]
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")  # each timed part is its own tf.function, retraced on purpose
    meta = {"machine": common.machine_name(), "command": "python bench/layers.py " + " ".join(shown),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
            "versions": f"TensorFlow {tf.__version__}, Keras {keras.__version__}"}
    if args.candidates:
        text = (f"### {meta['machine']}, {meta['date']}, candidates\n\nMeasured with `{meta['command']}`; "
                f"{meta['versions']}.\n\n" + "\n".join(candidates(args.batch_size, args.rounds,
                                                                   args.mixed_precision)) + "\n")
        key = common.machine_slug() + "-candidates"
    else:
        text = render_breakdown(breakdown(args.batch_size, args.rounds, args.gemm_size, args.copy_mb), meta)
        key = common.machine_slug()
    print(text)
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    if args.write:
        from pathlib import Path

        common.write_section(Path(args.results), "layers", key, text, INTRO)
        print(f"Written to {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
