"""A user's own images in: a folder of class sub-folders for training, single pictures for prediction.

The folder layout is the one of `keras.utils.image_dataset_from_directory`::

    my_data/
        train/
            cat/  001.png 002.png ...
            dog/  ...
        test/            (optional: without it a seeded share of train is held out)
            cat/  ...
            dog/  ...

Class names are the sub-folder names of `train/`, sorted, so class `i` is the `i`-th name. Images are
read with Pillow only (no TensorFlow here, so this also works on Keras' JAX backend without it) into
the project's format: `x` float32 `[n, rows, cols, channels]` in [0, 1], `y` one-hot float32
`[n, n_class]`. Grayscale images give 1 channel, colour images 3 (RGB); a folder mixing both becomes
RGB.

Usage::

    from capsnet.datasets import save_class_names
    from capsnet.image_folder import load_image_folder, load_for_prediction

    ((x_train, y_train), (x_test, y_test)), class_names = load_image_folder("my_data", (28, 28))
    save_class_names("result/class_names.json", class_names)
    x = load_for_prediction("photo.jpg", size=(28, 28), channels=1, invert=True)  # [28, 28, 1]
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps

from capsnet.errors import DataError, first_line

# `capsnet.datasets.Dataset`, spelled out here: `capsnet.datasets` reads image folders through this
# module, which therefore does not import it.
Dataset = tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]

# Lower-case suffixes of the files that are read as images; anything else in the folders (README.txt,
# .DS_Store, labels.csv) is ignored. Compared case-insensitively, so IMG_001.JPG counts.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff")

# Pillow modes whose pixels are one grey level (an alpha channel, if any, is dropped).
_GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "F", "I;16", "I;16L", "I;16B", "I;16N"})
# Integer modes wider than 8 bits: 16-bit PNG/TIFF open as one of these and are scaled by 1/65535.
_WIDE_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})
_EXIF_ORIENTATION = 0x0112
# What Pillow raises on a bad file besides OSError (which covers UnidentifiedImageError and "image
# file is truncated"): SyntaxError for some broken headers, ValueError/EOFError from decoders.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


# ---------------------------------------------------------------------------------------------
# One image
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _strict_decoding() -> Iterator[None]:
    """Makes Pillow raise on truncated files while the block runs, whatever another module set.

    With `ImageFile.LOAD_TRUNCATED_IMAGES = True` (a common fix copied from forums) Pillow silently
    fills the missing part of a cut-off PNG or JPEG with grey, and such an image would train the model
    on garbage without anyone noticing.
    """
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def _open(path: Path) -> Image.Image:
    """Opens and fully decodes one image (call inside `_strict_decoding`).

    Raises:
        DataError: the file is missing, not an image, or truncated; the message names it.
    """
    try:
        with Image.open(path) as image:
            # `open` only reads the header; `load` decodes the pixels, which is where truncation shows.
            image.load()
            # Phone photos store "rotate me" in EXIF instead of rotating the pixels; apply it so that
            # a picture is seen upright, as every image viewer shows it.
            if image.getexif().get(_EXIF_ORIENTATION, 1) != 1:
                return ImageOps.exif_transpose(image)
            return image  # the decoded pixels outlive the file, which `with` closes
    except FileNotFoundError as e:
        raise DataError(f"{path}: no such file") from e
    except _DECODE_ERRORS as e:
        raise DataError(f"{path}: cannot read this image ({first_line(e)}); replace or delete the "
                        "file") from e


def _is_gray(image: Image.Image) -> bool:
    """Whether an image carries one grey level per pixel.

    A palette image (GIF, some PNGs) is grey when every pixel's colour has R = G = B: Pillow opens
    even a grayscale GIF in mode "P", and its mode alone cannot tell.
    """
    if image.mode in _GRAY_MODES:
        return True
    if image.mode in ("P", "PA"):
        rgb = np.asarray(image.convert("RGB"))
        return bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())
    return False


def _gray_array(image: Image.Image, path: Path) -> np.ndarray:
    """`[rows, cols]` float32 in [0, 1] from a grey image (see `_is_gray`), keeping 16-bit precision."""
    if image.mode in _WIDE_MODES:
        pixels = np.asarray(image, dtype=np.float64)
        # Mode "I" is 32-bit and could hold anything; a 16-bit PNG/TIFF is within 0..65535.
        if pixels.min() < 0 or pixels.max() > 65535:
            raise DataError(f"{path}: integer pixels {pixels.min():g}..{pixels.max():g} are outside "
                            "16-bit 0..65535; save it as an 8- or 16-bit image")
        return (pixels / 65535.0).astype(np.float32)
    if image.mode == "F":
        pixels = np.asarray(image, dtype=np.float32)
        if not np.isfinite(pixels).all() or pixels.min() < 0 or pixels.max() > 1:
            raise DataError(f"{path}: floating-point pixels must lie in [0, 1]; save it as an 8- or "
                            "16-bit image")
        return pixels.copy()
    # "1" (0/1 booleans), "L", "LA" and grey palettes all become 8-bit "L": 0..255.
    return np.asarray(image.convert("L"), dtype=np.float32) / 255.0


def _to_array(image: Image.Image, path: Path, channels: int | None = None) -> np.ndarray:
    """Converts a decoded image to `[rows, cols, channels]` float32 in [0, 1].

    Args:
        image: a loaded Pillow image.
        path: its file, for error messages.
        channels: 1 or 3; None keeps the image's own kind (1 for grey, 3 for colour).
    """
    gray = _is_gray(image)
    if channels is None:
        channels = 1 if gray else 3
    if gray:
        pixels = _gray_array(image, path)[..., np.newaxis]
        # Grey to RGB is the grey level repeated, which is what Pillow's convert("RGB") does too.
        return np.repeat(pixels, 3, axis=-1) if channels == 3 else pixels
    try:
        rgb = image.convert("RGB")  # drops alpha; CMYK, YCbCr, colour palettes -> RGB
        if channels == 1:
            # Pillow's ITU-R 601-2 luma, L = 0.299 R + 0.587 G + 0.114 B, as `Image.convert("L")`.
            return (np.asarray(rgb.convert("L"), dtype=np.float32) / 255.0)[..., np.newaxis]
        return np.asarray(rgb, dtype=np.float32) / 255.0
    except _DECODE_ERRORS as e:
        raise DataError(f"{path}: cannot convert mode {image.mode} to RGB ({first_line(e)}); save "
                        "it as an RGB or grayscale PNG/JPEG") from e


def _resize(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of `[rows, cols, channels]` float32 to `[size[0], size[1], channels]`.

    Done channel by channel in Pillow's 32-bit float mode "F", so that 16-bit images keep their
    precision and no value is rounded to 8 bits on the way.
    """
    if pixels.shape[:2] == tuple(size):
        return pixels
    rows, cols = size
    planes = [
        np.asarray(Image.fromarray(np.ascontiguousarray(pixels[..., c])).resize(
            (cols, rows), Image.Resampling.BILINEAR))  # Pillow sizes are (width, height)
        for c in range(pixels.shape[-1])
    ]
    # Bilinear weights are convex, but float rounding may step a hair outside [0, 1].
    return np.clip(np.stack(planes, axis=-1), 0.0, 1.0).astype(np.float32)


