"""`deploy.py` through the command line: `--predict` on a user's pictures, the class names that travel
with a trained model, `--export` checked in each format's own runtime, and the one-line errors.

Every expectation comes from Keras itself on arrays this file prepares with Pillow and NumPy (open,
resize, /255), never from the code under test. The model's weights are scaled so that its capsules
are long (lengths 0.1-1, asserted): a fresh CapsNet's lengths are ~1e-7, where any encoder bug would
hide below the 1e-4 tolerance.

The export runtimes (`onnxruntime`, `ai-edge-litert`) and `tf2onnx` come from requirements/export.txt;
without them those tests are skipped here and fail under CI (`CI` set), which installs them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
from conftest import REPO_ROOT, child_env, describe, run_script, synthetic_raw
from PIL import Image

import capsulenet
from capsnet import deploy
from capsnet.errors import UserError

N_CLASS = 3
NAMES = ["cat", "dog", "emu"]
LINE = re.compile(r"^(?P<path>.+): (?P<index>\d+) \((?P<name>.*)\) length (?P<length>\d+\.\d+)$")


def require(module: str) -> None:
    """Skips without `module`, except under CI, which installs requirements/export.txt."""
    try:
        __import__(module)
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail(f"{module} is missing: CI must pip install -r requirements/export.txt")
        pytest.skip(f"{module} not installed (pip install -r requirements/export.txt)")


def scale_to_long_capsules(eval_model: keras.Model) -> None:
    """Multiplies the primary-capsule kernel by 30 and W by 10 (measured: lengths 0.55-0.85 on
    `synthetic_raw` images) and the decoder's first kernel by 10, so that reconstructions vary."""
    primary = eval_model.get_layer("primarycap_conv2d")
    kernel, bias = primary.get_weights()
    primary.set_weights([kernel * 30, bias])
    digitcaps = eval_model.get_layer("digitcaps")
    digitcaps.set_weights([digitcaps.get_weights()[0] * 10])
    decoder = eval_model.get_layer("decoder")
    weights = decoder.get_weights()
    decoder.set_weights([weights[0] * 10, *weights[1:]])


def gray_images(n: int, seed: int = 0) -> np.ndarray:
    """`n` synthetic 28x28 uint8 images (a bright square at the class's place, on noise)."""
    (x, _), _ = synthetic_raw(n, 1, n_class=N_CLASS, seed=seed)
    return x


@pytest.fixture(scope="module")
def long_model() -> keras.Model:
    """A 3-class, 28x28x1 CapsNet eval model with long capsules."""
    keras.utils.set_random_seed(0)
    _, eval_model, _ = capsulenet.CapsNet((28, 28, 1), N_CLASS, routings=3)
    scale_to_long_capsules(eval_model)
    lengths, _ = eval_model.predict(gray_images(7)[..., None] / 255.0, verbose=0)
    assert 0.1 < lengths.min() and lengths.max() < 1.0, lengths
    return eval_model


