"""CapsNet (Sabour, Frosst & Hinton, "Dynamic Routing Between Capsules", NIPS 2017): the command line.

Trains CapsNet on MNIST (by default), Fashion-MNIST or local data, tests a trained model and draws how
each capsule dimension changes a reconstruction, classifies new images and exports the model. This
file reads and checks the flags and runs one function per mode (`run_train`, `run_test`, `run_predict`,
`run_export`), handing the flags' values to the `capsnet` package as plain parameters.

Usage:
    python capsulenet.py
    python capsulenet.py -t -w result/trained_model.h5 --dataset mnist.npz --digit 5 --explore
    python capsulenet.py -h
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from capsnet import datasets

# TensorFlow's C++ start-up lines (cuInit on GPU-less machines, CPU feature notes, absl's
# "before InitializeLog" warnings) are not for a person at a terminal; Python errors still show.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
with datasets.native_stderr_quiet():
    import keras

from capsnet import (
    autotune,  # noqa: E402
    deploy,  # noqa: E402
    errors,  # noqa: E402
    explore,  # noqa: E402
    multimnist,  # noqa: E402
    saving,  # noqa: E402
    training,  # noqa: E402
)
from capsnet.backup import Backup  # noqa: E402
from capsnet.errors import DataError, TrainingDivergedError, UserError  # noqa: E402
from capsnet.evaluation import manipulate_latent, test, test_two_digits  # noqa: E402, F401
from capsnet.layers import CONV_IMPLEMENTATIONS  # noqa: E402
from capsnet.losses import margin_loss  # noqa: E402, F401
from capsnet.model import CapsNet, two_digit_train_model  # noqa: E402, F401
from capsnet.training import train  # noqa: E402, F401

BACKUP_DIR = "backup"
# The backends with a training step in backends.py.
SUPPORTED_BACKENDS = ("tensorflow", "jax", "torch")
# Flags that must match for a run to resume where another stopped.
RESUME_FLAGS = ("batch_size", "lr", "lr_decay", "lam_recon", "routings", "shift_fraction", "dataset")


# ---------------------------------------------------------------------------------------------
# Flags
# ---------------------------------------------------------------------------------------------


def build_parser(description: str = "Capsule Network on MNIST.",
                 batch_size: int = training.DEFAULTS.batch_size) -> argparse.ArgumentParser:
    """The original's flags and defaults, plus `--dataset`, `--seed` and `--mixed_precision`."""
    defaults = training.DEFAULTS  # the one place the training defaults are written
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--epochs", default=defaults.epochs, type=int, help="Number of training epochs")
    parser.add_argument("--batch_size", default=batch_size, type=int, help="Images per training step")
    parser.add_argument("--lr", default=defaults.lr, type=float, help="Initial learning rate")
    parser.add_argument("--lr_decay", default=defaults.lr_decay, type=float,
                        help="The value multiplied by lr at each epoch. Set a larger value for "
                             "larger epochs")
    parser.add_argument("--lam_recon", default=defaults.lam_recon, type=float,
                        help="The coefficient for the loss of decoder")
    parser.add_argument("-r", "--routings", default=defaults.routings, type=int,
                        help="Number of iterations used in routing algorithm. should > 0")
    parser.add_argument("--shift_fraction", default=defaults.shift_fraction, type=float,
                        help="Fraction of pixels to shift at most in each direction.")
    parser.add_argument("--debug", action="store_true",
                        help="Save weights by TensorBoard (save_dir/tensorboard-logs)")
    parser.add_argument("--save_dir", default=defaults.save_dir, help="Where logs, weights and images go")
    parser.add_argument("-t", "--testing", action="store_true",
                        help="Test the trained model on testing dataset")
    parser.add_argument("--digit", default=5, type=int, help="Digit to manipulate")
    parser.add_argument("-w", "--weights", default=None,
                        help="The path of the saved weights (.weights.h5, .keras or legacy .h5). "
                             "Should be specified when testing")
    parser.add_argument("--dataset", default="mnist",
                        help="mnist, fashion_mnist, cifar10, a folder of images (train/<class>/, "
                             "optionally test/<class>/), a folder of the 4 MNIST-format IDX .gz files, "
                             "or an .npz with x_train, y_train, x_test, y_test")
    parser.add_argument("--seed", default=None, type=int,
                        help="Seed Python, NumPy, Keras and the augmentation for a repeatable run "
                             "(default: drawn at random)")
    parser.add_argument("--mixed_precision", nargs="?", const="auto", default=None, choices=("auto", "force"),
                        help="Compute convolutions and the decoder in bfloat16 (capsules stay float32) "
                             "where the device does bfloat16 natively and it measured faster, else say "
                             "so and train in float32; '--mixed_precision force' uses bfloat16 anyway")
    parser.add_argument("--conv_implementation", default="auto", choices=CONV_IMPLEMENTATIONS,
                        help="PrimaryCaps convolution: 'auto' times im2col and the library Conv2D once "
                             "per machine and keeps the faster (cached, autotune.py)")
    parser.add_argument("--multimnist", action="store_true",
                        help="Train and test on MultiMNIST (paper section 6): pairs of overlapping digits "
                             "of --dataset, 36x36, built on the fly")
    parser.add_argument("--multimnist_test_pairs", type=int, default=multimnist.DEFAULT_TEST_PAIRS,
                        metavar="K", help="With --multimnist: partners per test digit (the paper used 1000)")
    parser.add_argument("--image_size", nargs=2, type=int, metavar=("H", "W"), default=None,
                        help="Resize the images of a --dataset folder to H x W (default: they must "
                             "share one size)")
    parser.add_argument("--predict", nargs="+", metavar="PATH", default=None,
                        help="With -w: classify these image files or folders of images; prints one line "
                             "each, writes save_dir/predictions.csv and predictions.png")
    parser.add_argument("--invert", action="store_true",
                        help="With --predict: invert the images (1 - x), for dark strokes on a light "
                             "background; MNIST digits are light on dark")
    parser.add_argument("--export", choices=deploy.EXPORT_FORMATS, default=None,
                        help="With -w: export the eval model (x -> [capsule lengths, reconstruction]) "
                             "for serving, into save_dir")
    parser.add_argument("--model", default="capsnet", choices=("capsnet", "baseline"),
                        help="'baseline': train the paper's baseline CNN (section 5: three 5x5 convolutions, "
                             "dense 328 and 192, dropout, softmax) instead, with the same data, shifts, "
                             "optimizer and epochs")
    parser.add_argument("--steps_per_execution", default=1, type=int, metavar="K",
                        help="Training steps per compiled call (JAX: a lax.scan over K batches; TensorFlow: "
                             "a graph loop): the same steps, fewer dispatches, for fast GPUs")
    parser.add_argument("--explore", action="store_true",
                        help="With -t: also write save_dir/explore.html, one page (no server needed) with "
                             "sliders for each test image's capsule and its reconstruction redrawn live")
    return parser


