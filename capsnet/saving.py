"""Weight and model files: load any format the original or this project wrote, write atomically.

- `.weights.h5`: Keras 3 weights (`model.save_weights`), what checkpoints and `trained_model.weights.h5`
  hold;
- `.keras`: a whole Keras 3 model, loaded with `safe_mode=True` (a `Lambda` layer is refused: nothing
  in a model file is ever executed), its layers' weights copied by name;
- `.h5` / `.hdf5`: legacy Keras 2 weights or models, as the original wrote them, matched by topology;
- a missing `NAME.h5` falls back to `NAME.weights.h5`, then to `NAME.keras`, so that the original's
  `-w result/trained_model.h5` keeps working.

Every writer goes through a temporary file and a rename (`atomic.atomic_path`): a crash or a full disk
never leaves a truncated file where a good one was.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
import warnings
import zipfile

import keras
import numpy as np

from capsnet import (
    atomic,
    layers,  # noqa: F401 - registers the layers that .keras files name
)
from capsnet.errors import UserError


def _is_legacy_h5(path: str) -> bool:
    import h5py

    with h5py.File(path, "r") as f:
        return "layer_names" in f.attrs or "model_weights" in f


def load_model_file(path: str) -> keras.Model:
    """A whole model from a `.keras` file, loaded with `safe_mode=True` (after `import capsulelayers`,
    which registers this project's layers): a `Lambda` layer, arbitrary code, is refused.

    Raises:
        UserError: the file is missing, not a `.keras` archive, unsafe or unreadable (one line).
    """
    if not os.path.isfile(path):
        raise UserError(f"-w {path}: no such file")
    _check_container(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Keras' notes on compile state; the outcome is checked
            return keras.saving.load_model(path, compile=False, safe_mode=True)
    except ValueError as e:
        if "Lambda" in str(e) or "safe_mode" in str(e):
            raise UserError(f"-w {path}: refused, the model contains a Lambda layer (arbitrary code); "
                            "only models made of registered layers are loaded") from e
        raise UserError(f"-w {path}: cannot be loaded ({_load_error(e)})") from e
    except Exception as e:  # zipfile, h5py and Keras raise many types for broken files
        raise UserError(f"-w {path}: cannot be loaded ({_load_error(e)})") from e


def _load_keras_file(model: keras.Model, path: str) -> None:
    saved = load_model_file(path)
    for layer in model.layers:
        if not layer.weights:
            continue
        try:
            source = saved.get_layer(layer.name)
        except ValueError as e:
            raise UserError(f"{path}: has no layer '{layer.name}'; it is not a CapsNet model") from e
        layer.set_weights(source.get_weights())


def resolve_weights_path(path: str, announce: bool = False) -> str:
    """`path`, or for a missing `NAME.h5` the first that exists of `NAME.weights.h5` (the name Keras 3
    forces on weight files) and `NAME.keras` (the whole model, which holds the same weights), so that
    the original's `-w result/trained_model.h5` keeps working whichever of the two a folder keeps."""
    if os.path.exists(path) or not path.endswith(".h5") or path.endswith(".weights.h5"):
        return path
    stem = path[: -len(".h5")]
    for alternative, why in ((stem + ".weights.h5", "Keras 3 names weight files *.weights.h5"),
                             (stem + ".keras", "the whole model, with the same weights")):
        if os.path.exists(alternative):
            if announce:
                print(f"Note: {path} not found, loading {alternative} ({why})")
            return alternative
    return path


def load_weights(model: keras.Model, path: str) -> str:
    """Loads `.weights.h5`, `.keras` or legacy Keras-2 `.h5` weights into `model` (the train model).

    A missing `NAME.h5` falls back to `NAME.weights.h5`, then `NAME.keras` (see `resolve_weights_path`).

    Returns:
        the path actually loaded.

    Raises:
        UserError: the file is missing, unreadable, unsafe or does not fit the model.
    """
    path = resolve_weights_path(path, announce=True)
    if not os.path.isfile(path):
        raise UserError(f"-w {path}: no such file")
    if not os.access(path, os.R_OK):
        raise UserError(f"-w {path}: file is not readable")
    try:
        with warnings.catch_warnings():
            # Keras warns about containers it matches by topology; the outcome is checked instead.
            warnings.simplefilter("ignore")
            _load_by_format(model, path)
    except UserError:
        raise
    except Exception as e:  # h5py, zipfile and Keras raise many types for broken or foreign files
        raise UserError(f"-w {path}: cannot be loaded into this model ({_load_error(e)})") from e
    return path


def _check_container(path: str) -> None:
    """Says in plain words what a file is not, before Keras or h5py say it in their own (a `.keras`
    that is no zip archive made Keras report "File not found"; a `.h5` that is no HDF5 file made h5py
    report "file signature not found")."""
    import h5py

    if path.endswith(".keras") and not zipfile.is_zipfile(path):
        raise UserError(f"-w {path}: not a Keras model file (a .keras file is a zip archive written by "
                        "model.save); is it complete, and the file you meant?")
    if path.endswith((".h5", ".hdf5")) and not h5py.is_hdf5(path):
        raise UserError(f"-w {path}: not an HDF5 file (weights files are written by save_weights or the "
                        "original's model.save); is it complete, and the file you meant?")


def _load_by_format(model: keras.Model, path: str) -> None:
    _check_container(path)
    if path.endswith(".keras"):
        _load_keras_file(model, path)
    elif path.endswith(".weights.h5") or (path.endswith((".h5", ".hdf5")) and not _is_legacy_h5(path)):
        with tempfile.TemporaryDirectory() as tmp:
            # Keras 3 reads its own format only under a .weights.h5 name.
            alias = os.path.join(tmp, "w.weights.h5")
            os.symlink(os.path.abspath(path), alias)
            model.load_weights(alias)
    elif path.endswith((".h5", ".hdf5")):
        model.load_weights(path)  # legacy Keras 2 HDF5, matched by topology
    else:
        raise UserError(f"-w {path}: unknown weights format; use .weights.h5, .keras or .h5")


def _load_error(error: Exception) -> str:
    """The useful part of a weight-loading error, on one line."""
    text = " ".join(str(error).split())
    # Keras 3 files name the layer and both shapes one way, legacy Keras-2 files another.
    patterns = (r"name=([\w.-]+).*?variable\.shape=(\([^)]*\)).*?value\.shape=(\([^)]*\))",
                r"\(named ([\w.-]+)\).*?expects shape (\([^)]*\)).*?saved weight with shape (\([^)]*\))")
    for pattern in patterns:
        shapes = re.search(pattern, text)
        if shapes:
            layer, expected, found = shapes.groups()
            return f"layer {layer} needs weights of shape {expected}, the file holds {found}"
    return text[:300] or type(error).__name__


def save_weights(model: keras.Model, path: str | os.PathLike) -> None:
    """`model.save_weights`, through a temporary file and a rename.

    Raises:
        OSError: naming `path`, e.g. the disk is full (checked first: see `atomic.check_free_space`).
    """
    atomic.check_free_space(path, _weight_bytes(model))
    with atomic.atomic_path(path) as tmp:
        model.save_weights(tmp)


def save_model(model: keras.Model, path: str | os.PathLike) -> None:
    """`model.save` (`.keras`), through a temporary file and a rename; see `save_weights`."""
    atomic.check_free_space(path, _weight_bytes(model))
    with atomic.atomic_path(path) as tmp:
        model.save(tmp)


def _weight_bytes(model: keras.Model) -> int:
    """About what a file of `model`'s weights takes: the arrays plus 1 MiB for HDF5's structure."""
    return sum(math.prod(w.shape) * np.dtype(w.dtype).itemsize for w in model.weights) + 2**20
