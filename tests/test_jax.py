"""What only the JAX backend has, on the CPU, with TensorFlow blocked: its devices (a batch is split
evenly over them) and the GPU harness (`bench/backend_epoch.py`, carried to the lent GPU machine, which
has JAX but no TensorFlow).

The checks JAX shares with PyTorch (every output written, weights across backends, resuming, data
parallelism on two CPU devices, which compares with the shared one-device run) are in
`test_other_backends.py`.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import describe, run_on_backend, save_npz, synthetic_raw


@pytest.mark.slow
def test_jax_batch_must_divide_over_the_devices(tmp_path: Path) -> None:
    data = save_npz(tmp_path / "tiny.npz", synthetic_raw(20, 10))
    result = run_on_backend("jax", "capsulenet-multi-gpu.py", "--cpu", "--gpus", "2", "--batch_size", "5",
                            "--dataset", str(data), "--save_dir", str(tmp_path))
    assert result.returncode == 2, describe(result)
    assert result.stderr.strip().splitlines()[-1] == (
        "error: --batch_size 5: must be a multiple of the number of devices (2) on the JAX backend; "
        "each takes an equal share")


@pytest.mark.slow
def test_gpu_harness_runs_without_tensorflow(small_idx_dir: Path, tmp_path: Path) -> None:
    """`bench/backend_epoch.py`, the script carried to the lent GPU machine (JAX, no TensorFlow there),
    runs end to end on JAX's CPU: its speed table, one real epoch on an IDX folder and the eval model's
    test accuracy, which must equal the epoch's validation accuracy (the same weights and images, one
    through `fit`'s metric, the other through the eval model's longest capsule)."""
    report = tmp_path / "report.md"
    run = run_on_backend("jax", "bench/backend_epoch.py", "--data", str(small_idx_dir), "--epochs", "1",
                         "--steps", "1", "--out", str(report))
    assert run.returncode == 0, describe(run)
    text = report.read_text()
    assert re.search(r"^### \S+ \(cpu, JAX [\d.]+\), Keras [\d.]+ on jax,", text, re.M), text
    assert re.search(r"^\| [\d.]+ ms \| \d+ \| [\d.]+ s \| [\d.]+ ms \| [\d.]+ ms \|$", text, re.M), text
    epoch = re.search(r"^\| 1 \| [\d.]+ \| \d+ \| (\d\.\d{4}) \|$", text, re.M)
    test = re.search(r"Test accuracy after 1 epochs .*: (\d\.\d{4}) on 100 images", text)
    assert epoch and test, text
    assert epoch.group(1) == test.group(1)
