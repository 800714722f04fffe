"""Data-parallel training on the PyTorch backend: several processes joined by `torch.distributed`.

Each process trains the same model on its slice of every global batch (`backends.TorchSteps`), the
gradients summed over the processes (`all_reduce`) before each update; one process per GPU (NCCL), or
with `--cpu` one per CPU share (gloo). torchrun is the launcher and its standard variables say who is
who (`WORLD_SIZE`, `RANK`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`):

- one machine: `capsulenet-multi-gpu.py --gpus N` starts `torchrun --standalone --nproc_per_node N`
  on itself when it was not started by torchrun;
- several machines: `torchrun --nnodes M --nproc_per_node N --node_rank K --master_addr HOST
  --master_port PORT capsulenet-multi-gpu.py ...` on each (or the variables set by hand, one process
  each). `TorchEngine` is the adapter for `flow.train`.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
from collections.abc import Sequence

from capsnet.distributed import flow
from capsnet.distributed.cluster import Cluster
from capsnet.errors import UserError

# How long a collective waits for a peer before failing. A dead peer is noticed at once (its socket
# closes); this bounds a hung one, and must outlast the chief's test on the whole test set, which the
# other processes wait for at the final barrier.
TIMEOUT = datetime.timedelta(minutes=30)


def check_gpus(cpu: bool, gpus: int) -> None:
    """Raises `UserError` when `--gpus` asks for more GPUs than this machine has (without `--cpu`)."""
    import torch

    visible = torch.cuda.device_count()
    if not cpu and gpus > visible:
        seen = f"only {visible} GPU(s) are visible" if visible else "no GPU is visible"
        raise UserError(f"--gpus {gpus}: {seen}; ask for fewer, or add --cpu to train on {gpus} CPU "
                        "processes")


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


class TorchEngine:
    """`flow.Engine` for `torch.distributed` (gloo on CPUs, NCCL on GPUs)."""

    def __init__(self, cluster: Cluster, cpu: bool) -> None:
        import torch
        import torch.distributed as dist

        self.cluster, self.torch, self.dist = cluster, torch, dist
        self.use_gpu = not cpu and torch.cuda.is_available()
        self.device = f"cuda:{cluster.local_rank}" if self.use_gpu else "cpu"

    def join(self) -> None:
        if self.use_gpu:
            self.torch.cuda.set_device(self.cluster.local_rank)  # Keras' torch backend uses the current GPU
        self.dist.init_process_group("nccl" if self.use_gpu else "gloo", timeout=TIMEOUT)

    def sum(self, values: Sequence[int]) -> list[int]:
        tensor = self.torch.tensor(list(values), dtype=self.torch.int64, device=self.device)
        self.dist.all_reduce(tensor)
        return [int(v) for v in tensor.cpu()]

    def lost_peer(self, error: BaseException) -> bool:
        return isinstance(error, RuntimeError)  # gloo / NCCL: "Connection closed by peer", "timed out"

    def check_batch(self, batch_size: int) -> None:
        if batch_size < self.cluster.size:
            raise UserError(f"--batch_size {batch_size}: must be at least the number of processes "
                            f"({self.cluster.size}); it is split across them")

    def describe(self) -> str:
        return (f"Data-parallel on {self.cluster.size} process(es) (torch.distributed, "
                f"{self.dist.get_backend()}; rank 0 on {self.device})")

    def training(self) -> contextlib.AbstractContextManager:
        return flow.nothing()
