"""Several processes, misconfigured or kept waiting: one line and an exit code, never a silent hang.

- The variables of each engine (`TF_CONFIG`; `JAX_*`; torchrun's `WORLD_SIZE`, `RANK`, `LOCAL_RANK`,
  `MASTER_ADDR`, `MASTER_PORT`) are checked by pure functions: a mapping in, a `Cluster` or one
  `UserError` out (fast, no process).
- The meeting before the engines join (`rendezvous.meet`), between threads over real localhost
  sockets: everyone meets; the chief names exactly who never came; a rank given twice is refused.
- Real processes of `capsulenet-multi-gpu.py` on localhost, per engine: a bad variable is one
  `error:` line and exit 2; a process whose peer never comes says it waits (in a file, so flushed),
  then exits 1 with one line within `--join_timeout`; Ctrl-C or SIGTERM while it waits ends it with
  exit 130 and leaves the backup as it was. A slow one: Ctrl-C while a peer hangs in a collective.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import child_env, describe, run_script, save_npz, start_script, synthetic_raw
from test_multi_gpu import free_ports

from capsnet import errors
from capsnet.distributed import rendezvous
from capsnet.distributed.cluster import Cluster, jax_cluster, read_cluster, tf_cluster, torch_cluster

TORCH = {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1",
         "MASTER_PORT": "29500"}
JAX = {"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
PROCESS_TIMEOUT_S = 120  # generous: a process start imports Keras and its backend


def _tf(workers: list[str], index: int = 0, **cluster: list[str]) -> dict[str, str]:
    return {"TF_CONFIG": json.dumps({"cluster": {"worker": workers, **cluster},
                                     "task": {"type": "worker", "index": index}})}


# ---------------------------------------------------------------------------------------------
# The variables (pure functions)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("reader", "environ", "message"), [
    # The rows of the issue: a forgotten coordinator must not train alone; a forgotten MASTER_ADDR is
    # not a traceback; a rank out of range does not hang.
    (jax_cluster, {"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"},
     r"^JAX_COORDINATOR_ADDRESS is not set \(JAX_NUM_PROCESSES and JAX_PROCESS_ID are\)"),
    (torch_cluster, {**TORCH, "MASTER_ADDR": ""},
     r"^MASTER_ADDR is not set \(WORLD_SIZE, RANK, LOCAL_RANK and MASTER_PORT are\): .*set it on every"),
    (torch_cluster, {**TORCH, "RANK": "5"}, r"^RANK 5: must be in \[0, WORLD_SIZE = 2\)"),
    (torch_cluster, {**TORCH, "LOCAL_RANK": "-1"}, r"^LOCAL_RANK -1: must be in \[0, WORLD_SIZE = 2\)"),
    (torch_cluster, {**TORCH, "WORLD_SIZE": "two"}, r"^WORLD_SIZE: 'two' is not an integer"),
    (torch_cluster, {**TORCH, "MASTER_PORT": "70000"}, r"^MASTER_PORT: '70000' is not a port"),
    (torch_cluster, {**TORCH, "MASTER_ADDR": "10.0.0.1:29500"},
     r"^MASTER_ADDR: '10.0.0.1:29500' is not .*the port goes in MASTER_PORT"),
    (jax_cluster, {**JAX, "JAX_PROCESS_ID": "2"},
     r"^JAX_PROCESS_ID 2: must be in \[0, JAX_NUM_PROCESSES = 2\)"),
    (jax_cluster, {**JAX, "JAX_NUM_PROCESSES": "0"}, r"^JAX_NUM_PROCESSES 0: must be at least 1"),
    (jax_cluster, {**JAX, "JAX_COORDINATOR_ADDRESS": "10.0.0.1"},
     r"^JAX_COORDINATOR_ADDRESS: '10.0.0.1' is not host:port"),
    (jax_cluster, {**JAX, "JAX_COORDINATOR_ADDRESS": "h:0"},
     r"^JAX_COORDINATOR_ADDRESS: 'h:0' is not host:port"),
    (tf_cluster, _tf(["127.0.0.1:1", "127.0.0.1"]), r"^TF_CONFIG worker 1: '127.0.0.1' is not host:port"),
    (tf_cluster, _tf(["h:1", "h:1"]), r"^TF_CONFIG: h:1 is given to several tasks"),
])
def test_a_bad_variable_is_named_with_the_fix(reader: object, environ: dict, message: str) -> None:
    with pytest.raises(errors.UserError, match=message):
        reader(environ)


@pytest.mark.parametrize(("engine", "environ", "message"), [
    ("tensorflow", JAX, r"^JAX_COORDINATOR_ADDRESS: on TensorFlow, start every machine with TF_CONFIG"),
    ("jax", TORCH, r"^WORLD_SIZE: on JAX, start every machine with JAX_COORDINATOR_ADDRESS, "),
    ("torch", _tf(["h:1"]), r"^TF_CONFIG: on PyTorch, start every machine with torchrun"),
])
def test_another_engines_variables_are_not_ignored(engine: str, environ: dict, message: str) -> None:
    with pytest.raises(errors.UserError, match=message):
        read_cluster(engine, environ)


def test_no_variable_is_one_machine() -> None:
    for engine in ("tensorflow", "jax", "torch"):
        assert read_cluster(engine, {"MASTER_ADDR": "h", "MASTER_PORT": "1", "PATH": "/bin"}) is None


def test_the_clusters_the_variables_describe() -> None:
    torch = torch_cluster({**TORCH, "MASTER_ADDR": "::1"})
    assert (torch.rank, torch.size, torch.local_rank, torch.coordinator) == (1, 2, 1, "[::1]:29500")
    assert (torch.name, torch.is_chief, torch.backup_dir_name, torch.gathered) == (
        "rank 1", False, "backup-rank-1", False)
    assert torch_cluster({**TORCH, "TORCHELASTIC_RUN_ID": "x"}).gathered  # torchrun's agent met them
    jax = jax_cluster({**JAX, "JAX_PROCESS_ID": "0"})
    assert (jax.name, jax.is_chief, jax.backup_dir_name, jax.coordinator) == (
        "process 0", True, "backup", "127.0.0.1:1234")
    # With a chief task, the chief is rank 0 and the coordinator; workers follow in order.
    tf = tf_cluster(_tf(["h:2", "h:3"], index=1, chief=["h:1"]))
    assert (tf.rank, tf.size, tf.coordinator, tf.name, tf.where(0)) == (
        2, 3, "h:1", "worker 1", "chief 0 at h:1")


# ---------------------------------------------------------------------------------------------
# The meeting, between threads on localhost
# ---------------------------------------------------------------------------------------------


def _cluster(rank: int, size: int, port: int) -> Cluster:
    names = tuple(f"process {r}" for r in range(size))
    return Cluster("process", rank, rank, size, f"127.0.0.1:{port}", names, variable="JAX_*")


def _meet_in_threads(ranks: list[int], size: int, timeout_s: float | list[float], port: int,
                     delays: list[float] | None = None) -> list[BaseException | None]:
    """Runs `rendezvous.meet` for each of `ranks` in its own thread (after its delay, within its
    timeout); returns what each raised."""
    timeouts = timeout_s if isinstance(timeout_s, list) else [timeout_s] * len(ranks)
    outcomes: list[BaseException | None] = [None] * len(ranks)

    def one(i: int) -> None:
        time.sleep((delays or [0.0] * len(ranks))[i])
        try:
            rendezvous.meet(_cluster(ranks[i], size, port), timeouts[i])
        except Exception as e:  # noqa: BLE001 - the test reads what each raised
            outcomes[i] = e

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(ranks))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    return outcomes


def test_everyone_meets_whoever_comes_first() -> None:
    # The others come before the chief listens: they retry until it does.
    assert _meet_in_threads([1, 2, 0], 3, 10, free_ports(1)[0], delays=[0, 0, 0.5]) == [None, None, None]


def test_the_chief_names_who_never_came() -> None:
    # The visitor waits longer, so that it is still there when the chief gives up.
    chief, visitor = _meet_in_threads([0, 1], 3, [1.5, 3], free_ports(1)[0])
    assert isinstance(chief, rendezvous.JoinTimeoutError)
    assert str(chief).startswith("process 0 waited 1.5 s (--join_timeout) for process 2, which never joined")
    assert isinstance(visitor, rendezvous.JoinTimeoutError)
    assert "process 0 at 127.0.0.1:" in str(visitor) and "answered but not every one" in str(visitor)


def test_a_process_alone_says_the_chief_never_answered() -> None:
    (visitor,) = _meet_in_threads([1], 2, 0.5, free_ports(1)[0])
    assert isinstance(visitor, rendezvous.JoinTimeoutError)
    assert "for process 0 at 127.0.0.1:" in str(visitor) and "which never answered" in str(visitor)


def test_a_rank_given_twice_is_refused() -> None:
    port = free_ports(1)[0]
    outcomes = _meet_in_threads([0, 1, 1], 3, [2, 4, 4], port, delays=[0, 0.2, 0.8])
    assert isinstance(outcomes[2], errors.UserError), outcomes
    assert "another process joined as process 1 already" in str(outcomes[2])
    assert isinstance(outcomes[0], rendezvous.JoinTimeoutError)  # process 2 never came


def test_a_taken_port_is_named() -> None:
    port = free_ports(1)[0]
    with socket.create_server(("127.0.0.1", port)):
        with pytest.raises(errors.UserError, match=f"cannot listen on port {port} of this machine, it is"):
            rendezvous.meet(_cluster(0, 2, port), 1)


# ---------------------------------------------------------------------------------------------
# Real processes on localhost
# ---------------------------------------------------------------------------------------------

ENGINES = ("tensorflow", "jax", "torch")


def _engine_env(engine: str, rank: int, port: int, **extra: str) -> dict[str, str]:
    """The variables of a 2-process cluster on 127.0.0.1, this process being `rank`."""
    if engine == "tensorflow":
        return child_env(**_tf([f"127.0.0.1:{port}", f"127.0.0.1:{port + 1}"], index=rank), **extra)
    if engine == "jax":
        return child_env(KERAS_BACKEND="jax", JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                         JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(rank), **extra)
    ranks = {"RANK": str(rank), "LOCAL_RANK": str(rank), "MASTER_PORT": str(port)}
    return child_env(KERAS_BACKEND="torch", OMP_NUM_THREADS="1", **{**TORCH, **ranks}, **extra)


def _skip_if_missing(engine: str) -> None:
    if importlib.util.find_spec(engine) is None:
        pytest.skip(f"{engine} is not installed")


def _error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize(("engine", "variables", "named"), [
    ("jax", {"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}, "error: JAX_COORDINATOR_ADDRESS is not set"),
    ("torch", {k: v for k, v in TORCH.items() if k != "MASTER_ADDR"}, "error: MASTER_ADDR is not set"),
    ("torch", {**TORCH, "RANK": "5"}, "error: RANK 5: must be in [0, WORLD_SIZE = 2)"),
])
def test_a_bad_variable_is_one_line_and_exit_2(engine: str, variables: dict, named: str,
                                               tmp_path: Path) -> None:
    _skip_if_missing(engine)
    env = child_env(KERAS_BACKEND=engine, **variables)
    result = run_script("capsulenet-multi-gpu.py", "--cpu", "--epochs", "1", "--save_dir", str(tmp_path),
                        env=env, timeout=PROCESS_TIMEOUT_S)
    assert result.returncode == errors.EXIT_BAD_INPUT, describe(result)
    assert "Traceback" not in result.stderr
    assert _error_lines(result.stderr) == [result.stderr.strip().splitlines()[-1]], describe(result)
    assert result.stderr.strip().splitlines()[-1].startswith(named), describe(result)
    assert not list(tmp_path.iterdir())  # nothing trained, nothing written


@pytest.fixture(scope="module")
def tiny_npz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_npz(tmp_path_factory.mktemp("join") / "data.npz", synthetic_raw(20, 10, seed=1))


def _start(engine: str, rank: int, port: int, folder: Path, data: Path, *flags: str
           ) -> tuple[subprocess.Popen, Path]:
    """One process of a 2-process cluster, its output (stdout and stderr) in a file, as under nohup."""
    log = folder / f"rank-{rank}.log"
    with log.open("w") as out:
        proc = start_script("capsulenet-multi-gpu.py", "--cpu", "--gpus", "1", "--epochs", "1",
                            "--batch_size", "10", "--dataset", str(data),
                            "--save_dir", str(folder / f"rank-{rank}"), *flags,
                            env=_engine_env(engine, rank, port), stdout=out, stderr=subprocess.STDOUT)
    return proc, log


SIGNALS = {"tensorflow": signal.SIGINT, "jax": signal.SIGTERM, "torch": signal.SIGINT}


@pytest.fixture(scope="module", params=ENGINES)
def alone(request: pytest.FixtureRequest, tiny_npz: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Per engine, two processes at once, each of another 2-process cluster whose other half never
    comes: the chief (rank 0) with `--join_timeout 3`, and rank 1, which gets Ctrl-C (SIGTERM on JAX)
    once its waiting line is in its file. Rank 1's save_dir holds a backup from an earlier run.

    Returns each one's exit code and output, the backup folder and its files before and after."""
    engine = request.param
    _skip_if_missing(engine)
    folder = tmp_path_factory.mktemp(f"alone-{engine}")
    kind = {"tensorflow": "worker", "jax": "process", "torch": "rank"}[engine]
    backup = folder / "rank-1" / f"backup-{kind}-1"
    backup.mkdir(parents=True)
    (backup / "state.json").write_text('{"epoch": 1, "checkpoint": "epoch-0001.npz"}')
    (backup / "epoch-0001.npz").write_bytes(b"weights of epoch 1")
    before = {p.name: p.read_bytes() for p in backup.iterdir()}
    chief_port, other_port = free_ports(2)
    chief, chief_log = _start(engine, 0, chief_port, folder, tiny_npz, "--join_timeout", "3")
    other, other_log = _start(engine, 1, other_port, folder, tiny_npz)
    try:
        deadline = time.monotonic() + PROCESS_TIMEOUT_S
        while (": waiting for " not in other_log.read_text() and other.poll() is None
               and time.monotonic() < deadline):
            time.sleep(0.1)
        waited = other.poll() is None
        other.send_signal(SIGNALS[engine])
        other_code = other.wait(timeout=30)
        chief_code = chief.wait(timeout=PROCESS_TIMEOUT_S)
    finally:
        for proc in (chief, other):
            proc.kill()
            proc.wait()
    return {"engine": engine, "chief": (chief_code, chief_log.read_text()), "waited": waited,
            "other": (other_code, other_log.read_text()), "backup": backup, "before": before,
            "after": {p.name: p.read_bytes() for p in backup.iterdir()}}


