"""Keras 3 implementation of CapsNet (Sabour, Frosst & Hinton, NIPS 2017).

The current version trains CapsNet on MNIST (by default), Fashion-MNIST or local data, tests a trained
model and draws how each capsule dimension changes a reconstruction.

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
import json
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's start-up chatter out of the CLI

import keras  # noqa: E402
from keras import layers, ops  # noqa: E402

import utils  # noqa: E402
from capsulelayers import PACKAGE, CapsuleLayer, Length, Mask, PrimaryCap  # noqa: E402

CAPSULE_DIM = 16
# Offsets added to one capsule dimension in the manipulation plot: -0.25, -0.2, ..., 0.25.
PERTURBATIONS = np.round(np.arange(-0.25, 0.25 + 1e-9, 0.05), 2)
BACKUP_DIR = "backup"
# Flags that must match for a run to resume where another stopped.
RESUME_FLAGS = ("batch_size", "lr", "lr_decay", "lam_recon", "routings", "shift_fraction", "dataset")

EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3


class UserError(Exception):
    """A problem with the user's flags or files: printed as one line, exit code 2."""


class TrainingDivergedError(Exception):
    """The loss became NaN or inf; the last good checkpoint is kept."""


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


@keras.saving.register_keras_serializable(package=PACKAGE)
def margin_loss(y_true: Any, y_pred: Any) -> Any:
    """Margin loss, the paper's eq. 4, per sample.

    `L = sum_k T_k max(0, 0.9 - |v_k|)^2 + 0.5 (1 - T_k) max(0, |v_k| - 0.1)^2`.

    Args:
        y_true: one-hot labels `[batch, n_class]`.
        y_pred: capsule lengths `[batch, n_class]`.

    Returns:
        `[batch]`; Keras' loss reduction (or the caller) averages it over the batch.
    """
    y_true = ops.cast(y_true, y_pred.dtype)
    present = y_true * ops.square(ops.relu(0.9 - y_pred))
    absent = 0.5 * (1 - y_true) * ops.square(ops.relu(y_pred - 0.1))
    return ops.sum(present + absent, axis=-1)


def reconstruction_loss(x: Any, x_recon: Any) -> Any:
    """Mean squared error per sample: `[batch, rows, cols, channels]` x2 -> `[batch]`."""
    x_recon = ops.cast(x_recon, x.dtype)
    return ops.mean(ops.reshape(ops.square(x - x_recon), (ops.shape(x)[0], -1)), axis=-1)


def make_optimizer(args: argparse.Namespace, steps_per_epoch: int) -> keras.optimizers.Optimizer:
    """Adam whose learning rate is `lr * lr_decay ** epoch` (a staircase decay per epoch).

    The schedule reads the optimizer's own step counter, so a resumed run continues at the right rate.
    """
    schedule = keras.optimizers.schedules.ExponentialDecay(
        args.lr, decay_steps=steps_per_epoch, decay_rate=args.lr_decay, staircase=True
    )
    optimizer = keras.optimizers.Adam(learning_rate=schedule)
    if keras.mixed_precision.global_policy().name == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


# ---------------------------------------------------------------------------------------------
# Weights files
# ---------------------------------------------------------------------------------------------


def _is_legacy_h5(path: str) -> bool:
    import h5py

    with h5py.File(path, "r") as f:
        return "layer_names" in f.attrs or "model_weights" in f


def _load_keras_file(model: keras.Model, path: str) -> None:
    try:
        saved = keras.saving.load_model(path, compile=False, safe_mode=True)
    except ValueError as e:
        if "Lambda" in str(e) or "safe_mode" in str(e):
            raise UserError(f"-w {path}: refused, the model contains a Lambda layer (arbitrary code); "
                            "only models made of registered layers are loaded") from e
        raise
    for layer in model.layers:
        if not layer.weights:
            continue
        try:
            source = saved.get_layer(layer.name)
        except ValueError as e:
            raise UserError(f"{path}: has no layer '{layer.name}'; it is not a CapsNet model") from e
        layer.set_weights(source.get_weights())


