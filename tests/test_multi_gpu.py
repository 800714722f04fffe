"""Data-parallel training: `capsulenet-multi-gpu.py` on logical CPU devices and localhost workers.

TensorFlow's devices can be split into logical ones only before it initialises them, so everything
that trains on several devices runs in a child process: the CLI itself, or this file run as a script
(`python tests/test_multi_gpu.py --equivalence OUT.json`) for the one-step equivalence check.

The end-to-end runs compare whole `log.csv` files with a one-device `capsulenet.py` run of the same seed
and global batch: 2 logical CPUs, a control with the all-reduce turned off (`tests/without_all_reduce.py`)
that must differ, and two localhost workers, one of which is killed mid-run before both are resumed.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pandas as pd
import pytest
from conftest import child_env, describe, printed_accuracy, run_script, start_script

from capsnet.backup import Backup
from capsnet.distributed import flow, tf_distribute
from capsnet.distributed.cluster import tf_cluster
from capsnet.errors import UserError

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "capsulenet-multi-gpu.py"

EQUIVALENCE_BATCH = 16
# One Adam step moves a weight by up to lr = 1e-3; summation order alone changes it by ~1e-8.
EQUIVALENCE_ATOL = 1e-6
WORKER_TIMEOUT_S = 240


def load_script() -> ModuleType:
    """`capsulenet-multi-gpu.py` as a module (its name is not importable)."""
    spec = importlib.util.spec_from_file_location("capsulenet_multi_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def run_mgpu(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return run_script("capsulenet-multi-gpu.py", *args, timeout=timeout)


def free_ports(n: int) -> list[int]:
    """`n` distinct free TCP ports on 127.0.0.1 (bound to port 0, then released)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


# ---------------------------------------------------------------------------------------------
# Flags and TF_CONFIG (no device is touched)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mgpu() -> ModuleType:
    return load_script()


def test_original_flags_and_defaults(mgpu: ModuleType) -> None:
    args = mgpu.build_parser().parse_args([])
    assert (args.batch_size, args.gpus, args.epochs, args.lr, args.lr_decay) == (300, 2, 50, 0.001, 0.9)
    assert (args.lam_recon, args.routings, args.shift_fraction, args.digit) == (0.392, 3, 0.1, 5)
    assert (args.save_dir, args.testing, args.weights, args.cpu) == ("./result", False, None, False)
    assert args.join_timeout == 300


@pytest.mark.parametrize("value", ["0", "-5", "nan"])
def test_join_timeout_must_be_positive(mgpu: ModuleType, value: str) -> None:
    args = mgpu.build_parser().parse_args(["--join_timeout", value])
    with pytest.raises(UserError, match=f"^--join_timeout {float(value)}: must be > 0 seconds$"):
        mgpu.train_distributed(args)


def _tf_config(cluster: dict, task_type: str, index: int) -> dict[str, str]:
    return {"TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": task_type, "index": index}})}


WORKERS = {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}
WITH_CHIEF = {"chief": ["127.0.0.1:3"], **WORKERS}


@pytest.mark.parametrize(("cluster", "task_type", "index", "chief", "backup"), [
    (WORKERS, "worker", 0, True, "backup"),
    (WORKERS, "worker", 1, False, "backup-worker-1"),
    (WITH_CHIEF, "chief", 0, True, "backup"),
    (WITH_CHIEF, "worker", 0, False, "backup-worker-0"),
])
def test_the_chief_is_task_chief_or_worker_0(cluster: dict, task_type: str, index: int, chief: bool,
                                             backup: str) -> None:
    task = tf_cluster(_tf_config(cluster, task_type, index))
    assert task.is_chief is chief
    assert task.backup_dir_name == backup
    assert task.size == len(cluster.get("chief", [])) + 2


