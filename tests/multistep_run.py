"""Trains one small model through `training.Trainer` several ways on the current Keras backend, for
`tests/test_multistep.py` (the backend is chosen when Keras is imported, so each backend is its own
process).

Usage: KERAS_BACKEND=jax python tests/multistep_run.py OUT [--replicas 2]

`--replicas 2`: data-parallel over two CPU devices (TensorFlow: `MirroredStrategy` over two logical
CPUs; JAX: `keras.distribution.DataParallel`, with `XLA_FLAGS=--xla_force_host_platform_device_count=2`
set by the caller), each step's batch of 10 split 5 + 5.

Writes `OUT/NAME/log.csv`, `OUT/NAME/weights.npz` and `OUT/NAME/calls.json` (the steps of each
`train_many` call, one line per process) for each run, all from the same seed and data
(a small baseline CNN with dropout on 70 synthetic 14x14 images of 2 classes, batch 10: 7 steps per
epoch, 2 epochs, `lr_decay` 0.5, shifts on):

- `k1`: one step per call (`steps_per_execution` 1, the default path);
- `k3`: three steps per call (calls of 3, 3 and 1 steps per epoch);
- `k3_resumed`: as `k3`, but stopped after epoch 1 and resumed from its backup by a new model and
  optimizer (a new process would do the same).
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Any

import keras
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import synthetic_raw  # noqa: E402

from capsnet import backends, losses, training  # noqa: E402
from capsnet.backup import Backup  # noqa: E402
from capsnet.baseline import baseline_cnn  # noqa: E402

SEED = 5
BATCH = 10


def data() -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    (x, y), (x_test, y_test) = synthetic_raw(70, 20, n_class=2, seed=1, size=14)
    onehot = np.eye(2, dtype="float32")
    return ((x[..., None].astype("float32") / 255, onehot[y]),
            (x_test[..., None].astype("float32") / 255, onehot[y_test]))


def data_parallel(replicas: int) -> Any:
    """Sets up `replicas` CPU devices; returns the TensorFlow strategy (None elsewhere)."""
    if replicas == 1:
        return None
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * replicas)
        return tf.distribute.MirroredStrategy([f"CPU:{i}" for i in range(replicas)])
    import jax

    devices = jax.devices()[:replicas]
    assert len(devices) == replicas, "set XLA_FLAGS=--xla_force_host_platform_device_count"
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
    return None


def fit(save_dir: Path, epochs: int, per_call: int, strategy: Any = None) -> keras.Model:
    """A fresh model and optimizer (same seed each time) trained until `epochs` through the Trainer,
    resuming whatever `save_dir/backup` holds."""
    save_dir.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(SEED)
    with strategy.scope() if strategy is not None else contextlib.nullcontext():
        model = baseline_cnn((14, 14, 1), 2, conv_channels=(4, 4, 2), dense_units=(8, 6))
        optimizer = training.make_optimizer(0.01, 0.5, steps_per_epoch=7)
    config = training.TrainConfig(epochs=epochs, batch_size=BATCH, lr=0.01, lr_decay=0.5, seed=SEED,
                                  save_dir=str(save_dir), steps_per_execution=per_call)
    steps = backends.make_steps(model, optimizer, 0.0, BATCH, strategy, objective=losses.CLASSIFIER)
    calls: list[int] = []  # the steps of each train_many call, to show which path ran
    train_many = steps.train_many

    def counted(*stacked: np.ndarray) -> np.ndarray:
        calls.append(len(stacked[0]))
        return train_many(*stacked)

    steps.train_many = counted
    trainer = training.Trainer(model, optimizer, steps, config, Backup(save_dir / "backup"))
    trainer.fit(*data())
    with (save_dir / "calls.json").open("a") as f:
        f.write(json.dumps(calls) + "\n")
    return model


def save(model: keras.Model, save_dir: Path) -> None:
    np.savez(save_dir / "weights.npz", *[np.asarray(w) for w in model.weights])


if __name__ == "__main__":
    out = Path(sys.argv[1])
    strategy = data_parallel(int(sys.argv[3]) if sys.argv[2:3] == ["--replicas"] else 1)
    for name, per_call in (("k1", 1), ("k3", 3)):
        save(fit(out / name, 2, per_call, strategy), out / name)
    fit(out / "k3_resumed", 1, 3, strategy)
    save(fit(out / "k3_resumed", 2, 3, strategy), out / "k3_resumed")
