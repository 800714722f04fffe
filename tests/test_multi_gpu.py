"""Data-parallel training: `capsulenet-multi-gpu.py` on logical CPU devices and localhost workers.

TensorFlow's devices can be split into logical ones only before it initialises them, so everything
that trains on several devices runs in a child process: the CLI itself, or this file run as a script
(`python tests/test_multi_gpu.py --equivalence OUT.json`) for the one-step equivalence check.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from conftest import child_env, run_script, start_script

from backup import Backup

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


def printed_accuracy(output: str) -> float:
    """The `Test acc: X` a run printed."""
    found = re.findall(r"Test acc: ([0-9.]+)", output)
    assert found, output[-3000:]
    return float(found[-1])


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
def test_the_chief_is_task_chief_or_worker_0(mgpu: ModuleType, cluster: dict, task_type: str,
                                             index: int, chief: bool, backup: str) -> None:
    task = mgpu.read_tf_config(_tf_config(cluster, task_type, index))
    assert task.is_chief is chief
    assert task.backup_dir_name == backup
    assert task.n_workers == len(cluster.get("chief", [])) + 2


@pytest.mark.parametrize(("environ", "message"), [
    ({"TF_CONFIG": "{not json"}, "TF_CONFIG: expected JSON"),
    ({"TF_CONFIG": '{"cluster": {"worker": ["h:1"]}}'}, "TF_CONFIG: expected JSON"),
    (_tf_config({"worker": ["h:1"], "ps": ["h:2"]}, "worker", 0), "not supported"),
    (_tf_config(WORKERS, "worker", 2), "is not in the cluster"),
    (_tf_config(WORKERS, "evaluator", 0), "is not in the cluster"),
])
def test_bad_tf_config(mgpu: ModuleType, environ: dict, message: str) -> None:
    with pytest.raises(mgpu.UserError, match=message):
        mgpu.read_tf_config(environ)


def test_no_tf_config_means_one_machine(mgpu: ModuleType) -> None:
    assert mgpu.read_tf_config({}) is None
    assert mgpu.read_tf_config({"TF_CONFIG": " "}) is None


def test_too_many_gpus_lists_the_visible_ones(mgpu: ModuleType, monkeypatch: pytest.MonkeyPatch,
                                              tmp_path: Path) -> None:
    import tensorflow as tf

    fake = [argparse.Namespace(name=f"/physical_device:GPU:{i}") for i in range(2)]
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: fake)
    args = mgpu.build_parser().parse_args(["--gpus", "3", "--save_dir", str(tmp_path)])
    with pytest.raises(mgpu.UserError, match=r"--gpus 3: only 2 GPU\(s\) are visible "
                                             r"\(/physical_device:GPU:0, /physical_device:GPU:1\)"):
        mgpu.configure_devices(args, multi_worker=False)


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

    import backends
    import capsulenet
    import training
    import utils

    data = utils.load_dataset(data_path)
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
# The CLI end to end on 2 logical CPU devices
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_on_two_logical_cpus(small_npz: Path, tmp_path: Path) -> None:
    save_dir = tmp_path / "result"
    result = run_mgpu("--cpu", "--gpus", "2", "--dataset", str(small_npz), "--epochs", "1",
                        "--batch_size", "50", "--seed", "1", "--save_dir", str(save_dir))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "Data-parallel on 2 replica(s) (MirroredStrategy" in result.stdout
    for name in ("log.csv", "weights-01.weights.h5", "trained_model.weights.h5",
                 "trained_model.keras", "real_and_recon.png", "manipulate-5.png", "log.png"):
        assert (save_dir / name).is_file(), name
    assert not (save_dir / "backup").exists()  # a finished run leaves no backup
    header = (save_dir / "log.csv").read_text().splitlines()[0].split(",")
    assert {"epoch", "loss", "capsnet_accuracy", "val_capsnet_accuracy"} <= set(header)
    accuracy = printed_accuracy(result.stdout)

    # The single-device script tests the same weights to the same accuracy.
    single = run_script("capsulenet.py", "-t", "-w", str(save_dir / "trained_model.weights.h5"),
                        "--dataset", str(small_npz), "--save_dir", str(tmp_path / "single"))
    assert single.returncode == 0, single.stderr[-3000:]
    assert printed_accuracy(single.stdout) == pytest.approx(accuracy, abs=1e-9)


@pytest.mark.slow
def test_weights_from_capsulenet_load_in_the_multi_gpu_script(small_npz: Path,
                                                               tmp_path: Path) -> None:
    import capsulenet
    import saving

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


@pytest.fixture
def tiny_npz(small_raw: Any, tmp_path: Path) -> Path:
    """100 training and 40 test images: 5 steps of 20 (10 per worker)."""
    (x_train, y_train), (x_test, y_test) = small_raw
    path = tmp_path / "tiny.npz"
    np.savez(path, x_train=x_train[:100], y_train=y_train[:100], x_test=x_test[:40],
             y_test=y_test[:40])
    return path


def start_workers(n: int, argv: list[str], tmp_path: Path) -> list[tuple[subprocess.Popen, Path]]:
    """`n` workers of one `TF_CONFIG` cluster on 127.0.0.1, each with its own save_dir and log."""
    cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(n)]}
    workers = []
    for index in range(n):
        env = child_env(TF_CONFIG=json.dumps({"cluster": cluster,
                                              "task": {"type": "worker", "index": index}}))
        log = (tmp_path / f"worker-{index}.log").open("w")
        proc = start_script("capsulenet-multi-gpu.py", *argv, "--save_dir", str(tmp_path / f"worker-{index}"),
                            env=env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        workers.append((proc, tmp_path / f"worker-{index}.log"))
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


@pytest.mark.slow
def test_two_localhost_workers_train_together(tiny_npz: Path, tmp_path: Path) -> None:
    workers = start_workers(2, ["--cpu", "--dataset", str(tiny_npz), "--epochs", "1",
                                "--batch_size", "20"], tmp_path)
    codes = wait_all([proc for proc, _ in workers], WORKER_TIMEOUT_S)
    logs = [log.read_text() for _, log in workers]
    assert codes == [0, 0], "\n----\n".join(text[-3000:] for text in logs)
    chief, other = tmp_path / "worker-0", tmp_path / "worker-1"
    assert "Data-parallel on 2 replica(s) (MultiWorkerMirroredStrategy; worker 0 of 2" in logs[0]
    printed_accuracy(logs[0])
    for name in ("log.csv", "weights-01.weights.h5", "trained_model.weights.h5",
                 "trained_model.keras", "real_and_recon.png"):
        assert (chief / name).is_file(), name
    # Only the chief writes user files; the other worker's own backup is gone once it finished.
    assert [p for p in other.rglob("*") if p.is_file()] == []
    assert "Test acc" not in logs[1]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--equivalence", nargs=2, metavar=("OUT_JSON", "DATASET"), required=True)
    equivalence_main(*parser.parse_args().equivalence)


@pytest.mark.parametrize(("mine", "theirs", "kept", "resumes_after"), [
    (3, 2, [2, 3], 2),  # this worker is one epoch ahead: it rolls back
    (2, 3, [1, 2], 2),  # another worker is ahead: nothing to do here
    (1, 0, [1], 0),  # another worker has no backup yet: everyone starts over
])
def test_workers_agree_on_the_resume_epoch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           mine: int, theirs: int, kept: list[int],
                                           resumes_after: int) -> None:
    module = load_script()
    backup = tmp_path / "backup"
    backup.mkdir()
    for epoch in kept:  # the files a Trainer leaves: weights and state of the last two epochs
        (backup / f"epoch-{epoch:04d}.npz").write_bytes(b"")
        (backup / f"epoch-{epoch:04d}.json").write_text(json.dumps({"epoch": epoch}))
    Backup(backup).roll_back(mine)

    def two_workers(strategy: Any, values: list[int]) -> list[int]:
        return [v + int(e == theirs) for e, v in enumerate(values)]

    monkeypatch.setattr(module, "sum_over_workers", two_workers)
    module.agree_on_resume_point(strategy=None, backup_dir=backup, epochs=5)
    assert Backup(backup).latest_epoch() == resumes_after


def test_workers_too_far_apart_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = load_script()
    backup = tmp_path / "backup"
    backup.mkdir()
    for epoch in (3, 4):
        (backup / f"epoch-{epoch:04d}.npz").write_bytes(b"")
        (backup / f"epoch-{epoch:04d}.json").write_text(json.dumps({"epoch": epoch}))
    Backup(backup).roll_back(4)
    monkeypatch.setattr(module, "sum_over_workers",
                        lambda strategy, values: [v + int(e == 2) for e, v in enumerate(values)])
    with pytest.raises(module.UserError, match="ends after epoch 4, another worker's after epoch 2"):
        module.agree_on_resume_point(strategy=None, backup_dir=backup, epochs=5)