def resolve_weights_path(path: str, announce: bool = False) -> str:
    """`path`, or for a missing `NAME.h5` an existing `NAME.weights.h5` (the name Keras 3 forces on
    weight files), so that the original's `-w result/trained_model.h5` keeps working."""
    if os.path.exists(path) or not path.endswith(".h5") or path.endswith(".weights.h5"):
        return path
    alternative = path[: -len(".h5")] + ".weights.h5"
    if not os.path.exists(alternative):
        return path
    if announce:
        print(f"Note: {path} not found, loading {alternative} (Keras 3 names weight files "
              "*.weights.h5)")
    return alternative


def load_weights(model: keras.Model, path: str) -> str:
    """Loads `.weights.h5`, `.keras` or legacy Keras-2 `.h5` weights into `model` (the train model).

    A missing `NAME.h5` falls back to `NAME.weights.h5` (see `resolve_weights_path`).

    Returns:
        the path actually loaded.

    Raises:
        UserError: the file is missing, unreadable, unsafe or does not fit the model.
    """
    path = resolve_weights_path(path, announce=True)
    if not os.path.isfile(path):
        raise UserError(f"-w {path}: no such file")
    if not os.access(path, os.R_OK):
        raise UserError(f"-w {path}: file is not readable")
    try:
        with warnings.catch_warnings():
            # Keras warns about containers it matches by topology; the outcome is checked instead.
            warnings.simplefilter("ignore")
            _load_by_format(model, path)
    except UserError:
        raise
    except Exception as e:  # h5py, zipfile and Keras raise many types for broken or foreign files
        raise UserError(f"-w {path}: cannot be loaded into this model ({_load_error(e)})") from e
    return path


def _load_by_format(model: keras.Model, path: str) -> None:
    if path.endswith(".keras"):
        _load_keras_file(model, path)
    elif path.endswith(".weights.h5") or (path.endswith((".h5", ".hdf5")) and not _is_legacy_h5(path)):
        with tempfile.TemporaryDirectory() as tmp:
            # Keras 3 reads its own format only under a .weights.h5 name.
            alias = os.path.join(tmp, "w.weights.h5")
            os.symlink(os.path.abspath(path), alias)
            model.load_weights(alias)
    elif path.endswith((".h5", ".hdf5")):
        model.load_weights(path)  # legacy Keras 2 HDF5, matched by topology
    else:
        raise UserError(f"-w {path}: unknown weights format; use .weights.h5, .keras or .h5")


def _load_error(error: Exception) -> str:
    """The useful part of a weight-loading error, on one line."""
    text = " ".join(str(error).split())
    shapes = re.search(r"name=([\w.-]+).*?variable\.shape=(\([^)]*\)).*?value\.shape=(\([^)]*\))",
                       text)
    if shapes:
        layer, expected, found = shapes.groups()
        return f"layer {layer} needs weights of shape {expected}, the file holds {found}"
    return text[:300] or type(error).__name__


def save_weights(model: keras.Model, path: str | os.PathLike) -> None:
    """`model.save_weights`, through a temporary file and a rename."""
    with utils.atomic_path(path) as tmp:
        model.save_weights(tmp)


def save_model(model: keras.Model, path: str | os.PathLike) -> None:
    """`model.save` (`.keras`), through a temporary file and a rename."""
    with utils.atomic_path(path) as tmp:
        model.save(tmp)


# ---------------------------------------------------------------------------------------------
# Data pipeline
# ---------------------------------------------------------------------------------------------


def train_dataset(
    x: Any, y: Any, batch_size: int, shift_fraction: float, seed: int, epoch: int
) -> Any:
    """One epoch of shuffled, randomly shifted training batches `([x, y], ...)` as a `tf.data`
    pipeline.

    The order and the shifts depend only on `(seed, epoch)`, so a resumed run sees the same data as
    an uninterrupted one. Only full batches are made, as the original's `steps_per_epoch = n // batch`.

    Args:
        x: `[n, rows, cols, channels]` tensor; y: `[n, n_class]` tensor.
    """
    import tensorflow as tf

    n = int(x.shape[0])
    steps = n // batch_size
    order = np.random.default_rng([seed, epoch]).permutation(n)[: steps * batch_size]
    ds = tf.data.Dataset.from_tensor_slices(order.reshape(steps, batch_size))
    ds = ds.map(lambda idx: (tf.gather(x, idx), tf.gather(y, idx)),
                num_parallel_calls=tf.data.AUTOTUNE)
    if shift_fraction > 0:
        # Zero-filled random shifts up to shift_fraction of the size, sub-pixel as the original's
        # ImageDataGenerator. A fresh seeded layer per epoch makes the stream depend on the epoch
        # alone; its map stays sequential so the draws keep their order.
        # float32 whatever the precision policy: the shifted images are also the decoder's target.
        shift = layers.RandomTranslation(shift_fraction, shift_fraction, fill_mode="constant",
                                         fill_value=0.0, seed=int(seed * 100_003 + epoch) % 2**31,
                                         dtype="float32")
        ds = ds.map(lambda xb, yb: (shift(xb, training=True), yb))
    return _with_options(ds).prefetch(tf.data.AUTOTUNE)


