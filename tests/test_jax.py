"""What only the JAX backend has, on the CPU, with TensorFlow blocked: its devices (a batch is split
evenly over them). `bench/epoch.py --backends jax`, the benchmark carried to a GPU machine without
TensorFlow, is tested in `test_bench_reference.py`.

The checks JAX shares with PyTorch (every output written, weights across backends, resuming, data
parallelism on two CPU devices, which compares with the shared one-device run) are in
`test_other_backends.py`.
"""

from __future__ import annotations

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


