"""The trained model shipped in `result/`: usable right after `git clone`.

- its one file, `trained_model.keras`, loads with `safe_mode=True` as a float32 model whose weights
  are the ones its archive holds, and the model the code builds computes the same with them;
- on real MNIST test digits it computes what the paper's equations compute with its weights (the
  NumPy reference in `tests/reference.py`, the weights read from the archive's `model.weights.h5`
  with zipfile and h5py, not through Keras), loaded under the original's name `trained_model.h5`;
- the README, the run's `log.csv` and `gallery.json` state one accuracy, and the original's command
  `python capsulenet.py -t -w result/trained_model.h5` prints it on the whole test set.

Real MNIST comes from `../shared/data/mnist.npz` beside the repository (or `$CAPSNET_MNIST`): CI has it,
so there its absence fails; elsewhere the tests that need it skip.
"""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import reference
from conftest import REPO_ROOT, describe, run_script, weights_in

RESULT = REPO_ROOT / "result"
MODEL = RESULT / "trained_model.keras"
N_REFERENCE = 40  # test digits pushed through the NumPy equations (the routing loops cost ~0.1 s each)


@pytest.fixture(scope="module")
def mnist_test() -> tuple[np.ndarray, np.ndarray]:
    """The real MNIST test set: uint8 images `[10000, 28, 28]`, integer labels `[10000]`."""
    path = Path(os.environ.get("CAPSNET_MNIST", REPO_ROOT.parent / "shared" / "data" / "mnist.npz"))
    if not path.is_file():
        missing = f"real MNIST not found at {path} (set CAPSNET_MNIST to a copy of mnist.npz)"
        if os.environ.get("CI"):
            pytest.fail(missing)
        pytest.skip(missing)
    with np.load(path, allow_pickle=False) as data:
        return data["x_test"], data["y_test"]


def readme_accuracy() -> float:
    """The shipped model's test accuracy as the README's first screen states it."""
    text = (REPO_ROOT / "README.md").read_text()
    match = re.search(r"\*\*The shipped model\*\*.*?\*\*(\d+\.\d+)% test accuracy", text, re.S)
    assert match, "README states no test accuracy for the shipped model"
    return float(match.group(1)) / 100


def reference_capsules(weights: dict[str, np.ndarray], images: np.ndarray) -> np.ndarray:
    """The digit capsules `[batch, 10, 16]` of the paper's CapsNet (conv1, PrimaryCaps, DigitCaps with
    3 routings) for `images` `[batch, 28, 28]` in [0, 1], in float64."""
    x = images[..., None].astype(np.float64)
    conv1 = np.maximum(reference.valid_conv(x, weights["layers/conv2d/vars/0"],
                                            weights["layers/conv2d/vars/1"], 1), 0)
    primary = reference.valid_conv(conv1, weights["layers/conv2d_1/vars/0"],
                                   weights["layers/conv2d_1/vars/1"], 2)
    u = reference.squash(primary.reshape(len(x), 1152, 8))  # [batch, 6, 6, 256] -> [batch, 1152, 8]
    return reference.capsule_layer(weights["layers/capsule_layer/vars/0"], u, routings=3)


def test_keras_file_loads_in_safe_mode_into_the_model_the_code_builds() -> None:
    """`keras.saving.load_model(safe_mode=True)` after `import capsulelayers`: a float32 model of the
    paper's size whose weights are the archive's (read with h5py), and the eval model `CapsNet` builds,
    loaded from the same file by `saving.load_weights`, computes exactly what it does."""
    import keras

    import capsulelayers  # noqa: F401 - registers the layers that the .keras file names
    import capsulenet
    from capsnet import saving

    loaded = keras.saving.load_model(MODEL, safe_mode=True)
    assert {w.dtype for w in loaded.weights} == {"float32"}
    # conv1 20,992 + PrimaryCaps 5,308,672 + DigitCaps 1,474,560 + decoder 1,411,344 parameters.
    assert sum(int(np.prod(w.shape)) for w in loaded.weights) == 8_215_568
    archived, arrays = weights_in(MODEL), [np.asarray(w.numpy()) for w in loaded.weights]
    assert len(archived) == len(arrays)
    for path, array in archived.items():
        assert any(a.shape == array.shape and np.array_equal(a, array) for a in arrays), path
    model, eval_model, _ = capsulenet.CapsNet((28, 28, 1), 10, routings=3)
    saving.load_weights(model, str(MODEL))
    x = np.random.default_rng(0).random((8, 28, 28, 1), dtype=np.float32)
    for ours, theirs in zip(eval_model.predict(x, verbose=0), loaded.predict(x, verbose=0), strict=True):
        np.testing.assert_array_equal(ours, theirs)


def test_readme_log_and_gallery_state_one_accuracy() -> None:
    with open(RESULT / "log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    gallery = json.loads((RESULT / "gallery.json").read_text())
    assert len(rows) == gallery["epochs"] == 50
    assert float(rows[-1]["val_capsnet_accuracy"]) == pytest.approx(readme_accuracy(), abs=5e-5)
    assert gallery["test_accuracy"] == pytest.approx(readme_accuracy(), abs=5e-5)


def test_shipped_weights_compute_the_papers_equations(mnist_test: tuple[np.ndarray, np.ndarray],
                                                      tmp_path: Path) -> None:
    """Loaded under the original's name `trained_model.h5` from a folder that holds only the `.keras`
    file, as `-t -w result/trained_model.h5` does."""
    import capsulenet
    from capsnet import saving

    x_test, y_test = mnist_test
    images = x_test[:N_REFERENCE] / 255.0
    expected = reference.length(reference_capsules(weights_in(MODEL), images))
    (tmp_path / MODEL.name).symlink_to(MODEL)
    model, eval_model, _ = capsulenet.CapsNet((28, 28, 1), 10, routings=3)
    assert saving.load_weights(model, str(tmp_path / "trained_model.h5")) == str(tmp_path / MODEL.name)
    lengths, _ = eval_model.predict(images[..., None].astype("float32"), verbose=0)
    np.testing.assert_allclose(lengths, expected, atol=1e-4)
    # A trained model, not only a consistent one: these digits are classified as the labels say
    # (the whole test set: 99.64%; 40 digits allow one miss).
    assert np.sum(expected.argmax(1) == y_test[:N_REFERENCE]) >= N_REFERENCE - 1


@pytest.mark.slow
def test_original_command_prints_the_readme_accuracy(mnist_test: tuple[np.ndarray, np.ndarray],
                                                     tmp_path: Path) -> None:
    dataset = Path(os.environ.get("CAPSNET_MNIST", REPO_ROOT.parent / "shared" / "data" / "mnist.npz"))
    result = run_script("capsulenet.py", "-t", "-w", "result/trained_model.h5", "--dataset", str(dataset),
                        "--save_dir", str(tmp_path))
    assert result.returncode == 0, describe(result)
    assert f"Test acc: {readme_accuracy():.4f}" in result.stdout, describe(result)
    assert (tmp_path / "real_and_recon.png").is_file() and (tmp_path / "manipulate-5.png").is_file()