def eval_dataset(x: Any, y: Any, batch_size: int) -> Any:
    """Test batches in order, the last one partial."""
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size)
    return _with_options(ds).prefetch(tf.data.AUTOTUNE)


def _with_options(ds: Any) -> Any:
    import tensorflow as tf

    options = tf.data.Options()
    # Every worker builds the same pipeline; each takes its slice of every global batch.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return ds.with_options(options)


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------

TRAIN_SUMS = ("loss", "capsnet_loss", "decoder_loss", "capsnet_accuracy")


@dataclass
class RunState:
    """What a resumed run needs beside the weights and the optimizer: `backup/state.json`."""

    epoch: int = 0  # epochs completed
    best: float = -math.inf  # best val_capsnet_accuracy so far
    seed: int = 0
    flags: dict | None = None


class Trainer:
    """The training loop shared by `capsulenet.py` and `capsulenet-multi-gpu.py`.

    It runs under any `tf.distribute` strategy: the default (one device), `MirroredStrategy`
    (several devices) and `MultiWorkerMirroredStrategy` (several machines), under which Keras 3's
    `model.fit` fails (keras-team/keras#20585). Each step runs `strategy.run` with a
    `GradientTape` and the Keras optimizer, which all-reduces the gradients. Every epoch it
    validates, appends to `log.csv`, keeps the best weights and writes a resumable backup (weights,
    optimizer state, schedule position, best score, seed); only the chief writes files.
    """

    def __init__(self, model: keras.Model, args: argparse.Namespace, strategy: Any = None,
                 is_chief: bool = True, jit_compile: bool = False,
                 weights_model: keras.Model | None = None, backup_dir: str | None = None) -> None:
        import tensorflow as tf

        self.tf = tf
        self.model = model
        # Checkpoints hold the layers' weights only, as the original's (a model without an optimizer
        # saves no optimizer state): a model sharing the layers, e.g. the eval model, is saved.
        self.weights_model = weights_model or model
        self.args = args
        self.strategy = strategy or tf.distribute.get_strategy()
        self.is_chief = is_chief
        self.save_dir = Path(args.save_dir)
        # Every worker backs up its own state (a multi-worker run passes each worker its own folder)
        # so each can resume; only the chief writes the user-facing files.
        self.backup_dir = Path(backup_dir) if backup_dir else self.save_dir / BACKUP_DIR
        self.optimizer = model.optimizer
        self.train_step = tf.function(self._train_step, jit_compile=jit_compile)
        self.eval_step = tf.function(self._eval_step, jit_compile=jit_compile)

    # -- steps -------------------------------------------------------------------------------

    def _losses(self, x: Any, y: Any, training: bool) -> tuple[Any, ...]:
        lengths, recon = self.model([x, y], training=training)
        margin = margin_loss(y, ops.cast(lengths, "float32"))
        mse = reconstruction_loss(x, recon)
        total = margin + self.args.lam_recon * mse
        correct = ops.cast(ops.equal(ops.argmax(lengths, -1), ops.argmax(y, -1)), "float32")
        return total, margin, mse, correct

    def _replica_train_step(self, x: Any, y: Any) -> list[Any]:
        tf = self.tf
        with tf.GradientTape() as tape:
            total, margin, mse, correct = self._losses(x, y, training=True)
            # Sum over the replica's samples / global batch: the all-reduced SUM of gradients is then
            # the gradient of the global batch mean.
            loss = ops.sum(total) / self.args.batch_size
            scaled = self.optimizer.scale_loss(loss) if hasattr(self.optimizer, "scale_loss") else loss
        variables = self.model.trainable_variables
        grads = tape.gradient(scaled, variables)
        self.optimizer.apply_gradients(zip(grads, variables, strict=True))
        return [ops.sum(t) for t in (total, margin, mse, correct)]

    def _replica_eval_step(self, x: Any, y: Any) -> list[Any]:
        return [ops.sum(t) for t in self._losses(x, y, training=False)]

    def _reduce(self, per_replica: list[Any]) -> list[Any]:
        sum_ = self.tf.distribute.ReduceOp.SUM
        return [self.strategy.reduce(sum_, v, axis=None) for v in per_replica]

    def _train_step(self, x: Any, y: Any) -> list[Any]:
        return self._reduce(self.strategy.run(self._replica_train_step, args=(x, y)))

    def _eval_step(self, x: Any, y: Any) -> list[Any]:
        return self._reduce(self.strategy.run(self._replica_eval_step, args=(x, y)))

    # -- epochs ------------------------------------------------------------------------------

    def evaluate(self, x: Any, y: Any) -> dict[str, float]:
        """Loss and accuracy of the train model (decoder masked by the true label) on all of `x`."""
        sums = np.zeros(len(TRAIN_SUMS))
        # A last batch smaller than the replica count would hand a replica an empty batch, which
        # the convolutions refuse: those few samples are evaluated outside the strategy.
        tail = len(x) % self.args.batch_size
        tail = tail if tail < self.strategy.num_replicas_in_sync else 0
        dataset = self.strategy.experimental_distribute_dataset(
            eval_dataset(x[: len(x) - tail], y[: len(y) - tail], self.args.batch_size))
        for xb, yb in dataset:
            sums += [float(v) for v in self.eval_step(xb, yb)]
        if tail:
            sums += [float(v) for v in self._replica_eval_step(self.tf.constant(x[-tail:]),
                                                               self.tf.constant(y[-tail:]))]
        return dict(zip(TRAIN_SUMS, sums / len(x), strict=True))

    def run_epoch(self, x: Any, y: Any, epoch: int, seed: int) -> dict[str, float]:
        steps = int(x.shape[0]) // self.args.batch_size
        progbar = keras.utils.Progbar(steps, verbose=1 if self.is_chief else 0,
                                      stateful_metrics=TRAIN_SUMS)
        sums = np.zeros(len(TRAIN_SUMS))
        batches = self.strategy.experimental_distribute_dataset(
            train_dataset(x, y, self.args.batch_size, self.args.shift_fraction, seed, epoch))
        for step, (xb, yb) in enumerate(batches, start=1):
            values = np.array([float(v) for v in self.train_step(xb, yb)])
            if not np.isfinite(values).all():
                raise TrainingDivergedError(f"loss became {values[0]} at epoch {epoch + 1}, step {step}")
            sums += values
            progbar.update(step, list(zip(TRAIN_SUMS, sums / (step * self.args.batch_size), strict=True)))
        return dict(zip(TRAIN_SUMS, sums / (steps * self.args.batch_size), strict=True))

    def learning_rate(self) -> float:
        rate = self.optimizer.learning_rate
        return float(rate(self.optimizer.iterations) if callable(rate) else rate)

    # -- the whole run -----------------------------------------------------------------------

    def fit(self, train_data: tuple, valid_data: tuple, epochs: int) -> Any:
        """Trains until `epochs` epochs are complete, resuming a backed-up run; returns the log."""
        import pandas as pd

        tf = self.tf
        x_train, y_train = (tf.constant(a) for a in train_data)
        x_valid, y_valid = valid_data
        with self.strategy.scope():  # the optimizer's slots are mirrored like the weights
            self.optimizer.build(self.model.trainable_variables)
        state = self._restore()
        log = self._read_log(state.epoch)
        writer = (tf.summary.create_file_writer(str(self.save_dir / "tensorboard-logs"))
                  if self.args.debug and self.is_chief else None)
        for epoch in range(state.epoch, epochs):
            if self.is_chief:
                print(f"Epoch {epoch + 1}/{epochs}")
            learning_rate = self.learning_rate()
            start = time.perf_counter()
            row = self.run_epoch(x_train, y_train, epoch, state.seed)
            row.update({f"val_{k}": v for k, v in self.evaluate(x_valid, y_valid).items()})
            if not np.isfinite(row["val_loss"]):
                raise TrainingDivergedError(f"validation loss became {row['val_loss']} at epoch {epoch + 1}")
            row = {"epoch": epoch, **row, "learning_rate": learning_rate}
            if self.is_chief:
                print(" - ".join([f"{time.perf_counter() - start:.0f}s"]
                                 + [f"{k}: {v:.4f}" for k, v in row.items() if k != "epoch"]))
            log = pd.concat([log, pd.DataFrame([row])], ignore_index=True)
            state = self._end_epoch(epoch, row, log, state, writer)
        return log

    def _end_epoch(self, epoch: int, row: dict, log: Any, state: RunState, writer: Any) -> RunState:
        state = RunState(epoch=epoch + 1, best=state.best, seed=state.seed, flags=state.flags)
        if not self.is_chief:
            self._backup(state)
            return state
        # Order matters for a crash between two writes: the log first (resume trims it back to the
        # backup's epoch), then the best checkpoint, then the backup that makes the epoch final.
        utils.write_text_atomic(self.save_dir / "log.csv", log.to_csv(index=False))
        accuracy = row["val_capsnet_accuracy"]
        if accuracy > state.best:
            path = self.save_dir / f"weights-{epoch + 1:02d}.weights.h5"
            print(f"val_capsnet_accuracy improved from {state.best:.5f} to {accuracy:.5f}, "
                  f"saving model to {path}")
            save_weights(self.weights_model, path)
            state.best = float(accuracy)
        self._backup(state)
        if writer is not None:
            with writer.as_default(step=epoch):
                for key, value in row.items():
                    if key != "epoch":
                        self.tf.summary.scalar(key, value)
                for weight in self.model.trainable_weights:
                    self.tf.summary.histogram(weight.path, weight)
            writer.flush()
        return state

    def _backup(self, state: RunState) -> None:
        self.backup_dir.mkdir(parents=True, exist_ok=True)
        # Model and optimizer state go to files named by epoch; state.json, written last and
        # atomically, decides which is current, so a crash never pairs mismatched halves.
        name = f"epoch-{state.epoch:04d}"
        with utils.atomic_path(self.backup_dir / f"{name}.npz") as tmp:
            np.savez(tmp, **_trainable_state(self.model, self.optimizer))
        utils.write_text_atomic(self.backup_dir / f"{name}.json", json.dumps(state.__dict__, indent=1))
        rollback_backup(self.backup_dir, state.epoch)
        # The epoch before stays too: workers of a multi-worker run stopped one epoch apart resume
        # together from the earlier one.
        for old in self.backup_dir.glob("epoch-*"):
            if _backup_epoch(old) < state.epoch - 1:
                old.unlink()

    def _restore(self) -> RunState:
        flags = {k: getattr(self.args, k) for k in RESUME_FLAGS}
        path = self.backup_dir / "state.json"
        if not path.exists():
            return RunState(seed=self.args.seed, flags=flags)
        saved = json.loads(path.read_text())
        checkpoint = self.backup_dir / saved.pop("checkpoint")
        state = RunState(**saved)
        changed = {k: (state.flags.get(k), v) for k, v in flags.items() if state.flags.get(k) != v}
        if changed:
            detail = ", ".join(f"--{k} was {old}, now {new}" for k, (old, new) in changed.items())
            raise UserError(f"{self.backup_dir} holds an unfinished run with other flags ({detail}); "
                            "rerun with the same flags to resume, or delete that folder to start over")
        with np.load(checkpoint, allow_pickle=False) as arrays:
            _assign_state(self.model, self.optimizer, arrays)
        if self.is_chief:
            print(f"Resuming after epoch {state.epoch} from {self.backup_dir} "
                  f"(delete that folder to start over)")
        return state

    def _read_log(self, completed: int) -> Any:
        """The log of the epochs before `completed`, dropping rows a crash left beyond the backup."""
        import pandas as pd

        path = self.save_dir / "log.csv"
        if completed == 0 or not path.exists():
            return pd.DataFrame()
        log = pd.read_csv(path)
        return log[log["epoch"] < completed].reset_index(drop=True)

    def finish(self) -> None:
        """Removes the backup once the run is complete, as Keras' BackupAndRestore does."""
        shutil.rmtree(self.backup_dir, ignore_errors=True)


