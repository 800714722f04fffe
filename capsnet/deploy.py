"""A trained CapsNet used outside training: predictions on new images, exported models.

The eval model (`x -> [capsule lengths, reconstruction]`) of a `-w` file is classified on a user's own
pictures (`--predict`) or exported for serving without this project's code (`--export`) through
Keras' own `model.export`:

| format | written to | run it with |
|---|---|---|
| `tf_saved_model` | `save_dir/saved_model/` | `tf.saved_model.load` (TensorFlow) |
| `onnx` | `save_dir/trained_model.onnx` | `onnxruntime` |
| `litert` | `save_dir/trained_model.tflite` | `ai_edge_litert.interpreter.Interpreter` |

Each export takes any batch size, is float32 (a `--mixed_precision` model is rebuilt in float32
first) and returns `[lengths [batch, n_class], reconstruction [batch, rows, cols, channels]]`.
Exporting needs the TensorFlow backend; `onnx` also needs `tf2onnx` and `onnx`
(`pip install -r requirements/export.txt`, which also holds the runtimes).

Usage::

    python capsulenet.py -w result/trained_model.keras --predict digit.png my_pictures/ [--invert]
    python capsulenet.py -w result/trained_model.keras --export onnx

    from capsnet import deploy
    eval_model, class_names = deploy.load_eval_model("result/trained_model.keras", build=...)
    deploy.predict_images(eval_model, ["digit.png"], class_names, invert=False, save_dir="result",
                          batch_size=100)
    deploy.export_model(eval_model, "litert", "result")   # -> Path("result/trained_model.tflite")
"""

from __future__ import annotations

import importlib
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np

from capsnet import atomic, datasets, image_folder, plots, saving
from capsnet.errors import DataError, UserError, first_line
from capsnet.model import CapsNet

EXPORT_FORMATS = ("tf_saved_model", "onnx", "litert")
# Where each format is written, inside save_dir.
EXPORT_NAMES = {
    "tf_saved_model": "saved_model",
    "onnx": "trained_model.onnx",
    "litert": "trained_model.tflite",
}
# (module, pinned requirement) that exporting a format needs besides TensorFlow; the pins are those of
# requirements/export.txt (a test keeps the two equal).
EXPORT_PACKAGES: dict[str, tuple[tuple[str, str], ...]] = {
    "tf_saved_model": (),
    "onnx": (("tf2onnx", "tf2onnx==1.17.0"), ("onnx", "onnx==1.23.2")),
    "litert": (),  # the converter ships with TensorFlow; ai-edge-litert only runs the file
}
REQUIREMENTS_FILE = "requirements/export.txt"
PREDICTIONS_CSV = "predictions.csv"
PREDICTIONS_PNG = "predictions.png"
# predictions.png shows the first this many images: a folder of 100,000 pictures would otherwise make
# a picture of 150 megapixels. The CSV has every image.
MAX_PREVIEW_IMAGES = 100


# ---------------------------------------------------------------------------------------------
# Loading the eval model
# ---------------------------------------------------------------------------------------------


def load_eval_model(weights: str, build: Callable[[], tuple[keras.Model, list[str]]]
                    ) -> tuple[keras.Model, list[str]]:
    """The eval model of `weights` and the names of its classes.

    Args:
        weights: a `.keras` file (the whole eval model, as training writes `trained_model.keras`), or
            any weights file that `build` knows how to load.
        build: for a file other than `.keras`: returns `(eval_model, class_names)` with the weights
            loaded (the command line builds the model for `--dataset`, as `-t` does).

    Returns:
        `(eval_model, class_names)`: `x [batch, rows, cols, channels] -> [lengths [batch, n_class],
        reconstruction [batch, rows, cols, channels]]`, and one name per class:
        `class_names.json` beside `weights` if it exists, else the dataset's names (`build`), else
        the class numbers `"0"`, `"1"`, ...

    Raises:
        UserError: the file is unsafe (a `Lambda` layer), unreadable or not a CapsNet eval model, or
            `class_names.json` names another number of classes.
        DataError: `class_names.json` is malformed.
    """
    # Read first: a malformed file should fail before a dataset is loaded for `build`.
    names_path = Path(weights).parent / datasets.DEFAULT_CLASS_NAMES_FILE
    saved_names = datasets.load_class_names(names_path)
    if str(weights).endswith(".keras"):
        model = saving.load_model_file(str(weights))
        class_names = [str(i) for i in range(_n_class(model, str(weights)))]
    else:
        model, class_names = build()
    n_class = _n_class(model, str(weights))
    if saved_names is not None:
        if len(saved_names) != n_class:
            raise UserError(f"{names_path}: {len(saved_names)} class names but the model of -w {weights} "
                            f"has {n_class} classes; fix or delete the file")
        class_names = saved_names
    return model, list(class_names)


