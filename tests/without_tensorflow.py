"""Runs a script as `python SCRIPT ARGS` would, with `import tensorflow` made to fail, as on a
machine where TensorFlow is not installed (the lent GPU machine has JAX but no TensorFlow).

Usage: python tests/without_tensorflow.py capsulenet.py --epochs 1 ...
"""

from __future__ import annotations

import importlib.abc
import runpy
import sys
from pathlib import Path


class NoTensorFlow(importlib.abc.MetaPathFinder):
    """Refuses `tensorflow` and its submodules, as an absent package would."""

    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        if name == "tensorflow" or name.startswith("tensorflow."):
            raise ModuleNotFoundError(f"No module named '{name}' (blocked by {Path(__file__).name})")
        return None


if __name__ == "__main__":
    sys.meta_path.insert(0, NoTensorFlow())
    script = Path(sys.argv[1]).resolve()
    sys.argv = sys.argv[1:]
    sys.path.insert(0, str(script.parent))  # as `python SCRIPT` puts the script's folder first
    runpy.run_path(str(script), run_name="__main__")