def _backup_epoch(path: Path) -> int:
    """The epoch of a backup file named `epoch-0003.npz` or `epoch-0003.json`."""
    return int(path.name.split(".")[0].split("-")[1])


def backup_epochs(backup_dir: str | os.PathLike) -> list[int]:
    """The completed epochs whose weights and state are both in `backup_dir`, in order."""
    folder = Path(backup_dir)
    epochs = {_backup_epoch(p) for p in folder.glob("epoch-*.npz")}
    return sorted(e for e in epochs if (folder / f"epoch-{e:04d}.json").exists())


def backup_epoch(backup_dir: str | os.PathLike) -> int:
    """The epoch a run in `backup_dir` resumes after; 0 without a backup."""
    path = Path(backup_dir) / "state.json"
    return int(json.loads(path.read_text())["epoch"]) if path.exists() else 0


def rollback_backup(backup_dir: str | os.PathLike, epoch: int) -> None:
    """Makes the backup of `epoch` (one of `backup_epochs`) the one a run resumes from; epoch 0 removes
    the backup, so the run starts over."""
    folder = Path(backup_dir)
    if epoch == 0:
        shutil.rmtree(folder, ignore_errors=True)
        return
    state = json.loads((folder / f"epoch-{epoch:04d}.json").read_text())
    state["checkpoint"] = f"epoch-{epoch:04d}.npz"
    utils.write_text_atomic(folder / "state.json", json.dumps(state, indent=1))


