"""Training CapsNet: the configuration, the optimizer, `build` (model, optimizer and step in one
call), the epoch loop and `train`.

One loop serves every way this project trains (`capsulenet.py` on one device,
`capsulenet-multi-gpu.py` on several devices or machines, TensorFlow, JAX or PyTorch): each epoch it
trains on shuffled, randomly shifted batches, validates on the test set, appends a row to `log.csv`,
keeps the best weights, optionally writes TensorBoard logs, and backs up everything a killed run needs
to resume (`backup.Backup`). How one step runs on the devices is the backend's business (`backends.py`).

Usage::

    config = TrainConfig(epochs=2, seed=0, save_dir="result")      # the other flags' defaults
    built = build((28, 28, 1), 10, config, steps_per_epoch=600)    # models, optimizer, step
    train(built, (train_data, test_data), config, Backup("result/backup"))
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import keras
import numpy as np

from capsnet import atomic, backends, datasets, losses, plots, saving
from capsnet.backup import Backup, RunState
from capsnet.baseline import baseline_cnn
from capsnet.batches import DigitBatcher, prefetch
from capsnet.errors import TrainingDivergedError
from capsnet.model import CapsNet, compile_like_original, two_digit_train_model

# What every step and every validation returns, summed over its samples (the loop divides).
SUMS = ("loss", "capsnet_loss", "decoder_loss", "capsnet_accuracy")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """What training reads. Its defaults are the command line's (and the original project's): the flags
    read them from here (`DEFAULTS`), and so does everything else that trains or times a step."""

    epochs: int = 50
    batch_size: int = 100  # global: split across the replicas of a data-parallel run
    lr: float = 0.001
    lr_decay: float = 0.9  # lr at epoch e is lr * lr_decay ** e
    lam_recon: float = 0.392  # weight of the reconstruction MSE (0.0005 * 784, the paper's SSE weight)
    routings: int = 3  # the paper's routing iterations
    shift_fraction: float = 0.1
    seed: int = 0
    save_dir: str = "./result"
    debug: bool = False  # TensorBoard logs
    steps_per_execution: int = 1  # training steps per compiled call (backends.Steps.train_many)


DEFAULTS = TrainConfig()


# ---------------------------------------------------------------------------------------------
# Optimizer
# ---------------------------------------------------------------------------------------------


@keras.saving.register_keras_serializable(package="capsnet")
class Adam(keras.optimizers.Adam):
    """`keras.optimizers.Adam`, whose update on TensorFlow is one fused kernel per variable.

    Keras' Adam updates a variable in ~10 element-wise ops, each a pass over the variable; TensorFlow's
    own fused `ResourceApplyAdam` computes the same update (`lr_t = lr * sqrt(1 - beta_2^t) /
    (1 - beta_1^t)`, `m += (g - m)(1 - beta_1)`, `v += (g^2 - v)(1 - beta_2)`, `w -= lr_t * m /
    (sqrt(v) + epsilon)`) in one pass, which matters on a CPU, where the update is memory-bound
    (`python bench/layers.py` times it). The variables (`m`, `v`) are Keras Adam's own, so checkpoints
    and backups are interchangeable with it. Other backends (JAX fuses the update itself) and
    `amsgrad` take Keras' update.
    """

    def update_step(self, gradient: Any, variable: Any, learning_rate: Any) -> None:
        if keras.backend.backend() != "tensorflow" or self.amsgrad:
            return super().update_step(gradient, variable, learning_rate)
        import tensorflow as tf

        dtype = variable.dtype
        step = tf.cast(self.iterations + 1, dtype)
        index = self._get_variable_index(variable)
        tf.raw_ops.ResourceApplyAdam(
            var=variable.handle, m=self._momentums[index].value.handle,
            v=self._velocities[index].value.handle,
            beta1_power=tf.pow(tf.cast(self.beta_1, dtype), step),
            beta2_power=tf.pow(tf.cast(self.beta_2, dtype), step),
            lr=tf.cast(learning_rate, dtype), beta1=tf.cast(self.beta_1, dtype),
            beta2=tf.cast(self.beta_2, dtype), epsilon=tf.cast(self.epsilon, dtype),
            grad=tf.cast(gradient, dtype))
        return None


def make_optimizer(lr: float, lr_decay: float, steps_per_epoch: int) -> keras.optimizers.Optimizer:
    """Adam whose learning rate is `lr * lr_decay ** epoch` (a staircase decay per epoch).

    The schedule reads the optimizer's own step counter, so a resumed run continues at the right rate.
    """
    schedule = keras.optimizers.schedules.ExponentialDecay(
        lr, decay_steps=steps_per_epoch, decay_rate=lr_decay, staircase=True)
    optimizer = Adam(learning_rate=schedule)
    if keras.mixed_precision.global_policy().name == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


class Trainer:
    """Trains a CapsNet train model epoch by epoch, resumably.

    Every epoch it validates (losses with the decoder masked by the true label, as Keras' `fit` with
    `validation_data`), appends to `save_dir/log.csv`, writes `weights-{epoch:02d}.weights.h5` when
    `val_capsnet_accuracy` improves, and saves the backup that makes the epoch final. Only the chief of
    a multi-worker run writes the user-facing files; every worker keeps its own backup.

    Args:
        model: the train model `[x, y] -> [lengths, reconstruction]`.
        optimizer: the optimizer `steps` applies (its variables are backed up).
        steps: runs one training or validation step on the backend's devices (`backends.make_steps`).
        config: the training flags.
        backup: the run's backup folder (`Backup(save_dir/backup, flags)`).
        is_chief: whether this process writes `log.csv`, checkpoints and TensorBoard logs.
        weights_model: the model whose weights checkpoints hold (the eval model shares the train model's
            layers and saves without the optimizer, as the original's weights files).
        batcher: makes the training batches and validation arrays from the data (default: single digits,
            `DigitBatcher`; MultiMNIST: `multimnist.PairBatcher`).

    With `config.steps_per_execution` K > 1 the batches of an epoch go to the devices K at a time
    (`steps.train_many`); an epoch's last call takes what remains, so no call spans two epochs and the
    learning rate, the log, the checkpoint and the backup stay per epoch. The progress bar and the
    divergence check still see every step.

    A model with random layers (the baseline's dropout) has its random generators reseeded at every
    epoch from `(seed, epoch)`: the backup holds the weights, not the generators' state, so this is
    what lets a resumed run draw the masks an uninterrupted one would.
    """

    def __init__(self, model: keras.Model, optimizer: Any, steps: Any, config: TrainConfig, backup: Backup,
                 is_chief: bool = True, weights_model: keras.Model | None = None, batcher: Any = None
                 ) -> None:
        self.batcher = batcher or DigitBatcher(config.batch_size, config.shift_fraction)
        self.model = model
        self.optimizer = optimizer
        self.steps = steps
        self.config = config
        self.backup = backup
        self.is_chief = is_chief
        self.weights_model = weights_model or model
        self.save_dir = Path(config.save_dir)

    def fit(self, train_data: tuple[np.ndarray, np.ndarray], valid_data: tuple[np.ndarray, np.ndarray]
            ) -> Any:
        """Trains until `config.epochs` epochs are complete, resuming a backed-up run.

        Returns:
            the log (a pandas DataFrame, as `log.csv`).
        """
        import pandas as pd

        self.steps.build_optimizer()
        state = self.backup.restore(self.model, self.optimizer)
        if state is None:
            state = RunState(seed=self.config.seed, flags=self.backup.flags)
        elif self.is_chief:
            print(f"Resuming after epoch {state.epoch} from {self.backup.directory} "
                  "(delete that folder to start over)")
        self.steps.reload()
        log = self._read_log(state.epoch)
        tensorboard = (TensorBoardLog(self.save_dir / "tensorboard-logs")
                       if self.config.debug and self.is_chief else None)
        for epoch in range(state.epoch, self.config.epochs):
            if self.is_chief:
                print(f"Epoch {epoch + 1}/{self.config.epochs}")
            learning_rate = self.learning_rate()
            if self._reseed(epoch, state.seed):
                self.steps.reload()
            start = time.perf_counter()
            row = self.train_epoch(*train_data, epoch=epoch, seed=state.seed)
            self.steps.sync()
            row.update({f"val_{k}": v for k, v in self.evaluate(*valid_data).items()})
            if not np.isfinite(row["val_loss"]):
                raise TrainingDivergedError(f"validation loss became {row['val_loss']} at epoch {epoch + 1}")
            row = {"epoch": epoch, **row, "learning_rate": learning_rate}
            if self.is_chief:
                print(" - ".join([f"{time.perf_counter() - start:.0f}s"]
                                 + [f"{k}: {v:.4f}" for k, v in row.items() if k != "epoch"]))
            log = pd.concat([log, pd.DataFrame([row])], ignore_index=True)
            state = self._end_epoch(epoch, row, log, state, tensorboard)
        if tensorboard is not None:
            tensorboard.close()
        return log

    def train_epoch(self, x: np.ndarray, y: np.ndarray, epoch: int, seed: int) -> dict[str, float]:
        """One epoch of training steps on the batches the batcher makes of `(x, y)`; returns the means
        of `SUMS` over its samples.

        Raises:
            TrainingDivergedError: a step's loss is NaN or inf (the model is not saved).
        """
        batch_size = self.config.batch_size
        steps = len(x) // batch_size
        progbar = keras.utils.Progbar(steps, verbose=1 if self.is_chief else 0, stateful_metrics=SUMS)
        sums = np.zeros(len(SUMS))
        step = 0
        for values in self._step_values(self.batcher.train(x, y, epoch, seed)):
            step += 1
            if not np.isfinite(values).all():
                raise TrainingDivergedError(f"loss became {values[0]} at epoch {epoch + 1}, step {step}")
            sums += values
            progbar.update(step, list(zip(SUMS, sums / (step * batch_size), strict=True)))
        return dict(zip(SUMS, sums / (steps * batch_size), strict=True))

    def _step_values(self, batches: Iterator[tuple[np.ndarray, ...]]) -> Iterator[np.ndarray]:
        """Runs the training steps of `batches` and yields each step's sums, in order: one call per
        step, or per `steps_per_execution` steps (stacked in the prefetch thread)."""
        per_call = self.config.steps_per_execution
        if per_call <= 1:
            for batch in prefetch(batches):
                yield self.steps.train(*batch)
            return
        for stacked in prefetch(stack_batches(batches, per_call)):
            yield from self.steps.train_many(*stacked)

    def _reseed(self, epoch: int, seed: int) -> bool:
        """Sets the state of each random generator of the model (dropout's) from `(seed, epoch)`;
        returns whether the model has any."""
        generators = [v for v in self.model.non_trainable_variables
                      if v.path.endswith("seed_generator_state")]
        for i, variable in enumerate(generators):
            start = np.random.default_rng([seed, epoch, 2, i]).integers(2**31)
            variable.assign(np.array([start, 0], dtype=variable.dtype))
        return bool(generators)

    def evaluate(self, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
        """Loss and accuracy of the train model (decoder masked by the true labels) on the validation
        set the batcher makes of `(x, y)` (the test set itself for single digits)."""
        arrays = self.batcher.valid(x, y)
        sums = np.zeros(len(SUMS))
        for start in range(0, len(arrays[0]), self.config.batch_size):
            sums += self.steps.evaluate(*(a[start : start + self.config.batch_size] for a in arrays))
        return dict(zip(SUMS, sums / len(arrays[0]), strict=True))

    def learning_rate(self) -> float:
        """The rate of the optimizer's next step (Keras 3 evaluates a schedule at the current step)."""
        return float(self.optimizer.learning_rate)

    def _end_epoch(self, epoch: int, row: dict, log: Any, state: RunState,
                   tensorboard: TensorBoardLog | None) -> RunState:
        if not self.is_chief:
            state = state.next_epoch()
            self.backup.save(state, self.model, self.optimizer)
            return state
        # Order matters for a crash between two writes: the log first (resume trims it back to the
        # backup's epoch), then the best checkpoint, then the backup that makes the epoch final.
        atomic.write_text_atomic(self.save_dir / "log.csv", log.to_csv(index=False))
        accuracy = row["val_capsnet_accuracy"]
        best = None
        if accuracy > state.best:
            path = self.save_dir / f"weights-{epoch + 1:02d}.weights.h5"
            print(f"val_capsnet_accuracy improved from {state.best:.5f} to {accuracy:.5f}, "
                  f"saving model to {path}")
            saving.save_weights(self.weights_model, path)
            best = float(accuracy)
        state = state.next_epoch(best)
        self.backup.save(state, self.model, self.optimizer)
        if tensorboard is not None:
            tensorboard.write(epoch, {k: v for k, v in row.items() if k != "epoch"},
                              self.model.trainable_weights)
        return state

    def _read_log(self, completed: int) -> Any:
        """The log of the epochs before `completed`, dropping rows a crash left beyond the backup."""
        import pandas as pd

        path = self.save_dir / "log.csv"
        if completed == 0 or not path.exists():
            return pd.DataFrame()
        log = pd.read_csv(path)
        return log[log["epoch"] < completed].reset_index(drop=True)


class TensorBoardLog:
    """`--debug`: each epoch's scalars and a histogram of every trainable weight, as TensorBoard event
    files in `log_dir`.

    Written with the `tensorboard` package's own event writer and protocol buffers, which need no
    TensorFlow: the same files come from every Keras backend.
    """

    HISTOGRAM_BINS = 30  # TensorBoard re-bins for display; 30 keeps the event files small

    def __init__(self, log_dir: str | Path) -> None:
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self.writer = EventFileWriter(str(log_dir))

    def write(self, epoch: int, scalars: dict[str, float], weights: list[Any]) -> None:
        """Appends one event at step `epoch`: `scalars` by name, one histogram per weight by its path."""
        from tensorboard.compat.proto import event_pb2, summary_pb2

        values = [summary_pb2.Summary.Value(tag=key, simple_value=float(value))
                  for key, value in scalars.items()]
        for weight in weights:
            array = np.asarray(weight, dtype=np.float64).ravel()
            counts, edges = np.histogram(array, bins=self.HISTOGRAM_BINS)
            histogram = summary_pb2.HistogramProto(
                min=float(array.min()), max=float(array.max()), num=float(array.size),
                sum=float(array.sum()), sum_squares=float(np.square(array).sum()),
                bucket_limit=edges[1:].tolist(), bucket=counts.astype(float).tolist())
            values.append(summary_pb2.Summary.Value(tag=weight.path, histo=histogram))
        self.writer.add_event(event_pb2.Event(wall_time=time.time(), step=epoch,
                                              summary=summary_pb2.Summary(value=values)))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def stack_batches(batches: Iterator[tuple[np.ndarray, ...]], count: int
                  ) -> Iterator[tuple[np.ndarray, ...]]:
    """`batches` grouped `count` at a time, each array stacked along a new first axis
    (`[count, batch, ...]`); the last group holds what remains."""
    group: list[tuple[np.ndarray, ...]] = []
    for batch in batches:
        group.append(batch)
        if len(group) == count:
            yield tuple(np.stack(arrays) for arrays in zip(*group, strict=True))
            group = []
    if group:
        yield tuple(np.stack(arrays) for arrays in zip(*group, strict=True))


def steps_per_epoch(n_train: int, batch_size: int) -> int:
    """Full batches per epoch (at least one, so that the learning-rate schedule is defined)."""
    return max(1, n_train // batch_size)


class Built(NamedTuple):
    """What `build` returns: the three models, the optimizer and the steps that train `train_model`."""

    model: keras.Model  # [x, y] -> [lengths, reconstruction], compiled as the original
    eval_model: keras.Model  # x -> [lengths, reconstruction]
    manipulate_model: keras.Model  # [x, y, noise] -> reconstruction
    optimizer: Any
    steps: Any  # backends.make_steps' object, or TensorFlowSteps with XLA
    train_model: keras.Model  # what the steps train: `model`, or its two-digit form


def build(input_shape: tuple[int, ...], n_class: int, config: TrainConfig = DEFAULTS,
          steps_per_epoch: int = 600, strategy: Any = None, two_digits: bool = False,
          jit_compile: bool = False, architecture: Any = CapsNet, model: str = "capsnet") -> Built:
    """The models, the optimizer and the training step, as the command line trains them.

    Models and optimizer are made under `strategy`'s scope, so that their variables are mirrored
    alike (an optimizer made outside it refuses to apply under `MirroredStrategy`). The steps are
    traced on their first call, so the convolutions may still be tuned (`autotune.tune_model`) and
    weights loaded after `build`.

    Args:
        input_shape: one image, `(rows, cols, channels)`.
        n_class: classes.
        config: `lr`, `lr_decay`, `lam_recon`, `routings` and `batch_size` are read.
        steps_per_epoch: steps per epoch, the period of the learning-rate decay.
        strategy: TensorFlow only: the `tf.distribute` strategy (default: one device).
        two_digits: train the two-digit model of MultiMNIST (`losses.TWO_DIGITS`).
        jit_compile: TensorFlow only: compile the steps with XLA.
        architecture: `(input_shape, n_class, routings) -> (train, eval, manipulate)` models, e.g.
            the original formulation's for a benchmark.
        model: `"capsnet"`, or `"baseline"` for the paper's baseline CNN (`capsnet.baseline`), one
            softmax model trained on cross-entropy (`losses.CLASSIFIER`); it has no manipulate model.
    """
    with strategy.scope() if strategy is not None else contextlib.nullcontext():
        optimizer = make_optimizer(config.lr, config.lr_decay, steps_per_epoch)
        if model == "baseline":
            net = baseline_cnn(input_shape, n_class)
            train_model, eval_model, manipulate_model = net, net, None
        else:
            net, eval_model, manipulate_model = architecture(input_shape, n_class, config.routings)
            compile_like_original(net, optimizer, config.lam_recon)
            train_model = two_digit_train_model(net) if two_digits else net
    objective = (losses.CLASSIFIER if model == "baseline" else
                 losses.TWO_DIGITS if two_digits else losses.ONE_DIGIT)
    if jit_compile:
        steps = backends.TensorFlowSteps(train_model, optimizer, config.lam_recon, config.batch_size,
                                         strategy, jit_compile=True, objective=objective)
    else:
        steps = backends.make_steps(train_model, optimizer, config.lam_recon, config.batch_size, strategy,
                                    objective=objective)
    return Built(net, eval_model, manipulate_model, optimizer, steps, train_model)


def train(built: Built, data: datasets.Dataset, config: TrainConfig, backup: Backup, is_chief: bool = True,
          batcher: Any = None) -> None:
    """Trains `built.train_model` with `built.steps` on `data`, validating on the test set every epoch.

    Writes to `config.save_dir`: `log.csv`, `weights-{epoch:02d}.weights.h5` (best on validation
    accuracy), `trained_model.weights.h5` and `log.png` (the chief only), and removes the backup once
    the run is complete. MultiMNIST passes its `batcher` (`multimnist.PairBatcher`) with a two-digit
    `built`.
    """
    trainer = Trainer(built.train_model, built.optimizer, built.steps, config, backup, is_chief=is_chief,
                      weights_model=built.eval_model, batcher=batcher)
    trainer.fit(*data)
    if is_chief:
        path = Path(config.save_dir) / "trained_model.weights.h5"
        saving.save_weights(built.eval_model, path)
        print(f"Trained model saved to '{path}'")
        plots.plot_log(Path(config.save_dir) / "log.csv", show=False)
    backup.remove()