def validate_args(args: argparse.Namespace, extra: Sequence[tuple[str, bool, str]] = ()) -> None:
    """Checks every flag before any long work.

    Args:
        args: the parsed flags.
        extra: more `(flag, ok, rule)` checks (the multi-GPU script's `--gpus`).

    Raises:
        UserError: naming the first bad flag, its value and its range.
    """
    checks = [
        ("--epochs", args.epochs >= 1, "must be >= 1"),
        ("--batch_size", args.batch_size >= 1, "must be >= 1"),
        ("-r/--routings", args.routings >= 1, "must be >= 1"),
        ("--lr", math.isfinite(args.lr) and args.lr > 0, "must be > 0"),
        ("--lr_decay", 0 < args.lr_decay <= 1, "must be in (0, 1]"),
        ("--lam_recon", math.isfinite(args.lam_recon) and args.lam_recon >= 0, "must be >= 0"),
        ("--shift_fraction", 0 <= args.shift_fraction < 0.5, "must be in [0, 0.5)"),
        ("--digit", args.digit >= 0, "must be >= 0"),
        ("--seed", args.seed is None or 0 <= args.seed < 2**31, "must be in [0, 2**31)"),
        ("--multimnist_test_pairs", args.multimnist_test_pairs >= 1, "must be >= 1"),
        ("--steps_per_execution", args.steps_per_execution >= 1, "must be >= 1"),
        *extra,
    ]
    for flag, ok, rule in checks:
        if not ok:
            value = getattr(args, flag.split("--")[-1])
            raise UserError(f"{flag} {value}: {rule}")
    backend = keras.backend.backend()
    if backend not in SUPPORTED_BACKENDS:
        raise UserError(f"KERAS_BACKEND={backend}: not supported; this project trains and tests on "
                        "tensorflow (the default), jax (KERAS_BACKEND=jax) or torch (KERAS_BACKEND=torch)")
    if args.image_size is not None and min(args.image_size) < 1:
        raise UserError(f"--image_size {args.image_size[0]} {args.image_size[1]}: must be positive")
    for flag, used in (("--predict", args.predict is not None), ("--export", args.export is not None)):
        if used and args.weights is None:
            raise UserError(f"{flag}: needs the trained model, -w FILE (e.g. -w result/trained_model.keras)")
    baseline_refuses = [flag for flag, used in (("-t", args.testing), ("--multimnist", args.multimnist),
                                                ("--predict", args.predict is not None),
                                                ("--export", args.export is not None)) if used]
    if args.model == "baseline" and baseline_refuses:
        raise UserError(f"--model baseline: trains on single digits only (its test error is the "
                        f"val_capsnet_accuracy of log.csv); drop {baseline_refuses[0]}")
    if args.explore and not args.testing:
        raise UserError("--explore: draws a tested model's capsules; add -t (and -w FILE)")
    if args.weights is not None and not os.path.isfile(saving.resolve_weights_path(args.weights)):
        raise UserError(f"-w {args.weights}: no such file")
    if args.debug and not args.testing:
        try:  # the event writer needs it; without it the run would crash after its first epoch
            import tensorboard  # noqa: F401
        except ImportError as e:
            raise UserError("--debug: TensorBoard logs need the tensorboard package "
                            "(pip install tensorboard)") from e
    _check_writable(args.save_dir)


