"""Data-parallel training on the PyTorch backend: several processes joined by `torch.distributed`.

`capsulenet-multi-gpu.py` on `KERAS_BACKEND=torch` comes here. Each process trains the same model on
its slice of every global batch (`backends.TorchSteps`), the gradients summed over the processes
(`all_reduce`) before each update; one process per GPU (NCCL), or with `--cpu` one per CPU share
(gloo). `torchrun` is the launcher and its standard variables say who is who:

- `WORLD_SIZE` (processes in all), `RANK` (this one, 0 is the chief), `LOCAL_RANK` (its GPU on this
  machine), `MASTER_ADDR` / `MASTER_PORT` (where rank 0 listens);
- one machine: `capsulenet-multi-gpu.py --gpus N` starts `torchrun --standalone --nproc_per_node N`
  on itself when it was not started by torchrun;
- several machines: start `torchrun --nnodes M --nproc_per_node N --node_rank K --master_addr HOST
  --master_port PORT capsulenet-multi-gpu.py ...` on each (or set the variables above by hand, one
  process each).

As on TensorFlow's `TF_CONFIG` path, only the chief (rank 0) writes logs, checkpoints and the test;
every process keeps its own backup (`save_dir/backup`, `save_dir/backup-rank-R`), all agree on the
chief's `--seed` and on the epoch to resume from, and a process that loses a peer stops with one line
and exit code 1; rerunning the same command resumes from the last completed epoch.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from capsnet.backup import agree_on_resume_point as agree_on_backups
from capsnet.errors import UserError

# torchrun's variables (also what a hand-started process must set).
ENV_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# How long a collective waits for a peer before failing. A dead peer is noticed at once (its socket
# closes); this bounds a hung one, and must outlast the chief's test on the whole test set (minutes on
# a CPU), which the other processes wait for at the final barrier.
TIMEOUT = datetime.timedelta(minutes=30)


def launched_by_torchrun(environ: dict[str, str] | None = None) -> bool:
    """Whether the process was started by torchrun (or by hand with its variables)."""
    environ = os.environ if environ is None else environ
    return "WORLD_SIZE" in environ and "RANK" in environ


def relaunch_with_torchrun(nproc: int, argv: Sequence[str]) -> int:
    """Runs `torchrun --standalone --nproc_per_node nproc SCRIPT argv` (this script, on this machine)
    and returns its exit code."""
    from torch.distributed.run import get_args_parser, run

    script = os.path.abspath(sys.argv[0])
    args = get_args_parser().parse_args(["--standalone", f"--nproc_per_node={nproc}", "--tee=0",
                                         script, *argv])
    try:
        run(args)
    except Exception as e:  # torch.distributed.elastic's ChildFailedError: its report is printed
        print(f"error: a training process failed ({type(e).__name__}); rerun the same command to "
              "resume from the last completed epoch", file=sys.stderr)
        return 1
    return 0


class Group:
    """This process's place in the `torch.distributed` group, joined from torchrun's variables."""

    def __init__(self, cpu: bool) -> None:
        import torch
        import torch.distributed as dist

        self.torch, self.dist = torch, dist
        self.rank = int(os.environ["RANK"])
        self.world = int(os.environ["WORLD_SIZE"])
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        use_gpu = not cpu and torch.cuda.is_available()
        if use_gpu:
            torch.cuda.set_device(self.local_rank)  # Keras' torch backend computes on the current GPU
        dist.init_process_group("nccl" if use_gpu else "gloo", timeout=TIMEOUT)
        self.device = f"cuda:{self.local_rank}" if use_gpu else "cpu"

    @property
    def is_chief(self) -> bool:
        return self.rank == 0

    def sum(self, values: Sequence[int]) -> list[int]:
        """Element-wise sum of every process's `values`, on every process; also a barrier."""
        tensor = self.torch.tensor(list(values), dtype=self.torch.int64)
        if self.device != "cpu":
            tensor = tensor.to(self.device)
        self.dist.all_reduce(tensor)
        return [int(v) for v in tensor.cpu()]

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.dist.destroy_process_group()

    @property
    def backup_dir_name(self) -> str:
        return "backup" if self.is_chief else f"backup-rank-{self.rank}"


def agree_on_seed(group: Group, seed: int | None) -> int:
    """The chief's `--seed` (drawn when absent) on every process."""
    import numpy as np

    if seed is None:
        seed = int(np.random.default_rng().integers(2**31))
    return group.sum([seed if group.is_chief else 0])[0]


def agree_on_resume_point(group: Group, backup_dir: Path, epochs: int) -> None:
    """Every process resumes after the same epoch, the earliest any backed up."""

    def earliest(latest: int) -> int:  # a sum of one-hot vectors: gloo and NCCL both sum
        counts = group.sum([int(e == latest) for e in range(epochs + 1)])
        return next(e for e, count in enumerate(counts) if count)

    agree_on_backups(backup_dir, epochs, earliest)


@contextlib.contextmanager
def peers_watched(group: Group, backup_dir: Path) -> Iterator[None]:
    """Turns a lost peer (a collective fails) into one line on stderr and exit code 1."""
    try:
        yield
    except RuntimeError as e:  # gloo / NCCL: "Connection closed by peer", "timed out", ...
        text = str(e).strip().splitlines()
        reason = (text[0] if text else type(e).__name__)[:200]
        print(f"error: rank {group.rank} lost contact with the other processes ({reason}); rerun every "
              f"process with the same flags to resume from the last completed epoch (state in {backup_dir})",
              file=sys.stderr)
        group.close()
        raise SystemExit(1) from e


def train(*, cpu: bool, batch_size: int, save_dir: str, seed: int | None, epochs: int,
          run: Callable[[int, bool, str], None], test_alone: Callable[[], None]) -> None:
    """Trains under torchrun's group (joined here), then the chief tests on one device.

    Args:
        cpu: gloo on the CPU even where GPUs are visible; batch_size: the global batch, split
            across the processes; save_dir: where the backups go; seed: this process' `--seed` (the
            chief's wins); epochs: the run's length (the resume point is agreed against it).
        run: trains with `(seed, is_chief, backup_dir)` (the script's `capsulenet.run`);
        test_alone: the chief's one-device test after training.
    """
    group = Group(cpu)
    if batch_size < group.world:
        group.close()
        raise UserError(f"--batch_size {batch_size}: must be at least the number of processes "
                        f"({group.world}); it is split across them")
    backup_dir = Path(save_dir) / group.backup_dir_name
    with peers_watched(group, backup_dir):
        seed = agree_on_seed(group, seed)
        if group.is_chief:
            print(f"Data-parallel on {group.world} process(es) (torch.distributed, "
                  f"{group.dist.get_backend()}; rank 0 on {group.device})")
        agree_on_resume_point(group, backup_dir, epochs)
        run(seed, group.is_chief, str(backup_dir))
        if group.is_chief:
            test_alone()
        group.sum([1])  # leave together: a process that exits early looks like a crash to the others
    group.close()
