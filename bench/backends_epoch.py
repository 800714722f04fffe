"""One CPU epoch of the command line on every installed Keras backend, side by side in one run.

Each backend runs `KERAS_BACKEND=<backend> python capsulenet.py --epochs 1` in its own fresh process,
one after the other, on the same subset of MNIST (the first `--train` training images with the CLI's
shifts, validated on the first `--test` test images; batch 100, 3 routings, the defaults). The epoch
time is the one the CLI prints (training + validation, first-step compilation included), the process
time everything from start-up to the saved model.

Usage:
    python bench/backends_epoch.py --dataset ../shared/data/mnist.npz            # ~2-3 min on 2 cores
    python bench/backends_epoch.py --dataset ../shared/data/mnist.npz --write    # also into RESULTS.md

The machine should be otherwise idle: a run in parallel skews the times (less their ratios).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import common
import numpy as np
from epoch import product_epoch

BACKENDS = ("tensorflow", "jax", "torch")
INTRO = ("\n## One CPU epoch per Keras backend (`python bench/backends_epoch.py`)\n\n"
         "The same CLI epoch on TensorFlow, JAX and PyTorch, each in a fresh process, in one run.\n\n")


def subset(dataset: str, n_train: int, n_test: int, folder: Path) -> Path:
    """The first `n_train` / `n_test` images of `dataset` as an `.npz` the CLI reads."""
    common.use_repo()
    from capsnet import datasets

    (x_train, y_train), (x_test, y_test) = datasets.load_dataset(dataset)
    path = folder / "subset.npz"
    # Back to the keras.datasets layout (uint8 images, integer labels) that --dataset reads.
    def images(x: np.ndarray) -> np.ndarray:
        return (x[..., 0] * 255).round().astype("uint8")

    np.savez(path, x_train=images(x_train[:n_train]), y_train=y_train[:n_train].argmax(1),
             x_test=images(x_test[:n_test]), y_test=y_test[:n_test].argmax(1))
    return path


def versions() -> str:
    from importlib.metadata import version

    names = ["keras", *(b for b in BACKENDS if importlib.util.find_spec(b) is not None)]
    return ", ".join(f"{name} {version(name)}" for name in names)


def render(results: dict[str, dict[str, Any]], args: argparse.Namespace, argv: Sequence[str],
           date: str) -> str:
    """The RESULTS.md section: machine, date, one row per backend, epoch times relative to TensorFlow."""
    lines = [f"### {common.cpu_model()} ({common.cpu_cores()} cores), {date}", "",
             f"Measured with `python bench/backends_epoch.py {' '.join(argv)}` ({args.train} training "
             f"images = {args.train // common.BATCH} steps of {common.BATCH}, {args.test} validation images, "
             f"3 routings); {versions()}.", "",
             "| backend | epoch s (training + validation) | / TensorFlow's | process s | "
             "val accuracy after 1 epoch |", "|---|---:|---:|---:|---:|"]
    reference = results.get("tensorflow", {}).get("epoch_s")
    for backend, run in results.items():
        if "error" in run:
            lines.append(f"| {backend} | failed: {run['error']} | | | |")
            continue
        ratio = f"{run['epoch_s'] / reference:.2f}x" if reference else ""
        lines.append(f"| {backend} | {run['epoch_s']:.0f} | {ratio} | {run['process_s']:.0f} | "
                     f"{run['accuracy']:.4f} |")
    return "\n".join(lines) + "\n\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, help="MNIST as an .npz or IDX folder")
    parser.add_argument("--train", type=int, default=2000, help="training images (default 2000)")
    parser.add_argument("--test", type=int, default=500, help="validation images (default 500)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    parser.add_argument("--write", action="store_true", help="put the result into bench/RESULTS.md")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        data = subset(args.dataset, args.train, args.test, Path(folder))
        for backend in args.backends:
            if importlib.util.find_spec(backend) is None:
                results[backend] = {"error": "not installed"}
                continue
            print(f"{backend}: one epoch ...", flush=True)
            results[backend] = product_epoch(str(data), args.seed, Path(folder) / backend, backend=backend)
            print(f"{backend}: {results[backend]}", flush=True)
    text = render(results, args, [a for a in argv if a != "--write"], date)
    print(text)
    if args.write:
        with open(common.RESULTS_PATH, "a") as f:
            f.write(INTRO + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
