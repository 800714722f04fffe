"""`capsulenet-multi-gpu.py` over several processes, as on several machines, on the CPU:
PyTorch (`torch.distributed`, gloo; torchrun's standard variables `WORLD_SIZE`, `RANK`, `LOCAL_RANK`,
`MASTER_ADDR`, `MASTER_PORT`) and JAX (`jax.distributed`, JAX's gloo CPU collectives;
`JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`).

Per backend, two localhost processes started by hand with those variables, each with its own
`--save_dir` and one CPU device, with TensorFlow blocked (and JAX too on PyTorch). One run checks, in
order: process 1 is SIGKILLed once its first epoch is backed up and process 0 stops by itself with one
line; both are rerun with the same flags, resume and finish; the chief's `log.csv` (interrupted and
resumed) equals a one-process run's with the same seed and global batch (tight tolerance: float32
sums in another order). The control, the same two processes
without the gradient all-reduce (`tests/without_all_reduce.py`; on JAX each process then trains alone on
its share of each batch), must log something else.

Small data (40 training images, 4 steps of 10 per epoch, 10 test images) keep it to seconds
of compute; most of the time is the processes' start-up (and on JAX, XLA's compilation). A backend
that is not installed is skipped.
"""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from conftest import (
    child_env,
    describe,
    printed_accuracy,
    require_backend,
    run_script,
    save_npz,
    start_script,
    synthetic_raw,
)
from test_multi_gpu import free_ports, kill_after_first_epoch, wait_all

from capsnet import errors
from capsnet.backup import Backup
from capsnet.distributed.cluster import Cluster, jax_cluster, torch_cluster

FLAGS = ["--epochs", "2", "--batch_size", "10", "--seed", "4", "-r", "1", "--lr", "0.005"]
TIMEOUT_S = 300
# Two processes sum the gradients in another order than one: measured ~1e-7 relative (both backends).
LOG_RTOL, LOG_ATOL = 1e-5, 1e-7


# What differs per backend: the variables, the other packages blocked, the names of things.
BACKENDS = {
    "torch": {"block": ("--also-block", "jax"), "gpus": "2", "backup": "backup-rank-1",
              "started": "Data-parallel on 2 process(es) (torch.distributed, gloo",
              "lost": "error: rank 0 lost contact with the other processes ("},
    "jax": {"block": (), "gpus": "1", "backup": "backup-process-1",
            "started": "Data-parallel on 2 replica(s) over 2 processes (jax.distributed",
            "lost": "error: process 0 lost contact with the other processes ("},
}


def process_env(backend: str, rank: int, port: int) -> dict[str, str]:
    if backend == "torch":
        return child_env(KERAS_BACKEND="torch", WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank),
                         MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    return child_env(KERAS_BACKEND="jax", JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                     JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(rank))


