"""Shared fixtures and helpers: the repository on `sys.path`; the one way tests start the scripts as a
user would (`run_script`, `start_script`); the one synthetic dataset maker (`synthetic_raw`,
`save_npz`); real Fashion-MNIST (read here with our own IDX reader, independent of `utils.read_idx`);
and small local datasets in both formats that `--dataset` accepts (an `.npz` in the keras layout and a
folder of four IDX `.gz` files); running a script on one Keras backend with the other engines hidden
(`run_on_backend`), and the `Test acc` it printed (`printed_accuracy`)."""

from __future__ import annotations

import gzip
import importlib.util
import io
import os
import re
import struct
import subprocess
import sys
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# No convolution or bfloat16 timing in the suite (autotune.py; tests/test_autotune.py turns it on with
# a mocked timer): runs stay short and nothing is written to the user's cache folder.
os.environ.setdefault("CAPSNET_AUTOTUNE", "off")

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
# The product modules (capsulenet, capsulelayers, utils) and this folder's helpers (reference,
# conftest) import by bare name, whatever pytest's import mode.
for folder in (REPO_ROOT, TESTS_DIR):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
IDX_NAMES = {
    "x_train": "train-images-idx3-ubyte.gz",
    "y_train": "train-labels-idx1-ubyte.gz",
    "x_test": "t10k-images-idx3-ubyte.gz",
    "y_test": "t10k-labels-idx1-ubyte.gz",
}
SMALL_TRAIN = 300
SMALL_TEST = 100

RawData = tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def read_idx_gz(path: Path) -> np.ndarray:
    """Reads a gzipped unsigned-byte IDX file: magic `00 00 08 ndim`, ndim big-endian sizes, data."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    assert raw[:3] == b"\x00\x00\x08", f"{path}: not an unsigned-byte IDX file"
    ndim = raw[3]
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def write_idx_gz(path: Path, array: np.ndarray) -> None:
    """Writes a uint8 array as a gzipped IDX file."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


def fashion_available() -> bool:
    """Whether the Debian `dataset-fashion-mnist` files are installed."""
    return all((FASHION_DIR / name).is_file() for name in IDX_NAMES.values())


@pytest.fixture(scope="session")
def fashion_raw() -> RawData:
    """The full real Fashion-MNIST as uint8 images `[n, 28, 28]` and integer labels `[n]`."""
    if not fashion_available():
        missing = (f"Fashion-MNIST IDX files not found in {FASHION_DIR} "
                   "(apt-get install -y dataset-fashion-mnist)")
        if os.environ.get("CI"):  # CI installs them: their absence is a broken CI, not a reason to skip
            pytest.fail(missing)
        pytest.skip(missing)
    arrays = {key: read_idx_gz(FASHION_DIR / name) for key, name in IDX_NAMES.items()}
    return (arrays["x_train"], arrays["y_train"]), (arrays["x_test"], arrays["y_test"])


