"""The benchmark's baseline (bench/original_formulation.py) computes what the product computes, and the
benchmark's analytic FLOP count is right.

The speed comparison in bench/bench.py only means something if both formulations do the same
arithmetic: same weights must give the same capsule lengths and reconstructions (here on a full and
a partial batch), and the FLOP count that defines the floor must match the SPEC's figure and a count
taken independently from the ops of the product's traced training step.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


def _load_bench():
    """bench/bench.py as a module (it puts the repository and bench/ on sys.path itself)."""
    if "capsnet_bench" in sys.modules:
        return sys.modules["capsnet_bench"]
    spec = importlib.util.spec_from_file_location("capsnet_bench", REPO_ROOT / "bench" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["capsnet_bench"] = module
    spec.loader.exec_module(module)
    return module


bench = _load_bench()
original = bench.original
capsulenet = bench.capsulenet


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The product's models and the original formulation's, holding the same weights."""
    import keras

    keras.utils.set_random_seed(7)
    args = bench.train_args(str(tmp_path_factory.mktemp("bench")))
    product = bench.build_product(args, "product")
    baseline = bench.build_baseline(args, source=product.train_model)
    return {"product": product, "baseline": baseline, "args": args}


def _images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    x, _ = bench.synthetic_data(n, seed=seed)
    y = np.eye(10, dtype="float32")[np.random.default_rng(seed).integers(0, 10, n)]
    return x, y


def test_weights_copied_layer_by_layer(models: dict) -> None:
    product, baseline = models["product"].train_model, models["baseline"].train_model
    assert product.count_params() == baseline.count_params() == 8_215_568
    for name in original.WEIGHT_LAYERS:
        for a, b in zip(product.get_layer(name).get_weights(),
                        baseline.get_layer(name).get_weights(), strict=True):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("n", [100, 37, 1])
def test_same_outputs_train_model(models: dict, n: int) -> None:
    """Lengths (masked by the label) and reconstructions agree, for full and partial batches."""
    x, y = _images(n, seed=n)
    lengths_p, recon_p = models["product"].train_model.predict([x, y], batch_size=100, verbose=0)
    lengths_b, recon_b = models["baseline"].train_model.predict([x, y], batch_size=100, verbose=0)
    assert lengths_p.shape == lengths_b.shape == (n, 10)
    assert recon_p.shape == recon_b.shape == (n, 28, 28, 1)
    np.testing.assert_allclose(lengths_b, lengths_p, rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(recon_b, recon_p, rtol=1e-4, atol=1e-6)


def test_same_outputs_eval_model_partial_batch(models: dict) -> None:
    """The eval models (mask by the longest capsule) agree on 150 images = 100 + a partial 50."""
    x, _ = _images(150, seed=3)
    lengths_p, recon_p = models["product"].eval_model.predict(x, batch_size=100, verbose=0)
    lengths_b, recon_b = models["baseline"].eval_model.predict(x, batch_size=100, verbose=0)
    np.testing.assert_allclose(lengths_b, lengths_p, rtol=1e-4, atol=1e-9)
    np.testing.assert_array_equal(lengths_b.argmax(1), lengths_p.argmax(1))
    np.testing.assert_allclose(recon_b, recon_p, rtol=1e-4, atol=1e-6)


def test_lengths_are_not_trivial(models: dict) -> None:
    """Guards the comparison above: the capsules are tiny at init, so check the lengths differ
    across images and classes rather than being one constant both sides happen to share."""
    x, y = _images(20, seed=5)
    lengths, _ = models["product"].train_model.predict([x, y], verbose=0)
    assert np.all(lengths > 0) and np.ptp(lengths) > 0.01 * lengths.max()


def test_same_gradients(models: dict) -> None:
    """One training step's loss and gradients agree, so the timed steps do the same work."""
    import tensorflow as tf

    x, y = (tf.constant(a) for a in _images(100, seed=11))
    grads = {}
    for name in ("product", "baseline"):
        trainer = models[name].trainer
        with tf.GradientTape() as tape:
            total, *_ = trainer._losses(x, y, training=True)
            loss = tf.reduce_mean(total)
        variables = {v.path: v for v in trainer.model.trainable_variables}
        grads[name] = dict(zip(variables, tape.gradient(loss, list(variables.values())),
                               strict=True))
        grads[name]["loss"] = loss
    np.testing.assert_allclose(grads["baseline"]["loss"], grads["product"]["loss"], rtol=1e-5)
    for key in ("conv1/kernel", "primarycap_conv2d/kernel", "digitcaps/W"):
        a, b = np.asarray(grads["product"][key]), np.asarray(grads["baseline"][key])
        np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-3 * np.abs(a).max())