@pytest.fixture(scope="module", params=list(BACKENDS))
def data(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The data, in a folder of the backend's name (which the other fixtures read)."""
    require_backend(request.param)
    return save_npz(tmp_path_factory.mktemp(request.param) / "data.npz", synthetic_raw(40, 10, seed=3))


def backend_of(data: Path) -> str:
    return data.parent.name.rstrip("0123456789")


def start_ranks(folder: Path, run: str, wrapper: tuple[str, ...] = ()) -> list[tuple[subprocess.Popen, Path]]:
    """Two processes of one group on 127.0.0.1, rank `i` saving to `folder/rank-i`, its output in
    `folder/<run>-rank-<i>.log`."""
    backend = backend_of(folder.parent / "data.npz")
    port = free_ports(1)[0]
    ranks = []
    for rank in range(2):
        log = folder / f"{run}-rank-{rank}.log"
        with log.open("w") as out:
            proc = start_script("tests/without_tensorflow.py", *BACKENDS[backend]["block"], *wrapper,
                                "capsulenet-multi-gpu.py", "--cpu", "--gpus", BACKENDS[backend]["gpus"],
                                *FLAGS, "--dataset", str(folder.parent / "data.npz"),
                                "--save_dir", str(folder / f"rank-{rank}"),
                                env=process_env(backend, rank, port), stdout=out, stderr=subprocess.STDOUT)
        ranks.append((proc, log))
    return ranks


@pytest.fixture(scope="module")
def one_process_log(data: Path) -> pd.DataFrame:
    backend = backend_of(data)
    save_dir = data.parent / "one-process"
    result = run_script("tests/without_tensorflow.py", *BACKENDS[backend]["block"], "capsulenet.py", *FLAGS,
                        "--dataset", str(data), "--save_dir", str(save_dir),
                        env=child_env(KERAS_BACKEND=backend), timeout=TIMEOUT_S)
    assert result.returncode == 0, describe(result)
    return pd.read_csv(save_dir / "log.csv")


@pytest.fixture(scope="module")
def ranks_run(data: Path) -> dict[str, Any]:
    """The killed and rerun pair (see the module docstring): exit codes, outputs, the backed-up epochs
    after the loss and whether rank 0 stopped within TIMEOUT_S."""
    folder = data.parent / "pair"
    folder.mkdir()
    run: dict[str, Any] = {"folder": folder, "stopped": False}
    ranks = start_ranks(folder, "first")
    (chief, _), (other, _) = ranks
    backend = backend_of(data)
    run["backend"] = backend
    state = folder / "rank-1" / BACKENDS[backend]["backup"] / "state.json"
    run["stopped"] = kill_after_first_epoch(chief, other, state, TIMEOUT_S, TIMEOUT_S) is not None
    run["first_codes"] = [proc.returncode for proc, _ in ranks]
    run["first_logs"] = [log.read_text() for _, log in ranks]
    run["backup_epochs"] = [Backup(folder / "rank-0" / "backup").latest_epoch(),
                            Backup(folder / "rank-1" / BACKENDS[backend]["backup"]).latest_epoch()]
    rerun = start_ranks(folder, "rerun")
    run["rerun_codes"] = wait_all([proc for proc, _ in rerun], TIMEOUT_S)
    run["rerun_logs"] = [log.read_text() for _, log in rerun]
    return run


def logs_of(texts: list[str]) -> str:
    return "\n----\n".join(text[-3000:] for text in texts)


def mismatch(got: pd.DataFrame, want: pd.DataFrame) -> float:
    """The largest `|got - want| / (LOG_ATOL + LOG_RTOL |want|)` over the logs' cells: <= 1 is equal."""
    assert list(got.columns) == list(want.columns) and got["epoch"].tolist() == want["epoch"].tolist()
    a, b = got.to_numpy(float), want.to_numpy(float)
    return float((np.abs(a - b) / (LOG_ATOL + LOG_RTOL * np.abs(b))).max())


@pytest.mark.slow
def test_a_killed_process_stops_the_other_with_one_line(ranks_run: dict[str, Any]) -> None:
    logs = ranks_run["first_logs"]
    assert ranks_run["first_codes"][1] == -signal.SIGKILL, logs_of(logs)
    assert ranks_run["stopped"], f"rank 0 still ran {TIMEOUT_S} s after rank 1 was killed\n{logs_of(logs)}"
    assert ranks_run["first_codes"][0] == 1, logs_of(logs)
    errors = [line for line in logs[0].splitlines() if line.startswith("error:")]
    assert len(errors) == 1, logs_of(logs)
    assert errors[0].startswith(BACKENDS[ranks_run["backend"]]["lost"]), errors[0]
    assert "rerun every process with the same flags to resume" in errors[0]
    assert "Traceback" not in logs[0]
    assert ranks_run["backup_epochs"] == [1, 1]


@pytest.mark.slow
def test_rerun_resumes_and_logs_as_one_process(ranks_run: dict[str, Any], one_process_log: pd.DataFrame
                                               ) -> None:
    logs = ranks_run["rerun_logs"]
    assert ranks_run["rerun_codes"] == [0, 0], logs_of(logs)
    assert BACKENDS[ranks_run["backend"]]["started"] in logs[0], logs_of(logs)
    assert "Resuming after epoch 1" in logs[0], logs_of(logs)
    chief, other = ranks_run["folder"] / "rank-0", ranks_run["folder"] / "rank-1"
    for name in ("log.csv", "weights-01.weights.h5", "trained_model.weights.h5", "trained_model.keras",
                 "real_and_recon.png"):
        assert (chief / name).is_file(), name
    assert "Test acc" not in logs[1] and not (other / "log.csv").exists()
    log = pd.read_csv(chief / "log.csv")
    assert mismatch(log, one_process_log) <= 1, (log, one_process_log)
    assert printed_accuracy(logs[0]) == pytest.approx(log["val_capsnet_accuracy"].iloc[-1], abs=1e-4)


@pytest.mark.slow
def test_without_the_gradient_all_reduce_the_log_differs(data: Path, one_process_log: pd.DataFrame) -> None:
    """The control: each process applying only its own half-batch's gradient logs something else."""
    folder = data.parent / "control"
    folder.mkdir()
    ranks = start_ranks(folder, "control", wrapper=("tests/without_all_reduce.py",))
    codes = wait_all([proc for proc, _ in ranks], TIMEOUT_S)
    logs = [log.read_text() for _, log in ranks]
    assert codes == [0, 0], logs_of(logs)
    assert mismatch(pd.read_csv(folder / "rank-0" / "log.csv"), one_process_log) > 10, logs_of(logs)


def test_jax_processes_from_the_standard_variables() -> None:
    assert jax_cluster({}) is None
    cluster = jax_cluster({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "3",
                           "JAX_PROCESS_ID": "2"})
    assert isinstance(cluster, Cluster)
    assert (cluster.coordinator, cluster.size, cluster.rank) == ("10.0.0.1:1234", 3, 2)
    assert not cluster.is_chief and cluster.backup_dir_name == "backup-process-2"
    assert jax_cluster({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2",
                        "JAX_PROCESS_ID": "0"}).backup_dir_name == "backup"
    with pytest.raises(errors.UserError, match=r"JAX_NUM_PROCESSES is not set \(JAX_COORDINATOR_ADDRESS and "
                                               r"JAX_PROCESS_ID are\)"):
        jax_cluster({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_PROCESS_ID": "0"})
    with pytest.raises(errors.UserError, match=r"JAX_PROCESS_ID 2: must be in \[0, JAX_NUM_PROCESSES = 2\)"):
        jax_cluster({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"})


def test_torchrun_is_recognised_by_its_variables() -> None:
    with pytest.raises(errors.UserError, match="LOCAL_RANK, MASTER_ADDR and MASTER_PORT are not set"):
        torch_cluster({"WORLD_SIZE": "2", "RANK": "1"})  # a group, but not all of its variables
    assert torch_cluster({"MASTER_ADDR": "h"}) is None  # a scheduler's default, not a group


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_tf_config_is_refused_on_jax_and_torch_in_one_line(backend: str, tmp_path: Path) -> None:
    """TF_CONFIG is TensorFlow's: the other backends name their own variables (before any device)."""
    require_backend(backend)
    config = json.dumps({"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "worker", "index": 0}})
    result = run_script("capsulenet-multi-gpu.py", "--cpu", "--save_dir", str(tmp_path),
                        env={**child_env(KERAS_BACKEND=backend), "TF_CONFIG": config}, timeout=TIMEOUT_S)
    assert result.returncode == errors.EXIT_BAD_INPUT, describe(result)
    expected = {"jax": "JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID",
                "torch": "WORLD_SIZE, RANK, MASTER_ADDR and MASTER_PORT"}[backend]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: TF_CONFIG: on ") and expected in last, last
