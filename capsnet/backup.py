"""The resumable state of an unfinished training run: the folder `save_dir/backup`.

One class, `Backup`, owns the folder's format; nothing else reads or writes it. After every completed
epoch it holds:

    backup/
      epoch-0003.npz    model and optimizer variables after epoch 3, in `model.weights` and
                        `optimizer.variables` order (`model/0`, ..., `optimizer/0`, ...)
      epoch-0003.json   the `RunState` of that epoch (epochs done, best score, seed, flags)
      epoch-0002.*      the epoch before, kept so that workers one epoch apart can agree (see
                        `roll_back` and `distributed.flow.agree_on_resume_point`)
      state.json        the `RunState` to resume from, plus `"checkpoint": "epoch-0003.npz"`

`state.json` is written last and atomically, so a crash between two writes never pairs weights of one
epoch with the state of another. Like Keras' `BackupAndRestore`, the folder is removed once the run
is complete.

Usage::

    backup = Backup("result/backup", flags={"batch_size": 100, "lr": 0.001})
    state = backup.restore(model, optimizer) or RunState(seed=seed, flags=backup.flags)
    ...  # train one epoch
    state = state.next_epoch()
    backup.save(state, model, optimizer)
    ...
    backup.remove()
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from capsnet import atomic
from capsnet.errors import UserError

STATE_FILE = "state.json"


@dataclasses.dataclass(frozen=True)
class RunState:
    """What a resumed run needs beside the weights and the optimizer."""

    epoch: int = 0  # epochs completed
    best: float = -math.inf  # best val_capsnet_accuracy so far
    seed: int = 0
    flags: dict | None = None  # the flags that must match to resume (see `Backup`)

    def next_epoch(self, best: float | None = None) -> RunState:
        """The state after one more completed epoch, with a new best score if given."""
        return dataclasses.replace(self, epoch=self.epoch + 1, best=self.best if best is None else best)


def model_arrays(model: Any, optimizer: Any) -> dict[str, np.ndarray]:
    """The model's and the optimizer's variables as NumPy arrays, keyed `model/i` and `optimizer/i`."""
    arrays = {f"model/{i}": np.asarray(v) for i, v in enumerate(model.weights)}
    arrays.update({f"optimizer/{i}": np.asarray(v) for i, v in enumerate(optimizer.variables)})
    return arrays


def assign_model_arrays(model: Any, optimizer: Any, arrays: Mapping[str, np.ndarray]) -> None:
    """The inverse of `model_arrays`."""
    for prefix, variables in (("model", model.weights), ("optimizer", optimizer.variables)):
        for i, variable in enumerate(variables):
            variable.assign(arrays[f"{prefix}/{i}"])


def _changed_flags(saved: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """`{flag: (saved value, current value)}` of the flags that differ. Either side may name a flag
    the other lacks (e.g. --multimnist): that is a difference too."""
    return {k: (saved.get(k), current.get(k)) for k in {**saved, **current}
            if saved.get(k) != current.get(k)}


class Backup:
    """The backup folder of one training run.

    Args:
        directory: the folder, e.g. `result/backup` (a worker of a multi-worker run has its own).
        flags: the flags that must be equal for a run to resume from this folder (batch size, learning
            rate, ...): resuming with others would silently train a different run. None (a caller that
            states no flags, e.g. a script of its own) resumes whatever the folder holds; `{}` resumes
            only a backup saved without flags.
    """

    def __init__(self, directory: str | os.PathLike, flags: Mapping[str, Any] | None = None) -> None:
        self.directory = Path(directory)
        self.flags = None if flags is None else dict(flags)

    # -- reading -----------------------------------------------------------------------------

    def latest_epoch(self) -> int:
        """The epoch a run resumes after; 0 without a backup."""
        path = self.directory / STATE_FILE
        return int(json.loads(path.read_text())["epoch"]) if path.exists() else 0

    def epochs(self) -> list[int]:
        """The completed epochs whose arrays and state are both in the folder, in order."""
        epochs = {_epoch_of(p) for p in self.directory.glob("epoch-*.npz")}
        return sorted(e for e in epochs if self._state_path(e).exists())

    def restore(self, model: Any, optimizer: Any) -> RunState | None:
        """Loads the latest backup into `model` and `optimizer` (both built); None without one.

        Raises:
            UserError: the backup was made with other flags.
        """
        path = self.directory / STATE_FILE
        if not path.exists():
            return None
        saved = json.loads(path.read_text())
        checkpoint = self.directory / saved.pop("checkpoint")
        state = RunState(**saved)
        changed = {} if self.flags is None else _changed_flags(state.flags or {}, self.flags)
        if changed:
            detail = ", ".join(f"--{k} was {old}, now {new}" for k, (old, new) in changed.items())
            raise UserError(f"{self.directory} holds an unfinished run with other flags ({detail}); "
                            "rerun with the same flags to resume, or delete that folder to start over")
        with np.load(checkpoint, allow_pickle=False) as arrays:
            assign_model_arrays(model, optimizer, arrays)
        return state

    # -- writing -----------------------------------------------------------------------------

    def save(self, state: RunState, model: Any, optimizer: Any) -> None:
        """Backs up the epoch `state.epoch` and makes it the one a run resumes from."""
        self.directory.mkdir(parents=True, exist_ok=True)
        with atomic.atomic_path(self._arrays_path(state.epoch)) as tmp:
            np.savez(tmp, **model_arrays(model, optimizer))
        state_json = json.dumps(dataclasses.asdict(state), indent=1)
        atomic.write_text_atomic(self._state_path(state.epoch), state_json)
        self.roll_back(state.epoch)
        # The epoch before stays too: workers of a multi-worker run stopped one epoch apart resume
        # together from the earlier one.
        for old in self.directory.glob("epoch-*"):
            if _epoch_of(old) < state.epoch - 1:
                old.unlink()

    def roll_back(self, epoch: int) -> None:
        """Makes the backup of `epoch` (one of `epochs()`) the one a run resumes from; epoch 0 removes
        the backup, so that the run starts over."""
        if epoch == 0:
            self.remove()
            return
        state = json.loads(self._state_path(epoch).read_text())
        state["checkpoint"] = self._arrays_path(epoch).name
        atomic.write_text_atomic(self.directory / STATE_FILE, json.dumps(state, indent=1))

    def remove(self) -> None:
        """Deletes the folder, as Keras' `BackupAndRestore` does when training completes."""
        shutil.rmtree(self.directory, ignore_errors=True)

    # -- file names --------------------------------------------------------------------------

    def _arrays_path(self, epoch: int) -> Path:
        return self.directory / f"epoch-{epoch:04d}.npz"

    def _state_path(self, epoch: int) -> Path:
        return self.directory / f"epoch-{epoch:04d}.json"


def _epoch_of(path: Path) -> int:
    """The epoch of a backup file named `epoch-0003.npz` or `epoch-0003.json`."""
    return int(path.name.split(".")[0].split("-")[1])

