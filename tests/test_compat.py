"""Files written before the layout moved into the `capsnet/` package still load, with `safe_mode=True`.

- `tests/fixtures/compat_57e2f5a.keras` was written with `model.save` by commit 57e2f5a (the last
  layout with `capsulelayers.py` holding the layers; `tests/fixtures/README.md` gives the command): a
  tiny model made of every registered layer (`Conv2D`, `PrimaryCap`'s `Squash`, `CapsuleLayer`,
  `Length`, `Mask` both ways, the `squash` function as an activation). In a fresh process started in
  another folder it loads after `import capsulelayers`, and after `from capsnet.layers import ...` alone,
  and is refused before either import: the names the file records (`capsnet>CapsuleLayer`, ...) are the
  ones the new code registers. Its outputs are the paper's equations (`tests/reference.py`) with the
  weights read from the archive with h5py, not through Keras.
- `-w NAME.h5` finds `NAME.weights.h5`, else `NAME.keras`: the original's `-t -w
  result/trained_model.h5` works whichever file the folder keeps.

Elsewhere: the shipped `result/trained_model.keras` in test_shipped_model.py, legacy Keras-2 `.h5` files
(written by legacy Keras itself, `tests/keras2_writer.py`) in test_model.py, the installed package in
test_packaging.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import reference
from conftest import REPO_ROOT, TESTS_DIR, child_env, describe, weights_in

from capsnet import saving

FIXTURE = TESTS_DIR / "fixtures" / "compat_57e2f5a.keras"
ROUTINGS = 3  # the fixture's CapsuleLayer (tests/fixtures/make_compat_model.py)
DIM_PRIMARY = 4  # its PrimaryCap's dim_capsule
LABELS = [0, 1, 2, 0, 1, 2]
# Loads the fixture after STATEMENT in a fresh process, and says what a load before STATEMENT raised,
# which project modules STATEMENT brought in (and their files) and the class of each loaded layer;
# writes the outputs to OUT.
LOADER = """
import json, sys
import keras
import numpy as np

fixture, inputs, out, statement = sys.argv[1:]
try:
    keras.saving.load_model(fixture, safe_mode=True)
    refused = None
except Exception as error:
    refused = f"{type(error).__name__}: {error}"
exec(statement)
model = keras.saving.load_model(fixture, safe_mode=True)
data = np.load(inputs)
np.savez(out, *model.predict([data["x"], data["y"]], verbose=0))
ours = ("capsnet", "capsulelayers", "capsulenet", "utils")
print("RESULT", json.dumps({
    "refused": refused,
    "modules": sorted(m for m in sys.modules if m.split(".")[0] in ours),
    "files": {m: getattr(sys.modules[m], "__file__", None) for m in sys.modules if m.split(".")[0] in ours},
    "classes": {layer.name: f"{type(layer).__module__}.{type(layer).__name__}" for layer in model.layers},
}))
"""


def load_in_fresh_process(statement: str, folder: Path, inputs: Path, **env: str) -> tuple[dict, list]:
    """Runs LOADER with `statement` in `folder` (not the repository); returns its report and the
    fixture's outputs there. `env` replaces variables of the child (e.g. PYTHONPATH)."""
    script = folder / "load_fixture.py"
    script.write_text(LOADER)
    out = folder / "outputs.npz"
    result = subprocess.run([sys.executable, str(script), str(FIXTURE), str(inputs), str(out), statement],
                            cwd=folder, env=child_env(**env), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, describe(result)
    report = json.loads(result.stdout.split("RESULT ", 1)[1])
    with np.load(out) as f:
        return report, [f[f"arr_{i}"] for i in range(len(f.files))]


def fixture_inputs() -> tuple[np.ndarray, np.ndarray]:
    """Images `[6, 12, 12, 1]` in [0, 1] and one-hot labels `[6, 3]`."""
    x = np.random.default_rng(7).random((len(LABELS), 12, 12, 1), dtype=np.float32)
    return x, np.eye(3, dtype=np.float32)[LABELS]


def reference_outputs(x: np.ndarray, y: np.ndarray) -> list[np.ndarray]:
    """The fixture's four outputs from the paper's equations, float64, with the weights of its archive
    (`layers/<class>/vars/<i>`: kernel then bias): lengths `[b, 3]`, the capsules masked by `y` and by
    the longest `[b, 15]`, and `squash(longest @ W + b)` `[b, 4]`."""
    w = weights_in(FIXTURE)
    conv1 = np.maximum(reference.valid_conv(x, w["layers/conv2d/vars/0"], w["layers/conv2d/vars/1"], 1), 0)
    primary = reference.valid_conv(conv1, w["layers/conv2d_1/vars/0"], w["layers/conv2d_1/vars/1"], 2)
    u = reference.squash(primary.reshape(len(x), -1, DIM_PRIMARY))
    digits = reference.capsule_layer(w["layers/capsule_layer/vars/0"], u, ROUTINGS)
    longest = reference.mask_by_length(digits)
    dense = reference.squash(longest @ w["layers/dense/vars/0"] + w["layers/dense/vars/1"])
    return [reference.length(digits), reference.mask_by_label(digits, y), longest, dense]


@pytest.fixture(scope="module")
def expected(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[np.ndarray]]:
    """The inputs, saved for the child processes, and the reference outputs."""
    x, y = fixture_inputs()
    path = tmp_path_factory.mktemp("compat") / "inputs.npz"
    np.savez(path, x=x, y=y)
    want = reference_outputs(x, y)
    lengths, by_label, longest, _ = want
    # Outputs where every part shows: capsules far from zero, labels that are not always the longest
    # capsule (the two masks differ), and the reference that is not degenerate.
    assert lengths.min() > 0.05 and lengths.max() < 1
    assert (lengths.argmax(1) != np.array(LABELS)).any() and not np.allclose(by_label, longest)
    return path, want


@pytest.mark.parametrize("statement", [
    "import capsulelayers",
    "from capsnet.layers import CapsuleLayer, PrimaryCap, Length, Mask",
], ids=["capsulelayers", "capsnet.layers"])
def test_keras_file_of_the_old_layout_loads_in_safe_mode_and_computes_the_equations(
        expected: tuple[Path, list[np.ndarray]], tmp_path: Path, statement: str) -> None:
    inputs, want = expected
    report, outputs = load_in_fresh_process(statement, tmp_path, inputs, PYTHONPATH=str(REPO_ROOT))
    # Refused before the import: the layers must come from the registration, under the same names.
    assert report["refused"] and "capsnet>" in report["refused"], report
    if statement.startswith("from capsnet"):  # nothing of the top-level modules
        assert {"capsnet.layers"} <= set(report["modules"]), report
        assert not {"capsulelayers", "capsulenet", "utils"} & set(report["modules"]), report
    assert {name: report["classes"][name] for name in ("conv1", "primarycap_conv2d", "digits")} == {
        "conv1": "capsnet.layers.Conv2D", "primarycap_conv2d": "capsnet.layers.Conv2D",
        "digits": "capsnet.layers.CapsuleLayer"}
    assert report["classes"]["primarycap_squash"] == "capsnet.layers.Squash"
    for name in ("by_label", "longest"):
        assert report["classes"][name] == "capsnet.layers.Mask"
    assert report["classes"]["lengths"] == "capsnet.layers.Length"
    assert len(outputs) == len(want)
    for got, ref, name in zip(outputs, want, ("lengths", "by_label", "longest", "dense"), strict=True):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6, err_msg=name)


