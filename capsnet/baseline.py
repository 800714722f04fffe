"""The paper's baseline CNN (Sabour, Frosst & Hinton 2017, section 5), the row CapsNet is compared with.

The paper: "three convolutional layers of 256, 256, 128 channels. Each has 5x5 kernels and stride of
1. The last convolutional layers are followed by two fully connected layers of size 328, 192. The
last fully connected layer is connected with dropout to a 10 class softmax layer with cross entropy
loss", trained on 2-pixel shifted MNIST with Adam; "the baseline has 35.4M" parameters.

What the paper leaves open, and the choice made here:

- **Pooling: none.** The paper names no pooling layer, and its 35.4M parameters pin the layout down:
  with 'same' padding and no pooling the first dense layer sees 28 x 28 x 128 = 100,352 values and
  the network has 35,445,522 parameters (35.4M); max-pooling after the first two convolutions would
  leave 7 x 7 x 128 and 4.6M parameters, 'valid' padding without pooling 13.3M. Neither matches.
- **Padding: 'same'**, for the same reason.
- **Activations: ReLU** after every convolution and hidden dense layer (the paper's CapsNet uses ReLU;
  it names no other).
- **Dropout rate: 0.5** (unstated in the paper), between the 192-unit layer and the softmax.

It trains through the same `training.Trainer` as CapsNet (same data, shifts, Adam, learning-rate
decay, epochs, `log.csv`, backup and resume) with `losses.CLASSIFIER` as its objective.

Usage::

    from capsnet.baseline import baseline_cnn

    model = baseline_cnn((28, 28, 1), n_class=10)   # x [batch, 28, 28, 1] -> probabilities [batch, 10]
    model.count_params()                             # 35,445,522
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
from keras import layers

# The paper's sizes (section 5).
CONV_CHANNELS = (256, 256, 128)
KERNEL_SIZE = 5
DENSE_UNITS = (328, 192)
DROPOUT = 0.5


def baseline_cnn(input_shape: Sequence[int], n_class: int, conv_channels: Sequence[int] = CONV_CHANNELS,
                 dense_units: Sequence[int] = DENSE_UNITS, dropout: float = DROPOUT) -> keras.Model:
    """The baseline CNN: `x [batch, rows, cols, channels] -> class probabilities [batch, n_class]`.

    Shapes for MNIST (the defaults): conv1..conv3 `[batch, 28, 28, 256]`, `[batch, 28, 28, 256]`,
    `[batch, 28, 28, 128]`; flatten `[batch, 100352]`; fc1 `[batch, 328]`; fc2 `[batch, 192]`;
    softmax `[batch, 10]`. Parameters: 6,656 + 1,638,656 + 819,328 (convolutions) + 32,915,784 +
    63,168 + 1,930 (dense) = 35,445,522.

    Args:
        input_shape: `(rows, cols, channels)`.
        n_class: number of classes.
        conv_channels, dense_units, dropout: the paper's sizes by default; smaller ones make a model
            that tests train in seconds.
    """
    # Under a mixed-precision policy the softmax stays float32: the cross-entropy takes its log.
    out_dtype = "float32" if keras.mixed_precision.global_policy().name.startswith("mixed") else None
    x = layers.Input(shape=tuple(int(d) for d in input_shape), name="input_image")
    h = x
    for i, channels in enumerate(conv_channels, start=1):
        h = layers.Conv2D(channels, KERNEL_SIZE, strides=1, padding="same", activation="relu",
                          name=f"conv{i}")(h)
    h = layers.Flatten(name="flatten")(h)
    for i, units in enumerate(dense_units, start=1):
        h = layers.Dense(units, activation="relu", name=f"fc{i}")(h)
    # A seed of its own: then every backend draws the masks from the layer's generator state, which
    # `training.Trainer` sets per epoch so that a resumed run repeats them (unseeded, PyTorch would
    # draw from its global generator, which no backup holds).
    h = layers.Dropout(dropout, seed=0, name="dropout")(h)
    probabilities = layers.Dense(n_class, activation="softmax", name="softmax", dtype=out_dtype)(h)
    return keras.Model(x, probabilities, name="baseline_cnn")