def _trainable_state(model: keras.Model, optimizer: Any) -> dict[str, np.ndarray]:
    arrays = {f"model/{i}": np.asarray(v) for i, v in enumerate(model.weights)}
    arrays.update({f"optimizer/{i}": np.asarray(v) for i, v in enumerate(optimizer.variables)})
    return arrays


def _assign_state(model: keras.Model, optimizer: Any, arrays: Any) -> None:
    for prefix, variables in (("model", model.weights), ("optimizer", optimizer.variables)):
        for i, variable in enumerate(variables):
            variable.assign(arrays[f"{prefix}/{i}"])


def train(model: keras.Model, data: tuple, args: argparse.Namespace, strategy: Any = None,
          is_chief: bool = True, weights_model: keras.Model | None = None,
          backup_dir: str | None = None) -> keras.Model:
    """Trains `model` (the train model) on `data`, validating on the test set every epoch.

    Writes to `args.save_dir`: `log.csv`, `weights-{epoch:02d}.weights.h5` (best on validation
    accuracy), `trained_model.weights.h5`, `trained_model.keras` and `log.png`.
    """
    (x_train, y_train), (x_test, y_test) = data
    trainer = Trainer(model, args, strategy=strategy, is_chief=is_chief, weights_model=weights_model,
                      backup_dir=backup_dir)
    trainer.fit((x_train, y_train), (x_test, y_test), args.epochs)
    if is_chief:
        save_weights(trainer.weights_model, Path(args.save_dir) / "trained_model.weights.h5")
        print(f"Trained model saved to '{args.save_dir}/trained_model.weights.h5'")
        utils.plot_log(Path(args.save_dir) / "log.csv", show=False)
    trainer.finish()
    return model


