"""What only the PyTorch backend has, on the CPU, with TensorFlow and JAX blocked: `autotune`'s PyTorch
timer (eager forward + backward, as `TorchSteps` runs them). Skipped where PyTorch is not installed
(`requirements/torch.txt`; CI installs it).

The checks PyTorch shares with JAX (every output written, weights across backends, `--predict`,
resuming) are in `test_other_backends.py`; that a weights file computes the same on PyTorch as on
TensorFlow, output for output and gradient for gradient, is in `test_backends.py`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import REPO_ROOT, backend_available, describe, run_on_backend

pytestmark = pytest.mark.skipif(not backend_available("torch"),
                                reason="PyTorch is not installed (pip install -r requirements/torch.txt)")


def test_the_autotuner_times_both_convolutions_on_pytorch(tmp_path: Path) -> None:
    """`autotune`'s PyTorch timer (forward + backward, eager as `TorchSteps`): both candidates are timed
    and the faster one is what `tune_model` chooses, on PyTorch alone."""
    script = tmp_path / "tune.py"
    script.write_text(
        "import json, sys\n"
        f"sys.path.insert(0, {str(REPO_ROOT)!r})\n"
        "import keras, capsulelayers\nfrom capsnet import autotune, decisions\n"
        "x = keras.Input((9, 9, 3))\n"
        "h = capsulelayers.Conv2D(4, 3, name='first')(x)\n"
        "model = keras.Model(x, capsulelayers.Conv2D(4, 3, strides=2, name='primary')(h))\n"
        "seconds = {}\n"
        "def timer(config, input_shape, input_grad=True, policy=None):\n"
        "    seconds[config['name']] = autotune.time_conv_candidates(config, input_shape, input_grad,\n"
        "                                                            policy, rounds=1)\n"
        "    return seconds[config['name']]\n"
        "import pathlib; cache = decisions.DecisionCache(pathlib.Path(sys.argv[1]))\n"
        "choices = autotune.tune_model(model, 2, cache=cache, timer=timer)\n"
        "print('RESULT', json.dumps({'seconds': seconds, 'choices': choices}))\n")
    result = run_on_backend("torch", str(script), str(tmp_path / "decisions.json"), CAPSNET_AUTOTUNE="on")
    assert result.returncode == 0, describe(result)
    found = json.loads(result.stdout.split("RESULT ", 1)[1])
    assert set(found["seconds"]) == {"first", "primary"}
    for name, seconds in found["seconds"].items():
        assert set(seconds) == {"im2col", "conv"} and all(0 < s < 60 for s in seconds.values())
        assert found["choices"][name] == min(seconds, key=seconds.get)
