"""autotune.py: the convolution decision with the timer mocked both ways, its cache (hits, keys, a
corrupt file), explicit choices, and the `--mixed_precision` guard with the bfloat16 probe mocked.

Timing is switched on here (conftest switches it off for the rest of the suite) and every cache lives
in the test's tmp folder, never in the user's home.
"""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np
import pytest

from capsnet import autotune, decisions, im2col, machine
from capsnet.layers import Conv2D


@pytest.fixture(autouse=True)
def _tmp_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(autotune.ENV_AUTOTUNE, "on")
    monkeypatch.setenv(decisions.ENV_CACHE_DIR, str(tmp_path / "cache"))
    return tmp_path / "cache"


class Timer:
    """A fake `time_conv_candidates`: fixed seconds, and a record of what it was asked to time."""

    def __init__(self, **seconds: float) -> None:
        self.seconds = seconds
        self.calls: list[tuple] = []

    def __call__(self, config: dict, input_shape: tuple, input_grad: bool) -> dict[str, float]:
        self.calls.append((config["name"], input_shape, input_grad))
        return dict(self.seconds)


def small_model(implementation: str = "auto") -> keras.Model:
    """Image `[7, 7, 2]` -> ReLU -> capsulelayers.Conv2D `3x3` stride 2 -> `[3, 3, 4]`."""
    x = keras.Input((7, 7, 2))
    h = keras.layers.ReLU(name="first")(x)
    return keras.Model(x, Conv2D(4, 3, strides=2, implementation=implementation, name="primary")(h))


def traced_ops(model: keras.Model) -> set[str]:
    import tensorflow as tf

    graph = tf.function(model).get_concrete_function(tf.TensorSpec((None, 7, 7, 2))).graph
    return {op.type for op in graph.get_operations()}


@pytest.mark.parametrize("seconds, want, graph_op", [
    ({"im2col": 0.2, "conv": 0.5}, "im2col", "GatherV2"),
    ({"im2col": 0.5, "conv": 0.2}, "conv", "Conv2D"),
])
def test_tune_model_keeps_the_faster_candidate_and_says_so(seconds: dict, want: str, graph_op: str) -> None:
    lines: list[str] = []
    timer = Timer(**seconds)
    model = small_model()
    assert autotune.tune_model(model, batch_size=8, timer=timer, say=lines.append) == {"primary": want}
    # Timed once, on the real shapes (the batch and the layer's input), with the input's gradient
    # (the layer's input is not the model's).
    assert timer.calls == [("primary", (8, 7, 7, 2), True)]
    layer = model.get_layer("primary")
    assert layer.tuned_implementation == want
    used = traced_ops(model)  # the traced model runs the chosen convolution, not the other
    assert graph_op in used and ({"GatherV2", "Conv2D"} - {graph_op}).isdisjoint(used)
    # Files say "auto" whichever implementation ran.
    assert layer.get_config()["implementation"] == "auto"
    # One line, naming the choice and both times.
    assert len(lines) == 1
    assert "200 ms" in lines[0] and "500 ms" in lines[0] and "timed now" in lines[0]
    assert lines[0].split(": ")[1].startswith("im2col" if want == "im2col" else "library Conv2D")


def test_a_cached_decision_is_not_timed_again(_tmp_cache: Path) -> None:
    timer = Timer(im2col=0.5, conv=0.2)
    autotune.tune_model(small_model(), 8, timer=timer, say=lambda line: None)
    assert len(timer.calls) == 1
    record = json.loads((_tmp_cache / decisions.CACHE_FILE).read_text())
    assert record["version"] == decisions.CACHE_VERSION
    assert [e["choice"] for e in record["entries"].values()] == ["conv"]

    lines: list[str] = []
    second = Timer(im2col=0.1, conv=9.0)  # would choose im2col if it were asked
    model = small_model()
    assert autotune.tune_model(model, 8, timer=second, say=lines.append) == {"primary": "conv"}
    assert second.calls == []
    assert len(lines) == 1 and "cached" in lines[0] and "200 ms" in lines[0]
    # Another batch is another shape: timed.
    autotune.tune_model(small_model(), 16, timer=second, say=lambda line: None)
    assert [c[1] for c in second.calls] == [(16, 7, 7, 2)]