def _n_class(model: keras.Model, path: str) -> int:
    """The number of classes of an eval model, after checking that it is one."""
    if len(model.inputs) != 1 or len(model.outputs) != 2 or len(model.input_shape) != 4:
        raise UserError(f"-w {path}: holds a model with {len(model.inputs)} input(s) and "
                        f"{len(model.outputs)} output(s); --predict and --export need the eval model "
                        "x -> [capsule lengths, reconstruction] (training writes it to "
                        "trained_model.keras)")
    return int(model.outputs[0].shape[-1])


# ---------------------------------------------------------------------------------------------
# Predicting
# ---------------------------------------------------------------------------------------------


def predict_images(eval_model: keras.Model, paths: Sequence[str | os.PathLike], class_names: Sequence[str],
                   invert: bool, save_dir: str | os.PathLike, batch_size: int) -> None:
    """Classifies image files (or the images in folders) and writes what it found.

    Each picture is converted to the model's input (`image_folder.load_for_prediction`: resized to
    its rows x cols, made grey or RGB, scaled to [0, 1], `1 - x` with `invert`). Prints one line per
    image to stdout, e.g. `digit.png: 7 (seven) length 0.931`, and writes into `save_dir`:

    - `predictions.csv`: `path,class,class_name,length_<name0>,...`, one row per image, every
      capsule length;
    - `predictions.png`: each input beside its reconstruction (the first `MAX_PREVIEW_IMAGES`).

    A file that cannot be read is named on one stderr line (`error: PATH: reason`) and skipped.

    Args:
        eval_model: `x [batch, rows, cols, channels] -> [lengths [batch, n_class], reconstruction]`.
        paths: image files and folders (searched recursively for image files).
        class_names: `n_class` names, `class_names[i]` for class `i`.
        invert: for dark-on-light pictures given to a model trained on light-on-dark ones (MNIST).
        save_dir: an existing folder.
        batch_size: images per `predict` call.

    Raises:
        DataError: after every readable image was predicted and written, if any could not be
            read; or a folder holds no images, or the names do not match the classes.
    """
    rows, cols, channels = (int(d) for d in eval_model.input_shape[1:])
    n_class = int(eval_model.outputs[0].shape[-1])
    if len(class_names) != n_class:
        raise DataError(f"{len(class_names)} class names for a model of {n_class} classes")
    files = image_folder.expand_prediction_paths(paths)
    table: list[list[Any]] = []
    previews: list[np.ndarray] = []
    failed = 0
    for chunk in _chunks(files, max(1, int(batch_size))):
        readable, images = [], []
        for path in chunk:
            try:
                images.append(image_folder.load_for_prediction(path, size=(rows, cols), channels=channels,
                                                               invert=invert))
                readable.append(path)
            except DataError as e:  # its message starts with the path
                print(f"error: {e}", file=sys.stderr, flush=True)
                failed += 1
        if not images:
            continue
        x = np.stack(images)  # [b, rows, cols, channels]
        lengths, recon = (np.asarray(a, dtype=np.float32) for a in eval_model.predict_on_batch(x))
        for path, image, length, reconstruction in zip(readable, x, lengths, recon, strict=True):
            index = int(np.argmax(length))
            print(f"{path}: {index} ({class_names[index]}) length {length[index]:.3f}", flush=True)
            table.append([str(path), index, class_names[index], *length.tolist()])
            if len(previews) < MAX_PREVIEW_IMAGES:
                # Input on the left, its reconstruction on the right: [rows, 2 * cols, channels].
                previews.append(np.concatenate([image, reconstruction], axis=1))
    if table:
        _write_predictions(table, previews, class_names, Path(save_dir))
    if failed:
        raise DataError(f"{failed} of {len(files)} image(s) could not be read (named above)")


