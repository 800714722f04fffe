"""Writes real Keras-2 HDF5 files with legacy Keras, for tests/test_model.py.

Run in a child process with `TF_USE_LEGACY_KERAS=1`, so that TensorFlow's Keras is `tf_keras` (Keras 2,
the version matching TensorFlow, pinned in requirements/dev.txt), not Keras 3:

    TF_USE_LEGACY_KERAS=1 python tests/keras2_writer.py DATA.npz OUT_DIR

It builds the original CapsNet-Keras model with the original's layer names and weight shapes (`conv1`;
`primarycap_conv2d`, `primarycap_reshape`, `primarycap_squash`; `digitcaps` with `W` of shape
`[n_class, 1152, 16, 8]` and no bias; `capsnet`; the `decoder` Sequential of three Dense layers and
`out_recon`), its forward pass written here in TensorFlow ops from the paper (squash; routing by
agreement, 3 iterations, softmax over the output capsules; lengths; masking by the label or by the
longest capsule). Its weights are drawn at a scale where capsules are long (lengths ~0.1-1; a
glorot-initialised model's are ~1e-7 and would hide the encoder). Then it writes into OUT_DIR:

- `x.h5`: the train model's `save_weights` (what the original's `trained_model.h5` was);
- `full.h5`: the train model's `save` (HDF5, weights under `model_weights`);
- `five.h5`: `save_weights` of the same model for 5 classes;
- `predictions.npz`: the eval model's `lengths` and `recon` on DATA's `x_test`, and `accuracy`;
- `relabelled.npz`: DATA with `y_test` replaced so that the eval model's accuracy is exactly 37% (the 37
  images with the clearest winner keep it as their label, the others get their shortest capsule), so
  that an accuracy printed by another program matches only if it predicts as this one.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # before TensorFlow is imported

import tensorflow as tf  # noqa: E402
import tf_keras as keras  # noqa: E402

layers = keras.layers

ROUTINGS = 3
# Standard deviations of the weights (biases: 0.01) that give capsule lengths of ~0.1-1 on [0, 1] images.
SCALES = {"conv1": 0.1, "primarycap_conv2d": 0.02, "digitcaps": 0.05, "decoder": 0.05}
CORRECT = 37


def squash(s: tf.Tensor, axis: int = -1) -> tf.Tensor:
    squared = tf.reduce_sum(tf.square(s), axis, keepdims=True)
    return squared / (1 + squared) * s / tf.sqrt(squared + 1e-7)


def lengths(v: tf.Tensor) -> tf.Tensor:
    return tf.sqrt(tf.reduce_sum(tf.square(v), -1))


class Length(layers.Layer):
    def call(self, inputs: tf.Tensor) -> tf.Tensor:
        return lengths(inputs)


class Mask(layers.Layer):
    def call(self, inputs: tf.Tensor | list) -> tf.Tensor:
        if isinstance(inputs, list):
            capsules, mask = inputs
        else:
            capsules = inputs
            mask = tf.one_hot(tf.argmax(lengths(capsules), 1), depth=capsules.shape[1])
        masked = capsules * tf.expand_dims(mask, -1)
        return tf.reshape(masked, [-1, capsules.shape[1] * capsules.shape[2]])


class CapsuleLayer(layers.Layer):
    def __init__(self, num_capsule: int, dim_capsule: int, routings: int, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.num_capsule, self.dim_capsule, self.routings = num_capsule, dim_capsule, routings

    def build(self, input_shape: tf.TensorShape) -> None:
        self.W = self.add_weight(  # noqa: N815 - the original's weight name
            name="W", shape=[self.num_capsule, input_shape[1], self.dim_capsule, input_shape[2]],
            initializer="glorot_uniform")
        self.built = True

    def call(self, inputs: tf.Tensor) -> tf.Tensor:
        u_hat = tf.einsum("jiab,nib->njia", self.W, inputs)  # [batch, J, I, 16]
        b = tf.zeros_like(u_hat[..., 0])  # [batch, J, I]
        for iteration in range(self.routings):
            c = tf.nn.softmax(b, axis=1)  # over the output capsules
            v = squash(tf.einsum("nji,njia->nja", c, u_hat))
            if iteration < self.routings - 1:
                b = b + tf.einsum("nja,njia->nji", v, u_hat)
        return v

    def get_config(self) -> dict:
        return {**super().get_config(), "num_capsule": self.num_capsule,
                "dim_capsule": self.dim_capsule, "routings": self.routings}


def main(data_path: str, out: str) -> None:
    assert keras.__version__.startswith("2."), keras.__version__
    assert tf.keras.layers.Layer is keras.layers.Layer, "tf.keras is not tf_keras: set TF_USE_LEGACY_KERAS=1"

    def capsnet(input_shape: tuple[int, ...], n_class: int) -> tuple[keras.Model, keras.Model]:
        x = layers.Input(shape=input_shape)
        conv1 = layers.Conv2D(256, 9, strides=1, padding="valid", activation="relu", name="conv1")(x)
        primary = layers.Conv2D(8 * 32, 9, strides=2, padding="valid", name="primarycap_conv2d")(conv1)
        primary = layers.Reshape(target_shape=[-1, 8], name="primarycap_reshape")(primary)
        primary = layers.Lambda(squash, name="primarycap_squash")(primary)
        digitcaps = CapsuleLayer(n_class, 16, ROUTINGS, name="digitcaps")(primary)
        out_caps = Length(name="capsnet")(digitcaps)
        y = layers.Input(shape=(n_class,))
        decoder = keras.models.Sequential(name="decoder")
        decoder.add(layers.Dense(512, activation="relu", input_dim=16 * n_class))
        decoder.add(layers.Dense(1024, activation="relu"))
        decoder.add(layers.Dense(int(np.prod(input_shape)), activation="sigmoid"))
        decoder.add(layers.Reshape(target_shape=input_shape, name="out_recon"))
        train_model = keras.models.Model([x, y], [out_caps, decoder(Mask()([digitcaps, y]))])
        eval_model = keras.models.Model(x, [out_caps, decoder(Mask()(digitcaps))])
        return train_model, eval_model

    def randomize(model: keras.Model, seed: int) -> None:
        rng = np.random.default_rng(seed)
        for name, scale in SCALES.items():
            layer = model.get_layer(name)
            layer.set_weights([(rng.normal(size=w.shape) * (scale if w.ndim > 1 else 0.01)).astype("float32")
                               for w in layer.get_weights()])

    out_dir = Path(out)
    with np.load(data_path, allow_pickle=False) as f:
        data = {k: f[k] for k in f.files}
    x_test = data["x_test"].astype("float32")[..., None] / 255.0
    train_model, eval_model = capsnet(x_test.shape[1:], 10)
    assert train_model.get_layer("digitcaps").get_weights()[0].shape == (10, 1152, 16, 8)
    assert len(train_model.get_layer("digitcaps").get_weights()) == 1  # no bias
    randomize(train_model, seed=1)
    predicted_lengths, recon = eval_model.predict(x_test, batch_size=50, verbose=0)
    longest = predicted_lengths.max(axis=1)
    assert 0.1 < np.median(longest) < 1.0, f"capsules not long: median longest {np.median(longest)}"
    train_model.save_weights(str(out_dir / "x.h5"))
    train_model.save(str(out_dir / "full.h5"))

    ranked = np.sort(predicted_lengths, axis=1)
    clearest = np.argsort(ranked[:, -2] - ranked[:, -1])[:CORRECT]  # largest winning margins first
    y_test = np.argmin(predicted_lengths, axis=1)
    y_test[clearest] = np.argmax(predicted_lengths, axis=1)[clearest]
    accuracy = float(np.mean(np.argmax(predicted_lengths, 1) == y_test))
    np.savez(out_dir / "predictions.npz", lengths=predicted_lengths, recon=recon, accuracy=accuracy,
             y_test=y_test)
    np.savez(out_dir / "relabelled.npz", **{**data, "y_test": y_test.astype(np.uint8)})

    five, _ = capsnet(x_test.shape[1:], 5)
    randomize(five, seed=2)
    five.save_weights(str(out_dir / "five.h5"))


if __name__ == "__main__":
    main(*sys.argv[1:])
