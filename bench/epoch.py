"""One epoch of the command line, end to end, on every installed Keras backend, beside the original
formulation's `model.fit`, in one run.

Each runs in its own fresh process, one after the other, on the same data (the CLI's shifts, the test
set as validation data, the command line's defaults: batch 100, 3 routings):

- `CLI on <backend>`: `KERAS_BACKEND=<backend> python capsulenet.py --epochs 1` as a user runs it; its
  epoch time is the one it prints (`123s - loss: ...`: training + validation, the first step's
  compilation included), its accuracy the `val_capsnet_accuracy` of its `log.csv`, its process time
  everything from start-up to the saved model (the autotuner's one-time timing included, unless the
  cache already holds it);
- `original` (`--original`, TensorFlow): bench/original_formulation.py's model (tiled `u_hat`,
  `map_fn`, `Lambda(squash)`), built by `training.build` and trained by `model.fit` for one epoch on
  the original's Python generator (per-image shifts), with the same validation data; its epoch time is
  `fit`'s wall time.

Usage:
    python bench/epoch.py --dataset ../shared/data/mnist.npz --original --write      # the full epoch
    python bench/epoch.py --dataset ../shared/data/mnist.npz --train 2000 --test 500 --write
    python bench/epoch.py --dataset mnist.npz --backends tensorflow jax

`--write` rewrites this machine's section (one per machine and training-set size) of
bench/RESULTS.md in place. The machine should be otherwise idle: work in parallel skews the times.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import common
import numpy as np

BACKENDS = ("tensorflow", "jax", "torch")
EPOCH_LINE = re.compile(r"^(\d+)s - loss: ", re.MULTILINE)
INTRO = ("\n## One epoch of the command line per backend, and the original formulation's "
         "(`python bench/epoch.py`)\n\n"
         "Each in a fresh process, one after the other in one run; written by `bench/epoch.py --write`, "
         "one section per machine and training-set size, rewritten in place.\n\n")


def subset(dataset: str, n_train: int | None, n_test: int | None, folder: Path) -> tuple[Path, int, int]:
    """The first `n_train` / `n_test` images of `dataset` (all when None) as an `.npz` the CLI reads,
    and how many of each it holds."""
    from capsnet import datasets

    (x_train, y_train), (x_test, y_test) = datasets.load_dataset(dataset)
    x_train, y_train, x_test, y_test = x_train[:n_train], y_train[:n_train], x_test[:n_test], y_test[:n_test]

    def images(x: np.ndarray) -> np.ndarray:  # back to keras.datasets' layout, which --dataset reads
        return (x[..., 0] * 255).round().astype("uint8")

    path = folder / "subset.npz"
    np.savez(path, x_train=images(x_train), y_train=y_train.argmax(1), x_test=images(x_test),
             y_test=y_test.argmax(1))
    return path, len(x_train), len(x_test)


def cli_epoch(dataset: str, seed: int, save_dir: Path, backend: str) -> dict[str, Any]:
    """`capsulenet.py --epochs 1` in a fresh process on Keras backend `backend`: its printed epoch
    seconds, the process's seconds and the validation accuracy of its `log.csv`."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, str(common.REPO_ROOT / "capsulenet.py"), "--epochs", "1",
                             "--dataset", dataset, "--seed", str(seed), "--save_dir", str(save_dir)],
                            capture_output=True, text=True, env=common.child_env({"KERAS_BACKEND": backend}),
                            cwd=common.REPO_ROOT)
    wall = time.perf_counter() - start
    found = EPOCH_LINE.findall(result.stdout)
    if result.returncode != 0 or not found:
        return {"error": common.last_line(result.stderr)}
    with open(save_dir / "log.csv") as f:
        header, row = f.read().splitlines()[:2]
    log = dict(zip(header.split(","), (float(v) for v in row.split(",")), strict=True))
    return {"epoch_s": float(found[-1]), "process_s": wall, "accuracy": log["val_capsnet_accuracy"]}


def original_main(dataset: str, seed: int) -> None:
    """Child process: one epoch of the original formulation through `model.fit`; prints JSON."""
    import keras
    import original_formulation as original

    from capsnet import datasets

    keras.utils.set_random_seed(seed)
    (x_train, y_train), (x_test, y_test) = datasets.load_dataset(dataset)
    steps = len(x_train) // common.BATCH
    built = common.build_original()
    batches = original.train_generator(x_train, y_train, common.BATCH, common.DEFAULTS.shift_fraction,
                                       seed=seed)
    start = time.perf_counter()
    history = built.model.fit(batches, steps_per_epoch=steps, epochs=1, verbose=0,
                              validation_data=((x_test, y_test), (y_test, x_test)), batch_size=common.BATCH)
    seconds = time.perf_counter() - start
    accuracy = [v for k, v in history.history.items() if k.startswith("val_") and "acc" in k][0][-1]
    print(json.dumps({"epoch_s": seconds, "accuracy": float(accuracy)}))