def test_a_peer_that_never_comes_is_named_within_the_join_timeout(alone: dict) -> None:
    code, text = alone["chief"]
    assert code == 1, text[-3000:]
    waiting = [line for line in text.splitlines() if ": waiting for 1 of 2 " in line]
    assert len(waiting) == 1 and "up to 3 s..." in waiting[0], text[-3000:]
    peer = {"tensorflow": "worker 1 at 127.0.0.1:", "jax": "process 1", "torch": "rank 1"}[alone["engine"]]
    name = {"tensorflow": "worker 0", "jax": "process 0", "torch": "rank 0"}[alone["engine"]]
    assert len(_error_lines(text)) == 1, text[-3000:]
    (error,) = _error_lines(text)
    assert error.startswith(f"error: {name} waited 3 s (--join_timeout) for {peer}"), error
    assert "which never joined" in error and "Traceback" not in text


def test_ctrl_c_while_waiting_ends_with_130_and_keeps_the_backup(alone: dict) -> None:
    code, text = alone["other"]
    assert alone["waited"], text[-3000:]  # the waiting line reached the file while it waited
    assert code == errors.EXIT_INTERRUPTED, text[-3000:]
    last = text.strip().splitlines()[-1]
    assert last.startswith("interrupted: rerun the same command") and f"(state in {alone['backup']})" in last
    assert "Traceback" not in text and not _error_lines(text)
    assert alone["after"] == alone["before"]