def _check_writable(save_dir: str) -> None:
    try:
        os.makedirs(save_dir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=save_dir):
            pass
    except OSError as e:
        raise UserError(f"--save_dir {save_dir}: not writable ({e.strerror})") from e


def check_data(args: argparse.Namespace, data: datasets.Dataset) -> None:
    """Checks the flags that depend on the data."""
    (x_train, y_train), _ = data
    n_class = y_train.shape[1]
    if args.testing and args.digit >= n_class:  # only -t draws the manipulation plot
        raise UserError(f"--digit {args.digit}: must be in 0..{n_class - 1} for this dataset")
    training_run = not args.testing and args.predict is None and args.export is None
    if training_run and args.batch_size > len(x_train):
        raise UserError(f"--batch_size {args.batch_size}: larger than the {len(x_train)} training "
                        "images")
    if min(x_train.shape[1:3]) < 25:
        raise UserError(f"--dataset {args.dataset}: images of {x_train.shape[1:3]} are too small "
                        "for two 9x9 convolutions (need at least 25x25)")


def setup(args: argparse.Namespace) -> tuple[datasets.Dataset, list[str]]:
    """Draws a seed if none was given (into `args.seed`, so that backups record it), seeds every
    generator, sets the precision policy and loads the data and its class names."""
    if args.seed is None:
        args.seed = int(np.random.default_rng().integers(2**31))
    keras.utils.set_random_seed(args.seed)
    if args.mixed_precision:
        policy = autotune.precision_policy(args.mixed_precision, args.batch_size)  # float32 if bf16 is slow
        keras.mixed_precision.set_global_policy(policy)
    image_size = tuple(args.image_size) if args.image_size else None
    try:
        data, class_names = datasets.load_labelled_dataset(args.dataset, image_size=image_size,
                                                           seed=args.seed)
    except DataError as e:
        raise UserError(str(e)) from e
    check_data(args, data)
    return data, class_names


def train_config(args: argparse.Namespace) -> training.TrainConfig:
    """What the training loop reads, from the flags of the same names."""
    return training.TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                                lr_decay=args.lr_decay, lam_recon=args.lam_recon, routings=args.routings,
                                shift_fraction=args.shift_fraction, seed=args.seed,
                                save_dir=args.save_dir, debug=args.debug,
                                steps_per_execution=args.steps_per_execution)


def input_shape(args: argparse.Namespace, x_train: np.ndarray) -> tuple[int, int, int]:
    """The model's `(rows, cols, channels)`: the data's, or with `--multimnist` each digit padded by
    `multimnist.PAD` on every side."""
    rows, cols, channels = (int(d) for d in x_train.shape[1:])
    if args.multimnist:
        rows, cols = rows + 2 * multimnist.PAD, cols + 2 * multimnist.PAD
    return rows, cols, channels


# ---------------------------------------------------------------------------------------------
# Modes
# ---------------------------------------------------------------------------------------------


