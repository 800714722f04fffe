"""Valid channels-last 2D convolution as one matrix product over the image patches (im2col), with a
gradient of two more matrix products.

`capsnet.layers.Conv2D` runs its convolution through `im2col_conv2d` when `implementation` says so.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
from keras import ops


def im2col_indices(input_size: tuple[int, int], kernel_size: tuple[int, int],
                   strides: tuple[int, int]) -> np.ndarray:
    """Where each patch element of a "valid" convolution reads its input pixel.

    Args:
        input_size: `(rows, cols)` of the input image.
        kernel_size, strides: `(rows, cols)` of the convolution.

    Returns:
        int32 `[out_rows * out_cols * kernel_rows * kernel_cols]`: for output pixel `(i, j)` and kernel
        tap `(u, v)`, in that order, the flat input position `(i * stride_r + u) * cols + j * stride_c + v`.
    """
    (rows, cols), (kernel_rows, kernel_cols), (stride_r, stride_c) = input_size, kernel_size, strides
    r = np.arange((rows - kernel_rows) // stride_r + 1)[:, None] * stride_r + np.arange(kernel_rows)
    c = np.arange((cols - kernel_cols) // stride_c + 1)[:, None] * stride_c + np.arange(kernel_cols)
    return (r[:, None, :, None] * cols + c[None, :, None, :]).reshape(-1).astype("int32")


def col2im(values: Any, index: np.ndarray, pixels: int, dtype: str) -> Any:
    """Sums patch elements back onto the pixels they were taken from (the adjoint of the im2col
    `take`).

    The elements are first put in pixel order (one `take`), then summed by a sorted `segment_sum`:
    TensorFlow's unsorted one runs on one core, the sorted one on all of them.

    Args:
        values: `[batch, len(index), channels]`, e.g. the gradient of the patches.
        index: the pixel each element came from (`im2col_indices`).
        pixels: pixels per image.
        dtype: the dtype to sum in.

    Returns:
        `[batch * pixels, channels]` in `dtype`; pixels that no patch reads are zero.
    """
    order = np.argsort(index, kind="stable")
    pixel_of = index[order]
    batch, channels = ops.shape(values)[0], values.shape[-1]
    grouped = ops.cast(ops.reshape(ops.take(values, order, axis=1), (-1, channels)), dtype)
    segment = ops.reshape(ops.arange(batch, dtype="int32")[:, None] * pixels + pixel_of, (-1,))
    if keras.backend.backend() != "tensorflow":
        return ops.segment_sum(grouped, segment, num_segments=batch * pixels, sorted=True)
    if _in_tensorflow_xla():
        return ops.segment_sum(grouped, segment, num_segments=batch * pixels)
    # TensorFlow's sorted sum takes no `num_segments`: it returns (last segment + 1) rows.
    summed = ops.segment_sum(grouped, segment, sorted=True)
    return ops.pad(summed, [[0, pixels - 1 - int(pixel_of[-1])], [0, 0]])


def _in_tensorflow_xla() -> bool:
    """Whether TensorFlow is tracing for XLA (`jit_compile=True`), which has no sorted `SegmentSum`
    kernel (the unsorted one, given `num_segments`, compiles)."""
    import tensorflow as tf
    from tensorflow.python.ops import control_flow_util  # no public equivalent

    return control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph())


def im2col_conv2d(inputs: Any, kernel: Any, strides: tuple[int, int], bias: Any = None) -> Any:
    """A "valid", channels-last 2D convolution as one matrix product, with a gradient of two more.

    Forward: the patches `[batch * out_rows * out_cols, kernel_rows * kernel_cols * channels]` are
    gathered from the input in one `take` (im2col), times the kernel seen as `[kernel_rows *
    kernel_cols * channels, filters]` (its own row-major layout: no copy). Backward: the kernel
    gradient is `patches^T @ upstream`, the input gradient `upstream @ kernel^T` summed back onto the
    input pixels (`col2im`). Three GEMMs of the convolution's own size, where TensorFlow's CPU
    convolution (and its differentiated `extract_patches`) run far below the GEMM rate, and XLA's
    CPU strided-convolution backward far below that. The patches (81x the output pixels times the
    input channels: 298 MB for PrimaryCaps at batch 100 in float32) are kept for the backward pass.

    In bfloat16 or float16 the sums that are no matrix product (col2im's overlaps, the bias gradient
    over batch and pixels) accumulate in float32: TensorFlow's CPU `BiasAddGrad` sums in bfloat16 and
    is ~6% off after 288 terms, where the library convolution's fused bias gradient is not.

    Args:
        inputs: `[batch, rows, cols, channels]`, rows, cols and channels known; any batch size.
        kernel: `[kernel_rows, kernel_cols, channels, filters]`, as `keras.layers.Conv2D` stores it;
            cast to the inputs' dtype.
        strides: `(rows, cols)`.
        bias: `[filters]` added to every output pixel, or None.

    Returns:
        `[batch, out_rows, out_cols, filters]`, what `ops.conv(inputs, kernel, strides, "valid")` (plus
        `bias`) gives within float rounding, with the same gradients.
    """
    rows, cols, channels = (int(d) for d in inputs.shape[1:])
    kernel_rows, kernel_cols, _, filters = (int(d) for d in kernel.shape)
    index = im2col_indices((rows, cols), (kernel_rows, kernel_cols), strides)
    out_rows = (rows - kernel_rows) // strides[0] + 1
    out_cols = (cols - kernel_cols) // strides[1] + 1
    taps = kernel_rows * kernel_cols * channels
    dtype = keras.backend.standardize_dtype(inputs.dtype)
    accumulate = "float32" if dtype in ("bfloat16", "float16") else dtype

    @ops.custom_gradient
    def convolve(inputs: Any, kernel: Any, *bias: Any) -> tuple[Any, Any]:
        pixels = ops.reshape(inputs, (-1, rows * cols, channels))
        patches = ops.reshape(ops.take(pixels, index, axis=1), (-1, taps))
        weights = ops.reshape(kernel, (taps, filters))
        outputs = ops.matmul(patches, weights)
        if bias:
            outputs = outputs + bias[0]

        def grad(*args: Any, upstream: Any = None) -> tuple[Any, ...]:
            upstream = ops.reshape(args[0] if upstream is None else upstream, (-1, filters))
            kernel_grad = ops.einsum("pk,pf->kf", patches, upstream)  # no transposed copy of the patches
            patches_grad = ops.einsum("pf,kf->pk", upstream, weights)
            patches_grad = ops.reshape(patches_grad, (-1, len(index), channels))
            inputs_grad = col2im(patches_grad, index, rows * cols, accumulate)
            grads = (ops.cast(ops.reshape(inputs_grad, (-1, rows, cols, channels)), dtype),
                     ops.reshape(kernel_grad, (kernel_rows, kernel_cols, channels, filters)))
            if bias:
                grads += (ops.cast(ops.sum(ops.cast(upstream, accumulate), axis=0), dtype),)
            return grads

        return ops.reshape(outputs, (-1, out_rows, out_cols, filters)), grad

    # Tensors, not variables (TensorFlow's custom gradient would want the gradients of the variables
    # it sees read from `grad` too), in the inputs' (compute) dtype, as `ops.conv` would cast them.
    weights = (kernel,) if bias is None else (kernel, bias)
    return convolve(inputs, *(ops.cast(w, dtype) for w in weights))


def im2col_is_default() -> bool:
    """The static rule of `Conv2D(implementation="auto")` where nothing was measured (`autotune`
    measures it, the command line does): im2col when the backend (TensorFlow or JAX) computes on the
    CPU, where three large matrix products beat the library's convolution backward on most CPUs (not
    on all: bench/RESULTS.md); the library convolution (cuDNN) on GPUs."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return not tf.config.list_logical_devices("GPU")
    if backend == "jax":
        import jax

        return jax.default_backend() == "cpu"
    return False