# ---------------------------------------------------------------------------------------------
# Testing
# ---------------------------------------------------------------------------------------------


def test(model: keras.Model, data: tuple, args: argparse.Namespace) -> float:
    """Prints the test accuracy of `model` (the eval model) and writes `real_and_recon.png`.

    Returns:
        the accuracy.
    """
    x_test, y_test = data
    y_pred, x_recon = model.predict(x_test, batch_size=args.batch_size, verbose=0)
    accuracy = float(np.mean(np.argmax(y_pred, 1) == np.argmax(y_test, 1)))
    print("-" * 30 + "Begin: test" + "-" * 30)
    print(f"Test acc: {accuracy:.4f}")
    image = utils.combine_images(np.concatenate([x_test[:50], x_recon[:50]]))
    path = Path(args.save_dir) / "real_and_recon.png"
    utils.save_image(image, path)
    print(f"Reconstructed images are saved to {path}")
    print("-" * 30 + "End: test" + "-" * 30)
    return accuracy


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


def manipulate_latent(model: keras.Model, data: tuple, args: argparse.Namespace,
                      rng: np.random.Generator | None = None) -> np.ndarray:
    """Writes `manipulate-{digit}.png`: one test sample of `args.digit` decoded with each of its 16
    capsule dimensions shifted by -0.25, -0.2, ..., 0.25 (rows: dimensions, columns: shifts).

    Computes what `model` (the manipulate model) would for the 176 noised copies, but encodes the
    sample once and decodes the 176 masked capsules in one batch: the encoder is 99% of the
    FLOPs, and this was measured ~20x faster than one predict of 176 (bench/RESULTS.md).

    Returns:
        the reconstructions, `[16 * 11, rows, cols, channels]`.
    """
    print("-" * 30 + "Begin: manipulate" + "-" * 30)
    x_test, y_test = data
    index = pick_sample(y_test, args.digit, rng)
    noise = perturbation_grid(y_test.shape[1])
    encoder = keras.Model(model.inputs[0], model.get_layer("digitcaps").output)
    capsules = encoder.predict(x_test[index : index + 1], verbose=0)  # [1, n_class, 16]
    masked = (capsules + noise) * y_test[index][None, :, None]  # keep the label's capsule
    decoder = model.get_layer("decoder")
    x_recons = decoder.predict(masked.reshape(len(noise), -1), batch_size=len(noise), verbose=0)
    image = utils.combine_images(x_recons, height=CAPSULE_DIM)
    path = Path(args.save_dir) / f"manipulate-{args.digit}.png"
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
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--epochs", default=50, type=int)
    parser.add_argument("--batch_size", default=batch_size, type=int)
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
    parser.add_argument("--debug", action="store_true", help="Save weights by TensorBoard")
    parser.add_argument("--save_dir", default="./result")
    parser.add_argument("-t", "--testing", action="store_true",
                        help="Test the trained model on testing dataset")
    parser.add_argument("--digit", default=5, type=int, help="Digit to manipulate")
    parser.add_argument("-w", "--weights", default=None,
                        help="The path of the saved weights (.weights.h5, .keras or legacy .h5). "
                             "Should be specified when testing")
    parser.add_argument("--dataset", default="mnist",
                        help="mnist, fashion_mnist, a folder of the 4 MNIST-format IDX .gz files, "
                             "or an .npz with x_train, y_train, x_test, y_test")
    parser.add_argument("--seed", default=None, type=int,
                        help="Seed Python, NumPy, Keras and the augmentation for a repeatable run")
    parser.add_argument("--mixed_precision", action="store_true",
                        help="Compute convolutions and the decoder in bfloat16 (capsules stay float32)")
    return parser


