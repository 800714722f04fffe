"""`--steps_per_execution`: K training steps per compiled call (JAX `lax.scan`, a TensorFlow graph
loop, a plain loop on PyTorch) train exactly as one step per call: the same `log.csv` (losses,
accuracies, the learning rate per epoch) and the same weights, also across a resume from the backup.

Each backend is its own process (`tests/multistep_run.py`; TensorFlow and JAX also on two CPU
devices): a small baseline CNN with dropout, 7 steps of 10 images per epoch, 2 epochs, K = 3 (calls of
3, 3 and 1 steps: the last call of an epoch takes what remains). Dropout makes the check stricter:
the random generator's state must advance through the K-step call as through K single steps.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import child_env, describe, require_backend, run_script

LOG_COLUMNS = ["epoch", "loss", "capsnet_loss", "decoder_loss", "capsnet_accuracy", "val_loss",
               "val_capsnet_loss", "val_decoder_loss", "val_capsnet_accuracy", "learning_rate"]


@pytest.mark.slow
@pytest.mark.parametrize(("backend", "replicas"), [("tensorflow", 1), ("jax", 1), ("torch", 1),
                                                   ("tensorflow", 2), ("jax", 2)])
def test_k_steps_per_call_log_the_same_as_one_step_per_call(backend: str, replicas: int,
                                                            tmp_path: Path) -> None:
    """Also data-parallel over two CPU devices (TensorFlow's `MirroredStrategy`, JAX's `DataParallel`):
    the stacked batches are split along their batch axis, not the step axis."""
    require_backend(backend)
    env = child_env(KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3",
                    XLA_FLAGS=f"--xla_force_host_platform_device_count={replicas}")
    result = run_script("tests/multistep_run.py", str(tmp_path), "--replicas", str(replicas), env=env,
                        timeout=600)
    assert result.returncode == 0, describe(result)
    logs = {name: pd.read_csv(tmp_path / name / "log.csv") for name in ("k1", "k3", "k3_resumed")}
    calls = {name: [json.loads(line) for line in (tmp_path / name / "calls.json").read_text().splitlines()]
             for name in logs}
    # Which path ran: none of the K-step calls for K = 1; for K = 3, 7 steps per epoch as 3 + 3 + 1.
    assert calls["k1"] == [[]]
    assert calls["k3"] == [[3, 3, 1] * 2]
    assert calls["k3_resumed"] == [[3, 3, 1], [3, 3, 1]]  # epoch 1, then epoch 2 after the resume

    expected = logs["k1"]
    assert list(expected.columns) == LOG_COLUMNS and list(expected["epoch"]) == [0, 1]
    np.testing.assert_allclose(expected["learning_rate"], [0.01, 0.005], rtol=1e-6)  # lr x 0.5^epoch
    for name in ("k3", "k3_resumed"):
        assert list(logs[name].columns) == LOG_COLUMNS
        np.testing.assert_allclose(logs[name].to_numpy(), expected.to_numpy(), rtol=1e-5, atol=1e-6,
                                   err_msg=name)
        with np.load(tmp_path / "k1" / "weights.npz") as a, np.load(tmp_path / name / "weights.npz") as b:
            assert a.files == b.files
            for key in a.files:
                np.testing.assert_allclose(b[key], a[key], rtol=1e-4, atol=1e-5, err_msg=f"{name} {key}")