def versions(backends: Sequence[str]) -> str:
    from importlib.metadata import version

    names = ["keras", *(b for b in backends if importlib.util.find_spec(b) is not None)]
    return ", ".join(f"{name} {version(name)}" for name in names)


def render(results: dict[str, dict[str, Any]], meta: dict[str, Any]) -> str:
    """The RESULTS.md section: machine, date, one row per run, epoch times against the TensorFlow
    CLI's, and the TensorFlow CLI's speed-up over the original formulation.

    Args:
        results: `{"tensorflow": {...}, "jax": ..., "original": ...}`, each `{"epoch_s",
            "accuracy", ["process_s"]}` or `{"error"}`.
        meta: `machine`, `date`, `command`, `versions`, `train`, `test`.
    """
    lines = [f"### {meta['machine']}, {meta['date']}", "",
             f"Measured with `{meta['command']}` ({meta['train']} training images = "
             f"{meta['train'] // common.BATCH} steps of {common.BATCH}, {meta['test']} validation images, "
             f"{common.ROUTINGS} routings); {meta['versions']}.", ""]
    rows = []
    reference = results.get("tensorflow", {}).get("epoch_s")
    for name, run in results.items():
        label = "original formulation, `model.fit` (TensorFlow)" if name == "original" else f"CLI on {name}"
        if "error" in run:
            rows.append([label, f"failed: {run['error']}", "", "", ""])
            continue
        ratio = f"{run['epoch_s'] / reference:.2f}x" if reference else "-"
        process = f"{run['process_s']:.0f}" if "process_s" in run else "-"
        rows.append([label, f"{run['epoch_s']:.0f}", ratio, process, f"{run['accuracy']:.4f}"])
    lines += common.table(["run", "epoch s (training + validation)", "/ TensorFlow CLI's", "process s",
                           "val accuracy after 1 epoch"], rows)
    original = results.get("original", {}).get("epoch_s")
    if reference and original:
        lines += ["", f"Speed-up of the TensorFlow CLI's epoch over the original formulation's: "
                      f"**{original / reference:.2f}x**."]
    return "\n".join(lines) + "\n\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, help="MNIST as an .npz or IDX folder")
    parser.add_argument("--train", type=int, default=None, help="training images (default: all)")
    parser.add_argument("--test", type=int, default=None, help="validation images (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    parser.add_argument("--original", action="store_true",
                        help="also the original formulation's model.fit epoch (TensorFlow)")
    parser.add_argument("--write", action="store_true", help="rewrite this machine's section of RESULTS.md")
    parser.add_argument("--results", type=Path, default=common.RESULTS_PATH)
    parser.add_argument("--original_child", action="store_true", help=argparse.SUPPRESS)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.original_child:
        original_main(args.dataset, args.seed)
        return 0
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as folder:
        data, n_train, n_test = subset(args.dataset, args.train, args.test, Path(folder))
        for backend in args.backends:
            if importlib.util.find_spec(backend) is None:
                results[backend] = {"error": "not installed"}
                continue
            print(f"{backend}: capsulenet.py --epochs 1 ...", flush=True)
            results[backend] = cli_epoch(str(data), args.seed, Path(folder) / backend, backend)
            print(f"{backend}: {results[backend]}", flush=True)
        if args.original:
            print("original: model.fit, one epoch ...", flush=True)
            results["original"] = common.run_child("epoch.py", ["--dataset", str(data), "--seed",
                                                                str(args.seed), "--original_child"],
                                                   timeout=7200)
            print(f"original: {results['original']}", flush=True)
    shown = [a for a, before in zip(argv, ["", *argv[:-1]], strict=True)
             if a not in ("--write", "--results") and before != "--results"]
    meta = {"machine": common.machine_name(), "train": n_train, "test": n_test,
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "versions": versions(args.backends),
            "command": "python bench/epoch.py " + " ".join(shown)}
    section = render(results, meta)
    print(section)
    if args.write:
        common.write_section(args.results, "epoch", common.slug(f"{meta['machine']} {n_train} images"),
                             section, INTRO)
        print(f"Written to {args.results}")
    return 0 if all("error" not in run for run in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
