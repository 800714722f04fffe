"""Regenerates the picture gallery of `result/` (README: test section) from one weights file.

The original project's README shows what a trained CapsNet does: its reconstructions, how each capsule
dimension changes a digit, the training curves and the model diagram. This script redraws all of them
in one run, so that a better model replaces every picture in one step:

- `real_and_recon.png`: 50 test images (top five rows) and their reconstructions (bottom five rows),
  280x280 for 28x28 data (`capsulenet.test`);
- `manipulate-0.png` ... `manipulate-{n_class-1}.png`: one test sample per class, row i adds -0.25,
  -0.2, ..., 0.25 to capsule dimension i, 448x308 for 28x28 data (`capsulenet.manipulate_latent`);
- `log.png`: the loss and accuracy curves of `--log` (`plots.plot_log`; the csv is copied beside it);
- `model.png`: the train model's diagram (`plots.plot_model`; needs pydot and graphviz, otherwise a
  note says so and the rest of the gallery is still written);
- `gallery.json`: the weights file, dataset, test accuracy, epochs (from `--log`) and date, the facts
  that the README's captions state.

The samples drawn for the manipulation grids come from a generator seeded with `--seed`: the same
weights, data and seed give the same gallery.

Usage:
    python experiments/gallery.py -w result/trained_model.weights.h5 --dataset ../shared/data/mnist.npz \\
        --log result/log.csv
    python experiments/gallery.py -w run/trained_model.keras --dataset fashion_mnist --out gallery \\
        --log run/log.csv --caption "CapsNet-v4, 50 epochs"
    python experiments/gallery.py -h
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# The project's modules live in the repository root, one folder up; the script may run from anywhere.
REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402

import capsulenet  # noqa: E402
from capsnet import atomic, datasets, errors, plots, saving, training  # noqa: E402
from capsnet.errors import UserError  # noqa: E402

SUMMARY_FILE = "gallery.json"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Redraw the result/ gallery from a trained CapsNet.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("-w", "--weights", required=True,
                        help="The trained weights (.weights.h5, .keras or legacy .h5), as for "
                             "capsulenet.py -t")
    parser.add_argument("--dataset", default="mnist",
                        help="The data the model was trained on, as capsulenet.py's --dataset takes it "
                             "(offline MNIST: ../shared/data/mnist.npz)")
    parser.add_argument("--out", default="result", help="Where the pictures and gallery.json go")
    parser.add_argument("--log", default=None,
                        help="The log.csv of the training run, drawn as log.png; without it no log.png")
    parser.add_argument("--caption", default=None,
                        help="Caption recorded in gallery.json; without it: routings, epochs, test accuracy")
    parser.add_argument("-r", "--routings", default=training.DEFAULTS.routings, type=int,
                        help="Routing iterations of the trained model")
    parser.add_argument("--batch_size", default=training.DEFAULTS.batch_size, type=int,
                        help="Images per prediction batch")
    parser.add_argument("--seed", default=0, type=int,
                        help="Seed of the choice of the manipulated samples")
    return parser


def log_epochs(path: str) -> int:
    """The number of epochs a training `log.csv` records (its `epoch` column counts from 0).

    Raises:
        UserError: the file is missing or is not a log of this CLI.
    """
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        return int(max(float(row["epoch"]) for row in rows)) + 1
    except OSError as e:
        raise UserError(f"--log {path}: cannot be read ({e.strerror})") from e
    except (KeyError, ValueError, TypeError) as e:  # no `epoch` column, no rows, or not numbers
        raise UserError(f"--log {path}: not a log.csv of capsulenet.py (needs an epoch column and "
                        "one row per epoch)") from e


def check_args(args: argparse.Namespace) -> int | None:
    """Checks every flag and file before the data is loaded (minutes for MNIST on a CPU).

    Returns:
        the epochs of `--log`, or None without it.

    Raises:
        UserError: naming the first bad flag or file.
    """
    if args.routings < 1:
        raise UserError(f"-r/--routings {args.routings}: must be >= 1")
    if args.batch_size < 1:
        raise UserError(f"--batch_size {args.batch_size}: must be >= 1")
    if args.seed < 0:
        raise UserError(f"--seed {args.seed}: must be >= 0")
    # saving.load_weights says the same later; here it costs no data loading.
    if not os.path.isfile(saving.resolve_weights_path(args.weights)):
        raise UserError(f"-w {args.weights}: no such file")
    epochs = log_epochs(args.log) if args.log is not None else None
    try:
        os.makedirs(args.out, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=args.out):
            pass
    except OSError as e:
        raise UserError(f"--out {args.out}: not writable ({e.strerror})") from e
    return epochs


def load_data(args: argparse.Namespace) -> datasets.Dataset:
    """The dataset, checked as `capsulenet.py -t` checks it, and with every class in the test set
    (one manipulation grid per class), before any picture is written."""
    try:
        data = datasets.load_dataset(args.dataset)
    except datasets.DataError as e:
        raise UserError(str(e)) from e
    capsulenet.check_data(argparse.Namespace(digit=0, testing=True, batch_size=args.batch_size,
                                             dataset=args.dataset), data)
    (_, y_train), (_, y_test) = data
    missing = sorted(set(range(y_train.shape[1])) - set(np.argmax(y_test, 1).tolist()))
    if missing:
        raise UserError(f"--dataset {args.dataset}: the test set holds no sample of class "
                        f"{', '.join(map(str, missing))}; each class needs one for its manipulate-N.png")
    return data


def draw_log(log: str, out: Path) -> Path:
    """Copies `log` into `out` (unless it is already there) and draws `out/log.png` beside it."""
    target = out / "log.csv"
    if not (target.exists() and os.path.samefile(log, target)):
        with atomic.atomic_path(target) as tmp:
            shutil.copyfile(log, tmp)
    try:
        return Path(plots.plot_log(target))
    except (KeyError, ValueError) as e:  # pandas: a column missing, or a value that is no number
        raise UserError(f"--log {log}: cannot be plotted ({e})") from e


def make_gallery(args: argparse.Namespace) -> dict[str, Any]:
    """Writes every picture and `gallery.json` into `args.out`; returns what gallery.json holds."""
    epochs = check_args(args)
    out = Path(args.out)
    data = load_data(args)
    (x_train, y_train), test_data = data
    n_class = y_train.shape[1]
    # The models as the command line builds them (the optimizer and step come along, unused here).
    config = dataclasses.replace(training.DEFAULTS, routings=args.routings, batch_size=args.batch_size)
    train_model, eval_model, manipulate_model, *_ = training.build(x_train.shape[1:], n_class, config)
    loaded = saving.load_weights(train_model, args.weights)
    print(f"Loaded weights from {loaded}")

    written = []
    accuracy = capsulenet.test(eval_model, test_data, args.batch_size, out)
    written.append("real_and_recon.png")
    # One generator for all the grids, so the whole gallery depends on --seed alone.
    rng = np.random.default_rng(args.seed)
    for digit in range(n_class):
        capsulenet.manipulate_latent(manipulate_model, test_data, digit, out, rng)
        written.append(f"manipulate-{digit}.png")
    if args.log is not None:
        written.append(draw_log(args.log, out).name)
    else:
        print("No --log given: log.png not drawn")
    model_drawn = plots.plot_model(train_model, out / "model.png")
    if model_drawn:
        written.append("model.png")
    else:
        print("gallery: model.png skipped (pydot and graphviz are optional); the other pictures are written")

    caption = args.caption or (f"CapsNet, {args.routings} routing{'s' * (args.routings != 1)}"
                               + (f", {epochs} epochs" if epochs is not None else "")
                               + f", test accuracy {accuracy:.2%}")
    summary = {
        "weights": Path(loaded).name,
        "dataset": args.dataset,
        "test_images": int(len(test_data[0])),
        "test_accuracy": accuracy,
        "epochs": epochs,
        "routings": args.routings,
        "seed": args.seed,
        "date": datetime.datetime.now(datetime.timezone.utc).date().isoformat(),
        "caption": caption,
        "model_png": model_drawn,
        "files": written,
    }
    atomic.write_text_atomic(out / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
    print(f"Gallery: {len(written)} pictures and {SUMMARY_FILE} in {out} ({caption})")
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    """Parses `argv`, draws the gallery, and turns errors into one line and an exit code, as
    `capsulenet.main` does: 2 bad flags, files or data, 1 OS error, 130 interrupted."""
    args = build_parser().parse_args(argv)
    try:
        make_gallery(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return errors.EXIT_BAD_INPUT
    except KeyboardInterrupt:
        # Every picture is written through a temporary file, so each one on disk is whole.
        print("\ninterrupted: the gallery may be incomplete; rerun the same command", file=sys.stderr)
        return errors.EXIT_INTERRUPTED
    except OSError as e:
        print(f"error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return errors.EXIT_OS_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