def synthetic_raw(n_train: int, n_test: int, n_class: int = 10, seed: int = 0, size: int = 28,
                  channels: int | None = None) -> RawData:
    """A learnable stand-in for MNIST: class k is a bright 8x8 square at its own place, on noise.

    Returns:
        `(x_train, y_train), (x_test, y_test)`: uint8 images `[n, size, size]` (or
        `[n, size, size, channels]`), integer labels `[n]` cycling through the classes.
    """
    if n_class > 10:
        raise ValueError("at most 10 classes have their own place")
    rng = np.random.default_rng(seed)
    shape = (size, size) if channels is None else (size, size, channels)

    def make(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = np.arange(n) % n_class
        x = rng.integers(0, 60, size=(n, *shape)).astype(np.uint8)
        for index, k in enumerate(y):
            row, col = divmod(int(k), 5)
            x[index, 2 + 12 * row : 10 + 12 * row, 1 + 5 * col : 9 + 5 * col] = 255
        return x, y.astype(np.uint8)

    return make(n_train), make(n_test)


def weights_in(path: Path) -> dict[str, np.ndarray]:
    """Every dataset of a weights file (`.weights.h5` or legacy `.h5`), by its HDF5 path; for a
    `.keras` model file (a zip archive), those of the `model.weights.h5` inside it, read with h5py from
    memory, not through Keras."""
    import h5py

    source: Path | io.BytesIO = path
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            source = io.BytesIO(archive.read("model.weights.h5"))
    arrays: dict[str, np.ndarray] = {}
    with h5py.File(source, "r") as f:
        f.visititems(lambda name, obj: arrays.__setitem__(name, obj[()])
                     if isinstance(obj, h5py.Dataset) else None)
    return arrays


def save_npz(path: Path, raw: RawData, **overrides: np.ndarray) -> Path:
    """Writes `raw` as an `.npz` in the `keras.datasets` layout; `overrides` replace arrays by name."""
    (x_train, y_train), (x_test, y_test) = raw
    arrays = {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test, **overrides}
    np.savez(path, **arrays)
    return path


# ---------------------------------------------------------------------------------------------
# Running the scripts as a user would
# ---------------------------------------------------------------------------------------------


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a script run: headless (no display, matplotlib's default backend), no
    inherited `TF_CONFIG`, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "MPLBACKEND", "TF_CONFIG")}
    env.update(extra)
    return env


def start_script(script: str, *args: str, env: dict[str, str] | None = None, **popen: object
                 ) -> subprocess.Popen:
    """Starts `python SCRIPT ARGS` in the repository root (`script` relative to it, e.g.
    `capsulenet.py`); output is captured as text unless `popen` says otherwise."""
    popen = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True, **popen}
    return subprocess.Popen([sys.executable, str(REPO_ROOT / script), *args], cwd=REPO_ROOT,
                            env=env or child_env(), **popen)


def run_script(script: str, *args: str, env: dict[str, str] | None = None, timeout: float = 600
               ) -> subprocess.CompletedProcess:
    """Runs `python SCRIPT ARGS` to the end (see `start_script`)."""
    return subprocess.run([sys.executable, str(REPO_ROOT / script), *args], cwd=REPO_ROOT,
                          env=env or child_env(), capture_output=True, text=True, timeout=timeout)


def describe(result: subprocess.CompletedProcess) -> str:
    """The end of a script's output, for assertion messages."""
    return f"exit {result.returncode}\nstdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}"


# The engines a run on each Keras backend hides (`tests/without_tensorflow.py`), as on a machine with only
# that backend's packages: the lent GPU machine has JAX and no TensorFlow; a PyTorch run needs neither.
HIDDEN = {"tensorflow": (), "jax": ("tensorflow",), "torch": ("tensorflow", "jax")}
TEST_ACC = re.compile(r"Test acc: (\d\.\d{4})")


def backend_available(backend: str) -> bool:
    """Whether the package of a Keras backend (`tensorflow`, `jax`, `torch`) is installed."""
    return importlib.util.find_spec(backend) is not None


def require_backend(backend: str) -> None:
    """Skips the calling test where `backend`'s package is not installed."""
    if not backend_available(backend):
        pytest.skip(f"{backend} is not installed (pip install -r requirements/{backend}.txt)")


def run_on_backend(backend: str, script: str, *args: str, timeout: float = 600, **env: str
                   ) -> subprocess.CompletedProcess:
    """`KERAS_BACKEND=BACKEND python SCRIPT ARGS` (see `run_script`) with the engines of `HIDDEN` failing
    to import; `env` adds variables."""
    hide = [arg for name in HIDDEN[backend][1:] for arg in ("--also-block", name)]
    wrapper = ["tests/without_tensorflow.py", *hide] if HIDDEN[backend] else []
    return run_script(*wrapper, script, *args, env=child_env(KERAS_BACKEND=backend, **env), timeout=timeout)


def printed_accuracy(output: str) -> float:
    """The last `Test acc: X.XXXX` a run printed (`-t`, or testing after training)."""
    found = TEST_ACC.findall(output)
    assert found, output[-3000:]
    return float(found[-1])