@pytest.mark.parametrize(("environ", "message"), [
    ({"TF_CONFIG": "{not json"}, "TF_CONFIG: expected JSON"),
    ({"TF_CONFIG": '{"cluster": {"worker": ["h:1"]}}'}, "TF_CONFIG: expected JSON"),
    (_tf_config({"worker": ["h:1"], "ps": ["h:2"]}, "worker", 0), "not supported"),
    (_tf_config(WORKERS, "worker", 2), "is not in the cluster"),
    (_tf_config(WORKERS, "evaluator", 0), "is not in the cluster"),
])
def test_bad_tf_config(environ: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        tf_cluster(environ)


def test_no_tf_config_means_one_machine() -> None:
    assert tf_cluster({}) is None
    assert tf_cluster({"TF_CONFIG": " "}) is None


def test_too_many_gpus_lists_the_visible_ones(mgpu: ModuleType, monkeypatch: pytest.MonkeyPatch,
                                              tmp_path: Path) -> None:
    import tensorflow as tf

    fake = [argparse.Namespace(name=f"/physical_device:GPU:{i}") for i in range(2)]
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: fake)
    args = mgpu.build_parser().parse_args(["--gpus", "3", "--save_dir", str(tmp_path)])
    with pytest.raises(UserError, match=r"--gpus 3: only 2 GPU\(s\) are visible "
                                        r"\(/physical_device:GPU:0, /physical_device:GPU:1\)"):
        tf_distribute.configure_devices(args.cpu, args.gpus, multi_worker=False)


