"""Keras 3 implementation of CapsNet (Sabour, Frosst & Hinton, NIPS 2017).

The current version trains CapsNet on MNIST (by default), Fashion-MNIST or local data, tests a trained
model and draws how each capsule dimension changes a reconstruction. This file holds the model, the
test, the manipulation plot and the command line; the training loop is in `training.py`, its resumable
state in `backup.py`, weight files in `saving.py` (README: "Layout").

Usage:
    python capsulenet.py
    python capsulenet.py --epochs 50 --routings 3
    python capsulenet.py -t -w result/trained_model.weights.h5 --digit 5
    python capsulenet.py -h

Result: about 99.66% test accuracy on MNIST after 50 epochs in the original project (see README.md for
what this port measured, on what data and machine).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

import utils

# TensorFlow's C++ start-up lines (cuInit on GPU-less machines, CPU feature notes, absl's
# "before InitializeLog" warnings) are not for a person at a terminal; Python errors still show.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
with utils.native_stderr_quiet():
    import keras
from keras import layers  # noqa: E402

import backends  # noqa: E402
import deploy  # noqa: E402
import errors  # noqa: E402
import image_folder  # noqa: E402
import losses  # noqa: E402
import multimnist  # noqa: E402
import saving  # noqa: E402
import training  # noqa: E402
from backup import Backup  # noqa: E402
from capsulelayers import CapsuleLayer, Length, Mask, PrimaryCap  # noqa: E402
from errors import TrainingDivergedError, UserError  # noqa: E402
from losses import margin_loss  # noqa: E402, F401 - the original's public name

CAPSULE_DIM = 16
# Offsets added to one capsule dimension in the manipulation plot: -0.25, -0.2, ..., 0.25.
PERTURBATIONS = np.round(np.arange(-0.25, 0.25 + 1e-9, 0.05), 2)
BACKUP_DIR = "backup"
# The backends with a training step in backends.py.
SUPPORTED_BACKENDS = ("tensorflow", "jax", "torch")
# Flags that must match for a run to resume where another stopped.
RESUME_FLAGS = ("batch_size", "lr", "lr_decay", "lam_recon", "routings", "shift_fraction", "dataset")


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------


def CapsNet(  # noqa: N802 - the original's public name
    input_shape: Sequence[int], n_class: int, routings: int
) -> tuple[keras.Model, keras.Model, keras.Model]:
    """A Capsule Network.

    Args:
        input_shape: data shape, 3D `[rows, cols, channels]`, e.g. `[28, 28, 1]`.
        n_class: number of classes.
        routings: number of routing iterations, at least 1.

    Returns:
        `train_model` (`[x, y] -> [lengths, reconstruction]`, the decoder masked by the true label),
        `eval_model` (`x -> [lengths, reconstruction]`, masked by the longest capsule) and
        `manipulate_model` (`[x, y, noise [n_class, 16]] -> reconstruction of digitcaps + noise`),
        all three sharing their layers.
    """
    input_shape = tuple(int(d) for d in input_shape)
    # Under a mixed-precision policy the capsules stay float32: a fresh model's capsule lengths are
    # ~1e-7 and their squares would underflow in float16.
    caps_dtype = "float32" if keras.mixed_precision.global_policy().name.startswith("mixed") else None
    x = layers.Input(shape=input_shape, name="input_image")

    # Layer 1: a conventional Conv2D layer. [batch, 20, 20, 256]
    conv1 = layers.Conv2D(256, 9, strides=1, padding="valid", activation="relu", name="conv1")(x)
    # Layer 2: Conv2D with `squash`, grouped into capsules. [batch, 1152, 8]
    primarycaps = PrimaryCap(conv1, dim_capsule=8, n_channels=32, kernel_size=9, strides=2,
                             padding="valid")
    # Layer 3: capsule layer with dynamic routing. [batch, n_class, 16]
    digitcaps = CapsuleLayer(num_capsule=n_class, dim_capsule=CAPSULE_DIM, routings=routings,
                             name="digitcaps", dtype=caps_dtype)(primarycaps)
    # Layer 4: each capsule's length, the class probability. [batch, n_class]
    out_caps = Length(name="capsnet", dtype=caps_dtype)(digitcaps)

    # Decoder network.
    y = layers.Input(shape=(n_class,), name="input_label")
    masked_by_y = Mask(name="mask_by_label", dtype=caps_dtype)([digitcaps, y])
    masked = Mask(name="mask_by_length", dtype=caps_dtype)(digitcaps)
    decoder = keras.Sequential(
        [
            layers.Input(shape=(CAPSULE_DIM * n_class,)),
            layers.Dense(512, activation="relu"),
            layers.Dense(1024, activation="relu"),
            layers.Dense(math.prod(input_shape), activation="sigmoid", dtype=caps_dtype),
            layers.Reshape(target_shape=input_shape, name="out_recon"),
        ],
        name="decoder",
    )

    train_model = keras.Model([x, y], [out_caps, decoder(masked_by_y)], name="capsnet_train")
    eval_model = keras.Model(x, [out_caps, decoder(masked)], name="capsnet_eval")

    # Manipulate model: perturb the capsules, then decode the label's capsule.
    noise = layers.Input(shape=(n_class, CAPSULE_DIM), name="input_noise")
    noised_digitcaps = layers.Add(name="add_noise")([digitcaps, noise])
    masked_noised_y = Mask(name="mask_noised", dtype=caps_dtype)([noised_digitcaps, y])
    manipulate_model = keras.Model([x, y, noise], decoder(masked_noised_y), name="capsnet_manipulate")
    return train_model, eval_model, manipulate_model


def two_digit_train_model(train_model: keras.Model) -> keras.Model:
    """The MultiMNIST train model (paper section 6), sharing every layer of `train_model`.

    `[x, y_first, y_second] -> [lengths, reconstruction of first, reconstruction of second]`: each digit
    is decoded from its own capsule, masked by its own one-hot label `[batch, n_class]`.
    """
    digitcaps = train_model.get_layer("digitcaps")
    decoder = train_model.get_layer("decoder")
    n_class = digitcaps.num_capsule
    dtype = digitcaps.dtype_policy
    y_first = layers.Input(shape=(n_class,), name="input_label_first")
    y_second = layers.Input(shape=(n_class,), name="input_label_second")
    recon_first = decoder(Mask(name="mask_first", dtype=dtype)([digitcaps.output, y_first]))
    recon_second = decoder(Mask(name="mask_second", dtype=dtype)([digitcaps.output, y_second]))
    return keras.Model([train_model.inputs[0], y_first, y_second],
                       [train_model.get_layer("capsnet").output, recon_first, recon_second],
                       name="capsnet_train_two_digits")


def compile_like_original(model: keras.Model, optimizer: Any, lam_recon: float) -> None:
    """Compiles the train model as the original did (margin loss + lam_recon x MSE, accuracy), so that
    users who prefer `model.fit` can call it; `training.Trainer` computes the same losses itself."""
    model.compile(optimizer=optimizer, loss=[margin_loss, "mse"], loss_weights=[1.0, lam_recon],
                  metrics=[["accuracy"], []])


def train(model: keras.Model, eval_model: keras.Model, optimizer: Any, data: utils.Dataset,
          config: training.TrainConfig, backup: Backup, strategy: Any = None, is_chief: bool = True,
          objective: losses.Objective = losses.ONE_DIGIT, batcher: Any = None) -> None:
    """Trains `model` (the train model) on `data`, validating on the test set every epoch.

    Writes to `config.save_dir`: `log.csv`, `weights-{epoch:02d}.weights.h5` (best on validation
    accuracy), `trained_model.weights.h5` and `log.png` (the chief only), and removes the backup once
    the run is complete. MultiMNIST passes its `objective` and `batcher` (`losses.TWO_DIGITS`,
    `multimnist.PairBatcher`) with the two-digit train model.
    """
    steps = backends.make_steps(model, optimizer, config.lam_recon, config.batch_size, strategy,
                                objective=objective)
    trainer = training.Trainer(model, optimizer, steps, config, backup, is_chief=is_chief,
                               weights_model=eval_model, batcher=batcher)
    trainer.fit(*data)
    if is_chief:
        path = Path(config.save_dir) / "trained_model.weights.h5"
        saving.save_weights(eval_model, path)
        print(f"Trained model saved to '{path}'")
        utils.plot_log(Path(config.save_dir) / "log.csv", show=False)
    backup.remove()


# ---------------------------------------------------------------------------------------------
# Testing
# ---------------------------------------------------------------------------------------------


def test(model: keras.Model, data: tuple[np.ndarray, np.ndarray], batch_size: int = 100,
         save_dir: str | os.PathLike = "./result") -> float:
    """Prints the test accuracy of `model` (the eval model) and writes `save_dir/real_and_recon.png`:
    the first 50 test images in the top five rows, their reconstructions below.

    Args:
        data: `(x_test [n, rows, cols, channels], y_test [n, n_class])`.

    Returns:
        the accuracy.
    """
    x_test, y_test = data
    y_pred, x_recon = model.predict(x_test, batch_size=batch_size, verbose=0)
    accuracy = float(np.mean(np.argmax(y_pred, 1) == np.argmax(y_test, 1)))
    print("-" * 30 + "Begin: test" + "-" * 30)
    print(f"Test acc: {accuracy:.4f}")
    image = utils.combine_images(np.concatenate([x_test[:50], x_recon[:50]]))
    path = Path(save_dir) / "real_and_recon.png"
    utils.save_image(image, path)
    print(f"Reconstructed images are saved to {path}")
    print("-" * 30 + "End: test" + "-" * 30)
    return accuracy


def test_two_digits(eval_model: keras.Model, pairs: Any, batch_size: int = 100,
                    save_dir: str | os.PathLike = "./result") -> dict[str, float]:
    """MultiMNIST's test: prints both metrics and writes `real_and_recon.png` as the paper's Figure 5.

    An image counts as right only if its two longest capsules are exactly its two digits (the official
    code's metric); "at least one" is also printed. The picture shows 50 overlaid inputs, then each one's
    two predicted digits decoded from their own capsules, drawn in red and green over each other.

    Args:
        eval_model: `x -> [lengths, reconstruction]` for 36x36 inputs.
        pairs: `multimnist.Pairs`, the test set.

    Returns:
        `{"both": ..., "at_least_one": ..., "error": ...}`.
    """
    lengths, _ = eval_model.predict(pairs.x, batch_size=batch_size, verbose=0)
    scores = multimnist.accuracy(lengths, pairs.y)
    print("-" * 30 + "Begin: test" + "-" * 30)
    print(f"Test acc: {scores['both']:.4f} (both digits right; MultiMNIST error {scores['error']:.2%})")
    print(f"Test acc, at least one digit right: {scores['at_least_one']:.4f}")
    shown = pairs.take(slice(0, 50))
    top2 = multimnist.two_longest(lengths[:50])
    eye = np.eye(lengths.shape[1], dtype="float32")
    decoder = eval_model.get_layer("decoder")
    # Called directly, not with `predict`: a model built per call would make `predict` trace anew.
    encoder = keras.Model(eval_model.inputs[0], eval_model.get_layer("digitcaps").output)
    capsules = keras.ops.convert_to_numpy(encoder(shown.x, training=False))  # [50, n_class, 16]
    recons = [keras.ops.convert_to_numpy(decoder(
        (capsules * eye[top2[:, k]][:, :, None]).reshape(len(capsules), -1), training=False)) for k in (0, 1)]
    path = Path(save_dir) / "real_and_recon.png"
    utils.save_image(multimnist.overlay_image(shown.x, *recons), path)
    print(f"Reconstructed images are saved to {path}")
    print("-" * 30 + "End: test" + "-" * 30)
    return scores


def pick_sample(y_test: np.ndarray, digit: int, rng: np.random.Generator | None = None) -> int:
    """The index of a random test sample of class `digit`; every one of them can be picked.

    Raises:
        UserError: the test set has no sample of that class.
    """
    candidates = np.flatnonzero(np.argmax(y_test, 1) == digit)
    if len(candidates) == 0:
        raise UserError(f"--digit {digit}: the test set holds no sample of that class")
    return int(candidates[(rng or np.random.default_rng()).integers(len(candidates))])


def perturbation_grid(n_class: int) -> np.ndarray:
    """The noise added to the capsules, `[16 * 11, n_class, 16]`: row `dim * 11 + k` adds
    `PERTURBATIONS[k]` to dimension `dim` of every capsule."""
    noise = np.zeros((CAPSULE_DIM, len(PERTURBATIONS), n_class, CAPSULE_DIM), dtype="float32")
    for dim in range(CAPSULE_DIM):
        noise[dim, :, :, dim] = PERTURBATIONS[:, None]
    return noise.reshape(-1, n_class, CAPSULE_DIM)


def manipulate_latent(model: keras.Model, data: tuple[np.ndarray, np.ndarray], digit: int = 5,
                      save_dir: str | os.PathLike = "./result", rng: np.random.Generator | None = None
                      ) -> np.ndarray:
    """Writes `save_dir/manipulate-{digit}.png`: one test sample of `digit` decoded with each of its 16
    capsule dimensions shifted by -0.25, -0.2, ..., 0.25 (rows: dimensions, columns: shifts).

    Computes what `model` (the manipulate model) would for the 176 noised copies, but encodes the
    sample once and decodes the 176 masked capsules in one batch: the encoder is 99% of the
    FLOPs, and this was measured ~20x faster than one predict of 176 (bench/RESULTS.md).

    Returns:
        the reconstructions, `[16 * 11, rows, cols, channels]`.
    """
    print("-" * 30 + "Begin: manipulate" + "-" * 30)
    x_test, y_test = data
    index = pick_sample(y_test, digit, rng)
    noise = perturbation_grid(y_test.shape[1])
    encoder = keras.Model(model.inputs[0], model.get_layer("digitcaps").output)
    # Called directly, not with `predict`: the encoder is built per call and `predict` would trace it
    # anew every time (TensorFlow warns of retracing after a few calls, e.g. one grid per class).
    capsules = keras.ops.convert_to_numpy(encoder(x_test[index : index + 1], training=False))  # [1, n, 16]
    masked = (capsules + noise) * y_test[index][None, :, None]  # keep the label's capsule
    decoder = model.get_layer("decoder")
    x_recons = keras.ops.convert_to_numpy(
        decoder(masked.reshape(len(noise), -1).astype("float32"), training=False))
    image = utils.combine_images(x_recons, height=CAPSULE_DIM)
    path = Path(save_dir) / f"manipulate-{digit}.png"
    utils.save_image(image, path)
    print(f"manipulated result saved to {path}")
    print("-" * 30 + "End: manipulate" + "-" * 30)
    return x_recons


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def build_parser(description: str = "Capsule Network on MNIST.", batch_size: int = 100
                 ) -> argparse.ArgumentParser:
    """The original's flags and defaults, plus `--dataset`, `--seed` and `--mixed_precision`."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--epochs", default=50, type=int, help="Number of training epochs")
    parser.add_argument("--batch_size", default=batch_size, type=int, help="Images per training step")
    parser.add_argument("--lr", default=0.001, type=float, help="Initial learning rate")
    parser.add_argument("--lr_decay", default=0.9, type=float,
                        help="The value multiplied by lr at each epoch. Set a larger value for "
                             "larger epochs")
    parser.add_argument("--lam_recon", default=0.392, type=float,
                        help="The coefficient for the loss of decoder")
    parser.add_argument("-r", "--routings", default=3, type=int,
                        help="Number of iterations used in routing algorithm. should > 0")
    parser.add_argument("--shift_fraction", default=0.1, type=float,
                        help="Fraction of pixels to shift at most in each direction.")
    parser.add_argument("--debug", action="store_true",
                        help="Save weights by TensorBoard (save_dir/tensorboard-logs)")
    parser.add_argument("--save_dir", default="./result", help="Where logs, weights and images go")
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
    parser.add_argument("--mixed_precision", action="store_true",
                        help="Compute convolutions and the decoder in bfloat16 (capsules stay float32)")
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


def check_data(args: argparse.Namespace, data: utils.Dataset) -> None:
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


def mixed_precision_policy() -> str:
    """`mixed_bfloat16` on every device.

    float16 was measured to stall at chance on an H100 (Fashion-MNIST, 5 epochs, loss scaling on;
    bench/gpu/), while bfloat16 learned as float32 did: bfloat16 keeps float32's exponent range.
    """
    return "mixed_bfloat16"


def setup(args: argparse.Namespace) -> tuple[utils.Dataset, list[str]]:
    """Draws a seed if none was given (into `args.seed`, so that backups record it), seeds every
    generator, sets the precision policy and loads the data and its class names."""
    if args.seed is None:
        args.seed = int(np.random.default_rng().integers(2**31))
    keras.utils.set_random_seed(args.seed)
    if args.mixed_precision:
        keras.mixed_precision.set_global_policy(mixed_precision_policy())
    image_size = tuple(args.image_size) if args.image_size else None
    try:
        data, class_names = utils.load_labelled_dataset(args.dataset, image_size=image_size, seed=args.seed)
    except utils.DataError as e:
        raise UserError(str(e)) from e
    check_data(args, data)
    return data, class_names


def run(args: argparse.Namespace, strategy: Any = None, is_chief: bool = True, backup_dir: str | None = None,
        on_model: Callable[[keras.Model], None] | None = None) -> None:
    """Trains, or with `-t` tests: the body of both scripts, after their flags were validated.

    Args:
        args: the parsed flags.
        strategy: TensorFlow only: the `tf.distribute` strategy to train under (default: one device).
        is_chief: whether this process writes the user-facing files (multi-worker runs).
        backup_dir: this process' backup folder (default `save_dir/backup`).
        on_model: called on the chief with the train model once it is built (e.g. to draw `model.png`).
    """
    if args.predict is not None or args.export is not None:
        use_trained_model(args)
        return
    data, class_names = setup(args)
    (x_train, y_train), (x_test, y_test) = data
    config = training.TrainConfig.from_args(args)
    rows, cols, channels = x_train.shape[1:]
    if args.multimnist:  # each digit padded by multimnist.PAD on every side
        rows, cols = rows + 2 * multimnist.PAD, cols + 2 * multimnist.PAD
    # The optimizer too is made under the strategy: its variables are mirrored like the weights.
    with strategy.scope() if strategy is not None else contextlib.nullcontext():
        optimizer = training.make_optimizer(config.lr, config.lr_decay,
                                            training.steps_per_epoch(len(x_train), config.batch_size))
        model, eval_model, manipulate_model = CapsNet((rows, cols, channels), y_train.shape[1], args.routings)
        compile_like_original(model, optimizer, config.lam_recon)
        train_model = two_digit_train_model(model) if args.multimnist else model
    if is_chief:
        model.summary()
        if on_model is not None:
            on_model(model)
    if args.weights is not None:
        print(f"Loaded weights from {saving.load_weights(model, args.weights)}")
    if not args.testing:
        warn_if_slow_backend()
        flags = {k: getattr(args, k) for k in RESUME_FLAGS}
        if args.multimnist:  # only then: backups of single-digit runs made before this flag still resume
            flags.update(multimnist=True, multimnist_test_pairs=args.multimnist_test_pairs)
        backup = Backup(backup_dir or Path(args.save_dir) / BACKUP_DIR, flags=flags)
        objective, batcher = ((losses.TWO_DIGITS, multimnist.PairBatcher(config.batch_size,
                                                                         args.multimnist_test_pairs))
                              if args.multimnist else (losses.ONE_DIGIT, None))
        train(train_model, eval_model, optimizer, data, config, backup, strategy=strategy,
              is_chief=is_chief, objective=objective, batcher=batcher)
        if is_chief:
            saving.save_model(eval_model, Path(args.save_dir) / "trained_model.keras")
            image_folder.save_class_names(Path(args.save_dir) / image_folder.DEFAULT_CLASS_NAMES_FILE,
                                          class_names)
            print(f"Full model (x -> [lengths, reconstruction]) saved to "
                  f"'{args.save_dir}/trained_model.keras', its class names to "
                  f"'{args.save_dir}/{image_folder.DEFAULT_CLASS_NAMES_FILE}'")
        return
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


def use_trained_model(args: argparse.Namespace) -> None:
    """`--predict` and `--export`: the eval model of `-w`, used on new images or exported.

    A `.keras` file holds the whole model; a weights file is loaded into a model built for `--dataset`
    (as `-t` does). Class names come from `class_names.json` beside the `-w` file, else the dataset.

    Raises:
        UserError: a file cannot be loaded or exported; `--predict` also when any image could not be
            read (after predicting all the others).
    """
    try:
        eval_model, class_names = deploy.load_eval_model(
            args.weights, build=lambda: _eval_model_for_dataset(args))
        if args.export is not None:
            deploy.export_model(eval_model, args.export, args.save_dir)
        if args.predict is not None:
            deploy.predict_images(eval_model, args.predict, class_names, invert=args.invert,
                                  save_dir=args.save_dir, batch_size=args.batch_size)
    except utils.DataError as e:
        raise UserError(str(e)) from e


def _eval_model_for_dataset(args: argparse.Namespace) -> tuple[keras.Model, list[str]]:
    """The eval model for `--dataset`'s shape and classes with `-w`'s weights, and the class names."""
    data, class_names = setup(args)
    (x_train, y_train), _ = data
    model, eval_model, _ = CapsNet(x_train.shape[1:], y_train.shape[1], args.routings)
    print(f"Loaded weights from {saving.load_weights(model, args.weights)}")
    return eval_model, class_names


def warn_if_slow_backend() -> None:
    """One line when training would be far slower than it needs to be: JAX on a CPU."""
    if keras.backend.backend() != "jax":
        return
    import jax

    if jax.default_backend() == "cpu":
        print("Warning: JAX is running on the CPU, where it trains slower than TensorFlow (measured: an "
              "epoch of 2,000 MNIST images took 38 s on JAX, 21 s on TensorFlow, 2 cores); TensorFlow, "
              "the default backend, is the CPU backend (unset KERAS_BACKEND). JAX is this project's GPU "
              "backend.")


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
    # A polite kill (SIGTERM) ends like Ctrl-C: a message, and the last completed epoch kept.
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
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
    return 0


def _validate_and_run(args: argparse.Namespace) -> None:
    validate_args(args)
    run(args)


def _raise_keyboard_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
