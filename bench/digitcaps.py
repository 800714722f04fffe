"""The DigitCaps layer (`CapsuleLayer`: prediction vectors + 3 routing iterations on `[batch, 1152, 8]`)
as the product computes it against the plain formulation it replaced, forward + backward, and the
training step with either, on the TensorFlow backend.

The plain formulation is the paper's equations as `einsum`s differentiated automatically:
`u_hat = einsum("jiod,bid->bjio", W, u)`, then each routing iteration's `einsum`s. The product
computes `u_hat` as one batched matrix product plus a transpose (`CapsuleLayer.predictions`) and
routes with a hand-written gradient (`capsulelayers.dynamic_routing`). At batch 100 the layer holds
~1% of the step's FLOPs but, as plain `einsum`s, about a third of its time: every pass over `u_hat`
(74 MB) is memory traffic.

Every comparison is interleaved in one process (medians over rounds), as in
`bench/primarycaps_conv.py`: on a machine shared with other work, trust the ratios.

Usage::

    python bench/digitcaps.py                   # batch 100, 7 rounds
    python bench/digitcaps.py --rounds 9 --mixed_precision
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
ROUTINGS = 3


def plain_predictions(w: Any, u: Any) -> Any:
    """`u_hat` `[batch, 10, 1152, 16]` as one `einsum`, differentiated automatically."""
    from keras import ops

    return ops.einsum("jiod,bid->bjio", w, u)


def plain_routing(u_hat: Any, routings: int) -> Any:
    """Procedure 1 as `einsum`s, differentiated automatically."""
    from keras import ops

    from capsnet.layers import squash

    logits = ops.zeros_like(u_hat[..., 0])
    for iteration in range(routings):
        outputs = squash(ops.einsum("bji,bjio->bjo", ops.softmax(logits, axis=1), u_hat))
        if iteration < routings - 1:
            logits = logits + ops.einsum("bjo,bjio->bji", outputs, u_hat)
    return outputs


def gradient_step(fn: Callable[[Any, Any], Any], w: Any, u: Any, upstream: Any) -> Callable[[], Any]:
    """A `tf.function` of forward + backward of `fn(w, u)` (gradients of `sum(fn * upstream)` for `w`
    and `u`), returning the loss and the gradients' sums (the loss keeps the forward un-pruned)."""
    import tensorflow as tf

    @tf.function
    def step() -> Any:
        with tf.GradientTape() as tape:
            tape.watch(u)
            outputs = fn(w, u)
            loss = tf.reduce_sum(tf.cast(outputs, "float32") * tf.reshape(upstream, outputs.shape))
        return [loss] + [tf.reduce_sum(g) for g in tape.gradient(loss, [w, u])]

    return lambda: [v.numpy() for v in step()]


def layer_variants(batch: int, rounds: int) -> None:
    import tensorflow as tf
    from primarycaps_conv import interleave, report

    from capsnet.layers import CapsuleLayer, dynamic_routing

    rng = np.random.default_rng(0)
    layer = CapsuleLayer(10, 16, routings=ROUTINGS)
    layer.build((None, 1152, 8))
    u = tf.constant(rng.standard_normal((batch, 1152, 8), dtype=np.float32) * 0.3)
    upstream = tf.constant(rng.standard_normal((batch, 10, 16), dtype=np.float32))
    upstream_hat = tf.constant(rng.standard_normal((batch, 10, 1152, 16), dtype=np.float32))
    u_hat = tf.constant(rng.standard_normal((batch, 10, 1152, 16), dtype=np.float32) * 0.1)

    def product_predictions(w: Any, u: Any) -> Any:
        return layer.predictions(u)  # reads layer.W, which is w

    fns = {
        "layer plain": gradient_step(
            lambda w, u: plain_routing(plain_predictions(w, u), ROUTINGS), layer.W, u, upstream),
        "layer product": gradient_step(lambda w, u: layer(u), layer.W, u, upstream),
        "predictions plain": gradient_step(plain_predictions, layer.W, u, upstream_hat),
        "predictions product": gradient_step(product_predictions, layer.W, u, upstream_hat),
        # The routing alone: `u_hat` in the place of `u` (the kernel's gradient is then zero).
        "routing plain": gradient_step(lambda w, x: plain_routing(x, ROUTINGS) + 0 * w[0, 0, 0, 0],
                                       layer.W, u_hat, upstream),
        "routing product": gradient_step(lambda w, x: dynamic_routing(x, ROUTINGS) + 0 * w[0, 0, 0, 0],
                                         layer.W, u_hat, upstream),
    }
    checks = {}
    for name, fn in fns.items():
        checks[name] = fn()  # traces, warms up, and gives the numbers to compare
    for part in ("layer", "predictions", "routing"):
        plain, product = checks[f"{part} plain"], checks[f"{part} product"]
        error = max(abs(a - b) / max(abs(a), 1e-6) for a, b in zip(plain, product, strict=True))
        print(f"  {part}: loss and gradient sums agree within {error:.1e} (relative)")
    times = interleave(fns, rounds)
    print(f"DigitCaps forward + backward, batch {batch}, {ROUTINGS} routings, {rounds} interleaved rounds:")
    for part in ("layer", "predictions", "routing"):
        report({k: v for k, v in times.items() if k.startswith(part)}, {}, reference=f"{part} plain")


def training_steps(batch: int, rounds: int, mixed_precision: bool) -> None:
    import keras
    from primarycaps_conv import interleave, product_step, report, step_batch

    from capsnet import layers as capsulelayers

    x, y = step_batch(batch, np.random.default_rng(0))
    product_call = capsulelayers.CapsuleLayer.call

    def plain_call(self: Any, inputs: Any) -> Any:
        return plain_routing(plain_predictions(self.W, inputs), self.routings)

    fns: dict[str, Callable[[], Any]] = {}
    weights = None
    for policy in ("float32", "mixed_bfloat16") if mixed_precision else ("float32",):
        keras.mixed_precision.set_global_policy(policy)
        for name, call in (("plain", plain_call), ("product", product_call)):
            capsulelayers.CapsuleLayer.call = call  # read when the step is traced, just below
            step, weights = product_step(x, y, weights)
            step()  # trace with this call
            fns[f"step {name} {policy.removeprefix('mixed_')}"] = step
    capsulelayers.CapsuleLayer.call = product_call
    keras.mixed_precision.set_global_policy("float32")
    times = interleave(fns, rounds)
    print(f"Training step (train model, TensorFlowSteps, Adam), batch {batch}, DigitCaps plain or as "
          f"the product computes it, {rounds} interleaved rounds:")
    report(times, {}, reference="step plain float32")


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(REPO_ROOT / "bench"))
    from primarycaps_conv import layer_bench_parser, use_tensorflow

    args = layer_bench_parser(__doc__.split("\n\n")[0], rounds=7).parse_args(argv)
    if not use_tensorflow():
        return 2
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the start")
    layer_variants(args.batch_size, args.rounds)
    if not args.no_step:
        training_steps(args.batch_size, args.rounds, args.mixed_precision)
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
