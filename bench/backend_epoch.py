"""CapsNet speed and accuracy on an accelerator through any Keras 3 backend.

The lent GPU machines carry JAX and PyTorch but no TensorFlow (its wheel is too large to carry there),
so this script measures the project's own model, compiled as the product compiles it
(`capsulenet.CapsNet`, `training.make_optimizer`, `capsulenet.compile_like_original`), with Keras'
built-in `train_on_batch` / `fit` on whatever backend is installed:

    KERAS_BACKEND=jax python bench/backend_epoch.py --data /usr/share/datasets/fashion-mnist --epochs 3

It prints a markdown report (also written to `--out`): the device, median ms per training step at
batch 100, images/s, inference ms per 100 images, the manipulation grid, and real epochs on an IDX
dataset (shifted each epoch by the product's own `batches.train_batches`, validated on the test set)
with their wall time and test accuracy.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import statistics
import tempfile
import time
from pathlib import Path

import common
import numpy as np
from common import BATCH

common.use_repo()  # the product's modules, imported below by bare name

import keras  # noqa: E402

import capsulenet  # noqa: E402
from capsnet import batches, datasets, training  # noqa: E402


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
    """The project's three models, the train model compiled as the CLI compiles it (default flags)."""
    config = training.TrainConfig()
    model, eval_model, manipulate_model = capsulenet.CapsNet(common.INPUT_SHAPE, common.N_CLASS,
                                                             common.ROUTINGS)
    optimizer = training.make_optimizer(config.lr, config.lr_decay, steps_per_epoch)
    capsulenet.compile_like_original(model, optimizer, config.lam_recon)
    if args.jit_compile != "auto":  # else compile's own "auto" choice stands
        model.jit_compile = args.jit_compile
    return model, eval_model, manipulate_model


def step_times(model: keras.Model, eval_model: keras.Model, manipulate_model: keras.Model,
               steps: int) -> dict[str, float]:
    rng = np.random.default_rng(0)
    x = rng.random((BATCH, 28, 28, 1), dtype=np.float32)
    y = np.eye(10, dtype=np.float32)[rng.integers(0, 10, BATCH)]
    # Results come back as NumPy, so each timed call is synchronous.
    common.timed_calls(lambda: model.train_on_batch([x, y], [y, x]), 5)  # compile and warm up
    train = statistics.median(common.timed_calls(lambda: model.train_on_batch([x, y], [y, x]), steps))
    eval_model.predict_on_batch(x)
    infer = statistics.median(common.timed_calls(lambda: eval_model.predict_on_batch(x), steps))
    with tempfile.TemporaryDirectory() as save_dir, contextlib.redirect_stdout(io.StringIO()):
        def grid_once() -> None:
            capsulenet.manipulate_latent(manipulate_model, (x, y), common.DIGIT, save_dir)

        grid_once()
        grid = statistics.median(common.timed_calls(grid_once, 5))
    return {"train": train, "infer": infer, "grid": grid}


def shifted_epoch(x: np.ndarray, y: np.ndarray, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """One epoch's shuffled, randomly shifted training data, as the product's loop makes it
    (`batches.train_batches`, shift fraction 0.1), joined for `fit`: `[n - n % 100, ...]` each."""
    made = list(batches.train_batches(x, y, BATCH, 0.1, seed=0, epoch=epoch))
    return np.concatenate([b[0] for b in made]), np.concatenate([b[1] for b in made])


def real_epochs(args: argparse.Namespace) -> list[str]:
    (x_train, y_train), (x_test, y_test) = datasets.prepare(datasets.load_idx_folder(args.data), args.data)
    model, eval_model, _ = build(args, len(x_train) // BATCH)
    lines = []
    for epoch in range(args.epochs):
        start = time.perf_counter()
        xs, ys = shifted_epoch(x_train, y_train, epoch)
        history = model.fit([xs, ys], [ys, xs], batch_size=BATCH, epochs=epoch + 1, shuffle=False,
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
