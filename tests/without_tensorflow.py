"""Runs a script as `python SCRIPT ARGS` would, with `import tensorflow` made to fail, as on a
machine where TensorFlow is not installed (the lent GPU machine has JAX but no TensorFlow).

Usage: python tests/without_tensorflow.py [--also-block jax] capsulenet.py --epochs 1 ...

`--also-block NAME` (repeatable) hides another package the same way: a PyTorch run must need neither
TensorFlow nor JAX.

A `None` entry in `sys.modules` is Python's own way to mark a module absent: `import tensorflow`
raises `ModuleNotFoundError`, and `importlib.util.find_spec("tensorflow")` returns None, as for a
package that is not installed (PyTorch's `torch._dynamo` probes packages that way at import).
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

if __name__ == "__main__":
    blocked = ["tensorflow"]
    while sys.argv[1] == "--also-block":
        blocked.append(sys.argv[2])
        del sys.argv[1:3]
    for name in blocked:
        sys.modules[name] = None  # type: ignore[assignment]
    script = Path(sys.argv[1]).resolve()
    sys.argv = sys.argv[1:]
    sys.path.insert(0, str(script.parent))  # as `python SCRIPT` puts the script's folder first
    runpy.run_path(str(script), run_name="__main__")