@pytest.mark.slow
def test_ctrl_c_while_a_peer_hangs_in_a_collective(tiny_npz: Path, tmp_path: Path) -> None:
    """Two PyTorch ranks train; rank 1 is stopped (SIGSTOP) after its first epoch, so rank 0 blocks in a
    collective, in C++; Ctrl-C then ends rank 0 with exit 130, its backup still loadable."""
    _skip_if_missing("torch")
    port = free_ports(1)[0]
    ranks = [_start("torch", rank, port, tmp_path, tiny_npz, "--epochs", "4", "--seed", "2")
             for rank in (0, 1)]
    (chief, chief_log), (other, _) = ranks
    state = tmp_path / "rank-1" / "backup-rank-1" / "state.json"
    try:
        deadline = time.monotonic() + PROCESS_TIMEOUT_S
        while not state.exists() and chief.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert state.exists(), chief_log.read_text()[-3000:]
        # Written to a file, the epoch lines are there while the process runs, not at its exit.
        assert "Epoch 1/4" in chief_log.read_text() and chief.poll() is None, chief_log.read_text()[-3000:]
        other.send_signal(signal.SIGSTOP)
        time.sleep(1)
        chief.send_signal(signal.SIGINT)
        code = chief.wait(timeout=30)
    finally:
        for proc, _ in ranks:
            proc.kill()
            proc.wait()
    text = chief_log.read_text()
    assert code == errors.EXIT_INTERRUPTED, text[-3000:]
    assert "\ninterrupted: rerun the same command" in text, text[-3000:]
    saved = json.loads((tmp_path / "rank-0" / "backup" / "state.json").read_text())
    assert saved["epoch"] >= 1 and (tmp_path / "rank-0" / "backup" / saved["checkpoint"]).is_file()
    assert os.path.getsize(tmp_path / "rank-0" / "backup" / saved["checkpoint"]) > 0