def test_more_gpus_than_visible_is_one_line_exit_2(tmp_path: Path) -> None:
    import tensorflow as tf

    if len(tf.config.list_physical_devices("GPU")) >= 3:
        pytest.skip("this machine has 3 or more GPUs")
    result = run_mgpu("--gpus", "3", "--save_dir", str(tmp_path), timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert re.fullmatch(r"error: --gpus 3: (no GPU is visible|only [0-2] GPU\(s\) are visible "
                        r"\(.*\)); ask for fewer, or add --cpu to train on 3 logical CPU devices",
                        last), last
    assert not list(tmp_path.iterdir())  # nothing trained, nothing written


def test_batch_smaller_than_the_replica_count(small_npz: Path, tmp_path: Path) -> None:
    result = run_mgpu("--cpu", "--gpus", "2", "--batch_size", "1", "--dataset", str(small_npz),
                        "--save_dir", str(tmp_path), timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        "error: --batch_size 1: must be at least the number of replicas (2); it is split across them")


def test_bad_tf_config_through_the_cli(tmp_path: Path) -> None:
    result = run_script("capsulenet-multi-gpu.py", "--save_dir", str(tmp_path),
                        env=child_env(TF_CONFIG="{oops"), timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: TF_CONFIG: expected JSON")


# ---------------------------------------------------------------------------------------------
# One step on 2 replicas == one step on 1 device (the gradients are all-reduced)
# ---------------------------------------------------------------------------------------------


def equivalence_main(out: str, data_path: str) -> None:
    """Child process: one Adam step on one device, on 2 logical CPUs, and on 2 logical CPUs with
    the optimizer's all-reduce disabled (a control that must differ); then validation on both
    models; writes the differences as JSON."""
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

    import keras
    from keras.src.backend.tensorflow import optimizer as tf_optimizer

    import capsulenet
    from capsnet import backends, datasets, training

    data = datasets.load_dataset(data_path)
    x, y = (a[:EQUIVALENCE_BATCH] for a in data[0])
    config = training.TrainConfig(batch_size=EQUIVALENCE_BATCH, shift_fraction=0.0, seed=3)

    def one_step(strategy: Any, initial: list | None) -> tuple[list, list, float]:
        keras.utils.set_random_seed(config.seed)
        with strategy.scope():
            model, _, _ = capsulenet.CapsNet(x.shape[1:], y.shape[1], routings=3)
            optimizer = training.make_optimizer(config.lr, config.lr_decay, steps_per_epoch=1)
        steps = backends.TensorFlowSteps(model, optimizer, config.lam_recon, config.batch_size, strategy)
        steps.build_optimizer()
        if initial is not None:
            model.set_weights(initial)
        before = [np.array(w) for w in model.get_weights()]
        trainer = training.Trainer(model, optimizer, steps, config, backup=None)
        trainer.train_epoch(x, y, epoch=0, seed=config.seed)  # 16 samples: exactly one step
        trainers.append(trainer)
        # Every replica's copy of every weight must agree, not only the first one's.
        spread = max((float(np.abs(c.numpy() - v.value.values[0].numpy()).max())
                      for v in model.weights if hasattr(v.value, "values")
                      for c in v.value.values), default=0.0)
        return before, [np.array(w) for w in model.get_weights()], spread

    def max_diff(a: list, b: list) -> float:
        return max(float(np.abs(p - q).max()) for p, q in zip(a, b, strict=True))

    trainers: list = []
    plain = tf.distribute.get_strategy()
    initial, one_device, _ = one_step(plain, None)
    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    _, two_replicas, spread = one_step(mirrored, initial)
    plain_trainer, mirrored_trainer = trainers
    real_all_reduce = tf_optimizer.TFOptimizer._all_reduce_sum_gradients
    tf_optimizer.TFOptimizer._all_reduce_sum_gradients = lambda self, grads_and_vars: grads_and_vars
    try:
        _, no_all_reduce, _ = one_step(mirrored, initial)
    finally:
        tf_optimizer.TFOptimizer._all_reduce_sum_gradients = real_all_reduce
    # Validation with a last batch of 1 sample for 2 replicas (one would get an empty batch).
    x_valid, y_valid = (a[: EQUIVALENCE_BATCH + 1] for a in data[1])
    valid = [trainer.evaluate(x_valid, y_valid) for trainer in (mirrored_trainer, plain_trainer)]
    result = {"change": max_diff(one_device, initial), "diff": max_diff(two_replicas, one_device),
              "valid_diff": max(abs(valid[0][k] - valid[1][k]) for k in valid[0]),
              "replica_spread": spread, "diff_without_all_reduce": max_diff(no_all_reduce, one_device),
              "replicas": mirrored.num_replicas_in_sync}
    Path(out).write_text(json.dumps(result))


@pytest.mark.slow
def test_two_replicas_one_step_equals_one_device(small_npz: Path, tmp_path: Path) -> None:
    out = tmp_path / "equivalence.json"
    result = run_script("tests/test_multi_gpu.py", "--equivalence", str(out), str(small_npz))
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(out.read_text())
    assert found["replicas"] == 2
    assert found["change"] > 1e-4  # the step really moved the weights (Adam: ~lr = 1e-3)
    assert found["diff"] < EQUIVALENCE_ATOL, found
    assert found["replica_spread"] < EQUIVALENCE_ATOL, found
    assert found["valid_diff"] < 1e-5, found  # the same validation numbers on 1 and 2 replicas
    # The control: each replica applying its own half-batch gradient ends elsewhere.
    assert found["diff_without_all_reduce"] > 100 * EQUIVALENCE_ATOL, found


# ---------------------------------------------------------------------------------------------
# The CLI end to end: 2 logical CPU devices == one device, unless the all-reduce is off
# ---------------------------------------------------------------------------------------------

# Two epochs of 5 steps of 20 (10 per replica), one routing. The high learning rate moves the capsules
# out of their ~1e-7 start within the first steps, so that every part of the model trains.
PARALLEL_FLAGS = ["--epochs", "2", "--batch_size", "20", "--seed", "1", "-r", "1", "--lr", "0.005"]
# Replicas sum the gradients in another order than one device: measured ~3e-6 relative in the log.
LOG_RTOL, LOG_ATOL = 1e-4, 1e-6


@pytest.fixture(scope="module")
def data_100(small_raw: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """100 training and 40 test images of `small_raw`."""
    (x_train, y_train), (x_test, y_test) = small_raw
    path = tmp_path_factory.mktemp("data") / "data-100.npz"
    np.savez(path, x_train=x_train[:100], y_train=y_train[:100], x_test=x_test[:40], y_test=y_test[:40])
    return path


@pytest.fixture(scope="module")
def one_device_log(data_100: Path, tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    """log.csv of `capsulenet.py` on one device with PARALLEL_FLAGS (the same seed and global batch)."""
    save_dir = tmp_path_factory.mktemp("one-device") / "result"
    result = run_script("capsulenet.py", *PARALLEL_FLAGS, "--dataset", str(data_100),
                        "--save_dir", str(save_dir))
    assert result.returncode == 0, describe(result)
    return pd.read_csv(save_dir / "log.csv")


def log_mismatch(got: pd.DataFrame, want: pd.DataFrame) -> float:
    """The largest `|got - want| / (LOG_ATOL + LOG_RTOL |want|)` over the logs' cells: <= 1 is equal."""
    assert list(got.columns) == list(want.columns)
    assert got["epoch"].tolist() == want["epoch"].tolist()
    a, b = got.to_numpy(float), want.to_numpy(float)
    return float((np.abs(a - b) / (LOG_ATOL + LOG_RTOL * np.abs(b))).max())


@pytest.fixture(scope="module")
def two_cpus(data_100: Path, tmp_path_factory: pytest.TempPathFactory
             ) -> tuple[Path, subprocess.CompletedProcess]:
    save_dir = tmp_path_factory.mktemp("two-cpus") / "result"
    result = run_mgpu("--cpu", "--gpus", "2", *PARALLEL_FLAGS, "--dataset", str(data_100),
                      "--save_dir", str(save_dir))
    return save_dir, result


@pytest.mark.slow
def test_cli_on_two_logical_cpus_equals_one_device(two_cpus: tuple[Path, subprocess.CompletedProcess],
                                                   one_device_log: pd.DataFrame, data_100: Path) -> None:
    """`--cpu --gpus 2` logs what one device logs for the same seed and global batch (every loss,
    accuracy and rate of both epochs), writes every output, and its printed test accuracy is that of
    its weights loaded as `capsulenet.py -t -w` loads them (computed here)."""
    save_dir, result = two_cpus
    assert result.returncode == 0, describe(result)
    assert "Data-parallel on 2 replica(s) (MirroredStrategy" in result.stdout
    for name in ("log.csv", "weights-01.weights.h5", "trained_model.weights.h5",
                 "trained_model.keras", "real_and_recon.png", "manipulate-5.png", "log.png"):
        assert (save_dir / name).is_file(), name
    assert not (save_dir / "backup").exists()  # a finished run leaves no backup
    mismatch = log_mismatch(pd.read_csv(save_dir / "log.csv"), one_device_log)
    assert mismatch <= 1, f"2 replicas vs one device: {mismatch:.3g} x the tolerance"

    import capsulenet
    from capsnet import saving

    model, eval_model, _ = capsulenet.CapsNet((28, 28, 1), 10, 1)
    saving.load_weights(model, str(save_dir / "trained_model.weights.h5"))
    with np.load(data_100) as f:
        x_test, y_test = f["x_test"][..., None].astype("float32") / 255, f["y_test"]
    lengths, _ = eval_model.predict(x_test, verbose=0)
    assert printed_accuracy(result.stdout) == pytest.approx(float(np.mean(lengths.argmax(1) == y_test)),
                                                            abs=1e-4)


@pytest.mark.slow
def test_without_the_all_reduce_the_log_differs(one_device_log: pd.DataFrame, data_100: Path,
                                                tmp_path: Path) -> None:
    """The control of the test above: the same run with the optimizer's all-reduce turned into the
    identity (each replica applies its own half-batch gradient) logs far outside the tolerance."""
    save_dir = tmp_path / "result"
    result = run_script("tests/without_all_reduce.py", "capsulenet-multi-gpu.py", "--cpu", "--gpus", "2",
                        *PARALLEL_FLAGS, "--dataset", str(data_100), "--save_dir", str(save_dir))
    assert result.returncode == 0, describe(result)
    mismatch = log_mismatch(pd.read_csv(save_dir / "log.csv"), one_device_log)
    assert mismatch > 10, f"without the all-reduce only {mismatch:.3g} x the tolerance from one device"


@pytest.mark.slow
def test_weights_from_capsulenet_load_in_the_multi_gpu_script(small_npz: Path,
                                                               tmp_path: Path) -> None:
    import capsulenet
    from capsnet import saving

    _, eval_model, _ = capsulenet.CapsNet((28, 28, 1), 10, 3)
    path = tmp_path / "single.weights.h5"
    saving.save_weights(eval_model, path)  # what capsulenet.py writes after training
    result = run_mgpu("--cpu", "-t", "-w", str(path), "--dataset", str(small_npz),
                        "--batch_size", "50", "--save_dir", str(tmp_path / "result"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Loaded weights from {path}" in result.stdout
    printed_accuracy(result.stdout)
    assert (tmp_path / "result" / "real_and_recon.png").is_file()


# ---------------------------------------------------------------------------------------------
# Two workers on localhost with TF_CONFIG
# ---------------------------------------------------------------------------------------------


def start_workers(n: int, argv: list[str], tmp_path: Path, run: str = "run"
                  ) -> list[tuple[subprocess.Popen, Path]]:
    """`n` workers of one `TF_CONFIG` cluster on 127.0.0.1, each with its own save_dir
    (`tmp_path/worker-<i>`) and log (`tmp_path/<run>-worker-<i>.log`, stdout and stderr)."""
    cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(n)]}
    workers = []
    for index in range(n):
        env = child_env(TF_CONFIG=json.dumps({"cluster": cluster,
                                              "task": {"type": "worker", "index": index}}))
        log = tmp_path / f"{run}-worker-{index}.log"
        with log.open("w") as out:
            proc = start_script("capsulenet-multi-gpu.py", *argv,
                                "--save_dir", str(tmp_path / f"worker-{index}"),
                                env=env, stdout=out, stderr=subprocess.STDOUT)
        workers.append((proc, log))
    return workers


def wait_all(procs: list[subprocess.Popen], timeout: float) -> list[int | None]:
    """Waits until every process exits, one fails or `timeout` passes; then kills the rest."""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            codes = [proc.poll() for proc in procs]
            if None not in codes or any(code not in (None, 0) for code in codes):
                break  # all done, or one failed and the others would wait for it forever
            time.sleep(0.5)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return [proc.returncode for proc in procs]


LOST_PEER_TIMEOUT_S = 120


def kill_after_first_epoch(chief: subprocess.Popen, other: subprocess.Popen, state: Path, timeout_s: float,
                           stop_timeout_s: float) -> float | None:
    """SIGKILLs `other` once its backup `state` (a `state.json`) records epoch 1, i.e. inside the
    second epoch, then waits up to `stop_timeout_s` for `chief` to stop by itself; whatever still runs
    after that (or after `timeout_s` without the epoch) is killed.

    Returns:
        the seconds `chief` took to stop after the kill, or None if it did not stop in time.
    """
    stopped_within_s = None
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and chief.poll() is None and other.poll() is None:
            if state.exists() and json.loads(state.read_text())["epoch"] >= 1:
                other.send_signal(signal.SIGKILL)
                killed = time.monotonic()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    chief.wait(timeout=stop_timeout_s)
                    stopped_within_s = time.monotonic() - killed
                break
            time.sleep(0.05)
    finally:
        for proc in (chief, other):
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    return stopped_within_s


@pytest.fixture(scope="module")
def workers_run(data_100: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two localhost workers with PARALLEL_FLAGS; worker 1 is SIGKILLed once its first epoch is backed
    up (inside the second); worker 0 must then stop by itself. Both are then rerun with the same flags.

    Returns what happened: `first_codes`, `first_logs` (each worker's output), `stopped_within_s` (None
    if worker 0 did not stop within LOST_PEER_TIMEOUT_S), `backup_epochs` (each worker's backed-up
    epoch after the loss), `rerun_codes`, `rerun_logs`, `folder`."""
    folder = tmp_path_factory.mktemp("workers")
    argv = ["--cpu", *PARALLEL_FLAGS, "--dataset", str(data_100)]
    run: dict[str, Any] = {"folder": folder, "stopped_within_s": None}
    workers = start_workers(2, argv, folder, run="first")
    (chief, _), (other, _) = workers
    state = folder / "worker-1" / "backup-worker-1" / "state.json"
    run["stopped_within_s"] = kill_after_first_epoch(chief, other, state, WORKER_TIMEOUT_S,
                                                     LOST_PEER_TIMEOUT_S)
    run["first_codes"] = [proc.returncode for proc, _ in workers]
    run["first_logs"] = [log.read_text() for _, log in workers]
    run["backup_epochs"] = [Backup(folder / "worker-0" / "backup").latest_epoch(),
                            Backup(folder / "worker-1" / "backup-worker-1").latest_epoch()]
    rerun = start_workers(2, argv, folder, run="rerun")
    run["rerun_codes"] = wait_all([proc for proc, _ in rerun], WORKER_TIMEOUT_S)
    run["rerun_logs"] = [log.read_text() for _, log in rerun]
    return run


def _logs(logs: list[str]) -> str:
    return "\n----\n".join(text[-3000:] for text in logs)


@pytest.mark.slow
def test_a_lost_worker_stops_the_other_with_one_line(workers_run: dict[str, Any]) -> None:
    """SIGKILL of worker 1 during the second epoch: worker 0 stops by itself within
    LOST_PEER_TIMEOUT_S, exit 1, with one `error:` line saying it lost contact with the cluster."""
    logs = workers_run["first_logs"]
    assert workers_run["first_codes"][1] == -signal.SIGKILL, _logs(logs)
    assert workers_run["stopped_within_s"] is not None, (
        f"worker 0 still ran {LOST_PEER_TIMEOUT_S} s after worker 1 was killed\n{_logs(logs)}")
    assert workers_run["first_codes"][0] == 1, _logs(logs)
    error_lines = [line for line in logs[0].splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, _logs(logs)
    assert error_lines[0].startswith("error: worker 0 lost contact with the other workers ("), error_lines[0]
    assert "rerun every worker with the same flags" in error_lines[0]
    assert "Traceback" not in logs[0]
    assert workers_run["backup_epochs"] == [1, 1]  # both had completed the first epoch


@pytest.mark.slow
def test_rerun_workers_resume_and_log_as_one_device(workers_run: dict[str, Any],
                                                    one_device_log: pd.DataFrame) -> None:
    """Rerun with the same flags, both workers resume after the epoch both completed and finish; the
    chief's log.csv (an interrupted, resumed two-worker run) equals the one-device run's, so the
    gradients were all-reduced across the workers. Only the chief writes user files; the other
    worker's backup is gone once it finished."""
    logs = workers_run["rerun_logs"]
    assert workers_run["rerun_codes"] == [0, 0], _logs(logs)
    assert "Data-parallel on 2 replica(s) (MultiWorkerMirroredStrategy; worker 0 of 2" in logs[0]
    assert "Resuming after epoch 1" in logs[0], _logs(logs)
    printed_accuracy(logs[0])
    chief, other = workers_run["folder"] / "worker-0", workers_run["folder"] / "worker-1"
    for name in ("log.csv", "weights-01.weights.h5", "trained_model.weights.h5",
                 "trained_model.keras", "real_and_recon.png"):
        assert (chief / name).is_file(), name
    assert [p for p in other.rglob("*") if p.is_file()] == []
    assert "Test acc" not in logs[1]
    mismatch = log_mismatch(pd.read_csv(chief / "log.csv"), one_device_log)
    assert mismatch <= 1, f"two workers vs one device: {mismatch:.3g} x the tolerance"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--equivalence", nargs=2, metavar=("OUT_JSON", "DATASET"), required=True)
    equivalence_main(*parser.parse_args().equivalence)


@pytest.mark.parametrize(("mine", "theirs", "kept", "resumes_after"), [
    (3, 2, [2, 3], 2),  # this worker is one epoch ahead: it rolls back
    (2, 3, [1, 2], 2),  # another worker is ahead: nothing to do here
    (1, 0, [1], 0),  # another worker has no backup yet: everyone starts over
])
def test_workers_agree_on_the_resume_epoch(tmp_path: Path, mine: int, theirs: int, kept: list[int],
                                           resumes_after: int) -> None:
    backup = tmp_path / "backup"
    backup.mkdir()
    for epoch in kept:  # the files a Trainer leaves: weights and state of the last two epochs
        (backup / f"epoch-{epoch:04d}.npz").write_bytes(b"")
        (backup / f"epoch-{epoch:04d}.json").write_text(json.dumps({"epoch": epoch}))
    Backup(backup).roll_back(mine)

    def two_workers(values: list[int]) -> list[int]:
        return [v + int(e == theirs) for e, v in enumerate(values)]

    flow.agree_on_resume_point(backup, 5, two_workers, peer="worker")
    assert Backup(backup).latest_epoch() == resumes_after


def test_workers_too_far_apart_are_refused(tmp_path: Path) -> None:
    backup = tmp_path / "backup"
    backup.mkdir()
    for epoch in (3, 4):
        (backup / f"epoch-{epoch:04d}.npz").write_bytes(b"")
        (backup / f"epoch-{epoch:04d}.json").write_text(json.dumps({"epoch": epoch}))
    Backup(backup).roll_back(4)
    with pytest.raises(UserError, match="ends after epoch 4, another worker's after epoch 2"):
        flow.agree_on_resume_point(backup, 5, lambda values: [v + int(e == 2) for e, v in enumerate(values)],
                                   peer="worker")
