"""The clone as an installable library: `pip install .` installs the `capsnet` package alone.

The clone's files (without `result/` and other weights and data, which the package does not hold) are
copied to a temporary folder, where setuptools builds a wheel without fetching anything
(`--no-build-isolation`, `--no-deps`; the build leaves `build/` and an `.egg-info` beside its sources,
so not in the clone). The
wheel holds `capsnet/` with its HTML template and nothing of the tests, benchmarks, experiments or the
top-level scripts. Installed with `pip install --target`, it is used by a fresh process started in
another folder with only that target on `PYTHONPATH` (the dependencies come from this interpreter):
`from capsnet.layers import CapsuleLayer, PrimaryCap, Length, Mask` comes from the target, and the
`.keras` fixture of the old layout loads with `safe_mode=True` and computes the paper's equations
(`test_compat.py`).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO_ROOT, describe
from test_compat import fixture_inputs, load_in_fresh_process, reference_outputs

IMPORT = "from capsnet.layers import CapsuleLayer, PrimaryCap, Length, Mask"


def pip(*args: str) -> None:
    result = subprocess.run([sys.executable, "-m", "pip", *args, "--no-deps", "--no-build-isolation",
                             "--disable-pip-version-check", "--no-index", "-q"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, describe(result)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel `pip` builds from a copy of the clone."""
    source = tmp_path_factory.mktemp("clone") / "capsnet-keras"
    # Without the git history, build leftovers, and the weights and data a clone may hold: the build
    # reads none of them.
    shutil.copytree(REPO_ROOT, source, ignore=shutil.ignore_patterns(
        ".git", "result*", "build", "*.egg-info", "__pycache__", ".*_cache", ".venv", ".whl", "*.npz", "*.h5",
        "*.keras"))
    out = tmp_path_factory.mktemp("wheel")
    pip("wheel", "-w", str(out), str(source))
    (found,) = out.glob("capsnet_keras-*.whl")
    return found


@pytest.mark.slow
def test_wheel_holds_the_package_and_its_template_only(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    top = {name.split("/")[0] for name in names}
    assert {folder for folder in top if not folder.endswith(".dist-info")} == {"capsnet"}, top
    packaged = {name for name in names if name.startswith("capsnet/")}
    in_clone = {path.relative_to(REPO_ROOT).as_posix() for path in (REPO_ROOT / "capsnet").rglob("*")
                if path.suffix in (".py", ".html") and "__pycache__" not in path.parts}
    assert packaged == in_clone
    assert "capsnet/explore_template.html" in packaged and "capsnet/distributed/__init__.py" in packaged


@pytest.mark.slow
def test_installed_package_loads_the_layers_and_an_old_keras_file_from_another_folder(
        wheel: Path, tmp_path: Path) -> None:
    target, elsewhere = tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    pip("install", "--target", str(target), str(wheel))
    assert (target / "capsnet" / "explore_template.html").is_file()
    assert not (target / "capsulelayers.py").exists() and not (target / "tests").exists()
    x, y = fixture_inputs()
    np.savez(tmp_path / "inputs.npz", x=x, y=y)
    report, outputs = load_in_fresh_process(IMPORT, elsewhere, tmp_path / "inputs.npz",
                                            PYTHONPATH=str(target))
    assert report["refused"], report  # before the import: nothing registered the layers
    assert "capsnet.layers" in report["files"], report
    for module, path in report["files"].items():  # every project module from the installed copy
        assert path is None or Path(path).resolve().is_relative_to(target.resolve()), (module, path)
    assert report["classes"]["digits"] == "capsnet.layers.CapsuleLayer"
    for got, want in zip(outputs, reference_outputs(x, y), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
