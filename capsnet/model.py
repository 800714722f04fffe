"""The CapsNet model (Sabour, Frosst & Hinton, NIPS 2017): what `capsulenet.py` trains, tests and uses.

`CapsNet` builds the three models that share one set of layers (train, eval, manipulate);
`two_digit_train_model` adds the MultiMNIST train model (paper section 6) on top of the same layers.
Nothing here reads a flag or a file: `capsulenet.py` (the command line) builds the models with the
values of its flags, `capsnet.deploy` rebuilds one in float32 for export.

Usage::

    from capsnet.model import CapsNet

    train_model, eval_model, manipulate_model = CapsNet((28, 28, 1), n_class=10, routings=3)
    lengths, reconstruction = eval_model(x)   # [batch, 10], [batch, 28, 28, 1]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import keras
from keras import layers

from capsnet.layers import CapsuleLayer, Length, Mask, PrimaryCap
from capsnet.losses import margin_loss

# The dimension of a digit capsule (the paper's 16D DigitCaps); the manipulation plot perturbs each one.
CAPSULE_DIM = 16


def CapsNet(  # noqa: N802 - the original's public name
    input_shape: Sequence[int], n_class: int, routings: int
) -> tuple[keras.Model, keras.Model, keras.Model]:
    """A Capsule Network.

    Args:
        input_shape: data shape, 3D `[rows, cols, channels]`, e.g. `[28, 28, 1]`.
        n_class: number of classes.
        routings: number of routing iterations, at least 1.

    Returns:
        `train_model` (`[x, y] -> [lengths, reconstruction]`, the decoder masked by the true label),
        `eval_model` (`x -> [lengths, reconstruction]`, masked by the longest capsule) and
        `manipulate_model` (`[x, y, noise [n_class, 16]] -> reconstruction of digitcaps + noise`),
        all three sharing their layers.
    """
    input_shape = tuple(int(d) for d in input_shape)
    # Under a mixed-precision policy the capsules stay float32: a fresh model's capsule lengths are
    # ~1e-7 and their squares would underflow in float16.
    caps_dtype = "float32" if keras.mixed_precision.global_policy().name.startswith("mixed") else None
    x = layers.Input(shape=input_shape, name="input_image")

    # Layer 1: a conventional Conv2D layer. [batch, 20, 20, 256]
    conv1 = layers.Conv2D(256, 9, strides=1, padding="valid", activation="relu", name="conv1")(x)
    # Layer 2: Conv2D with `squash`, grouped into capsules. [batch, 1152, 8]
    primarycaps = PrimaryCap(conv1, dim_capsule=8, n_channels=32, kernel_size=9, strides=2,
                             padding="valid")
    # Layer 3: capsule layer with dynamic routing. [batch, n_class, 16]
    digitcaps = CapsuleLayer(num_capsule=n_class, dim_capsule=CAPSULE_DIM, routings=routings,
                             name="digitcaps", dtype=caps_dtype)(primarycaps)
    # Layer 4: each capsule's length, the class probability. [batch, n_class]
    out_caps = Length(name="capsnet", dtype=caps_dtype)(digitcaps)

    # Decoder network.
    y = layers.Input(shape=(n_class,), name="input_label")
    masked_by_y = Mask(name="mask_by_label", dtype=caps_dtype)([digitcaps, y])
    masked = Mask(name="mask_by_length", dtype=caps_dtype)(digitcaps)
    decoder = keras.Sequential(
        [
            layers.Input(shape=(CAPSULE_DIM * n_class,)),
            layers.Dense(512, activation="relu"),
            layers.Dense(1024, activation="relu"),
            layers.Dense(math.prod(input_shape), activation="sigmoid", dtype=caps_dtype),
            layers.Reshape(target_shape=input_shape, name="out_recon"),
        ],
        name="decoder",
    )

    train_model = keras.Model([x, y], [out_caps, decoder(masked_by_y)], name="capsnet_train")
    eval_model = keras.Model(x, [out_caps, decoder(masked)], name="capsnet_eval")

    # Manipulate model: perturb the capsules, then decode the label's capsule.
    noise = layers.Input(shape=(n_class, CAPSULE_DIM), name="input_noise")
    noised_digitcaps = layers.Add(name="add_noise")([digitcaps, noise])
    masked_noised_y = Mask(name="mask_noised", dtype=caps_dtype)([noised_digitcaps, y])
    manipulate_model = keras.Model([x, y, noise], decoder(masked_noised_y), name="capsnet_manipulate")
    return train_model, eval_model, manipulate_model


def two_digit_train_model(train_model: keras.Model) -> keras.Model:
    """The MultiMNIST train model (paper section 6), sharing every layer of `train_model`.

    `[x, y_first, y_second] -> [lengths, reconstruction of first, reconstruction of second]`: each digit
    is decoded from its own capsule, masked by its own one-hot label `[batch, n_class]`.
    """
    digitcaps = train_model.get_layer("digitcaps")
    decoder = train_model.get_layer("decoder")
    n_class = digitcaps.num_capsule
    dtype = digitcaps.dtype_policy
    y_first = layers.Input(shape=(n_class,), name="input_label_first")
    y_second = layers.Input(shape=(n_class,), name="input_label_second")
    recon_first = decoder(Mask(name="mask_first", dtype=dtype)([digitcaps.output, y_first]))
    recon_second = decoder(Mask(name="mask_second", dtype=dtype)([digitcaps.output, y_second]))
    return keras.Model([train_model.inputs[0], y_first, y_second],
                       [train_model.get_layer("capsnet").output, recon_first, recon_second],
                       name="capsnet_train_two_digits")


def compile_like_original(model: keras.Model, optimizer: Any, lam_recon: float) -> None:
    """Compiles the train model as the original did (margin loss + lam_recon x MSE, accuracy), so that
    users who prefer `model.fit` can call it; `training.Trainer` computes the same losses itself."""
    model.compile(optimizer=optimizer, loss=[margin_loss, "mse"], loss_weights=[1.0, lam_recon],
                  metrics=[["accuracy"], []])
