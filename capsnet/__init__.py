"""CapsNet (Sabour, Frosst & Hinton, "Dynamic Routing Between Capsules", NIPS 2017) for Keras 3.

The public names are re-exported here and imported on first use, so that `import capsnet` stays cheap
and the command line can quiet TensorFlow's start-up before Keras loads::

    from capsnet import CapsNet, CapsuleLayer, PrimaryCap, Length, Mask, squash

One module per concern: `layers` (the capsule layers) and `im2col` (their convolution as matrix
products), `model` (CapsNet), `losses`, `datasets` and `batches` (data in, shifted batches out),
`training` and `backends` (the loop and the step per backend), `backup` and `saving` (files),
`evaluation`, `multimnist`, `image_folder`, `deploy`, `explore`, `plots`, `autotune` and `machine`
(what this machine runs fastest), `distributed` (several processes or machines).
"""

from __future__ import annotations

import importlib
from typing import Any

_PUBLIC = {
    "CapsuleLayer": "layers", "PrimaryCap": "layers", "Length": "layers", "Mask": "layers",
    "Squash": "layers", "Conv2D": "layers", "squash": "layers",
    "CapsNet": "model", "margin_loss": "losses",
    "load_labelled_dataset": "datasets", "combine_images": "plots", "plot_log": "plots",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(f"capsnet.{_PUBLIC[name]}"), name)
    raise AttributeError(f"module 'capsnet' has no attribute {name!r}")