def run(args: argparse.Namespace, strategy: Any = None, is_chief: bool = True, backup_dir: str | None = None,
        on_model: Callable[[keras.Model], None] | None = None) -> None:
    """The body of both scripts, after their flags were validated: runs the mode the flags ask for.

    Args:
        args: the parsed flags.
        strategy: TensorFlow only: the `tf.distribute` strategy to train under (default: one device).
        is_chief: whether this process writes the user-facing files (multi-worker runs).
        backup_dir: this process' backup folder (default `save_dir/backup`).
        on_model: called on the chief with the train model once it is built (e.g. to draw `model.png`).
    """
    if args.predict is not None or args.export is not None:  # both may be asked for at once
        eval_model, class_names = load_trained_model(args)
        if args.export is not None:
            run_export(args, eval_model)
        if args.predict is not None:
            run_predict(args, eval_model, class_names)
        return
    data, class_names = setup(args)
    if args.testing:
        run_test(args, data, class_names, is_chief=is_chief, on_model=on_model)
    else:
        run_train(args, data, class_names, strategy=strategy, is_chief=is_chief, backup_dir=backup_dir,
                  on_model=on_model)


def run_train(args: argparse.Namespace, data: datasets.Dataset, class_names: Sequence[str],
              strategy: Any = None, is_chief: bool = True, backup_dir: str | None = None,
              on_model: Callable[[keras.Model], None] | None = None) -> None:
    """Trains a CapsNet on `data` (`--multimnist`: on pairs of its digits), resuming a backed-up run.

    Writes into `--save_dir` what `training.train` writes, then (the chief) `trained_model.keras` and
    `class_names.json`.
    """
    config = train_config(args)
    (x_train, y_train), _ = data
    built = training.build(input_shape(args, x_train), y_train.shape[1], config,
                           training.steps_per_epoch(len(x_train), config.batch_size), strategy=strategy,
                           two_digits=args.multimnist, model=args.model)
    _show_and_load(args, built.model, is_chief, on_model)
    replicas = strategy.num_replicas_in_sync if strategy is not None else 1
    per_device = max(1, config.batch_size // replicas)
    autotune.tune_model(built.model, per_device, explicit=args.conv_implementation)
    autotune.warn_if_slow_backend(built.model, per_device)
    flags = {k: getattr(args, k) for k in RESUME_FLAGS}
    if args.multimnist:  # only then: backups of single-digit runs made before this flag still resume
        flags.update(multimnist=True, multimnist_test_pairs=args.multimnist_test_pairs)
    if args.model != "capsnet":  # the same: CapsNet backups made before --model still resume
        flags.update(model=args.model)
    backup = Backup(backup_dir or Path(args.save_dir) / BACKUP_DIR, flags=flags)
    batcher = (multimnist.PairBatcher(config.batch_size, args.multimnist_test_pairs) if args.multimnist
               else None)
    training.train(built, data, config, backup, is_chief=is_chief, batcher=batcher)
    if is_chief:
        saving.save_model(built.eval_model, Path(args.save_dir) / "trained_model.keras")
        datasets.save_class_names(Path(args.save_dir) / datasets.DEFAULT_CLASS_NAMES_FILE, class_names)
        outputs = "probabilities" if args.model == "baseline" else "[lengths, reconstruction]"
        print(f"Full model (x -> {outputs}) saved to "
              f"'{args.save_dir}/trained_model.keras', its class names to "
              f"'{args.save_dir}/{datasets.DEFAULT_CLASS_NAMES_FILE}'")


def run_test(args: argparse.Namespace, data: datasets.Dataset, class_names: Sequence[str],
             is_chief: bool = True, on_model: Callable[[keras.Model], None] | None = None) -> None:
    """`-t`: the model of `-w` (random weights without it) on the test set of `data` (`--multimnist`:
    on its test pairs): the manipulation plot of `--digit`, then the test accuracy and picture; with
    `--explore` also the capsule explorer page."""
    (x_train, y_train), (x_test, y_test) = data
    model, eval_model, manipulate_model = CapsNet(input_shape(args, x_train), y_train.shape[1], args.routings)
    _show_and_load(args, model, is_chief, on_model)
    autotune.tune_model(model, args.batch_size, explicit=args.conv_implementation)
    if args.weights is None:
        print("No weights are provided. Will test using random initialized weights.")
    if not is_chief:
        return
    if args.multimnist:
        pairs = multimnist.test_pairs(x_test, y_test, args.multimnist_test_pairs)
        first = np.eye(y_test.shape[1], dtype="float32")[pairs.labels[:, 0]]
        manipulate_latent(manipulate_model, (pairs.x, first), args.digit, args.save_dir)
        test_two_digits(eval_model, pairs, args.batch_size, args.save_dir)
    else:
        manipulate_latent(manipulate_model, (x_test, y_test), args.digit, args.save_dir)
        test(eval_model, (x_test, y_test), args.batch_size, args.save_dir)
    if args.explore:
        shown = (pairs.x, pairs.labels) if args.multimnist else (x_test, np.argmax(y_test, 1))
        explore.save_explorer(eval_model, *shown, class_names, args.save_dir, args.dataset, args.weights)


def run_predict(args: argparse.Namespace, eval_model: keras.Model, class_names: Sequence[str]) -> None:
    """`--predict`: classifies the images of `--predict` with the eval model of `-w`.

    Raises:
        UserError: any image could not be read (after predicting all the others).
    """
    try:
        deploy.predict_images(eval_model, args.predict, class_names, invert=args.invert,
                              save_dir=args.save_dir, batch_size=args.batch_size)
    except DataError as e:
        raise UserError(str(e)) from e


def run_export(args: argparse.Namespace, eval_model: keras.Model) -> None:
    """`--export`: writes the eval model of `-w` into `--save_dir` in the format `--export` names."""
    deploy.export_model(eval_model, args.export, args.save_dir)


def load_trained_model(args: argparse.Namespace) -> tuple[keras.Model, list[str]]:
    """The eval model of `-w` and its class names, for `--predict` and `--export`.

    A `.keras` file holds the whole model; a weights file is loaded into a model built for `--dataset`
    (as `-t` does). Class names come from `class_names.json` beside the `-w` file, else the dataset.

    Raises:
        UserError: the file cannot be loaded, or `class_names.json` is malformed.
    """
    try:
        return deploy.load_eval_model(args.weights, build=lambda: _eval_model_for_dataset(args))
    except DataError as e:
        raise UserError(str(e)) from e


def _eval_model_for_dataset(args: argparse.Namespace) -> tuple[keras.Model, list[str]]:
    """The eval model for `--dataset`'s shape and classes with `-w`'s weights, and the class names."""
    data, class_names = setup(args)
    (x_train, y_train), _ = data
    model, eval_model, _ = CapsNet(x_train.shape[1:], y_train.shape[1], args.routings)
    print(f"Loaded weights from {saving.load_weights(model, args.weights)}")
    return eval_model, class_names


def _show_and_load(args: argparse.Namespace, model: keras.Model, is_chief: bool,
                   on_model: Callable[[keras.Model], None] | None) -> None:
    """Prints the train model's summary and hands it to `on_model` (the chief), then loads `-w` into it."""
    if is_chief:
        model.summary()
        if on_model is not None:
            on_model(model)
    if args.weights is not None:
        print(f"Loaded weights from {saving.load_weights(model, args.weights)}")


def main(argv: Sequence[str] | None = None, parser: argparse.ArgumentParser | None = None,
         runner: Callable[[argparse.Namespace], None] | None = None) -> int:
    """Parses `argv`, runs, and turns user errors into one line and an exit code.

    Args:
        argv: the flags (default: `sys.argv[1:]`).
        parser: the parser (default: `build_parser()`).
        runner: what to run with the parsed flags (default: validate them, then `run`).

    Returns:
        0, or the exit code of `errors`: 1 OS error, 2 bad input, 3 diverged, 130 interrupted.
    """
    args = (parser or build_parser()).parse_args(argv)
    # A polite kill (SIGTERM) ends like Ctrl-C: a message, and the last completed epoch kept. The
    # caller's handler comes back on return (main also runs inside other programs, e.g. pytest).
    previous_handler = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        (runner or _validate_and_run)(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return errors.EXIT_BAD_INPUT
    except TrainingDivergedError as e:
        print(f"error: training stopped, {e}; the last good checkpoint and backup in "
              f"{args.save_dir} are untouched", file=sys.stderr)
        return errors.EXIT_DIVERGED
    except KeyboardInterrupt:
        print(f"\ninterrupted: rerun the same command to resume from the last completed epoch "
              f"(state in {args.save_dir}/{BACKUP_DIR})", file=sys.stderr)
        return errors.EXIT_INTERRUPTED
    except OSError as e:  # a full disk or a vanished folder: say which file, keep the good ones
        print(f"error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return errors.EXIT_OS_ERROR
    finally:
        # None: the handler was not set from Python; the default is the closest one can restore.
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous_handler is None else previous_handler)
    return 0


def _validate_and_run(args: argparse.Namespace) -> None:
    validate_args(args)
    run(args)


def _raise_keyboard_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