def validate_args(args: argparse.Namespace) -> None:
    """Checks every flag before any long work; raises UserError naming the flag and its range."""
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
    ]
    if hasattr(args, "gpus"):
        checks.append(("--gpus", args.gpus >= 1, "must be >= 1"))
    for flag, ok, rule in checks:
        if not ok:
            value = getattr(args, flag.split("--")[-1])
            raise UserError(f"{flag} {value}: {rule}")
    if args.weights is not None and not os.path.isfile(resolve_weights_path(args.weights)):
        raise UserError(f"-w {args.weights}: no such file")
    if args.debug and not args.testing:
        try:  # tf.summary needs it; without it the run would crash after its first epoch
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


def check_data(args: argparse.Namespace, data: tuple) -> None:
    """Checks the flags that depend on the data."""
    (x_train, y_train), _ = data
    n_class = y_train.shape[1]
    if args.digit >= n_class:
        raise UserError(f"--digit {args.digit}: must be in 0..{n_class - 1} for this dataset")
    if not args.testing and args.batch_size > len(x_train):
        raise UserError(f"--batch_size {args.batch_size}: larger than the {len(x_train)} training "
                        "images")
    if min(x_train.shape[1:3]) < 25:
        raise UserError(f"--dataset {args.dataset}: images of {x_train.shape[1:3]} are too small "
                        "for two 9x9 convolutions (need at least 25x25)")