def _check_size(size: Sequence[int] | None, what: str) -> tuple[int, int] | None:
    if size is None:
        return None
    try:
        rows, cols = (int(v) for v in size)
        valid = rows > 0 and cols > 0 and (rows, cols) == tuple(size)
    except (TypeError, ValueError):
        valid = False
    if not valid:
        raise DataError(f"{what} must be two positive whole numbers H W, got {size!r}")
    return rows, cols


def load_for_prediction(
    path: str | os.PathLike, size: tuple[int, int], channels: int, invert: bool = False
) -> np.ndarray:
    """Reads one picture as a model's input.

    Args:
        path: an image file Pillow reads.
        size: the model's `(rows, cols)`; the image is resized to it (bilinear) if different.
        channels: the model's channels, 1 or 3. Colour -> grey uses Pillow's "L" conversion
            (0.299 R + 0.587 G + 0.114 B); grey -> RGB repeats the grey level.
        invert: return `1 - x`, for dark-on-light pictures (ink on paper) given to a model trained on
            MNIST-like light-on-dark images.

    Returns:
        `[rows, cols, channels]` float32 in [0, 1].

    Raises:
        DataError: the file cannot be read, or `channels` is not 1 or 3; the message names the file.
    """
    path = Path(path)
    size = _check_size(size, "the model's input size")
    if channels not in (1, 3):
        raise DataError(f"{path}: the model takes {channels}-channel images; only 1 (grey) or 3 (RGB) "
                        "channels can be made from a picture")
    with _strict_decoding():
        image = _open(path)
    pixels = _to_array(image, path, channels)
    if size is not None:
        pixels = _resize(pixels, size)
    return (1.0 - pixels).astype(np.float32) if invert else pixels


