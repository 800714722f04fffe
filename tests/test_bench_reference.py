"""The benchmark's baseline (bench/original_formulation.py) computes what the product computes, the
benchmark's FLOP count and floor are right, the step's breakdown measures every part against its
floor, and the reports are written as documented, each in its own place of bench/RESULTS.md.

The speed comparison in bench/step.py only means something if both formulations do the same
arithmetic: same weights must give the same capsule lengths, reconstructions, manipulation grids and
gradients (on full and partial batches). A fresh model's capsules are ~1e-9 long, which would hide the
encoder from every comparison of reconstructions, so the shared weights are scaled until the capsules
are O(0.1-1) long and the decoder's output visibly depends on them; a control perturbs the baseline's
weights by 0.5% and checks that the same comparisons then fail. The FLOP count that defines the floor
must match a count by hand and a count taken independently from the ops of the product's traced
training step; the floor's matrix products must be checked against float64 and the CPU's peak.
"""

from __future__ import annotations

import contextlib
import io
import re
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH_DIR = Path(__file__).resolve().parent.parent / "bench"
# bench/'s scripts import each other by bare name, as when run as `python bench/step.py`; appended, so
# that the product's and the tests' own modules keep precedence.
if str(BENCH_DIR) not in sys.path:
    sys.path.append(str(BENCH_DIR))

import common  # noqa: E402
import epoch  # noqa: E402
import flops  # noqa: E402
import layers  # noqa: E402
import original_formulation as original  # noqa: E402
import replicas  # noqa: E402
import report  # noqa: E402
import step  # noqa: E402

import capsulenet  # noqa: E402
from capsnet import evaluation, im2col  # noqa: E402
from capsnet.losses import per_sample_terms  # noqa: E402

# Tolerances of the product-vs-baseline comparisons (float32, different summation orders).
LENGTH_TOL = {"rtol": 1e-4, "atol": 1e-9}
RECON_TOL = {"rtol": 1e-4, "atol": 1e-6}
TARGET_LENGTH = 0.1  # aimed-at median capsule length before routing sharpens it (lands near 0.3-0.8)
DECODER_GAIN = 10.0  # fresh Glorot decoders map any capsule to 0.5 +- 0.003; x10 spreads it to +- 0.2


def _images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    x, _ = common.synthetic_data(n, seed=seed)
    y = np.eye(10, dtype="float32")[np.random.default_rng(seed).integers(0, 10, n)]
    return x, y


def _lengthen_capsules(train_model, eval_model) -> None:  # noqa: ANN001
    """Scales the digit capsules' `W` so that the median capsule is O(0.1-1) long (a capsule's length
    is ~|s|^2 while it is short, so W scales by sqrt(target / length)), and the decoder's first kernel
    so that its output depends visibly on the capsules."""
    x, _ = _images(100, seed=99)
    lengths, _ = eval_model.predict(x, verbose=0)
    digitcaps = train_model.get_layer("digitcaps")
    (w,) = digitcaps.get_weights()
    digitcaps.set_weights([w * np.sqrt(TARGET_LENGTH / np.median(lengths))])
    dense = train_model.get_layer("decoder").layers[0]
    kernel, bias = dense.get_weights()
    dense.set_weights([kernel * DECODER_GAIN, bias])


class Models:
    """One variant's three models and steps, by the names the comparisons use."""

    def __init__(self, variant: step.Variant) -> None:
        self.train_model, self.eval_model = variant.built.model, variant.built.eval_model
        self.manipulate_model, self.steps = variant.built.manipulate_model, variant.steps


@pytest.fixture(scope="module")
def models() -> dict:
    """The product's models and the original formulation's, holding the same (lengthened) weights,
    both built by `training.build` as bench/step.py builds them."""
    import keras

    keras.utils.set_random_seed(7)
    product = step.build_variant("product")
    _lengthen_capsules(product.built.model, product.built.eval_model)
    baseline = step.build_variant("baseline", source=product.built.model)
    return {"product": Models(product), "baseline": Models(baseline)}


@contextlib.contextmanager
def _perturbed_baseline(models: dict, factor: float = 1.005):
    """The baseline's digit-capsule `W` multiplied by `factor` inside the block, then restored."""
    layer = models["baseline"].train_model.get_layer("digitcaps")
    (w,) = layer.get_weights()
    layer.set_weights([w * factor])
    try:
        yield
    finally:
        layer.set_weights([w])