def setup(args: argparse.Namespace) -> tuple:
    """Validates the flags, seeds, sets the precision policy and loads the data."""
    validate_args(args)
    if args.seed is None:
        args.seed = int(np.random.default_rng().integers(2**31))
    keras.utils.set_random_seed(args.seed)
    if args.mixed_precision:
        keras.mixed_precision.set_global_policy(mixed_precision_policy())
    try:
        data = utils.load_dataset(args.dataset)
    except utils.DataError as e:
        raise UserError(str(e)) from e
    check_data(args, data)
    return data


def mixed_precision_policy() -> str:
    """`mixed_bfloat16` on every device.

    float16 was measured to stall at chance on an H100 (Fashion-MNIST, 5 epochs, loss scaling on;
    bench/gpu/), while bfloat16 learned as float32 did: bfloat16 keeps float32's exponent range.
    """
    return "mixed_bfloat16"


def build_models(args: argparse.Namespace, data: tuple, steps_per_epoch: int) -> tuple:
    """The three models, the train model compiled with Adam, margin loss and MSE x lam_recon."""
    (x_train, y_train), _ = data
    model, eval_model, manipulate_model = CapsNet(
        input_shape=x_train.shape[1:], n_class=y_train.shape[1], routings=args.routings)
    # Compiled like the original, so `model.fit` works for users who prefer it; the Trainer computes
    # the same losses itself.
    model.compile(optimizer=make_optimizer(args, steps_per_epoch),
                  loss=[margin_loss, "mse"], loss_weights=[1.0, args.lam_recon],
                  metrics=[["accuracy"], []])
    return model, eval_model, manipulate_model


def run(args: argparse.Namespace, strategy: Any = None, is_chief: bool = True,
        test_after_training: bool = False, backup_dir: str | None = None,
        on_model: Callable[[keras.Model], None] | None = None) -> None:
    """Trains (then tests if `test_after_training`), or only tests with `-t`: both scripts' body.

    `on_model(train_model)` runs on the chief once the model is built (e.g. to draw `model.png`).
    """
    import tensorflow as tf

    data = setup(args)
    strategy = strategy or tf.distribute.get_strategy()
    steps_per_epoch = max(1, len(data[0][0]) // args.batch_size)
    with strategy.scope():
        model, eval_model, manipulate_model = build_models(args, data, steps_per_epoch)
    if is_chief:
        model.summary()
        if on_model is not None:
            on_model(model)
    if args.weights is not None:
        loaded = load_weights(model, args.weights)
        print(f"Loaded weights from {loaded}")
    if not args.testing:
        train(model, data, args, strategy=strategy, is_chief=is_chief, weights_model=eval_model,
              backup_dir=backup_dir)
        if is_chief:
            save_model(eval_model, Path(args.save_dir) / "trained_model.keras")
            print(f"Full model (x -> [lengths, reconstruction]) saved to "
                  f"'{args.save_dir}/trained_model.keras'")
        if not test_after_training:
            return
    elif args.weights is None:
        print("No weights are provided. Will test using random initialized weights.")
    if is_chief:
        manipulate_latent(manipulate_model, data[1], args)
        test(eval_model, data[1], args)


def main(argv: Sequence[str] | None = None, parser: argparse.ArgumentParser | None = None,
         runner: Callable[[argparse.Namespace], None] = run) -> int:
    """Parses `argv`, runs, and turns user errors into one line and an exit code."""
    args = (parser or build_parser()).parse_args(argv)
    # A polite kill (SIGTERM) ends like Ctrl-C: a message, and the last completed epoch kept.
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        runner(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except TrainingDivergedError as e:
        print(f"error: training stopped, {e}; the last good checkpoint and backup in "
              f"{args.save_dir} are untouched", file=sys.stderr)
        return EXIT_DIVERGED
    except KeyboardInterrupt:
        print(f"\ninterrupted: rerun the same command to resume from the last completed epoch "
              f"(state in {args.save_dir}/{BACKUP_DIR})", file=sys.stderr)
        return 130
    except OSError as e:  # a full disk or a vanished folder: say which file, keep the good ones
        print(f"error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 1
    return 0


def _raise_keyboard_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