def test_the_cache_key_changes_with_the_backend_and_the_dtype_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    config = Conv2D(4, 3, strides=2, name="primary").get_config()
    timer = Timer(im2col=0.2, conv=0.5)
    quiet = {"timer": timer, "say": lambda line: None}
    autotune.choose_conv("primary", config, (8, 7, 7, 2), **quiet)
    autotune.choose_conv("primary", config, (8, 7, 7, 2), **quiet)
    assert len(timer.calls) == 1
    bfloat16 = Conv2D(4, 3, strides=2, name="primary", dtype="mixed_bfloat16").get_config()
    autotune.choose_conv("primary", bfloat16, (8, 7, 7, 2), **quiet)
    assert len(timer.calls) == 2
    versions = machine.backend_versions()
    monkeypatch.setattr(machine, "backend_versions", lambda: {**versions, "backend": "jax", "jax": "0.10.2"})
    autotune.choose_conv("primary", config, (8, 7, 7, 2), **quiet)
    assert len(timer.calls) == 3
    float32_key = autotune.conv_key(config, (8, 7, 7, 2), "float32", True)
    assert float32_key != autotune.conv_key(config, (8, 7, 7, 2), "mixed_bfloat16", True)
    assert float32_key["backend"] == "jax" and float32_key["cpu"]  # the machine is in the key


@pytest.mark.parametrize("content", [
    b"__import__('pathlib').Path('MARKER').write_text('executed')",  # Python, not JSON
    b'{"version": 1, "entries": [1, 2]}',  # JSON of another shape
    b"\x00\xff\xfe not UTF-8",
])
def test_a_corrupt_cache_is_ignored_with_one_line_and_rewritten(content: bytes, _tmp_cache: Path,
                                                                tmp_path: Path) -> None:
    marker = tmp_path / "executed"
    _tmp_cache.mkdir()
    cache_file = _tmp_cache / decisions.CACHE_FILE
    cache_file.write_bytes(content.replace(b"MARKER", str(marker).encode()))
    lines: list[str] = []
    timer = Timer(im2col=0.2, conv=0.5)
    assert autotune.tune_model(small_model(), 8, timer=timer, say=lines.append) == {"primary": "im2col"}
    assert not marker.exists()
    assert len(timer.calls) == 1
    warnings = [line for line in lines if line.startswith("Warning")]
    assert len(warnings) == 1 and str(cache_file) in warnings[0] and "\n" not in warnings[0]
    assert json.loads(cache_file.read_text())["version"] == decisions.CACHE_VERSION  # rewritten, valid


def test_an_explicit_choice_wins_without_timing() -> None:
    timer = Timer(im2col=0.2, conv=0.5)
    model = small_model()
    assert autotune.tune_model(model, 8, explicit="conv", timer=timer, say=print) == {"primary": "conv"}
    assert timer.calls == [] and "GatherV2" not in traced_ops(model)
    # A layer built with an explicit implementation is not tuned either.
    fixed = small_model("conv")
    assert autotune.tune_model(fixed, 8, timer=timer, say=print) == {}
    assert timer.calls == [] and fixed.get_layer("primary").tuned_implementation is None


def test_timing_off_leaves_the_static_rule(monkeypatch: pytest.MonkeyPatch, _tmp_cache: Path) -> None:
    monkeypatch.setenv(autotune.ENV_AUTOTUNE, "off")
    timer = Timer(im2col=0.5, conv=0.2)
    model = small_model()
    assert autotune.tune_model(model, 8, timer=timer, say=print) == {}
    assert timer.calls == [] and not _tmp_cache.exists()
    assert model.get_layer("primary").tuned_implementation is None


def test_the_real_timer_times_both_candidates_forward_and_backward() -> None:
    config = Conv2D(4, 3, strides=2).get_config()
    seconds = autotune.time_conv_candidates(config, (2, 9, 9, 3), rounds=1)
    assert set(seconds) == {"im2col", "conv"} and all(0 < s < 60 for s in seconds.values())


def test_a_layer_outside_the_cli_never_times() -> None:
    """`Conv2D(implementation="auto")` on its own follows the static rule: no timing in `call`."""
    layer = Conv2D(4, 3, strides=2)
    x = np.random.default_rng(0).standard_normal((2, 9, 9, 3)).astype("float32")
    assert layer(x).shape == (2, 4, 4, 4)
    assert layer.tuned_implementation is None
    assert layer._uses_im2col(x) == im2col.im2col_is_default()


# ---------------------------------------------------------------------------------------------
# --mixed_precision
# ---------------------------------------------------------------------------------------------

NATIVE_CPU = autotune.Bfloat16Support(True, "Xeon (amx_bf16, avx512_bf16)", False)
EMULATED_CPU = autotune.Bfloat16Support(False, "EPYC (no avx512_bf16 or amx_bf16 in its flags)", False)


def test_native_bfloat16_that_measured_faster_is_used() -> None:
    lines: list[str] = []
    policy = autotune.precision_policy("auto", 100, support=lambda: NATIVE_CPU, ratio=lambda batch: 0.6,
                                       say=lines.append)
    assert policy == "mixed_bfloat16"
    assert len(lines) == 1 and "0.60x" in lines[0]