def _chunks(items: Sequence[Path], size: int) -> Iterator[Sequence[Path]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _write_predictions(table: list[list[Any]], previews: list[np.ndarray], class_names: Sequence[str],
                       save_dir: Path) -> None:
    import pandas as pd  # imported here: a second or so that training never needs

    columns = ["path", "class", "class_name", *(f"length_{name}" for name in class_names)]
    csv_path = save_dir / PREDICTIONS_CSV
    with atomic.atomic_path(csv_path) as tmp:
        pd.DataFrame(table, columns=columns).to_csv(tmp, index=False)
    png_path = save_dir / PREDICTIONS_PNG
    plots.save_image(plots.combine_images(np.stack(previews)), png_path)
    shown = "" if len(previews) == len(table) else f" (the first {len(previews)})"
    print(f"Predictions of {len(table)} image(s) saved to '{csv_path}', inputs beside their "
          f"reconstructions{shown} to '{png_path}'")


# ---------------------------------------------------------------------------------------------
# Exporting
# ---------------------------------------------------------------------------------------------


def export_model(eval_model: keras.Model, fmt: str, save_dir: str | os.PathLike) -> Path:
    """Exports the eval model with Keras' `model.export` for serving without this project's code.

    The export takes `input_image` float32 `[batch, rows, cols, channels]` (any batch) and returns
    `[lengths [batch, n_class], reconstruction [batch, rows, cols, channels]]`, float32. It is
    written through a temporary path and a rename, so a failed export never leaves a partial one
    where a good one was.

    Args:
        eval_model: `x -> [lengths, reconstruction]`, any dtype policy (a mixed-precision model is
            rebuilt in float32 with the same weights; ONNX export requires float32).
        fmt: one of `EXPORT_FORMATS`.
        save_dir: an existing folder.

    Returns:
        the path written: `save_dir/saved_model/`, `save_dir/trained_model.onnx` or
        `save_dir/trained_model.tflite`.

    Raises:
        UserError: not the TensorFlow backend, a package is missing, or the exporter failed; one line.
    """
    if fmt not in EXPORT_FORMATS:
        raise UserError(f"--export {fmt}: unknown format; use one of {', '.join(EXPORT_FORMATS)}")
    check_export_requirements(fmt)
    target = Path(save_dir) / EXPORT_NAMES[fmt]
    print(f"Exporting the eval model (x -> [capsule lengths, reconstruction]) as {fmt}...", flush=True)
    try:
        model = _exportable(eval_model)
        if fmt == "tf_saved_model":
            _write_folder_atomically(target, lambda tmp: _export(model, fmt, tmp))
        else:
            with atomic.atomic_path(target) as tmp:
                _export(model, fmt, tmp)
    except (UserError, OSError):
        raise
    except Exception as e:  # TensorFlow's converters raise their own types; say it on one line
        raise UserError(f"--export {fmt}: the exporter failed ({type(e).__name__}: {first_line(e)})"
                        ) from e
    print(f"Exported model saved to '{target}'")
    return target


def check_export_requirements(fmt: str) -> None:
    """Raises `UserError` (one line, naming the `pip install`) unless `fmt` can be exported here."""
    backend = keras.backend.backend()
    if backend != "tensorflow":
        raise UserError(f"--export {fmt}: needs the TensorFlow backend, this run uses "
                        f"KERAS_BACKEND={backend}; run it without KERAS_BACKEND after pip install -r "
                        f"{REQUIREMENTS_FILE}")
    missing = []
    for module, requirement in EXPORT_PACKAGES[fmt]:
        try:
            importlib.import_module(module)
        except Exception:  # ImportError, or a package broken by another version of its dependencies
            missing.append(requirement)
    if missing:
        raise UserError(f"--export {fmt}: needs {' and '.join(r.split('==')[0] for r in missing)}: "
                        f"pip install -r {REQUIREMENTS_FILE} (or pip install {' '.join(missing)})")


def _all_layers(model: keras.Model) -> Iterator[keras.layers.Layer]:
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):  # the decoder is a nested Sequential
            yield from _all_layers(layer)