# ---------------------------------------------------------------------------------------------
# Folders
# ---------------------------------------------------------------------------------------------


def _is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()


def _image_files(folder: Path) -> list[Path]:
    """The image files under `folder`, recursively (as `image_dataset_from_directory`), sorted.

    Hidden files and folders are skipped: macOS leaves `._photo.png` resource forks beside copied
    images, which have an image suffix but are not images.
    """
    files = []
    for path in folder.rglob("*"):
        if any(part.startswith(".") for part in path.relative_to(folder).parts):
            continue
        if _is_image_file(path):
            files.append(path)
    return sorted(files)


def _class_folders(split: Path) -> list[Path]:
    """The class sub-folders of `split` (`train/` or `test/`), sorted by name, hidden ones skipped."""
    return sorted((p for p in split.iterdir() if p.is_dir() and not p.name.startswith(".")),
                  key=lambda p: p.name)


def is_image_folder(path: str | os.PathLike) -> bool:
    """Whether `path` is a folder with `train/` holding at least one class sub-folder.

    An MNIST IDX folder (four `*-idx?-ubyte.gz` files, no `train/`) is not one.
    """
    train = Path(path) / "train"
    try:
        return train.is_dir() and bool(_class_folders(train))
    except OSError:  # unreadable folder: not ours to judge here; the loader will report it
        return False


