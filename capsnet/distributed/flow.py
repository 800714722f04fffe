"""One multi-process training run, the same on every engine.

Every process runs the same command; the engine's variables say who is who (`cluster`). Then:

1. meet: every process comes to the chief's address within `--join_timeout` (`rendezvous.meet`), in a
   wait that prints one line, names who never came, and stops at Ctrl-C or SIGTERM;
2. join: the engine connects the processes (`Engine.join`), now that all are there;
3. agree: every process takes the chief's `--seed` (the data order and the shifts derive from
   `(seed, epoch)`) and resumes after the same epoch, the earliest any of them backed up;
4. train: the chief alone writes the user's files (logs, checkpoints, plots); every process keeps its
   own backup (`save_dir/backup` on the chief, `save_dir/backup-<kind>-<index>` on the others);
5. test: the chief tests the trained weights on one device; then all leave together, since a process
   that exits early looks like a crash to the others.

A process that loses a peer (a collective fails) prints one `error:` line and exits with code 1; rerun
every process with the same flags to resume from the last completed epoch.

An engine brings only its primitives (`Engine`): joining, an element-wise sum over the processes (also
a barrier; the seed and resume agreements are built on it), and whether an error means a lost peer.
"""

from __future__ import annotations

import contextlib
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from capsnet.backup import Backup
from capsnet.distributed import rendezvous
from capsnet.distributed.cluster import Cluster
from capsnet.errors import EXIT_INTERRUPTED, EXIT_OS_ERROR, UserError

DEFAULT_JOIN_TIMEOUT_S = 300.0
_joined = False


class Engine(Protocol):
    """What an engine adapter provides (`tf_distribute`, `jax_distributed`, `torch_distributed`)."""

    def join(self) -> None:
        """Connects this process to the others (all of them have met already)."""

    def sum(self, values: Sequence[int]) -> list[int]:
        """The element-wise sum of every process's `values`, on every process; also a barrier."""

    def lost_peer(self, error: BaseException) -> bool:
        """Whether `error` is a collective that failed because another process is gone."""

    def check_batch(self, batch_size: int) -> None:
        """Raises `UserError` when the global batch cannot be split over the replicas."""

    def describe(self) -> str:
        """One line naming the replicas, printed by the chief."""

    def training(self) -> contextlib.AbstractContextManager:
        """The context the training runs in (e.g. JAX's data-parallel distribution)."""


def has_joined() -> bool:
    """Whether this process joined others: it must then end through `rendezvous.end` on an error, as
    the engines' exit handlers would wait for the peers (see `train`)."""
    return _joined


def train(cluster: Cluster, engine: Engine, *, join_timeout: float, batch_size: int, save_dir: str,
          seed: int | None, epochs: int, run: Callable[[int, bool, str], None],
          test_alone: Callable[[], None]) -> None:
    """Trains data-parallel over every process of `cluster`, then the chief tests on one device.

    Args:
        cluster: this process's place (`cluster.read_cluster`).
        engine: the engine's adapter for this process.
        join_timeout: seconds to wait for every process to come.
        batch_size: the global batch, split over the replicas.
        save_dir: where the backups go.
        seed: this process's `--seed`; the chief's wins (None: the chief draws one).
        epochs: the run's length (the resume point is agreed against it).
        run: trains with `(seed, is_chief, backup_dir)` (the script's `capsulenet.run`).
        test_alone: the chief's one-device test after training.

    Raises:
        SystemExit: exit code 1 when some process never came, 130 on Ctrl-C or SIGTERM while waiting
            (after joining, these and a lost peer end the process at once: `rendezvous.end`).
    """
    global _joined
    backup_dir = Path(save_dir) / cluster.backup_dir_name
    interrupted = ("\ninterrupted: rerun the same command to resume from the last completed epoch (state "
                   f"in {backup_dir})")
    try:
        rendezvous.meet(cluster, join_timeout)
    except rendezvous.JoinTimeoutError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_OS_ERROR) from None
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr, flush=True)
        raise SystemExit(EXIT_INTERRUPTED) from None
    with rendezvous.watching_signals(interrupted):
        try:
            engine.join()
            _joined = True
            _reclaim_sigterm()
            engine.check_batch(batch_size)
            seed = agree_on_seed(engine.sum, seed, cluster.is_chief)
            if cluster.is_chief:
                print(engine.describe())
            agree_on_resume_point(backup_dir, epochs, engine.sum, peer=cluster.peer)
            with engine.training():
                run(seed, cluster.is_chief, str(backup_dir))
            if cluster.is_chief:
                test_alone()
            engine.sum([1])  # leave together
        except KeyboardInterrupt:  # the engines' exit handlers would wait for the other processes
            rendezvous.end(EXIT_INTERRUPTED, interrupted)
        except Exception as e:
            if not _joined or isinstance(e, UserError) or not engine.lost_peer(e):
                raise
            rendezvous.end(EXIT_OS_ERROR, lost_peer_message(cluster, e, backup_dir))