@pytest.fixture(scope="module")
def model_file(long_model: keras.Model, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model") / "trained_model.keras"
    long_model.save(path)
    return path


def model_copy(model_file: Path, folder: Path) -> Path:
    """The model file alone in `folder`, so that a test can put its own class_names.json beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy(model_file, folder / model_file.name))


def save_png(path: Path, pixels: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(pixels)).save(path)
    return path


def as_model_input(path: Path, invert: bool = False) -> np.ndarray:
    """What the model must see of a picture: grey (Pillow's "L" for colour), 28x28 (bilinear, in
    float), /255, optionally 1 - x. `[28, 28, 1]` float32."""
    image = Image.open(path).convert("L").convert("F")
    if image.size != (28, 28):
        image = image.resize((28, 28), Image.Resampling.BILINEAR)
    x = np.clip(np.asarray(image, dtype=np.float32) / 255.0, 0, 1)[..., None]
    return 1.0 - x if invert else x


def parse_lines(stdout: str) -> list[re.Match]:
    return [m for m in map(LINE.match, stdout.splitlines()) if m]


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


# ---------------------------------------------------------------------------------------------
# --predict
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_predict_files_and_a_folder_with_a_corrupt_file(long_model: keras.Model, model_file: Path,
                                                        tmp_path: Path) -> None:
    x = gray_images(4, seed=1)
    a = save_png(tmp_path / "a.png", x[0])
    # 56x40: resized to 28x28 on the way in.
    b = save_png(tmp_path / "b.png", np.asarray(Image.fromarray(x[1]).resize((40, 56))))
    folder = tmp_path / "pics"
    c = save_png(folder / "c.png", (np.repeat(x[2][..., None], 3, axis=-1) // [1, 2, 3]).astype(np.uint8))
    d = save_png(folder / "d.png", x[3])
    bad = folder / "bad.png"
    bad.write_bytes(a.read_bytes()[:60])  # a truncated PNG
    (folder / "notes.txt").write_text("not an image, ignored")
    out = tmp_path / "out"

    result = run_script("capsulenet.py", "-w", str(model_file), "--predict", str(a), str(b), str(folder),
                        "--save_dir", str(out), "--batch_size", "2")

    assert result.returncode == 2, describe(result)
    assert "Traceback" not in result.stderr, describe(result)
    good = [a, b, c, d]  # the folder's files sorted by name: bad.png first, then c.png, d.png
    errors = error_lines(result.stderr)
    assert len(errors) == 2, describe(result)
    assert errors[0].startswith(f"error: {bad}: "), describe(result)
    assert errors[1] == "error: 1 of 5 image(s) could not be read (named above)", describe(result)

    inputs = np.stack([as_model_input(p) for p in good])
    lengths, recon = long_model.predict(inputs, verbose=0)
    lines = parse_lines(result.stdout)
    assert [m["path"] for m in lines] == [str(p) for p in good], describe(result)
    for m, length in zip(lines, lengths, strict=True):
        k = int(np.argmax(length))
        assert (int(m["index"]), m["name"]) == (k, str(k))
        assert float(m["length"]) == pytest.approx(length[k], abs=1e-3)

    table = pd.read_csv(out / "predictions.csv")
    assert list(table.columns) == ["path", "class", "class_name", "length_0", "length_1", "length_2"]
    assert list(table["path"]) == [str(p) for p in good]
    assert list(table["class"]) == list(lengths.argmax(1))
    assert list(table["class_name"].astype(str)) == [str(k) for k in lengths.argmax(1)]
    np.testing.assert_allclose(table[["length_0", "length_1", "length_2"]].to_numpy(), lengths, atol=1e-5)

    # 4 pairs (28x56: input, reconstruction) tiled 2 x 2: 112 wide, 56 high, grey.
    with Image.open(out / "predictions.png") as png:
        assert (png.size, png.mode) == ((112, 56), "L")
        pixels = np.asarray(png, dtype=np.int32)
    np.testing.assert_allclose(pixels[:28, :28], np.round(inputs[0, ..., 0] * 255), atol=1)
    np.testing.assert_allclose(pixels[:28, 28:56], np.round(recon[0, ..., 0] * 255), atol=1)
    np.testing.assert_allclose(pixels[28:, 56:84], np.round(inputs[3, ..., 0] * 255), atol=1)


@pytest.mark.slow
def test_predict_invert_with_class_names_json(long_model: keras.Model, model_file: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    weights = model_copy(model_file, tmp_path / "model")
    (weights.parent / "class_names.json").write_text(json.dumps({"class_names": NAMES}))
    ink_on_paper = save_png(tmp_path / "scan.png", 255 - gray_images(2, seed=2)[1])
    out = tmp_path / "out"

    code = capsulenet.main(["-w", str(weights), "--predict", str(ink_on_paper), "--invert",
                            "--save_dir", str(out)])

    captured = capsys.readouterr()
    assert code == 0, captured.err
    inverted = as_model_input(ink_on_paper, invert=True)[None]
    lengths, _ = long_model.predict(inverted, verbose=0)
    plain, _ = long_model.predict(as_model_input(ink_on_paper)[None], verbose=0)
    assert np.abs(lengths - plain).max() > 1e-2  # so that ignoring --invert would be seen
    k = int(lengths[0].argmax())
    (line,) = parse_lines(captured.out)
    assert (line["path"], int(line["index"]), line["name"]) == (str(ink_on_paper), k, NAMES[k])
    assert float(line["length"]) == pytest.approx(lengths[0, k], abs=1e-3)
    table = pd.read_csv(out / "predictions.csv")
    assert list(table.columns) == ["path", "class", "class_name", "length_cat", "length_dog", "length_emu"]
    assert table["class_name"][0] == NAMES[k]
    np.testing.assert_allclose(table[["length_cat", "length_dog", "length_emu"]].to_numpy(), lengths,
                               atol=1e-5)


@pytest.mark.slow
def test_class_names_round_trip_from_an_image_folder(tmp_path: Path, capsys: pytest.CaptureFixture
                                                     ) -> None:
    # Colour images, so the model is RGB and predictions.png too. Folder names deliberately unsorted
    # on disk order and with a space: class i is the i-th sorted name.
    classes = ["zebra crossing", "apple", "mango"]
    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        for split, n in (("train", 3), ("test", 1)):
            for i in range(n):
                pixels = rng.integers(0, 40, (28, 28, 3), dtype=np.uint8)
                pixels[4 + 6 * c : 12 + 6 * c, 4:20, c] = 255
                save_png(tmp_path / "data" / split / name / f"{i}.png", pixels)
    out = tmp_path / "out"

    code = capsulenet.main(["--dataset", str(tmp_path / "data"), "--epochs", "1", "--batch_size", "3",
                            "--save_dir", str(out), "--seed", "0", "--digit", "0"])
    assert code == 0, capsys.readouterr().err
    saved = json.loads((out / "class_names.json").read_text())
    assert saved == {"class_names": ["apple", "mango", "zebra crossing"]}
    capsys.readouterr()

    picture = tmp_path / "data" / "test" / "mango" / "0.png"
    code = capsulenet.main(["-w", str(out / "trained_model.keras"), "--predict", str(picture),
                            "--save_dir", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    (line,) = parse_lines(captured.out)
    assert line["name"] == saved["class_names"][int(line["index"])]
    assert pd.read_csv(out / "predictions.csv").columns[3:].tolist() == [
        "length_apple", "length_mango", "length_zebra crossing"]
    with Image.open(out / "predictions.png") as png:
        assert (png.size, png.mode) == ((56, 28), "RGB")


# ---------------------------------------------------------------------------------------------
# --export, each format in its own runtime
# ---------------------------------------------------------------------------------------------


def run_saved_model(path: Path, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    import tensorflow as tf

    loaded = tf.saved_model.load(str(path))  # kept in a variable: it owns the weights `serve` reads
    lengths, recon = loaded.serve(tf.constant(x))
    return lengths.numpy(), recon.numpy()


def run_onnx(path: Path, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (model_input,) = session.get_inputs()
    assert model_input.type == "tensor(float)" and model_input.shape[1:] == [28, 28, 1]
    lengths, recon = session.run(None, {model_input.name: x})
    return lengths, recon


def run_litert(path: Path, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from ai_edge_litert.interpreter import Interpreter

    runner = Interpreter(model_path=str(path)).get_signature_runner()
    out = runner(input_image=x)
    return out["output_0"], out["output_1"]


RUNTIMES = {
    "tf_saved_model": ("tensorflow", "saved_model", run_saved_model),
    "onnx": ("onnxruntime", "trained_model.onnx", run_onnx),
    "litert": ("ai_edge_litert", "trained_model.tflite", run_litert),
}


@pytest.mark.slow
@pytest.mark.parametrize("fmt", deploy.EXPORT_FORMATS)
def test_export_runs_in_its_runtime_at_batch_1_and_7(fmt: str, long_model: keras.Model, model_file: Path,
                                                     tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    module, name, run = RUNTIMES[fmt]
    require(module)
    if fmt == "onnx":
        require("tf2onnx")
    out = tmp_path / "out"

    code = capsulenet.main(["-w", str(model_file), "--export", fmt, "--save_dir", str(out)])

    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert f"'{out / name}'" in captured.out
    assert sorted(p.name for p in out.iterdir()) == [name]  # no temporary left behind
    x = gray_images(7, seed=3)[..., None].astype(np.float32) / 255.0
    lengths, recon = long_model.predict(x, verbose=0)
    for batch in (1, 7):
        got_lengths, got_recon = run(out / name, x[:batch])
        assert got_lengths.dtype == np.float32 and got_lengths.shape == (batch, N_CLASS)
        assert got_recon.shape == (batch, 28, 28, 1)
        np.testing.assert_allclose(got_lengths, lengths[:batch], atol=1e-4)
        np.testing.assert_allclose(got_recon, recon[:batch], atol=1e-4)


@pytest.mark.slow
def test_mixed_precision_model_exports_in_float32(long_model: keras.Model, tmp_path: Path) -> None:
    import tensorflow as tf

    keras.mixed_precision.set_global_policy("mixed_bfloat16")  # conftest restores it
    _, mixed, _ = capsulenet.CapsNet((28, 28, 1), N_CLASS, routings=3)
    mixed.set_weights(long_model.get_weights())
    assert mixed.get_layer("conv1").compute_dtype == "bfloat16"
    x = gray_images(7, seed=4)[..., None].astype(np.float32) / 255.0
    reference, _ = long_model.predict(x, verbose=0)
    in_bfloat16, _ = mixed.predict(x, verbose=0)
    assert np.abs(in_bfloat16 - reference).max() > 1e-4  # else this test could not tell
    (tmp_path / "saved_model").mkdir()
    (tmp_path / "saved_model" / "stale.txt").write_text("from an earlier export")

    path = deploy.export_model(mixed, "tf_saved_model", tmp_path)

    assert path == tmp_path / "saved_model"
    assert not (path / "stale.txt").exists() and os.listdir(tmp_path) == ["saved_model"]
    signature = tf.saved_model.load(str(path)).signatures["serving_default"]
    (spec,) = signature.structured_input_signature[1].values()
    assert spec.dtype == tf.float32 and spec.shape.as_list() == [None, 28, 28, 1]
    outputs = signature(input_image=tf.constant(x))
    lengths = outputs["output_0"].numpy()
    assert lengths.dtype == np.float32
    np.testing.assert_allclose(lengths, reference, atol=1e-4)
    assert keras.mixed_precision.global_policy().name == "mixed_bfloat16"  # left as it was


@pytest.mark.parametrize("fmt", ["tf_saved_model", "litert"])
def test_a_failed_export_keeps_the_previous_one(fmt: str, long_model: keras.Model, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / deploy.EXPORT_NAMES[fmt]
    previous = target / "saved_model.pb" if fmt == "tf_saved_model" else target
    previous.parent.mkdir(exist_ok=True)
    previous.write_text("the previous export")

    def crash_half_way(model: keras.Model, filepath: str, **kwargs: object) -> None:
        Path(filepath).parent.mkdir(exist_ok=True)
        (Path(filepath) / "saved_model.pb" if fmt == "tf_saved_model" else Path(filepath)).write_text("ha")
        raise RuntimeError("converter crashed\nwith details on more lines")

    monkeypatch.setattr(keras.Model, "export", crash_half_way)
    with pytest.raises(UserError, match=f"--export {fmt}: .*converter crashed") as raised:
        deploy.export_model(long_model, fmt, tmp_path)
    assert "\n" not in str(raised.value)
    assert previous.read_text() == "the previous export"
    assert os.listdir(tmp_path) == [target.name]


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flag", [["--predict", "x.png"], ["--export", "onnx"]])
def test_predict_or_export_without_weights_is_one_line(flag: list[str], tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    code = capsulenet.main([*flag, "--save_dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith(f"error: {flag[0]}: ") and "-w" in err, err


def test_missing_export_packages_name_the_pip_install(long_model: keras.Model, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tf2onnx", None)  # `import tf2onnx` now raises ImportError
    with pytest.raises(UserError) as raised:
        deploy.export_model(long_model, "onnx", tmp_path)
    message = str(raised.value)
    assert "\n" not in message
    assert "pip install -r requirements/export.txt" in message and "tf2onnx==" in message, message
    assert list(tmp_path.iterdir()) == []


def test_export_on_another_backend_names_tensorflow(long_model: keras.Model, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    with pytest.raises(UserError, match=r"TensorFlow backend.*KERAS_BACKEND=jax"):
        deploy.export_model(long_model, "tf_saved_model", tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_requirements_export_pins_what_the_message_names() -> None:
    pins = {}
    for line in (REPO_ROOT / "requirements/export.txt").read_text().splitlines():
        requirement = line.split("#")[0].strip()
        if requirement and not requirement.startswith("-r "):
            package, version = requirement.split("==")
            pins[package] = version
    assert {"tf2onnx", "onnx", "onnxruntime", "ai-edge-litert"} <= set(pins)
    for _module, requirement in deploy.EXPORT_PACKAGES["onnx"]:
        package, version = requirement.split("==")
        assert pins[package] == version


@pytest.mark.slow
def test_class_names_json_of_another_length_is_one_line(model_file: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    weights = model_copy(model_file, tmp_path / "model")
    (weights.parent / "class_names.json").write_text(json.dumps({"class_names": ["cat", "dog"]}))
    picture = save_png(tmp_path / "a.png", gray_images(1)[0])
    code = capsulenet.main(["-w", str(weights), "--predict", str(picture), "--save_dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "2 class names" in err and "3 classes" in err, err


def test_keras_file_with_a_lambda_layer_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    inputs = keras.Input((28, 28, 1))
    unsafe = keras.Model(inputs, keras.layers.Lambda(lambda t: t * 2)(inputs))
    unsafe.save(tmp_path / "unsafe.keras")
    code = capsulenet.main(["-w", str(tmp_path / "unsafe.keras"), "--predict", "x.png",
                            "--save_dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "refused, the model contains a Lambda layer" in err, err


@pytest.mark.slow
def test_cifar10_offline_is_one_line_naming_dataset_path(tmp_path: Path) -> None:
    proxy = "http://127.0.0.1:9"  # nothing listens on the discard port: every download fails at once
    env = child_env(KERAS_HOME=str(tmp_path / "keras_home"), HTTPS_PROXY=proxy, HTTP_PROXY=proxy,
                    https_proxy=proxy, http_proxy=proxy)
    for key in ("NO_PROXY", "no_proxy"):
        env.pop(key, None)
    (tmp_path / "keras_home").mkdir()

    result = run_script("capsulenet.py", "--dataset", "cifar10", "--epochs", "1",
                        "--save_dir", str(tmp_path / "out"), env=env, timeout=300)

    assert result.returncode == 2, describe(result)
    assert result.stderr.count("\n") == 1, describe(result)
    assert result.stderr.startswith("error: ") and "cifar10" in result.stderr, describe(result)
    assert "--dataset PATH" in result.stderr, describe(result)