def expand_prediction_paths(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Turns the paths given to `--predict` into a list of image files.

    Files are kept as given, whatever their suffix (the user asked for them). Folders become their
    image files, recursively and sorted. A path that does not exist is kept, so that the caller
    reports it as unreadable together with the other pictures.

    Raises:
        DataError: a folder holds no image files.
    """
    expanded: list[Path] = []
    for given in paths:
        path = Path(given).expanduser()
        if path.is_dir():
            files = _image_files(path)
            if not files:
                raise DataError(f"{path}: folder holds no image files ({' '.join(IMAGE_SUFFIXES)})")
            expanded.extend(files)
        else:
            expanded.append(path)
    return expanded


def _holdout_split(
    files: list[tuple[Path, int]], n_class: int, holdout: float, seed: int
) -> tuple[list[tuple[Path, int]], list[tuple[Path, int]]]:
    """Splits `(file, label)` pairs into train and held-out test, stratified by class.

    Each class with n >= 2 images gives round(holdout * n) of them, at least 1 and at most n - 1, so
    that every class is both trained and tested; a class of one image stays in train. Which images
    are held out depends only on the seed and the sorted file names: the same folder and seed always
    give the same split. Both parts keep the sorted order.
    """
    rng = np.random.default_rng(seed)
    train: list[tuple[Path, int]] = []
    test: list[tuple[Path, int]] = []
    for label in range(n_class):
        members = [item for item in files if item[1] == label]
        n = len(members)
        k = 0 if n < 2 else min(max(math.floor(holdout * n + 0.5), 1), n - 1)
        held = set(rng.permutation(n)[:k].tolist())
        for i, item in enumerate(members):
            (test if i in held else train).append(item)
    return train, test


def _progress_bar(n: int, verbose: bool):
    if not verbose:
        return None
    # Imported here, not at the top, so that reading images never waits for a Keras backend to load.
    import keras

    return keras.utils.Progbar(n, unit_name="image")


def _load_images(
    files: list[tuple[Path, int]], image_size: tuple[int, int] | None, verbose: bool
) -> np.ndarray:
    """Reads the files into `[n, rows, cols, channels]` float32 in [0, 1] (see `load_image_folder`)."""
    bar = _progress_bar(len(files), verbose)
    arrays: list[np.ndarray] = []
    first_of_size: dict[tuple[int, int], Path] = {}
    with _strict_decoding():
        for i, (path, _) in enumerate(files):
            pixels = _to_array(_open(path), path)  # 1 channel for grey, 3 for colour
            shape = pixels.shape[:2]
            if image_size is not None:
                pixels = _resize(pixels, image_size)
            elif first_of_size and shape not in first_of_size:
                # Stop at the first mismatch: reading thousands more images cannot make it fit.
                other_shape, other = next(iter(first_of_size.items()))
                raise DataError(
                    f"images differ in size: {other} is {other_shape[0]}x{other_shape[1]} but {path} "
                    f"is {shape[0]}x{shape[1]} (HxW); pass --image_size H W to resize them all")
            first_of_size.setdefault(shape, path)
            arrays.append(pixels)
            if bar is not None:
                bar.update(i + 1)
    if any(a.shape[-1] == 3 for a in arrays):
        # A folder mixing grey and colour is colour: grey images repeat their level in R, G and B.
        arrays = [a if a.shape[-1] == 3 else np.repeat(a, 3, axis=-1) for a in arrays]
    return np.stack(arrays)


def load_image_folder(
    root: str | os.PathLike,
    image_size: tuple[int, int] | None = None,
    holdout: float = 0.1,
    seed: int = 0,
    verbose: bool = True,
) -> tuple[Dataset, list[str]]:
    """Loads `root/train/<class>/*` and `root/test/<class>/*` as a dataset.

    Args:
        root: the folder holding `train/` (and optionally `test/`). Images may sit in nested folders
            inside a class folder; files without an image suffix and hidden files are ignored.
        image_size: `(rows, cols)` to resize every image to (bilinear); None requires all images to
            share one size.
        holdout: without `root/test/`, the share of each training class held out as the test set
            (stratified, see `_holdout_split`), in (0, 1).
        seed: chooses the held-out images; the same seed gives the same split.
        verbose: show a progress bar and say how many images were held out.

    Returns:
        `((x_train, y_train), (x_test, y_test)), class_names`: x float32 `[n, rows, cols, channels]`
        in [0, 1] (channels 1 if every image is grey, else 3), y one-hot float32 `[n, n_class]`, and
        the sorted class folder names, `class_names[i]` being class `i`.

    Raises:
        DataError: missing or empty folders, fewer than 2 classes, a test class unknown to train,
            an unreadable or truncated image, or images of different sizes without `image_size`.
    """
    root = Path(root).expanduser()
    image_size = _check_size(image_size, "--image_size")
    train_dir, test_dir = root / "train", root / "test"
    if not train_dir.is_dir():
        raise DataError(f"{root}: no train/ folder; an image dataset needs train/<class name>/ folders "
                        "of images (and optionally test/<class name>/)")
    class_dirs = _class_folders(train_dir)
    class_names = [d.name for d in class_dirs]
    if len(class_names) < 2:
        raise DataError(f"{train_dir}: found {len(class_names)} class folder(s); put each class's "
                        "images in its own sub-folder, at least 2 classes")
    train_files: list[tuple[Path, int]] = []
    for label, folder in enumerate(class_dirs):
        files = _image_files(folder)
        if not files:
            # An empty class could never be predicted and would shift the one-hot columns.
            raise DataError(f"{folder}: no image files ({' '.join(IMAGE_SUFFIXES)}); add images or "
                            "remove the folder")
        train_files += [(f, label) for f in files]

    if test_dir.is_dir():
        index = {name: i for i, name in enumerate(class_names)}
        test_files: list[tuple[Path, int]] = []
        for folder in _class_folders(test_dir):
            if folder.name not in index:
                raise DataError(f"{folder}: class '{folder.name}' has no folder in {train_dir}; rename "
                                "it to a training class or add training images for it")
            test_files += [(f, index[folder.name]) for f in _image_files(folder)]
        if not test_files:
            raise DataError(f"{test_dir}: no test images; add test/<class name>/ images or remove "
                            "test/ to hold out part of train")
    else:
        if not 0 < holdout < 1:
            raise DataError(f"{root}: without a test/ folder a share of train is held out, but holdout "
                            f"is {holdout}; it must be between 0 and 1")
        n_all = len(train_files)
        train_files, test_files = _holdout_split(train_files, len(class_names), holdout, seed)
        if not test_files:
            raise DataError(f"{train_dir}: every class has a single image, so none can be held out; "
                            "add images or a test/ folder")
        if verbose:
            print(f"{root}: no test/ folder, so {len(test_files)} of {n_all} training images "
                  f"({holdout * 100:g}% of each class, seed {seed}) are held out as the test set")

    x = _load_images(train_files + test_files, image_size, verbose)
    labels = np.array([label for _, label in train_files + test_files], dtype=np.int64)
    y = np.eye(len(class_names), dtype=np.float32)[labels]
    n_train = len(train_files)
    return ((x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])), class_names
