"""Datasets, images and plots for CapsNet-Keras.

Data arrive as `x` float32 `[n, rows, cols, channels]` in [0, 1] and `y` one-hot float32
`[n, n_class]`, from `keras.datasets` (`mnist`, `fashion_mnist`, `cifar10`) or from local files (IDX
folders, `.npz`, and folders of images, which `capsnet.image_folder` reads), so the same command line runs
offline. `load_labelled_dataset` is the one entry point: it tells the sources apart and checks the
arrays.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import math
import os
import struct
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from capsnet.atomic import write_text_atomic
from capsnet.errors import DataError, first_line

IDX_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
KERAS_DATASETS = ("mnist", "fashion_mnist", "cifar10")
# Class names of the named datasets, in label order (their documentation's); others number their classes.
CLASS_NAMES = {
    "fashion_mnist": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                      "Bag", "Ankle boot"],
    "cifar10": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
}
# Where Debian's `dataset-fashion-mnist` package puts the IDX files.
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
# Written beside the weights, so that --predict prints the names a model was trained with.
DEFAULT_CLASS_NAMES_FILE = "class_names.json"

Dataset = tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


# ---------------------------------------------------------------------------------------------
# Native output
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def native_stderr_quiet() -> Iterator[None]:
    """Silences what native code writes to the process' stderr (file descriptor 2) in the block.

    TensorFlow's C++ code logs through absl before any Python setting can reach it ("All log messages
    before absl::InitializeLog() is called are written to STDERR"); `TF_CPP_MIN_LOG_LEVEL` removes the
    rest. Python exceptions raised in the block still reach the terminal: they are printed after it.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads an IDX file (the MNIST format), gzipped or not, into a uint8 array."""
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
        zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
        if zero != 0 or dtype_code != 0x08:
            raise DataError(f"{path}: not an unsigned-byte IDX file (magic {data[:4].hex()})")
        shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
        array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
        if array.size != math.prod(shape):
            raise DataError(f"{path}: truncated IDX file ({array.size} values for shape {shape})")
        return array.reshape(shape)
    except (OSError, EOFError, struct.error) as e:
        raise DataError(f"{path}: cannot read IDX file ({e})") from e


def _find_idx(folder: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem, stem.replace("-idx", ".idx")):
        if (folder / name).is_file():
            return folder / name
    raise DataError(f"{folder}: missing {stem}.gz (a folder needs the 4 MNIST-format IDX files: "
                    f"{', '.join(s + '.gz' for s in IDX_FILES.values())})")


def load_idx_folder(folder: str | os.PathLike) -> Dataset:
    """Loads a folder holding the four MNIST-format IDX files."""
    folder = Path(folder)
    arrays = {key: read_idx(_find_idx(folder, stem)) for key, stem in IDX_FILES.items()}
    return (arrays["x_train"], arrays["y_train"]), (arrays["x_test"], arrays["y_test"])


def load_npz(path: str | os.PathLike) -> Dataset:
    """Loads an `.npz` in the `keras.datasets` layout: `x_train`, `y_train`, `x_test`, `y_test`."""
    try:
        # allow_pickle=False: a data file must never be able to run code.
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in IDX_FILES if k not in f.files]
            if missing:
                raise DataError(f"{path}: missing arrays {missing}; an .npz needs x_train, y_train, "
                                "x_test and y_test")
            arrays = {k: f[k] for k in IDX_FILES}
    except (OSError, ValueError, EOFError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{path}: cannot read .npz ({e}); object arrays are refused") from e
    return (arrays["x_train"], arrays["y_train"]), (arrays["x_test"], arrays["y_test"])


def _load_keras_dataset(name: str) -> Dataset:
    import keras

    try:
        return getattr(keras.datasets, name).load_data()
    except Exception as e:  # keras raises a bare Exception on a failed download
        if name == "fashion_mnist" and DEBIAN_FASHION_MNIST.is_dir():
            return load_idx_folder(DEBIAN_FASHION_MNIST)
        raise DataError(
            f"could not load {name} through keras.datasets ({str(e).splitlines()[0][:160]}); "
            "without internet pass local data with --dataset PATH (a folder of the 4 MNIST-format "
            "IDX .gz files, or an .npz with x_train, y_train, x_test, y_test)"
        ) from e


def _prepare_images(x: np.ndarray, where: str) -> np.ndarray:
    if x.ndim == 3:
        x = x[..., np.newaxis]
    if x.ndim != 4 or x.shape[0] == 0:
        raise DataError(f"{where}: images must be [n, rows, cols] or [n, rows, cols, channels], "
                        f"got shape {x.shape}")
    if x.dtype == np.uint8:
        return x.astype("float32") / 255.0
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise DataError(f"{where}: images must be numbers, got dtype {x.dtype}")
    x = x.astype("float32")
    if not np.isfinite(x).all():
        raise DataError(f"{where}: images contain NaN or inf values")
    if x.min() < 0 or x.max() > 1:
        raise DataError(f"{where}: float images must lie in [0, 1] (got {x.min():g}..{x.max():g}); "
                        "scale them or save them as uint8")
    return x


def _prepare_labels(y: np.ndarray, n: int, where: str) -> np.ndarray:
    if y.ndim == 2 and y.shape[1] > 1:  # already one-hot
        if not np.isfinite(y).all() or not np.isin(y, (0, 1)).all() or not (y.sum(1) == 1).all():
            raise DataError(f"{where}: 2-D labels must be one-hot rows of 0 and 1")
        y = y.argmax(1)
    y = y.reshape(-1) if y.ndim == 2 and y.shape[1] == 1 else y
    if y.ndim != 1:
        raise DataError(f"{where}: labels must be [n] class indices or [n, n_class] one-hot, "
                        f"got shape {y.shape}")
    if len(y) != n:
        raise DataError(f"{where}: {n} images but {len(y)} labels")
    if not np.issubdtype(y.dtype, np.integer):
        if not np.isfinite(y).all() or (y != np.round(y)).any():
            raise DataError(f"{where}: labels must be whole class numbers (found NaN or fractions)")
    y = y.astype("int64")
    if y.min() < 0:
        raise DataError(f"{where}: labels must be >= 0, found {y.min()}")
    return y


def prepare(data: Dataset, source: str = "dataset") -> Dataset:
    """Checks raw arrays and returns `x` float32 `[n, rows, cols, channels]`, `y` one-hot float32.

    Raises:
        DataError: naming the problem (shapes, lengths, NaNs, label range).
    """
    (x_train, y_train), (x_test, y_test) = data
    x_train = _prepare_images(np.asarray(x_train), f"{source}: x_train")
    x_test = _prepare_images(np.asarray(x_test), f"{source}: x_test")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(f"{source}: train images are {x_train.shape[1:]} but test images are "
                        f"{x_test.shape[1:]}")
    y_train = _prepare_labels(np.asarray(y_train), len(x_train), f"{source}: y_train")
    y_test = _prepare_labels(np.asarray(y_test), len(x_test), f"{source}: y_test")
    n_class = int(y_train.max()) + 1
    if n_class < 2:
        raise DataError(f"{source}: need at least 2 classes, found {n_class}")
    if y_test.max() >= n_class:
        raise DataError(f"{source}: test label {y_test.max()} is out of range (training labels "
                        f"are 0..{n_class - 1})")
    eye = np.eye(n_class, dtype="float32")
    return (x_train, eye[y_train]), (x_test, eye[y_test])


def load_dataset(spec: str = "mnist") -> Dataset:
    """Loads `mnist`, `fashion_mnist`, `cifar10`, an image folder, a folder of IDX files or an `.npz`,
    and checks it (see `load_labelled_dataset`, which also returns the class names)."""
    return load_labelled_dataset(spec)[0]


def load_labelled_dataset(spec: str = "mnist", image_size: tuple[int, int] | None = None, seed: int = 0
                          ) -> tuple[Dataset, list[str]]:
    """Loads a dataset and its class names.

    Args:
        spec: `mnist`, `fashion_mnist`, `cifar10` (through `keras.datasets`), a folder of images
            (`train/<class>/`, optionally `test/<class>/`: `image_folder.load_image_folder`), a folder of
            the 4 MNIST-format IDX files, or an `.npz` with `x_train`, `y_train`, `x_test`, `y_test`.
        image_size: image folders only: resize every image to `(rows, cols)`.
        seed: image folders without `test/` only: which images are held out as the test set.

    Returns:
        `((x_train, y_train), (x_test, y_test)), class_names`: images float32
        `[n, rows, cols, channels]` in [0, 1], labels one-hot float32 `[n, n_class]`, and one name per
        class (the folder names, the dataset's documented names, or the class numbers).

    Raises:
        DataError: the data cannot be found, read or used; the message says why.
    """
    from capsnet import image_folder  # here, not at the top: Pillow is needed for folders of images only

    path = Path(spec).expanduser()
    if image_folder.is_image_folder(path):
        return image_folder.load_image_folder(path, image_size=image_size, seed=seed)
    if image_size is not None:
        raise DataError(f"--image_size: applies to folders of images only, not to --dataset {spec}")
    if spec in KERAS_DATASETS and not path.exists():
        raw = _load_keras_dataset(spec)
    elif path.is_dir():
        raw = load_idx_folder(path)
    elif path.is_file() and path.suffix == ".npz":
        raw = load_npz(path)
    elif path.exists():
        raise DataError(f"--dataset {spec}: expected a folder of images or of IDX files, or an .npz file")
    else:
        raise DataError(f"--dataset {spec}: no such file or folder (use mnist, fashion_mnist, cifar10, a "
                        "folder of images in train/<class>/, a folder of the 4 MNIST-format IDX .gz files, "
                        "or an .npz)")
    data = prepare(raw, source=spec)
    n_class = data[0][1].shape[1]
    names = CLASS_NAMES.get(spec if spec in KERAS_DATASETS and not path.exists() else "")
    return data, names if names and len(names) == n_class else [str(i) for i in range(n_class)]


# ---------------------------------------------------------------------------------------------
# Class names
# ---------------------------------------------------------------------------------------------


def save_class_names(path: str | os.PathLike, names: Sequence[str]) -> None:
    """Writes `{"class_names": [...]}` to `path` atomically, so predictions can print names."""
    names = list(names)
    if not all(isinstance(n, str) for n in names):
        raise DataError(f"{path}: class names must be strings, got {names!r}")
    write_text_atomic(path, json.dumps({"class_names": names}, indent=2, ensure_ascii=False) + "\n")


def load_class_names(path: str | os.PathLike) -> list[str] | None:
    """Reads a file written by `save_class_names`.

    Returns:
        the class names, `names[i]` being class `i`; None if the file does not exist.

    Raises:
        DataError: the file is not JSON, or `class_names` is not a non-empty list of strings.
    """
    path = Path(path)
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: cannot read class names ({first_line(e)}); delete the file or "
                        "write it as {\"class_names\": [\"name\", ...]}") from e
    names = data.get("class_names") if isinstance(data, dict) else None
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise DataError(f"{path}: expected {{\"class_names\": [\"name\", ...]}} with a non-empty list "
                        "of strings; fix or delete the file")
    return names
