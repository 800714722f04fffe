"""CapsNet speed and accuracy on an accelerator through any Keras 3 backend.

The lent GPU machines carry JAX and PyTorch but no TensorFlow (its wheel is too large to carry there),
so this script measures the project's own model (`capsulenet.CapsNet`, `margin_loss`, the same
optimizer settings) with Keras' built-in `train_on_batch` / `fit` on whatever backend is installed:

    KERAS_BACKEND=jax python bench/backend_epoch.py --data /usr/share/datasets/fashion-mnist --epochs 3

It prints a markdown report (also written to `--out`): the device, median ms per training step at
batch 100, images/s, inference ms per 100 images, the manipulation grid, and real epochs on an IDX
dataset (shifted by `RandomTranslation` each epoch, validated on the test set) with their wall time and
test accuracy.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import keras  # noqa: E402

import capsulenet  # noqa: E402
import utils  # noqa: E402

BATCH = 100


def device_name() -> str:
    """The accelerator's name, or the CPU's."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        device = jax.devices()[0]
        return f"{device.device_kind} ({device.platform}, JAX {jax.__version__})"
    if backend == "torch":
        import torch

        if torch.cuda.is_available():
            return f"{torch.cuda.get_device_name(0)} (PyTorch {torch.__version__})"
    return f"CPU ({backend})"


def build(args: argparse.Namespace, steps_per_epoch: int) -> tuple[keras.Model, keras.Model, keras.Model]:
    """The project's three models, the train model compiled as the CLI compiles it."""
    ns = argparse.Namespace(lr=0.001, lr_decay=0.9, lam_recon=0.392, routings=3)
    model, eval_model, manipulate_model = capsulenet.CapsNet((28, 28, 1), 10, ns.routings)
    model.compile(optimizer=capsulenet.make_optimizer(ns, steps_per_epoch),
                  loss=[capsulenet.margin_loss, "mse"], loss_weights=[1.0, ns.lam_recon],
                  metrics=[["accuracy"], []], jit_compile=args.jit_compile)
    return model, eval_model, manipulate_model


def timed(fn, repeats: int) -> list[float]:  # noqa: ANN001
    """Wall seconds of each call; results come back as NumPy, so each call is synchronous."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def step_times(model: keras.Model, eval_model: keras.Model, manipulate_model: keras.Model,
               steps: int) -> dict[str, float]:
    rng = np.random.default_rng(0)
    x = rng.random((BATCH, 28, 28, 1), dtype=np.float32)
    y = np.eye(10, dtype=np.float32)[rng.integers(0, 10, BATCH)]
    timed(lambda: model.train_on_batch([x, y], [y, x]), 5)  # compile and warm up
    train = statistics.median(timed(lambda: model.train_on_batch([x, y], [y, x]), steps))
    eval_model.predict_on_batch(x)
    infer = statistics.median(timed(lambda: eval_model.predict_on_batch(x), steps))
    ns = argparse.Namespace(digit=5, save_dir=tempfile.mkdtemp())
    capsulenet.manipulate_latent(manipulate_model, (x, y), ns)
    grid = statistics.median(timed(lambda: capsulenet.manipulate_latent(manipulate_model, (x, y), ns), 5))
    return {"train": train, "infer": infer, "grid": grid}


def shifted(x: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """One epoch's random zero-filled shifts, computed on the device in chunks."""
    layer = keras.layers.RandomTranslation(fraction, fraction, fill_mode="constant", seed=seed)
    return np.concatenate([keras.ops.convert_to_numpy(layer(x[i : i + 2000], training=True))
                           for i in range(0, len(x), 2000)])


def real_epochs(args: argparse.Namespace) -> list[str]:
    (x_train, y_train), (x_test, y_test) = utils.prepare(utils.load_idx_folder(args.data), args.data)
    model, eval_model, _ = build(args, len(x_train) // BATCH)
    lines = []
    for epoch in range(args.epochs):
        start = time.perf_counter()
        xs = shifted(x_train, 0.1, seed=epoch)
        history = model.fit([xs, y_train], [y_train, xs], batch_size=BATCH, epochs=epoch + 1,
                            initial_epoch=epoch, verbose=2,
                            validation_data=([x_test, y_test], [y_test, x_test]))
        seconds = time.perf_counter() - start
        val = history.history["val_capsnet_accuracy"][-1]
        lines.append(f"| {epoch + 1} | {seconds:.1f} | {len(x_train) / seconds:.0f} | {val:.4f} |")
        print(lines[-1], flush=True)
    lengths, _ = eval_model.predict(x_test, batch_size=BATCH, verbose=0)
    accuracy = float(np.mean(lengths.argmax(1) == y_test.argmax(1)))
    lines.append(f"\nTest accuracy after {args.epochs} epochs (eval model, longest-capsule mask): "
                 f"{accuracy:.4f} on {len(x_test)} images of `{args.data}`.")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="folder of the 4 MNIST-format IDX files for real epochs")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--jit_compile", default="auto")
    parser.add_argument("--out", default=None, help="also write the report here")
    parser.add_argument("--mixed_precision", default=None,
                        help="a Keras mixed policy, e.g. mixed_float16 (capsules stay float32)")
    args = parser.parse_args()
    if args.mixed_precision:
        keras.mixed_precision.set_global_policy(args.mixed_precision)
    if args.jit_compile in ("true", "false"):
        args.jit_compile = args.jit_compile == "true"
    report = [f"### {device_name()}, Keras {keras.__version__} on {keras.backend.backend()}, "
              f"jit_compile={args.jit_compile}, policy {keras.mixed_precision.global_policy().name}, "
              f"{datetime.date.today()}", ""]
    model, eval_model, manipulate_model = build(args, 600)
    t = step_times(model, eval_model, manipulate_model, args.steps)
    report += [
        "| training step, batch 100 | images/s | projected 60k epoch | inference / 100 images "
        "| manipulation grid (176) |",
        "|---|---|---|---|---|",
        f"| {t['train'] * 1e3:.1f} ms | {BATCH / t['train']:.0f} | {600 * t['train']:.1f} s "
        f"| {t['infer'] * 1e3:.1f} ms | {t['grid'] * 1e3:.1f} ms |",
        "",
    ]
    print("\n".join(report), flush=True)
    if args.data:
        report += ["| epoch | wall s (shifts + train + validation) | train images/s | val accuracy |",
                   "|---|---|---|---|", *real_epochs(args)]
    text = "\n".join(report) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