def test_emulated_bfloat16_trains_in_float32_and_says_so_with_the_ratio() -> None:
    lines: list[str] = []
    asked: list[int] = []
    policy = autotune.precision_policy("auto", 100, support=lambda: EMULATED_CPU,
                                       ratio=lambda batch: asked.append(batch) or 5.8, say=lines.append)
    assert policy == "float32" and asked == [100]
    assert len(lines) == 1
    assert "EPYC" in lines[0] and "5.80x" in lines[0] and "float32" in lines[0] and "force" in lines[0]


T4_GPU = autotune.Bfloat16Support(False, "Tesla T4 (compute capability 7.5, below 8.0)", True)


@pytest.mark.parametrize("device", [EMULATED_CPU, T4_GPU], ids=["emulating-cpu", "t4-like-gpu"])
@pytest.mark.parametrize("measured", [0.5, None], ids=["measured-faster", "not-measured"])
def test_a_device_without_native_bfloat16_trains_in_float32_whatever_was_measured(
        device: autotune.Bfloat16Support, measured: float | None) -> None:
    """The rule is "bfloat16 only where it is native": a device that emulates it gets float32 and one
    line even where the probe measured bfloat16 faster (0.5x) or measured nothing (autotune off)."""
    for _ in range(2):  # every time, not only the first
        lines: list[str] = []
        assert autotune.precision_policy("auto", 100, support=lambda: device, ratio=lambda batch: measured,
                                         say=lines.append) == "float32"
        assert len(lines) == 1
        assert device.device in lines[0] and "no native bfloat16" in lines[0] and "force" in lines[0]
        assert ("0.50x" in lines[0]) == (measured is not None)


def test_native_bfloat16_not_measured_is_used_without_a_line() -> None:
    """A native CPU with autotune off (no ratio) keeps bfloat16, as asked; nothing to report."""
    lines: list[str] = []
    assert autotune.precision_policy("auto", 100, support=lambda: NATIVE_CPU, ratio=lambda batch: None,
                                     say=lines.append) == "mixed_bfloat16"
    assert lines == []


def test_native_but_slower_bfloat16_trains_in_float32() -> None:
    lines: list[str] = []
    assert autotune.precision_policy("auto", 100, support=lambda: NATIVE_CPU, ratio=lambda batch: 1.4,
                                     say=lines.append) == "float32"
    assert len(lines) == 1 and "1.40x" in lines[0]


def test_forced_bfloat16_and_native_gpus_are_not_probed() -> None:
    def never(*args: object) -> object:
        raise AssertionError("probed")

    assert autotune.precision_policy("force", 100, support=never, ratio=never, say=never) == "mixed_bfloat16"
    gpu = autotune.Bfloat16Support(True, "NVIDIA H100 (compute capability 9.0)", True)
    assert autotune.precision_policy("auto", 100, support=lambda: gpu, ratio=never,
                                     say=never) == "mixed_bfloat16"
    assert autotune.precision_policy(None, 100, support=never, ratio=never, say=never) == "float32"


