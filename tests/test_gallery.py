"""`experiments/gallery.py`: one command redraws the 13 pictures of `result/` (issue 14) with the sizes
of the original's outputs, and records the test accuracy that the README's captions state.

The model is a fresh CapsNet with 1 routing whose weights are saved as a user's would be; the data is
the synthetic stand-in for MNIST. One subprocess runs the script as a user would (TensorFlow's start-up
alone is 5-10 s); the error case runs in-process."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO_ROOT, describe, run_script, save_npz, synthetic_raw
from PIL import Image

import capsulenet
from capsnet import saving

N_TRAIN, N_TEST = 20, 60  # real_and_recon.png tiles 50 test images: at least 50, every class present
LOG_CSV = (
    "epoch,loss,capsnet_loss,decoder_loss,capsnet_accuracy,val_loss,val_capsnet_loss,val_decoder_loss,"
    "val_capsnet_accuracy,learning_rate\n"
    "0,0.80,0.75,0.14,0.30,0.78,0.73,0.13,0.40,0.001\n"
    "1,0.60,0.55,0.12,0.50,0.58,0.53,0.12,0.60,0.0009\n"
    "2,0.40,0.35,0.10,0.70,0.41,0.36,0.11,0.75,0.00081\n"
)
PICTURES = ["real_and_recon.png", *(f"manipulate-{d}.png" for d in range(10)), "log.png", "model.png"]
MODEL_NOTE = "model.png not drawn, plot_model needs pydot and graphviz"


def load_gallery_module():
    """`experiments/gallery.py` as a module (the folder is no package)."""
    spec = importlib.util.spec_from_file_location("gallery", REPO_ROOT / "experiments" / "gallery.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_gallery_writes_13_pictures_with_the_documented_sizes(tmp_path: Path) -> None:
    raw = synthetic_raw(N_TRAIN, N_TEST)
    data = save_npz(tmp_path / "data.npz", raw)
    _, eval_model, _ = capsulenet.CapsNet((28, 28, 1), 10, 1)
    weights = tmp_path / "tiny.weights.h5"
    saving.save_weights(eval_model, weights)
    log = tmp_path / "log.csv"
    log.write_text(LOG_CSV)
    out = tmp_path / "gallery"

    result = run_script("experiments/gallery.py", "-w", str(weights), "--dataset", str(data),
                        "--out", str(out), "--log", str(log), "-r", "1", "--caption", "tiny test model")
    assert result.returncode == 0, describe(result)

    drawn = [name for name in PICTURES if (out / name).is_file()]
    if "model.png" not in drawn:  # allowed only where pydot or graphviz is missing, and then said so
        assert MODEL_NOTE in result.stdout, describe(result)
        assert "gallery: model.png skipped" in result.stdout
        drawn.append("model.png (not drawn: no pydot/graphviz)")
    assert len(drawn) == 13, drawn

    for name in ["real_and_recon.png", *(f"manipulate-{d}.png" for d in range(10))]:
        with Image.open(out / name) as image:
            assert (image.format, image.mode) == ("PNG", "L"), name  # 8-bit grayscale
            expected = (280, 280) if name == "real_and_recon.png" else (11 * 28, 16 * 28)  # (width, height)
            assert image.size == expected, name
    for name in ("log.png", "model.png"):
        if (out / name).is_file():
            with Image.open(out / name) as image:
                assert image.format == "PNG" and min(image.size) > 100, name

    summary = json.loads((out / "gallery.json").read_text())
    assert summary["weights"] == "tiny.weights.h5"
    assert summary["dataset"] == str(data)
    assert summary["epochs"] == 3
    assert summary["caption"] == "tiny test model"
    assert summary["date"][:2] == "20"
    # The accuracy the gallery states is the one of these weights on these test images, computed here
    # independently: the same weights, predicted in this process.
    eval_model.load_weights(weights)
    x_test = raw[1][0][..., None].astype("float32") / 255
    lengths, _ = eval_model.predict(x_test, batch_size=100, verbose=0)
    correct = int(np.sum(np.argmax(lengths, 1) == raw[1][1]))
    assert round(summary["test_accuracy"] * N_TEST) == correct
    assert f"Test acc: {correct / N_TEST:.4f}" in result.stdout


def test_missing_weights_file_exits_2_with_one_error_line(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    gallery = load_gallery_module()
    missing = tmp_path / "nothing.weights.h5"
    code = gallery.main(["-w", str(missing), "--dataset", "unused.npz", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.splitlines() == [f"error: -w {missing}: no such file"]
