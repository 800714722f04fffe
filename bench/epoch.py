"""One real MNIST epoch, end to end: this project's command line beside the original formulation's `fit`.

Both run in one invocation, one after the other, each in its own fresh process, on the same data
(60k training images with shifts, validation on the 10k test images, batch 100, 3 routings, the
defaults):

- `product`: `python capsulenet.py --epochs 1 --dataset DATA --seed SEED` as a user runs it; its
  epoch time is the one it prints (`123s - loss: ...`, training + validation), its accuracy the
  `val_capsnet_accuracy` of its `log.csv` (the test set doubles as validation data, as in the original);
- `original`: `bench/original_formulation.py`'s model (tiled `u_hat`, `map_fn`, `Lambda(squash)`),
  compiled like the original and trained by `model.fit` for one epoch on the original's Python
  generator (per-image shifts), with the same validation data; its epoch time is `fit`'s wall time.

Usage:
    python bench/epoch.py --dataset ../shared/data/mnist.npz            # about 25 min on 2 cores
    python bench/epoch.py --dataset ../shared/data/mnist.npz --write    # also into bench/RESULTS.md

The machine should be otherwise idle: a run in parallel skews both times (not their order).
"""

from __future__ import annotations

import argparse
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

EPOCH_LINE = re.compile(r"^(\d+)s - loss: ", re.MULTILINE)
INTRO = ("\n## One MNIST epoch end to end (`python bench/epoch.py`)\n\n"
         "This project's CLI and the original formulation's `fit`, one real epoch each, in one run.\n\n")


def product_epoch(dataset: str, seed: int, save_dir: Path, backend: str | None = None) -> dict[str, Any]:
    """`capsulenet.py --epochs 1` in a fresh process (on Keras backend `backend`, default the
    environment's): its printed epoch seconds, the process's seconds and the validation accuracy of
    its `log.csv`."""
    start = time.perf_counter()
    env = common.child_env({"KERAS_BACKEND": backend} if backend else None)
    result = subprocess.run([sys.executable, str(common.REPO_ROOT / "capsulenet.py"), "--epochs", "1",
                             "--dataset", dataset, "--seed", str(seed), "--save_dir", str(save_dir)],
                            capture_output=True, text=True, env=env, cwd=common.REPO_ROOT)
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
    common.use_repo()
    import keras
    import original_formulation as original

    import capsulenet
    from capsnet import datasets, training

    keras.utils.set_random_seed(seed)
    (x_train, y_train), (x_test, y_test) = datasets.load_dataset(dataset)
    steps = len(x_train) // common.BATCH
    model, _, _ = original.OriginalCapsNet(x_train.shape[1:], y_train.shape[1], routings=common.ROUTINGS)
    capsulenet.compile_like_original(model, training.make_optimizer(0.001, 0.9, steps), lam_recon=0.392)
    batches = original.train_generator(x_train, y_train, common.BATCH, shift_fraction=0.1, seed=seed)
    start = time.perf_counter()
    history = model.fit(batches, steps_per_epoch=steps, epochs=1, verbose=0,
                        validation_data=((x_test, y_test), (y_test, x_test)), batch_size=common.BATCH)
    seconds = time.perf_counter() - start
    accuracy = [v for k, v in history.history.items() if k.startswith("val_") and "acc" in k][0][-1]
    print(json.dumps({"epoch_s": seconds, "accuracy": float(accuracy)}))


def render(results: dict[str, Any], argv: Sequence[str]) -> str:
    """The RESULTS.md section: machine, date, both epochs and their ratio."""
    product, original = results["product"], results["original"]
    lines = [f"### {common.cpu_model()} ({common.cpu_cores()} cores), {results['date']}", "",
             f"Measured with `python bench/epoch.py {' '.join(argv)}`; {results['versions']}.", "",
             "| formulation | epoch s (training + validation) | test accuracy after 1 epoch |",
             "|---|---:|---:|"]
    for name, run in (("this project's CLI", product), ("original formulation, `model.fit`", original)):
        if "error" in run:
            lines.append(f"| {name} | failed: {run['error']} | |")
        else:
            lines.append(f"| {name} | {run['epoch_s']:.0f} | {run['accuracy']:.4f} |")
    if "error" not in product and "error" not in original:
        lines += ["", f"Speed-up of the CLI's epoch over the original's: "
                      f"**{original['epoch_s'] / product['epoch_s']:.2f}x**. The CLI process took "
                      f"{product['process_s']:.0f} s in all (start-up, data loading and saving included)."]
    return "\n".join(lines) + "\n\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, help="MNIST as an .npz or IDX folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--write", action="store_true", help="put the result into bench/RESULTS.md")
    parser.add_argument("--original_child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.original_child:
        original_main(args.dataset, args.seed)
        return 0
    common.use_repo()
    import report

    results: dict[str, Any] = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    results["versions"] = common.run_child_code(
        "import json, keras, numpy, tensorflow as tf; print(json.dumps({'v': f'TensorFlow {tf.__version__}, "
        "Keras {keras.__version__}, NumPy {numpy.__version__}'}))").get("v", "versions unknown")
    with tempfile.TemporaryDirectory() as tmp:
        print("product: capsulenet.py --epochs 1 ...", flush=True)
        results["product"] = product_epoch(args.dataset, args.seed, Path(tmp) / "product")
        print(json.dumps(results["product"]), flush=True)
    print("original: model.fit, one epoch ...", flush=True)
    results["original"] = common.run_child("epoch.py", ["--dataset", args.dataset, "--seed", str(args.seed),
                                                        "--original_child"], timeout=7200)
    print(json.dumps(results["original"]), flush=True)
    argv_text = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--write"]
    section = render(results, argv_text)
    print(section)
    if args.write:
        report.write_section(common.RESULTS_PATH, "epoch", common.machine_key(common.cpu_model()), section,
                             INTRO)
    return 0 if "error" not in results["product"] and "error" not in results["original"] else 1


if __name__ == "__main__":
    sys.exit(main())
