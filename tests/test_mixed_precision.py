"""`--mixed_precision` still learns: a short training on real Fashion-MNIST under the mixed policy
(bfloat16 on CPUs, float16 on GPUs, as `capsulenet.mixed_precision_policy` picks) leaves chance far
behind, with the capsules kept in float32.

Keras' dtype policy is global: the fixture restores float32 whatever happens, so that no other test
builds its models in reduced precision.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
N_TRAIN = 2000
N_TEST = 500
EPOCHS = 3  # 60 steps of 100


@pytest.fixture
def mixed_policy() -> Iterator[str]:
    """Sets the product's mixed-precision policy for the test, then float32 again."""
    import keras

    import capsulenet

    policy = capsulenet.mixed_precision_policy()
    keras.mixed_precision.set_global_policy(policy)
    try:
        yield policy
    finally:
        keras.mixed_precision.set_global_policy("float32")


@pytest.fixture(scope="module")
def fashion_small() -> tuple:
    """2000 training and 500 test images of real Fashion-MNIST, prepared as the CLI does."""
    if not FASHION_DIR.is_dir():
        pytest.skip(f"{FASHION_DIR} not found (apt-get install -y dataset-fashion-mnist)")
    import utils

    (x_train, y_train), (x_test, y_test) = utils.load_idx_folder(FASHION_DIR)
    rng = np.random.default_rng(0)
    train = rng.permutation(len(x_train))[:N_TRAIN]
    test = rng.permutation(len(x_test))[:N_TEST]
    raw = (x_train[train], y_train[train]), (x_test[test], y_test[test])
    return utils.prepare(raw, source=str(FASHION_DIR))


@pytest.mark.slow
def test_mixed_precision_learns_fashion_mnist(mixed_policy: str, fashion_small: tuple,
                                              tmp_path: Path) -> None:
    import keras

    import capsulenet

    keras.utils.set_random_seed(0)
    args = capsulenet.build_parser().parse_args(
        ["--save_dir", str(tmp_path), "--epochs", str(EPOCHS), "--seed", "0", "--mixed_precision"])
    (x_train, y_train), (x_test, y_test) = fashion_small
    model, eval_model, _ = capsulenet.build_models(args, fashion_small, N_TRAIN // args.batch_size)

    # The policy reached the convolutions and the decoder; the capsules stay float32.
    compute = mixed_policy.split("_", 1)[1]
    assert model.get_layer("conv1").compute_dtype == compute
    assert model.get_layer("primarycap_conv2d").compute_dtype == compute
    assert model.get_layer("conv1").variable_dtype == "float32"
    assert model.get_layer("digitcaps").compute_dtype == "float32"
    assert model.get_layer("capsnet").compute_dtype == "float32"

    trainer = capsulenet.Trainer(model, args, weights_model=eval_model)
    log = trainer.fit((x_train, y_train), (x_test, y_test), EPOCHS)

    assert np.isfinite(log["loss"]).all() and np.isfinite(log["val_loss"]).all()
    assert log["loss"].iloc[-1] < log["loss"].iloc[0]
    lengths, recon = eval_model.predict(x_test, batch_size=100, verbose=0)
    assert lengths.dtype == np.float32 and np.isfinite(recon).all()
    accuracy = float(np.mean(lengths.argmax(1) == y_test.argmax(1)))
    # Chance is 10%. Measured on 2 CPU cores: float32 68.2%, bfloat16 67.4% after these 60 steps.
    assert accuracy > 0.5, f"test accuracy {accuracy:.3f} after {EPOCHS} short epochs"
    assert log["val_capsnet_accuracy"].iloc[-1] == pytest.approx(accuracy, abs=0.05)