def lost_peer_message(cluster: Cluster, error: BaseException, backup_dir: Path) -> str:
    """The one line of a process whose peer is gone; the error's first line without its trace."""
    skip = ("Graph execution error", "Detected at node", "File ")
    lines = [line.strip() for line in str(getattr(error, "message", error)).splitlines()]
    reason = next((line for line in lines if line and not line.startswith(skip)), type(error).__name__)
    return (f"error: {cluster.name} lost contact with the other {cluster.peers} ({type(error).__name__}: "
            f"{reason[:200]}); rerun every {cluster.peer} with the same flags "
            f"to resume from the last completed epoch (state in {backup_dir})")


def _reclaim_sigterm() -> None:
    """Hands SIGTERM back to Python's handler: TensorFlow's and JAX's preemption notifiers take it over
    in C++ while joining and swallow it, and `kill` should stop a process as Ctrl-C does."""
    handler = signal.getsignal(signal.SIGTERM)
    if handler is not None:
        signal.signal(signal.SIGTERM, handler)


def agree_on_seed(total: Callable[[Sequence[int]], list[int]], seed: int | None, is_chief: bool) -> int:
    """The chief's `seed` (drawn at random when None) on every process, through the sum `total`."""
    if seed is None:
        seed = int(np.random.default_rng().integers(2**31))
    return total([seed if is_chief else 0])[0]


def agree_on_resume_point(backup_dir: str | Path, epochs: int, total: Callable[[Sequence[int]], list[int]],
                          peer: str = "process") -> None:
    """Makes every process resume after the same epoch: the earliest any of them backed up.

    Processes stopped between their epoch-end writes can be one epoch apart; each keeps the epoch
    before its latest (`Backup.save`), so the ahead ones roll back to it. Otherwise they would run
    different numbers of steps and wait for each other forever.

    Args:
        backup_dir: this process's backup folder.
        epochs: the run's length (a finished backup counts as its last epoch).
        total: the element-wise sum over the processes (`Engine.sum`); the earliest epoch is the first
            nonzero count of a sum of one-hot vectors.
        peer: what a process is called in the messages ("worker", "process").

    Raises:
        UserError: this process no longer holds the common epoch's backup.
    """
    backup = Backup(backup_dir)
    latest = min(backup.latest_epoch(), epochs)
    counts = total([int(e == latest) for e in range(epochs + 1)])
    common = next(e for e, count in enumerate(counts) if count)
    if common == latest:
        return
    if common != 0 and common not in backup.epochs():
        raise UserError(f"{backup_dir}: this {peer}'s backup ends after epoch {latest}, another {peer}'s "
                        f"after epoch {common}; delete every {peer}'s backup folder (save_dir/backup*) to "
                        "start over")
    print(f"Another {peer}'s backup ends after epoch {common}: resuming from there")
    backup.roll_back(common)


@contextlib.contextmanager
def nothing() -> Iterator[None]:
    """`Engine.training` for engines whose training needs no context."""
    yield