def child_entry(**entries: Callable[..., None]) -> None:
    """The command line of a test module run as a child process (`python tests/test_X.py --NAME ARGS`):
    calls `entries[NAME](*ARGS)`. A test starts it with `run_on_backend` to run code on another Keras
    backend, which is fixed when Keras is imported."""
    flag, *args = sys.argv[1:]
    entries[flag.removeprefix("--")](*args)


@pytest.fixture(scope="session")
def small_raw() -> RawData:
    """300 training and 100 test images (real Fashion-MNIST if installed, else synthetic)."""
    if not fashion_available():
        return synthetic_raw(SMALL_TRAIN, SMALL_TEST)
    arrays = {key: read_idx_gz(FASHION_DIR / name) for key, name in IDX_NAMES.items()}
    return ((arrays["x_train"][:SMALL_TRAIN], arrays["y_train"][:SMALL_TRAIN]),
            (arrays["x_test"][:SMALL_TEST], arrays["y_test"][:SMALL_TEST]))


@pytest.fixture(scope="session")
def small_npz(small_raw: RawData, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`small_raw` as an `.npz` in the `keras.datasets` layout."""
    return save_npz(tmp_path_factory.mktemp("npz") / "small.npz", small_raw)


@pytest.fixture(scope="session")
def small_idx_dir(small_raw: RawData, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`small_raw` as a folder of the four MNIST-format IDX `.gz` files."""
    (x_train, y_train), (x_test, y_test) = small_raw
    folder = tmp_path_factory.mktemp("idx")
    arrays = {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}
    for key, name in IDX_NAMES.items():
        write_idx_gz(folder / name, arrays[key])
    return folder


def assert_log_matches_saved_weights(save_dir: Path, npz: Path, routings: int, lr: float = 0.001,
                                     lr_decay: float = 0.9, lam_recon: float = 0.392) -> None:
    """A finished run's `log.csv` against values computed here: every row's `learning_rate` is
    `lr * lr_decay ** epoch` (the original's schedule), and the last row's validation columns are those
    of the weights the run saved last (`trained_model.weights.h5`) on the `.npz`'s test set, the margin
    loss from `tests/reference.py` and the MSE in NumPy (float64): the total `margin + lam_recon * MSE`,
    each term, and the accuracy of the longest capsule."""
    import keras
    import pandas as pd
    import reference as ref

    import capsulenet
    from capsnet import saving

    log = pd.read_csv(save_dir / "log.csv")
    np.testing.assert_allclose(log["learning_rate"], lr * lr_decay ** log["epoch"], rtol=1e-6)
    with np.load(npz) as f:
        x = f["x_test"][..., None].astype("float32") / 255
        labels = f["y_test"].astype(int)
    y = np.eye(labels.max() + 1, dtype="float32")[labels]
    keras.utils.set_random_seed(0)
    train_model, _, _ = capsulenet.CapsNet(x.shape[1:], y.shape[1], routings)
    saving.load_weights(train_model, str(save_dir / "trained_model.weights.h5"))
    lengths, recon = train_model.predict([x, y], batch_size=50, verbose=0)
    margin = ref.margin_loss(y, lengths)
    mse = np.mean((x.astype(np.float64) - recon).reshape(len(x), -1) ** 2, axis=1)
    want = {"val_loss": np.mean(margin + lam_recon * mse), "val_capsnet_loss": np.mean(margin),
            "val_decoder_loss": np.mean(mse), "val_capsnet_accuracy": np.mean(lengths.argmax(1) == labels)}
    got = log.iloc[-1]
    for column, value in want.items():
        assert got[column] == pytest.approx(value, rel=1e-4, abs=1e-7), (column, got[column], value)


@pytest.fixture(autouse=True)
def _restore_dtype_policy() -> Iterator[None]:
    """Puts back Keras' global dtype policy after each test (`--mixed_precision` changes it), so
    that no test builds its models under another test's policy."""
    import keras

    policy = keras.mixed_precision.global_policy()
    yield
    keras.mixed_precision.set_global_policy(policy)