def test_weights_copied_layer_by_layer(models: dict) -> None:
    product, baseline = models["product"].train_model, models["baseline"].train_model
    assert product.count_params() == baseline.count_params() == 8_215_568
    for name in original.WEIGHT_LAYERS:
        for a, b in zip(product.get_layer(name).get_weights(),
                        baseline.get_layer(name).get_weights(), strict=True):
            np.testing.assert_array_equal(a, b)


def test_capsules_are_long_and_reconstructions_depend_on_them(models: dict) -> None:
    """Guards every comparison below: capsules O(0.1-1) long and differing across images and
    classes, reconstructions that differ across images far beyond the comparison's tolerance."""
    x, y = _images(100, seed=5)
    lengths, recon = models["product"].train_model.predict([x, y], verbose=0)
    assert 0.1 < np.median(lengths) < 0.95
    assert lengths.min() > 0.01 and lengths.max() < 1.0
    assert np.ptp(lengths, axis=0).min() > 0.05  # every class varies across images
    assert recon.std(axis=0).mean() > 100 * (RECON_TOL["rtol"] * 0.5 + RECON_TOL["atol"])


@pytest.mark.parametrize("n", [100, 37, 1])
def test_same_outputs_train_model(models: dict, n: int) -> None:
    """Lengths (masked by the label) and reconstructions agree, for full and partial batches."""
    x, y = _images(n, seed=n)
    lengths_p, recon_p = models["product"].train_model.predict([x, y], batch_size=100, verbose=0)
    lengths_b, recon_b = models["baseline"].train_model.predict([x, y], batch_size=100, verbose=0)
    assert lengths_p.shape == lengths_b.shape == (n, 10)
    assert recon_p.shape == recon_b.shape == (n, 28, 28, 1)
    np.testing.assert_allclose(lengths_b, lengths_p, **LENGTH_TOL)
    np.testing.assert_allclose(recon_b, recon_p, **RECON_TOL)


def test_same_outputs_eval_model_partial_batch(models: dict) -> None:
    """The eval models (mask by the longest capsule) agree on 150 images = 100 + a partial 50."""
    x, _ = _images(150, seed=3)
    lengths_p, recon_p = models["product"].eval_model.predict(x, batch_size=100, verbose=0)
    lengths_b, recon_b = models["baseline"].eval_model.predict(x, batch_size=100, verbose=0)
    np.testing.assert_allclose(lengths_b, lengths_p, **LENGTH_TOL)
    np.testing.assert_array_equal(lengths_b.argmax(1), lengths_p.argmax(1))
    assert len(np.unique(lengths_p.argmax(1))) > 1  # the mask picks different capsules
    np.testing.assert_allclose(recon_b, recon_p, **RECON_TOL)


def test_same_gradients(models: dict) -> None:
    """One training step's loss and gradients agree, so the timed steps do the same work."""
    import tensorflow as tf

    x, y = (tf.constant(a) for a in _images(100, seed=11))
    lam_recon = common.DEFAULTS.lam_recon
    grads = {}
    for name in ("product", "baseline"):
        model = models[name].train_model
        with tf.GradientTape() as tape:
            lengths, recon = model([x, y], training=True)
            loss = tf.reduce_mean(per_sample_terms(x, y, lengths, recon, lam_recon)[0])
        variables = {v.path: v for v in model.trainable_variables}
        grads[name] = dict(zip(variables, tape.gradient(loss, list(variables.values())), strict=True))
        grads[name]["loss"] = loss
    np.testing.assert_allclose(grads["baseline"]["loss"], grads["product"]["loss"], rtol=1e-5)
    for key in ("conv1/kernel", "primarycap_conv2d/kernel", "digitcaps/W"):
        a, b = np.asarray(grads["product"][key]), np.asarray(grads["baseline"][key])
        assert np.abs(a).max() > 0
        np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-3 * np.abs(a).max())


