"""The original project's `capsulelayers` module: CapsNet's layers, re-exported from `capsnet.layers`.

`import capsulelayers` and `from capsulelayers import CapsuleLayer, PrimaryCap, Length, Mask, squash`
keep working, and importing it registers the layers that `.keras` files name.
"""

from capsnet.im2col import col2im, im2col_conv2d, im2col_indices, im2col_is_default
from capsnet.layers import (
    CONV_IMPLEMENTATIONS,
    FLOAT16_LENGTH_EPSILON,
    LENGTH_EPSILON,
    PACKAGE,
    SQUASH_EPSILON,
    CapsuleLayer,
    Conv2D,
    Length,
    Mask,
    PrimaryCap,
    Squash,
    dynamic_routing,
    safe_norm,
    squash,
    squash_gradient,
)

__all__ = [
    "CONV_IMPLEMENTATIONS", "FLOAT16_LENGTH_EPSILON", "LENGTH_EPSILON", "PACKAGE", "SQUASH_EPSILON",
    "CapsuleLayer", "Conv2D", "Length", "Mask", "PrimaryCap", "Squash", "col2im", "dynamic_routing",
    "im2col_conv2d", "im2col_indices", "im2col_is_default", "safe_norm", "squash", "squash_gradient",
]