def _exportable(eval_model: keras.Model) -> keras.Model:
    """The eval model as it is exported: float32 throughout, and library convolutions.

    Shares the other layers (and so their weights) with `eval_model`, or with its float32 copy.
    """
    model = eval_model
    if any(layer.compute_dtype != "float32" for layer in _all_layers(eval_model)):
        model = _float32_copy(eval_model)

    def swap(layer: keras.layers.Layer) -> keras.layers.Layer:
        config = layer.get_config()
        if isinstance(layer, keras.layers.Conv2D) and config.get("implementation", "conv") != "conv":
            # A convolution that may run as a gather and a matrix product (im2col, chosen by the
            # machine that exports) is exported as the library convolution: the same on every
            # machine, and the op each runtime has fast kernels for.
            plain = type(layer).from_config({**config, "implementation": "conv"})
            plain.build(layer.input.shape)
            plain.set_weights(layer.get_weights())
            return plain
        return layer  # reused as it is: same weights

    exportable = keras.models.clone_model(model, clone_function=swap)
    # Keras' ONNX exporter refuses a model that was never called, which a clone is not.
    exportable(np.zeros((1, *exportable.input_shape[1:]), dtype=np.float32), training=False)
    return exportable


def _float32_copy(eval_model: keras.Model) -> keras.Model:
    """The same CapsNet built under the float32 policy, its weights copied layer by layer.

    A `--mixed_precision` model computes its convolutions and decoder in bfloat16; an export must be
    float32 (Keras' ONNX export accepts float32 only, and serving runtimes expect it).
    """
    try:
        capsules = eval_model.get_layer("digitcaps")
    except ValueError as e:
        raise UserError("--export: the model has no 'digitcaps' layer; it is not a CapsNet eval model") from e
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("float32")
    try:
        _, float_model, _ = CapsNet(eval_model.input_shape[1:], capsules.num_capsule,
                                    capsules.get_config()["routings"])
    finally:
        keras.mixed_precision.set_global_policy(previous)
    for layer in float_model.layers:
        if layer.weights:
            source = eval_model.get_layer(layer.name)
            layer.set_weights([np.asarray(w, dtype=np.float32) for w in source.get_weights()])
    return float_model


def _export(model: keras.Model, fmt: str, path: str) -> None:
    kwargs: dict[str, Any] = {}
    if fmt == "litert":
        import tensorflow as tf

        # Keras also allows TensorFlow ("Flex") ops, which the ai-edge-litert interpreter cannot run:
        # fail here, at export, rather than on the user's device.
        kwargs["target_spec"] = {"supported_ops": [tf.lite.OpsSet.TFLITE_BUILTINS]}
    with warnings.catch_warnings(), datasets.native_stderr_quiet():
        # tf2onnx's numpy-2 notes and the converters' C++ logs are not for a person at a terminal;
        # errors still arrive as Python exceptions.
        warnings.simplefilter("ignore")
        model.export(path, format=fmt, verbose=False, **kwargs)
    if fmt == "onnx":
        import onnx

        # tf2onnx writes ops it cannot convert into the file unchanged and only logs them; the checker
        # refuses such a file here, so that onnxruntime never gets to.
        onnx.checker.check_model(path)


def _write_folder_atomically(target: Path, write: Callable[[str], None]) -> None:
    """`write(tmp)` into a new folder beside `target`, then swaps it in place of `target`."""
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    umask = os.umask(0o022)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp's folder is private (0700); an export is shared like a file
    old = None
    try:
        write(str(tmp))
        if target.exists() or target.is_symlink():
            # A folder cannot be renamed onto a non-empty one: move the old one aside first.
            old = Path(tempfile.mkdtemp(prefix=f".old-{target.name}-", dir=target.parent))
            os.replace(target, old / target.name)
        try:
            os.replace(tmp, target)
        except OSError:
            if old is not None:
                os.replace(old / target.name, target)  # put the previous export back
            raise
    finally:
        for leftover in (tmp, old):
            if leftover is not None and leftover.exists():
                shutil.rmtree(leftover, ignore_errors=True)