def _grids(models: dict, save_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """The product's grid (`capsulenet.manipulate_latent`: encoder once, one decoder batch) and the
    original's (176 predicts), for the same randomly picked sample."""
    x, y = common.synthetic_data(40, seed=2)
    with contextlib.redirect_stdout(io.StringIO()):
        grid_p = capsulenet.manipulate_latent(models["product"].manipulate_model, (x, y), 5, save_dir,
                                              rng=np.random.default_rng(1))
    grid_b = original.manipulate_latent(models["baseline"].manipulate_model, x, y, 5, save_dir,
                                        np.random.default_rng(1))
    return grid_p, grid_b


def test_manipulation_grids_agree(models: dict, tmp_path: Path) -> None:
    """Both grids give the same 176 images, and they show the sample's capsule: decoding the
    perturbations alone (capsules of zero) gives other images."""
    grid_p, grid_b = _grids(models, tmp_path)
    assert grid_p.shape == grid_b.shape == (176, 28, 28, 1)
    np.testing.assert_allclose(grid_b, grid_p, **RECON_TOL)
    assert (tmp_path / "manipulate-5.png").is_file()
    decoder = models["product"].train_model.get_layer("decoder")
    label = np.eye(10, dtype="float32")[5]
    noise_only = decoder.predict((evaluation.perturbation_grid(10) * label[None, :, None]).reshape(176, -1),
                                 verbose=0)
    assert np.abs(grid_p - noise_only).max() > 100 * RECON_TOL["atol"]


def test_comparisons_fail_for_another_encoder(models: dict, tmp_path: Path) -> None:
    """Control: the baseline's digit-capsule weights 0.5% larger must break the comparisons above
    (lengths, reconstructions of both models, the grid), so a real formulation error cannot hide.
    The baseline's grid is computed here in one predict of its manipulate model (what its 176 predicts
    compute, checked above), which keeps this control short."""
    x, y = _images(100, seed=100)
    grid_x, grid_y = common.synthetic_data(40, seed=2)
    with contextlib.redirect_stdout(io.StringIO()):
        grid_p = capsulenet.manipulate_latent(models["product"].manipulate_model, (grid_x, grid_y), 5,
                                              tmp_path, rng=np.random.default_rng(1))
    index = evaluation.pick_sample(grid_y, 5, np.random.default_rng(1))
    noise = evaluation.perturbation_grid(10)
    grid_inputs = [np.repeat(grid_x[index : index + 1], len(noise), axis=0),
                   np.repeat(grid_y[index : index + 1], len(noise), axis=0), noise]
    np.testing.assert_allclose(models["baseline"].manipulate_model.predict(grid_inputs, verbose=0), grid_p,
                               **RECON_TOL)  # unperturbed, this one-batch grid is the product's
    with _perturbed_baseline(models):
        lengths_p, recon_p = models["product"].train_model.predict([x, y], verbose=0)
        lengths_b, recon_b = models["baseline"].train_model.predict([x, y], verbose=0)
        _, eval_recon_p = models["product"].eval_model.predict(x, verbose=0)
        _, eval_recon_b = models["baseline"].eval_model.predict(x, verbose=0)
        grid_b = models["baseline"].manipulate_model.predict(grid_inputs, verbose=0)
    assert not np.allclose(lengths_b, lengths_p, **LENGTH_TOL)
    for a, b in ((recon_p, recon_b), (eval_recon_p, eval_recon_b), (grid_p, grid_b)):
        assert not np.allclose(b, a, **RECON_TOL)


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


def test_analytic_flops_match_a_count_by_hand() -> None:
    """1,202.6 MFLOP per training image counting every coupling's gradient (120.3 GFLOP per batch-100
    step), 95% of it in the PrimaryCaps conv."""
    counts = flops.analytic_flops()
    assert counts["train_total_all_couplings"] / 1e6 == pytest.approx(1202.6, abs=0.05)
    assert counts["train_total_all_couplings"] * 100 / 1e9 == pytest.approx(120.3, abs=0.05)
    assert counts["forward_total"] / 1e6 == pytest.approx(406.4, abs=0.05)
    assert counts["train"]["primarycaps"] / counts["train_total"] == pytest.approx(0.953, abs=0.005)
    # Independent arithmetic for the two convolutions and the decoder (2 FLOPs per multiply-add).
    assert counts["forward"]["conv1"] == 2 * (20 * 20 * 256) * (9 * 9 * 1)
    assert counts["forward"]["primarycaps"] == 2 * (6 * 6 * 256) * (9 * 9 * 256)
    assert counts["forward"]["decoder"] == 2 * (160 * 512 + 512 * 1024 + 1024 * 784)
    # The exact count drops only the gradient of the constant first coupling (0.03%).
    assert counts["train_total_all_couplings"] - counts["train_total"] == 2 * 10 * 1152 * 16


def test_analytic_flops_match_traced_graph(models: dict) -> None:
    """The analytic count equals the FLOPs of the live matmul-like ops of the product's traced
    training step (TensorFlow's own per-op counts for Conv2D and MatMul)."""
    import tensorflow as tf

    x, y = (tf.constant(a) for a in _images(100, seed=0))
    traced = flops.graph_flops(models["product"].steps.train_step.get_concrete_function(x, y))
    counts = flops.analytic_flops()
    assert sum(traced.values()) == counts["train_total"] * 100
    # Per op type: convolutions forward, their gradients, the decoder's matmuls. On a CPU the
    # PrimaryCaps convolution runs as im2col: its forward and gradients are three products of its own
    # size, MatMul or Einsum as TensorFlow lowers each einsum (one gradient became a MatMul here).
    primary = counts["forward"]["primarycaps"]
    if im2col.im2col_is_default():
        assert traced["Conv2D"] == 100 * counts["forward"]["conv1"]
        extra = traced["MatMul"] - 100 * counts["train"]["decoder"]
        assert extra in (100 * primary, 200 * primary, 300 * primary)
    else:
        assert traced["Conv2D"] == 100 * (counts["forward"]["conv1"] + primary)
        assert traced["MatMul"] == 100 * counts["train"]["decoder"]


def test_analytic_flops_follow_the_architecture() -> None:
    """One routing iteration and a 32x32x3 input change the count as the formulas say."""
    one = flops.analytic_flops(routings=1)
    three = flops.analytic_flops(routings=3)
    per_pass = 2 * 10 * 1152 * 16
    assert three["forward"]["routing"] - one["forward"]["routing"] == 4 * per_pass
    rgb = flops.analytic_flops(input_shape=(32, 32, 3))
    assert rgb["forward"]["conv1"] == 2 * (24 * 24 * 256) * (9 * 9 * 3)
    assert rgb["forward"]["u_hat"] == 2 * 10 * (8 * 8 * 32) * 16 * 8


# ---------------------------------------------------------------------------------------------
# The floor
# ---------------------------------------------------------------------------------------------


def test_gemm_products_are_checked_against_float64() -> None:
    """NumPy's and TensorFlow's timed products pass the float64 check; a product done in bfloat16
    precision and one that skips the work are caught by the same check."""
    rng = np.random.default_rng(0)
    honest = [flops.numpy_gemm(256, 2, rng), flops.tf_gemm(256, 2, rng), flops.tf_gemm(256, 1, rng, chain=3)]
    for c in honest:
        assert c["error"] < flops.FP32_TOLERANCE and c["gflops"] > 0

    def bfloat16(a: np.ndarray) -> np.ndarray:  # keep the top 16 bits of each float32
        return (a.view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)

    b = rng.standard_normal((256, 256), dtype=np.float32)
    low = flops._gemm_candidate("bf16", 256, lambda a, rows: (bfloat16(a) @ bfloat16(b))[rows], 2, 1, b, rng)
    lazy = flops._gemm_candidate("lazy", 256, lambda a, rows: np.zeros((len(rows), 256), np.float32),
                                 2, 1, b, rng)
    floor = {"candidates": [*honest, low, lazy], "tolerance": flops.FP32_TOLERANCE, "peak": None}
    flops.choose_floor(floor)
    assert "refused" in low and "refused" in lazy and low["error"] > 10 * flops.FP32_TOLERANCE
    assert all("refused" not in c for c in honest)
    assert floor["floor_gflops"] == max(c["gflops"] for c in honest)


def test_floor_refuses_rates_above_the_peak() -> None:
    """A rate above the theoretical peak is refused (a timing artefact), the best of the rest is the
    floor; with every candidate refused there is no floor."""
    def candidate(library: str, gflops: float, error: float = 5e-7) -> dict:
        return {"library": library, "n": 4096, "chain": 1, "gflops": gflops, "error": error}

    peak = flops.cpu_peak(cores=2, override_gflops=240.0)
    floor = {"candidates": [candidate("NumPy", 205.0), candidate("tf.matmul", 514.0),
                            candidate("tf.matmul", 230.0, error=3e-3)],
             "tolerance": flops.FP32_TOLERANCE, "peak": peak}
    flops.choose_floor(floor)
    assert floor["floor_gflops"] == 205.0 and floor["floor_source"] == "NumPy n=4096"
    assert "peak" in floor["candidates"][1]["refused"] and "error" in floor["candidates"][2]["refused"]
    floor["candidates"] = floor["candidates"][1:]
    flops.choose_floor(floor)
    assert floor["floor_gflops"] is None


def test_a_nominal_clock_does_not_refuse_a_boosted_product(monkeypatch: pytest.MonkeyPatch) -> None:
    """A peak from a nominal or current clock is no upper bound (boost runs above it): a checked
    product faster than it is the floor, refused only above the same cores at ASSUMED_MAX_GHZ; a
    maximum clock still refuses it. (Refusing it made the floor slower than the machine once: a 4096
    product at 288 GFLOP/s against 2 x 64 x 2.1 GHz = 269.)"""
    def floor_with(clock: tuple[float, str]) -> dict:
        monkeypatch.setattr(flops, "cpu_clock_ghz", lambda: clock)
        monkeypatch.setattr(flops.machine, "cpu_fields", lambda: {
            "flags": "avx512f avx2 fma", "vendor_id": "GenuineIntel", "cpu family": "6"})
        peak = flops.cpu_peak(cores=2)
        floor = {"candidates": [{"library": "tf.matmul", "n": 4096, "chain": 1, "gflops": 288.0,
                                 "error": 5e-7},
                                {"library": "NumPy", "n": 4096, "chain": 1, "gflops": 250.0,
                                 "error": 5e-7},
                                {"library": "tf.matmul", "n": 2048, "chain": 1, "gflops": 700.0,
                                 "error": 5e-7}],
                 "tolerance": flops.FP32_TOLERANCE, "peak": peak}
        flops.choose_floor(floor)
        return floor

    current = floor_with((2.1, f"/proc/cpuinfo cpu MHz (current; {flops.BOOST_CAVEAT})"))
    assert current["peak"]["gflops"] == pytest.approx(2 * 64 * 2.1)
    assert current["peak"]["bound_gflops"] == pytest.approx(2 * 64 * flops.ASSUMED_MAX_GHZ)
    assert current["floor_gflops"] == 288.0
    assert "peak of 640" in current["candidates"][2]["refused"]
    maximum = floor_with((2.1, "lscpu max MHz"))
    assert maximum["floor_gflops"] == 250.0 and "peak of 269" in maximum["candidates"][0]["refused"]


def test_cpu_peak_arithmetic() -> None:
    """2 Zen 4 cores: 2 x 32 FLOP/cycle x 3.7 GHz; AVX-512 with two full FMA units counts 64; this
    machine's estimate is positive and says how it was made."""
    per_cycle, _ = flops.flops_per_cycle({"avx512f", "avx2", "fma"}, "AuthenticAMD", 0x19)
    assert 2 * per_cycle * 3.7 == pytest.approx(236.8)
    assert flops.flops_per_cycle({"avx512f", "avx2", "fma"}, "GenuineIntel", 6)[0] == 64
    assert flops.flops_per_cycle({"avx512f"}, "AuthenticAMD", 0x1A)[0] == 64
    assert flops.flops_per_cycle({"avx2", "fma"}, "AuthenticAMD", 0x17)[0] == 32
    here = flops.cpu_peak()
    assert here["gflops"] == pytest.approx(here["cores"] * here["flops_per_cycle"] * here["ghz"])
    assert f"{here['cores']} cores" in here["how"]
    assert step.parse_args(["--peak_gflops", "240"]).peak_gflops == 240.0


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------


def test_results_writer_rewrites_a_section_in_place(tmp_path: Path) -> None:
    """bench/RESULTS.md: a script's rerun on a machine replaces that machine's section where it stands;
    other blocks, other machines and the text around them stay; nothing is appended."""
    path = tmp_path / "RESULTS.md"

    def write(key: str, text: str, owner: str = "step") -> None:
        common.write_section(path, owner, key, text, report.INTRO)

    write("cpu-x", "### CPU\nfirst\n")
    text = path.read_text()
    assert "<!-- step:start -->" in text and "<!-- step:end -->" in text and "first" in text
    other = "<!-- replicas:start -->\nreplica numbers\n<!-- replicas:end -->\n"
    path.write_text("# Title\n\nintro\n\n" + text + "\nnotes between\n\n" + other)
    write("gpu-y", "### GPU\ngpu numbers\n")
    write("cpu-x", "### CPU\nsecond\n")
    text = path.read_text()
    assert text.startswith("# Title\n\nintro\n")
    assert text.endswith("\nnotes between\n\n" + other)
    assert "second" in text and "first" not in text and "gpu numbers" in text
    assert text.index("second") < text.index("gpu numbers")  # in place, not moved to the end
    assert text.count("<!-- step:start -->") == 1 and text.count("step:device cpu-x") == 1
    write("cpu-x", "### CPU\nsecond\n")
    assert path.read_text() == text  # rewriting the same section changes nothing
    common.write_section(path, "replicas", "m", "### M\nnew replicas\n", replicas.INTRO)
    text = path.read_text()
    assert "replica numbers" in text and "new replicas" in text and "second" in text


def _fake_results(gpu: bool) -> dict:
    """Results shaped as step.run_benchmark returns them, with made-up numbers."""
    s = {"median": 0.5, "q1": 0.4, "q3": 0.6, "n": 4}
    device = {"kind": "GPU" if gpu else "CPU", "name": "Fake", "cpu": "Fake CPU (2 cores)",
              "cores": 2, "key": "fake"}
    config = step.Config(steps=3, rounds=2, warmup=1, inference_images=300, gemm_sizes=(2048,),
                         gemm_repeats=3, memory_steps=3, min_slow_steps=1, inference_calls=3, thread_rounds=1)
    candidates = [{"library": "NumPy", "n": 4096, "chain": 1, "gflops": 200.0, "error": 5e-7},
                  {"library": "tf.matmul", "n": 4096, "chain": 1, "gflops": 514.0, "error": 5e-7},
                  {"library": "tf.matmul", "n": 2048, "chain": 1, "gflops": 150.0, "error": 8e-3}]
    floor = {"candidates": candidates[1:] if gpu else candidates, "gpu": gpu, "tf32": gpu,
             "tolerance": flops.TF32_TOLERANCE if gpu else flops.FP32_TOLERANCE,
             "peak": None if gpu else flops.cpu_peak(cores=2, override_gflops=240.0)}
    flops.choose_floor(floor)
    return {
        "meta": {"date": "2026-01-01 00:00 UTC", "command": "python bench/step.py --quick",
                 "mode": "quick", "device": device, "tensorflow": "x", "keras": "x", "numpy": "x",
                 "python": "x", "remark": "", "rounds": "2", "config": config.__dict__,
                 "inference_images": 300, "memory_steps": 3},
        "floor": floor,
        "flops": {**flops.analytic_flops(), "graph_train_per_image": 1202.3e6},
        "steps": {name: {**s, "first_call": 1.0, "note": ""} for name in step.VARIANTS},
        "inference": {"product": s, "baseline": {**s, "median": 1.0}},
        "manipulation": {"product": s, "baseline": {**s, "median": 20.0}},
        "memory": {"product": {"peak_rss_mb": 1, "rss_before_build_mb": 1,
                               "rss_after_build_mb": 1, "gpu_peak_mb": None},
                   "baseline": {"error": "timed out"}},
        "threads": [{"label": "default", **s}, {"label": "inter=1, intra=1", "error": "boom"}],
        "errors": {"manipulation": "ValueError: something"},
    }


@pytest.mark.parametrize("gpu", [False, True])
def test_render_every_section(gpu: bool) -> None:
    """The report renders every phase, the floor's candidates (refused ones with the reason), failed
    phases and failed probes without raising."""
    results = _fake_results(gpu)
    text = report.render(results)
    for heading in ("**Floor.**", "**Training step**", "**Inference**",
                    "**Manipulation grid**", "**Peak memory", "**TensorFlow thread settings**",
                    "**Targets**", "**Manipulation grid failed**"):
        assert heading in text
    assert "| manipulation grid speed-up | 4 | >= 20.0x | 40.00x | met |" in text
    assert "| inference speed-up | 4 | >= 1.3x | 2.00x | met |" in text
    assert "refused: error 8.0e-03" in text
    if gpu:
        assert "Floor = tf.matmul n=4096, 514 GFLOP/s" in text and "Theoretical" not in text
    else:
        assert "refused: above the theoretical peak of 240 GFLOP/s" in text
        assert "Theoretical fp32 peak: 240 GFLOP/s" in text
        assert "Floor = NumPy n=4096, 200 GFLOP/s (83% of the peak), i.e. 601 ms per training step" in text
        step_floor = results["flops"]["train_total"] * 100 / 200e9
        assert f"| training step / fp32 floor | 12 | <= 1.3x | {0.5 / step_floor:.2f}x | met |" in text
    partial = _fake_results(gpu)
    for phase in step.PHASES:
        partial.pop(phase)
    assert "**Training step**" not in report.render(partial)


def test_render_without_a_floor() -> None:
    """Every candidate refused: the report says so and gives no 'x floor' ratio or floor target."""
    results = _fake_results(gpu=False)
    for c in results["floor"]["candidates"]:
        c["error"] = 1.0
    flops.choose_floor(results["floor"])
    text = report.render(results)
    assert "**No floor**" in text and "fp32 floor |" not in text
    row = next(line for line in text.splitlines() if line.startswith("| `product` | "))
    assert "| - |" in row


def test_render_replicas() -> None:
    """replicas.py's table: speed-ups against the 1-replica row, failures in place."""
    rows = [{"kind": "cpu", "replicas": 1, "batch": 32, "ms_per_step": 600.0, "samples_per_s": 53.3,
             "strategy": "_DefaultDistributionStrategy"},
            {"kind": "cpu", "replicas": 2, "batch": 32, "ms_per_step": 738.0, "samples_per_s": 43.4,
             "strategy": "MirroredStrategy"},
            {"kind": "gpu", "replicas": 2, "batch": 300, "error": "no | GPU"}]
    text = replicas.render_replicas(rows, "Fake (2 cores)", 2, None, "TensorFlow x, Keras y", "2026-01-01")
    assert "| 1 | 1 CPU device | default (one device) | 32 | 600 | 53.3 | 1.00x |" in text
    assert "| 2 | 2 logical CPU devices | MirroredStrategy | 32 | 738 | 43.4 | 0.81x |" in text
    assert "failed: no / GPU" in text and "same 2 cores" in text


@pytest.mark.slow
def test_replicas_benchmark_runs_both_configurations(tmp_path: Path) -> None:
    """`bench/replicas.py` trains through one device and through `MirroredStrategy` on two logical
    CPUs (its 2-replica row once failed: an optimizer made outside the strategy's scope), and writes
    its section where `--results` says, never into the repository's RESULTS.md here."""
    from conftest import describe, run_script

    results = tmp_path / "RESULTS.md"
    run = run_script("bench/replicas.py", "--steps", "1", "--warmup", "1", "--results", str(results),
                     "--write")
    assert run.returncode == 0, describe(run)
    text = results.read_text()
    assert "| 1 | 1 CPU device | default (one device) |" in text
    assert "| 2 | 2 logical CPU devices | MirroredStrategy |" in text


# ---------------------------------------------------------------------------------------------
# The step's breakdown (bench/layers.py) and the epoch's report (bench/epoch.py)
# ---------------------------------------------------------------------------------------------


def test_breakdown_times_every_part_against_its_floor() -> None:
    """A tiny breakdown (batch 2, one round) times every part of the step, and each floor is the
    part's work at the run's rates: FLOPs at the GEMM rate (counted here by hand) or bytes at the copy
    rate, whichever is slower."""
    result = layers.breakdown(batch=2, rounds=1, gemm_size=256, copy_mb=8)
    rows = {r["part"]: r for r in result["rows"]}
    assert list(rows) == ["conv1", "PrimaryCaps forward", "PrimaryCaps backward-input",
                          "PrimaryCaps backward-weights", "u_hat = W u", "routing", "decoder", "losses",
                          "Adam", "data (one batch + shifts)", "whole step"]
    gemm, copy = result["gemm_gflops"] * 1e9, result["copy_gbytes"] * 1e9
    assert gemm > 0 and copy > 0
    primary = 2 * (2 * 6 * 6) * (9 * 9 * 256) * 256  # [72, 20736] x [20736, 256], one GEMM
    for part in ("PrimaryCaps forward", "PrimaryCaps backward-input", "PrimaryCaps backward-weights"):
        assert rows[part]["floor_ms"] == pytest.approx(primary / gemm * 1e3, rel=1e-9)
    conv1 = 2 * 2 * 2 * (20 * 20 * 256) * (9 * 9 * 1)  # batch 2, forward + kernel gradient, 2 per MAC
    assert rows["conv1"]["floor_ms"] == pytest.approx(conv1 / gemm * 1e3, rel=1e-9)
    adam = 7 * 4 * 8_215_568  # read w, g, m, v and write w, m, v, float32
    assert rows["Adam"]["floor_ms"] == pytest.approx(adam / copy * 1e3, rel=1e-6)
    u_hat = 3 * 2 * 10 * 1152 * 16 * 4  # written once, read twice
    u_hat_flops = 3 * 2 * 10 * 1152 * 16 * 8 * 2  # forward and two gradients
    assert rows["u_hat = W u"]["floor_ms"] == pytest.approx(max(u_hat / copy, u_hat_flops / gemm) * 1e3,
                                                            rel=1e-6)
    assert rows["whole step"]["floor_ms"] == pytest.approx(
        flops.analytic_flops()["train_total"] * 2 / gemm * 1e3, rel=1e-9)
    for name, row in rows.items():
        if "backward" not in name:  # differences of medians; every other part is a time
            assert row["ms"] > 0, name
    text = layers.render_breakdown(result, {"machine": "Fake (2 cores)", "date": "2026-01-01",
                                            "command": "python bench/layers.py", "versions": "x"})
    for name, row in rows.items():
        line = next(line for line in text.splitlines() if line.startswith(f"| {name} |"))
        assert f"| {row['ms'] / row['floor_ms']:.2f}x |" in line


def test_epoch_report_compares_backends_and_the_original() -> None:
    """bench/epoch.py's section: one row per run, each epoch against the TensorFlow CLI's, failures in
    place, and the TensorFlow CLI's speed-up over the original formulation."""
    results = {"tensorflow": {"epoch_s": 20.0, "process_s": 30.0, "accuracy": 0.5},
               "jax": {"epoch_s": 25.0, "process_s": 60.0, "accuracy": 0.25},
               "torch": {"error": "not installed"},
               "original": {"epoch_s": 50.0, "accuracy": 0.125}}
    meta = {"machine": "Fake (2 cores)", "date": "2026-01-01", "command": "python bench/epoch.py --dataset d",
            "versions": "keras x", "train": 2000, "test": 500}
    text = epoch.render(results, meta)
    assert "| CLI on tensorflow | 20 | 1.00x | 30 | 0.5000 |" in text
    assert "| CLI on jax | 25 | 1.25x | 60 | 0.2500 |" in text
    assert "| CLI on torch | failed: not installed |" in text
    assert "| original formulation, `model.fit` (TensorFlow) | 50 | 2.50x | - | 0.1250 |" in text
    assert "over the original formulation's: **2.50x**" in text
    assert "2000 training images = 20 steps of 100" in text


@pytest.mark.slow
def test_epoch_benchmark_runs_without_tensorflow(small_idx_dir: Path, tmp_path: Path) -> None:
    """`bench/epoch.py --backends jax`, the command for a GPU machine that has JAX and no TensorFlow,
    runs the CLI's epoch end to end (here on JAX's CPU, TensorFlow blocked) and rewrites its section
    where `--results` says, the command shown without that path."""
    from conftest import child_env, describe, run_script

    results = tmp_path / "RESULTS.md"
    run = run_script("tests/without_tensorflow.py", "bench/epoch.py", "--dataset", str(small_idx_dir),
                     "--backends", "jax", "--results", str(results), "--write",
                     env=child_env(KERAS_BACKEND="jax"), timeout=600)
    assert run.returncode == 0, describe(run)
    text = results.read_text()
    assert re.search(r"^\| CLI on jax \| \d+ \| - \| \d+ \| \d\.\d{4} \|$", text, re.M), text
    assert "--results" not in text and str(tmp_path) not in text