def test_cpu_flags_decide_native_bfloat16(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(machine, "accelerators", lambda: [])
    monkeypatch.setattr(machine, "cpu_flags", lambda: {"avx2", "fma", "avx512f"})
    assert not autotune.bfloat16_support().native
    monkeypatch.setattr(machine, "cpu_flags", lambda: {"avx2", "amx_bf16"})
    assert autotune.bfloat16_support().native
    monkeypatch.setattr(machine, "accelerators", lambda: [{"name": "Tesla T4", "compute_capability": "7.5"}])
    assert autotune.bfloat16_support() == (False, "Tesla T4 (compute capability 7.5, below 8.0)", True)
    monkeypatch.setattr(machine, "accelerators", lambda: [{"name": "H100", "compute_capability": "9.0"}])
    assert autotune.bfloat16_support() == (True, "H100 (compute capability 9.0)", True)


@pytest.mark.parametrize("flag, emulated, want", [
    ([], False, "float32"),  # no flag: the policy is not touched
    (["--mixed_precision"], False, "mixed_bfloat16"),
    (["--mixed_precision"], True, "float32"),
    (["--mixed_precision", "force"], True, "mixed_bfloat16"),
])
def test_the_cli_flag_goes_through_the_guard(flag: list[str], emulated: bool, want: str, small_npz: Path,
                                             monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture) -> None:
    import capsulenet

    monkeypatch.setattr(autotune, "bfloat16_support", lambda: EMULATED_CPU if emulated else NATIVE_CPU)
    monkeypatch.setattr(autotune, "bfloat16_ratio", lambda batch, **kw: 7.25 if emulated else 0.5)
    args = capsulenet.build_parser().parse_args(["--dataset", str(small_npz), *flag])
    capsulenet.setup(args)
    assert keras.mixed_precision.global_policy().name == want
    printed = capsys.readouterr().out
    assert ("7.25x" in printed) == (emulated and flag == ["--mixed_precision"])


def test_timing_stops_once_the_choice_is_clear(monkeypatch: pytest.MonkeyPatch) -> None:
    """Medians over rotated rounds, on a fake clock; a candidate 2x slower after a round is not called
    again (XLA's CPU convolution backward takes seconds per call), a close race gets every round."""
    clock = [0.0]
    calls: dict[str, int] = {}
    monkeypatch.setattr(machine.time, "perf_counter", lambda: clock[0])

    def costs(name: str, seconds: list[float]) -> object:
        def run() -> None:
            calls[name] = calls.get(name, 0) + 1
            clock[0] += seconds[min(calls[name], len(seconds)) - 1]
        return run

    # first call (untimed), then 2.0, 3.0, 1.0 s: median 2.0; never 2x apart after a round
    close = {"im2col": costs("im2col", [9.0, 2.0, 3.0, 1.0]), "conv": costs("conv", [9.0, 2.5])}
    assert autotune.interleaved_medians(close, rounds=3) == {"im2col": 2.0, "conv": 2.5}
    assert calls == {"im2col": 4, "conv": 4}
    calls.clear()
    clear = {"im2col": costs("im2col", [9.0, 1.0]), "conv": costs("conv", [9.0, 2.5])}
    assert autotune.interleaved_medians(clear, rounds=3) == {"im2col": 1.0, "conv": 2.5}
    assert calls == {"im2col": 2, "conv": 2}
    calls.clear()
    # a first call 40 s against 2 s (XLA's CPU convolution backward): decided without timed rounds
    hopeless = {"im2col": costs("im2col", [2.0, 1.0]), "conv": costs("conv", [40.0, 38.0])}
    assert autotune.interleaved_medians(hopeless, rounds=3) == {"im2col": 2.0, "conv": 40.0}
    assert calls == {"im2col": 1, "conv": 1}
    calls.clear()
    # 10x apart but both short (compilation): timed as usual
    quick = {"im2col": costs("im2col", [0.4, 1.0]), "conv": costs("conv", [4.0, 1.5])}
    assert autotune.interleaved_medians(quick, rounds=3) == {"im2col": 1.0, "conv": 1.5}
    assert calls == {"im2col": 4, "conv": 4}


def test_seconds_by_backend_reads_this_machines_decisions_of_every_backend(tmp_path: Path) -> None:
    """The convolution's best time per backend, for this machine, layer shapes and float32 only."""
    model = small_model()
    cache = decisions.DecisionCache(tmp_path / "decisions.json", say=lambda line: None)
    key = autotune.conv_key(model.get_layer("primary").get_config(), (8, 7, 7, 2), "float32", True)
    cache.put(key, {"choice": "im2col", "seconds": {"im2col": 0.2, "conv": 0.5}})
    cache.put({**key, "backend": "jax", "jax": "0.10.2"}, {"choice": "conv", "seconds": {"im2col": 0.9,
                                                                                         "conv": 0.7}})
    torch = {"choice": "conv", "seconds": {"conv": 0.1}}
    cache.put({**key, "backend": "torch", "cpu": "another CPU"}, torch)
    cache.put({**key, "backend": "torch", "policy": "mixed_bfloat16"}, torch)
    cache.put({**key, "backend": "torch", "input_shape": [16, 7, 7, 2]}, torch)
    assert autotune.seconds_by_backend(model, 8, cache) == {key["backend"]: 0.2, "jax": 0.7}
    assert autotune.seconds_by_backend(model, 16, cache) == {"torch": 0.1}


@pytest.mark.parametrize("measured, want", [
    ({"jax": 0.9, "tensorflow": 0.3}, "900 ms on JAX against 300 ms on TensorFlow"),
    ({"jax": 0.2, "tensorflow": 0.3}, None),  # JAX measured faster here: nothing to warn about
    ({"jax": 0.2}, "bench/epoch.py"),  # nothing to compare: how to measure, no number
])
def test_jax_on_a_cpu_states_what_this_machine_measured_or_no_number(
        measured: dict, want: str | None, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    import re

    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    monkeypatch.setattr(autotune, "seconds_by_backend", lambda model, batch: measured)
    autotune.warn_if_slow_backend(None, 100)
    printed = capsys.readouterr().out
    if want is None:
        assert printed == ""
    else:
        assert want in printed and printed.count("\n") == 1
    if "tensorflow" not in measured:
        assert not re.search(r"\d", printed)