def test_manipulation_grids_agree(models: dict, tmp_path: Path) -> None:
    """The product's grid (one predict of 176), the original's (176 predicts) and the bench's
    encoder-once proposal give the same 176 images for the same sample."""
    import argparse
    import contextlib
    import io

    x, y = bench.synthetic_data(40, seed=2)
    product, baseline = models["product"], models["baseline"]
    with contextlib.redirect_stdout(io.StringIO()):
        grid_p = capsulenet.manipulate_latent(
            product.manipulate_model, (x, y), argparse.Namespace(digit=5, save_dir=str(tmp_path)),
            rng=np.random.default_rng(1))
    grid_b = original.manipulate_latent(baseline.manipulate_model, x, y, 5, tmp_path,
                                        np.random.default_rng(1))
    grid_e = bench.EncoderOnceGrid(product.eval_model)(x, y, 5, str(tmp_path),
                                                       np.random.default_rng(1))
    assert grid_p.shape == grid_b.shape == grid_e.shape == (176, 28, 28, 1)
    np.testing.assert_allclose(grid_b, grid_p, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(grid_e, grid_p, rtol=1e-4, atol=1e-6)
    assert (tmp_path / "manipulate-5.png").is_file()


def test_original_generator_shifts_each_image() -> None:
    """The baseline's Python augmenter: batches `((x, y), (y, x))`, whole-pixel shifts of at most
    round(0.1 * 28) = 3 px, a partial batch at the end of a pass, every image seen once per pass."""
    x = np.zeros((250, 28, 28, 1), dtype="float32")
    x[:, 12:16, 12:16] = 1.0  # a 4x4 square in the middle, so a shift moves it and loses nothing
    x[:, 12, 12, 0] = np.arange(250) + 2.0  # identifies the image
    y = np.eye(10, dtype="float32")[np.arange(250) % 10]
    generator = original.train_generator(x, y, 100, 0.1, seed=0)
    batches = [next(generator) for _ in range(3)]
    assert [len(b[0][0]) for b in batches] == [100, 100, 50]
    seen = []
    for (xb, yb), (yb2, xb2) in batches:
        assert xb is xb2 and yb is yb2
        for image in xb:
            rows, cols = np.nonzero(image[..., 0])
            assert image.sum() == pytest.approx(15 + image.max())  # moved whole, nothing lost
            assert abs(rows.min() - 12) <= 3 and abs(cols.min() - 12) <= 3
            seen.append(int(image.max()) - 2)
    assert sorted(seen) == list(range(250))
    shifted = [img for (xb, _), _ in batches for img in xb if img[12, 12, 0] < 2]
    assert len(shifted) > 100  # most images moved


def test_numpy_shift_matches_scipy() -> None:
    """The fallback used without SciPy moves images exactly as the SciPy path (order 0, edge fill)."""
    pytest.importorskip("scipy")
    rng = np.random.default_rng(0)
    image = rng.random((28, 28, 1)).astype("float32")
    for tx, ty in [(2.2, -1.4), (-2.8, 0.3), (0.0, 2.6), (-0.4, -2.9)]:
        np.testing.assert_array_equal(original._shift_numpy(image, tx, ty),
                                      original._shift_scipy(image, tx, ty))


# ---------------------------------------------------------------------------------------------
# FLOPs
# ---------------------------------------------------------------------------------------------


def test_analytic_flops_match_spec() -> None:
    """SPEC section 6: 1,202.6 MFLOP per training image, 120.3 GFLOP per batch-100 step; the
    parts the SPEC lists: 94% of it in the PrimaryCaps conv."""
    flops = bench.analytic_flops()
    assert flops["spec_train_total"] / 1e6 == pytest.approx(1202.6, abs=0.05)
    assert flops["spec_train_total"] * 100 / 1e9 == pytest.approx(120.3, abs=0.05)
    assert flops["forward_total"] / 1e6 == pytest.approx(406.4, abs=0.05)
    assert flops["train"]["primarycaps"] / flops["train_total"] == pytest.approx(0.953, abs=0.005)
    # Independent arithmetic for the two convolutions and the decoder (2 FLOPs per multiply-add).
    assert flops["forward"]["conv1"] == 2 * (20 * 20 * 256) * (9 * 9 * 1)
    assert flops["forward"]["primarycaps"] == 2 * (6 * 6 * 256) * (9 * 9 * 256)
    assert flops["forward"]["decoder"] == 2 * (160 * 512 + 512 * 1024 + 1024 * 784)
    # The exact count drops only the gradient of the constant first coupling (0.03%).
    assert flops["spec_train_total"] - flops["train_total"] == 2 * 10 * 1152 * 16


def test_analytic_flops_match_traced_graph(models: dict) -> None:
    """The analytic count equals the FLOPs of the live matmul-like ops of the product's traced
    training step (TensorFlow's own per-op counts for Conv2D and MatMul)."""
    import tensorflow as tf

    x, y = (tf.constant(a) for a in _images(100, seed=0))
    traced = bench.graph_flops(models["product"].trainer.train_step.get_concrete_function(x, y))
    flops = bench.analytic_flops()
    assert sum(traced.values()) == flops["train_total"] * 100
    # Per op type: convolutions forward, their gradients, the decoder's matmuls.
    assert traced["Conv2D"] == 100 * (flops["forward"]["conv1"] + flops["forward"]["primarycaps"])
    assert traced["MatMul"] == 100 * flops["train"]["decoder"]


def test_analytic_flops_follow_the_architecture() -> None:
    """One routing iteration and a 32x32x3 input change the count as the formulas say."""
    one = bench.analytic_flops(routings=1)
    three = bench.analytic_flops(routings=3)
    per_pass = 2 * 10 * 1152 * 16
    assert three["forward"]["routing"] - one["forward"]["routing"] == 4 * per_pass
    rgb = bench.analytic_flops(input_shape=(32, 32, 3))
    assert rgb["forward"]["conv1"] == 2 * (24 * 24 * 256) * (9 * 9 * 3)
    assert rgb["forward"]["u_hat"] == 2 * 10 * (8 * 8 * 32) * 16 * 8


def test_results_writer_keeps_other_blocks(tmp_path: Path) -> None:
    """bench/RESULTS.md: only the bench block changes; other blocks and devices stay."""
    path = tmp_path / "RESULTS.md"
    bench.write_results("### CPU\nfirst\n", "cpu-x", path)
    text = path.read_text()
    assert "<!-- bench:start -->" in text and "<!-- bench:end -->" in text and "first" in text
    replicas = "<!-- replicas:start -->\nreplica numbers\n<!-- replicas:end -->\n"
    path.write_text("# Title\n\nintro\n\n" + text + "\n" + replicas)
    bench.write_results("### GPU\ngpu numbers\n", "gpu-y", path)
    bench.write_results("### CPU\nsecond\n", "cpu-x", path)
    text = path.read_text()
    assert text.startswith("# Title\n\nintro\n")
    assert text.endswith(replicas)
    assert "second" in text and "first" not in text and "gpu numbers" in text
    assert text.count("<!-- bench:start -->") == 1 and text.count("bench:device cpu-x") == 1
    bench.write_results("### CPU\nsecond\n", "cpu-x", path)
    assert path.read_text() == text  # rewriting the same section changes nothing


def test_epoch_projection_separates_per_epoch_cost() -> None:
    """Epochs of 5 and 10 steps taking 3 s and 5 s: 0.4 s per step, 1 s per epoch of which 0.2
    is validation of 200 images; 600 steps + 10k-image validation: 0.8 + 240 + 10 s."""
    summary = bench.epoch_summary([(3.0, 5.0)], 5, 0.2, 200)
    assert summary["per_step"] == pytest.approx(0.4)
    assert summary["setup"] == pytest.approx(0.8)
    assert summary["projected"] == pytest.approx(0.8 + 240 + 10)


def _fake_results(gpu: bool) -> dict:
    """Results shaped as bench.run_benchmark returns them, with made-up numbers."""
    s = {"median": 0.5, "q1": 0.4, "q3": 0.6, "n": 4}
    device = {"kind": "GPU" if gpu else "CPU", "name": "Fake", "cpu": "Fake CPU (2 cores)",
              "cores": 2, "key": "fake"}
    config = bench.Config(steps=3, rounds=2, warmup=1, epoch_steps=5, epoch_rounds=1,
                          valid_images=200, inference_images=300, inference_calls=3,
                          gemm_repeats=3, memory_steps=3, min_slow_steps=1, thread_rounds=1)
    floor = {"numpy_gflops": 200.0, "tf_gflops": 400.0, "tf_device": "CPU", "tf32_note": ""}
    bench.choose_floor(floor, gpu)
    return {
        "meta": {"date": "2026-01-01 00:00 UTC", "command": "python bench/bench.py --quick",
                 "mode": "quick", "device": device, "tensorflow": "x", "keras": "x", "numpy": "x",
                 "python": "x", "remark": "", "rounds": "2", "config": config.__dict__,
                 "epoch_config": {"steps": 5, "valid_images": 200}, "inference_images": 300,
                 "memory_steps": 3},
        "floor": floor,
        "flops": {**bench.analytic_flops(), "graph_train_per_image": 1202.3e6},
        "steps": {name: {**s, "first_call": 1.0, "note": ""} for name in bench.VARIANTS},
        "epoch": {"product": bench.epoch_summary([(3.0, 5.0), (3.2, 5.2)], 5, 0.2, 200),
                  "baseline": bench.epoch_summary([(6.0, 10.0)], 5, 0.4, 200)},
        "inference": {"product": s, "baseline": {**s, "median": 1.0}},
        "manipulation": {"product": s, "baseline": {**s, "median": 20.0}, "proposal": s},
        "memory": {"product": {"peak_rss_mb": 1, "rss_before_build_mb": 1,
                               "rss_after_build_mb": 1, "gpu_peak_mb": None},
                   "baseline": {"error": "timed out"}},
        "threads": [{"label": "default", **s}, {"label": "inter=1, intra=1", "error": "boom"}],
        "errors": {"epoch": "ValueError: something"},
    }


@pytest.mark.parametrize("gpu", [False, True])
def test_render_every_section(gpu: bool) -> None:
    """The report renders every phase, failed phases and failed probes without raising."""
    text = bench.render(_fake_results(gpu))
    for heading in ("**Floor.**", "**Training step**", "**End-to-end epoch**", "**Inference**",
                    "**Manipulation grid**", "**Peak memory", "**TensorFlow thread settings**",
                    "**Targets of issue 4**", "**End-to-end epoch failed**"):
        assert heading in text
    assert "| manipulation grid speed-up | >= 20.0x | 40.00x | met |" in text
    assert "| inference speed-up | >= 1.3x | 2.00x | met |" in text
    assert "| end-to-end epoch speed-up (projected 60k + 10k) | >= 1.5x | 2.00x | met |" in text
    partial = _fake_results(gpu)
    for phase in ("steps", "epoch", "inference", "manipulation", "memory", "threads"):
        partial.pop(phase)
    assert "**Training step**" not in bench.render(partial)