def test_fixture_stays_small_and_was_written_by_the_old_layout() -> None:
    """A test fixture of a few tens of KB, whose `config.json` names the layers as 57e2f5a registered
    them (`package="capsnet"`), the names any older `.keras` file holds."""
    import zipfile

    assert FIXTURE.stat().st_size < 200_000
    with zipfile.ZipFile(FIXTURE) as archive:
        config = json.loads(archive.read("config.json"))
    registered = {layer["registered_name"] for layer in config["config"]["layers"]} - {None}
    assert registered == {"capsnet>Conv2D", "capsnet>Squash", "capsnet>CapsuleLayer", "capsnet>Length",
                          "capsnet>Mask"}
    activation = next(layer for layer in config["config"]["layers"] if layer["name"] == "dense")
    assert activation["config"]["activation"]["config"] == "capsnet>squash"


@pytest.mark.parametrize(("present", "found"), [
    (["trained_model.h5", "trained_model.weights.h5", "trained_model.keras"], "trained_model.h5"),
    (["trained_model.weights.h5", "trained_model.keras"], "trained_model.weights.h5"),
    (["trained_model.keras"], "trained_model.keras"),
    ([], "trained_model.h5"),
])
def test_original_weights_name_falls_back_to_weights_h5_then_keras(
        tmp_path: Path, capsys: pytest.CaptureFixture, present: list[str], found: str) -> None:
    for name in present:
        (tmp_path / name).write_bytes(b"")
    asked = str(tmp_path / "trained_model.h5")
    assert saving.resolve_weights_path(asked, announce=True) == str(tmp_path / found)
    why = {"trained_model.weights.h5": "Keras 3 names weight files *.weights.h5",
           "trained_model.keras": "the whole model, with the same weights"}
    note = f"Note: {asked} not found, loading {tmp_path / found} ({why[found]})\n" if found in why else ""
    assert capsys.readouterr().out == note


def test_other_names_do_not_fall_back(tmp_path: Path) -> None:
    """Only the original's `NAME.h5` has alternatives: a missing `.weights.h5`, `.keras` or `.hdf5` is
    reported as it was asked for."""
    for stem in ("a.weights", "a", "c"):
        (tmp_path / f"{stem}.keras").write_bytes(b"")
    for asked in ("a.weights.h5", "c.hdf5", "c.weights.h5"):
        assert saving.resolve_weights_path(str(tmp_path / asked)) == str(tmp_path / asked)
