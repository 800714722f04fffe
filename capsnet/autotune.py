"""Measured choices: which convolution runs, and whether `--mixed_precision` may use bfloat16.

Both depend on the machine: im2col beats the library convolution on some CPUs and loses on others,
and a CPU without bfloat16 arithmetic emulates it, several times slower than float32. So both are
measured once per machine and cached:

- **The convolution** (`capsnet.layers.Conv2D(implementation="auto")`: im2col or the library's
  convolution). `tune_model` times both candidates, forward + backward, on the layer's real shapes
  (the training batch), dtype policy, machine and backend, keeps the faster, caches the decision and
  prints one line naming it and both times.
- **bfloat16** (`precision_policy`): `--mixed_precision` trains in bfloat16 only where the device
  computes it natively (x86 `avx512_bf16`/`amx_bf16`, Arm `bf16`, NVIDIA compute capability >= 8.0)
  and, on a CPU, where the PrimaryCaps convolution (most of a step's FLOPs) measured faster in
  bfloat16 than in float32. Otherwise one line says why and the run stays float32;
  `--mixed_precision force` insists.

The timing is done by the command line *before the model trains*, never inside a layer's `call`:
`tune_model(model, batch_size)` sets each auto layer's `tuned_implementation`, a runtime attribute
that is not part of `get_config`, so a file saved on one machine still says `"auto"` on another. A
`Conv2D` used outside the CLI never times anything: `"auto"` there follows the static rule
(`capsnet.im2col.im2col_is_default`), and an explicit implementation always wins.

The cache is one JSON file (data, never executed; a corrupt one is ignored with a one-line warning and
rewritten) in `$CAPSNET_CACHE_DIR`, else `$XDG_CACHE_HOME/capsnet-keras`, else
`~/.cache/capsnet-keras`, keyed by everything that can change a decision (`machine.machine_key()`,
the dtype policy, the layer's shapes). `CAPSNET_AUTOTUNE=off` turns the timing off (the static rule
and the native-bfloat16 check only; the test suite sets it).
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import keras

from capsnet import machine
from capsnet.decisions import DecisionCache

ENV_AUTOTUNE = "CAPSNET_AUTOTUNE"
CANDIDATES = ("im2col", "conv")
# Timed calls per candidate after one untimed call: the median of three survives one call slowed by
# other work on a shared machine, and keeps a decision at batch 100 to a few seconds.
ROUNDS = 3
# A candidate this many times slower than another after one round is not timed again.
CLEAR_MARGIN = 2.0
# A first call (compilation included) this many times the other candidate's, and over FIRST_CALL_FLOOR
# seconds, decides without timed rounds: some compilers' convolution backward is that slow on a CPU,
# and a compilation alone is not that much slower than another.
FIRST_CALL_MARGIN = 10.0
FIRST_CALL_FLOOR = 5.0
# The bfloat16 probe times the PrimaryCaps convolution at no more than this batch: the ratio is per
# image, and on a CPU that emulates bfloat16 a full batch takes long.
PROBE_BATCH = 16
BFLOAT16_POLICY = "mixed_bfloat16"
# The x86 and Arm /proc/cpuinfo flags of native bfloat16 arithmetic.
BFLOAT16_CPU_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")

Say = Callable[[str], None]


class Bfloat16Support(NamedTuple):
    """Whether a device computes bfloat16 natively (`native`), its description, and whether it is a
    GPU."""

    native: bool
    device: str
    gpu: bool


def autotune_enabled() -> bool:
    """Whether timing runs may happen (`CAPSNET_AUTOTUNE` is not `0`, `off`, `false` or `no`)."""
    return os.environ.get(ENV_AUTOTUNE, "on").strip().lower() not in ("0", "off", "false", "no")


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


def interleaved_medians(fns: dict[str, Callable[[], Any]], rounds: int = ROUNDS) -> dict[str, float]:
    """Median seconds of each candidate over up to `rounds` interleaved calls (`machine.interleave`,
    after one untimed call each). Stops once one is `CLEAR_MARGIN` times slower than another: more
    calls of a candidate that slow would not change the choice. Where one first call already took
    `FIRST_CALL_MARGIN` times the other's (and over `FIRST_CALL_FLOOR` s), those first calls' seconds
    are returned and the rounds spared: compilation is on both sides, and the slow one cannot win."""

    def decided(timings: machine.Timings) -> bool:
        if not any(timings.samples.values()):
            first = timings.first.values()
            return max(first) > max(FIRST_CALL_MARGIN * min(first), FIRST_CALL_FLOOR)
        medians = timings.medians().values()
        return max(medians) > CLEAR_MARGIN * min(medians)

    timings = machine.interleave(fns, rounds, until=decided)
    return timings.medians() or timings.first


def time_conv_candidates(config: dict, input_shape: tuple[int, ...], input_grad: bool = True,
                         policy: str | None = None, rounds: int = ROUNDS) -> dict[str, float] | None:
    """Seconds of forward + backward of a `capsulelayers.Conv2D` of `config` with each implementation
    (`CANDIDATES`), on fresh layers (the model's own weights are not touched), under dtype `policy`
    (default: the config's). None where this backend has no timer."""
    from capsnet.layers import Conv2D

    with _quiet_retracing():
        return _time_candidates(Conv2D, config, input_shape, input_grad, policy, rounds)


@contextlib.contextmanager
def _quiet_retracing() -> Any:
    """TensorFlow warns when one Python function is traced many times; here each candidate is a new
    `tf.function` on purpose, so that warning would be noise at a user's terminal."""
    if keras.backend.backend() != "tensorflow":
        yield
        return
    import tensorflow as tf

    logger = tf.get_logger()
    level = logger.level
    logger.setLevel("ERROR")
    try:
        yield
    finally:
        logger.setLevel(level)


def _time_candidates(conv2d: type, config: dict, input_shape: tuple[int, ...], input_grad: bool,
                     policy: str | None, rounds: int) -> dict[str, float] | None:
    fns = {}
    for implementation in CANDIDATES:
        layer = conv2d.from_config({**config, "implementation": implementation,
                                    "name": f"autotune_{implementation}",
                                    **({"dtype": policy} if policy else {})})
        layer.build(input_shape)
        fn = machine.layer_step(layer, input_shape, input_grad)
        if fn is None:
            return None
        fns[implementation] = fn
    return interleaved_medians(fns, rounds)


# ---------------------------------------------------------------------------------------------
# The convolution
# ---------------------------------------------------------------------------------------------


def conv_key(config: dict, input_shape: tuple[int, ...], policy: str, input_grad: bool) -> dict[str, Any]:
    """The cache key of one convolution decision: the machine, the dtype policy and the shapes."""
    return {"decision": "conv2d", **machine.machine_key(), "policy": policy,
            "input_shape": [int(d) for d in input_shape], "filters": int(config["filters"]),
            "kernel_size": [int(d) for d in config["kernel_size"]],
            "strides": [int(d) for d in config["strides"]], "use_bias": bool(config["use_bias"]),
            "input_grad": bool(input_grad)}


def choose_conv(name: str, config: dict, input_shape: tuple[int, ...], input_grad: bool = True,
                cache: DecisionCache | None = None,
                timer: Callable[..., dict[str, float] | None] = time_conv_candidates,
                say: Say = print) -> str | None:
    """The faster implementation of one convolution, from the cache or timed once, with one line.

    Args:
        name: the layer's name, for the line.
        config: the layer's `get_config()`.
        input_shape: its input with the batch, e.g. `(100, 20, 20, 256)`.
        input_grad: whether training needs the input's gradient.
        cache: where decisions live (default: the user's cache).
        timer: `timer(config, input_shape, input_grad)` -> seconds by candidate, or None.
        say: where the line goes.

    Returns:
        `"im2col"` or `"conv"`; None where nothing was measured (timing off, or no timer for this
        backend): the layer then follows the static rule.
    """
    if not autotune_enabled():
        return None
    cache = cache or DecisionCache(say=say)
    policy = keras.dtype_policies.get(config.get("dtype") or keras.mixed_precision.global_policy()).name
    key = conv_key(config, input_shape, policy, input_grad)
    record = cache.get(key)
    if record is not None and record.get("choice") in CANDIDATES and isinstance(record.get("seconds"), dict):
        how = f"cached, measured {record.get('measured', '?')}"
    else:
        seconds = timer(config, tuple(input_shape), input_grad)
        if not seconds:
            return None
        record = {"choice": min(seconds, key=seconds.get), "seconds": seconds,
                  "measured": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
        cache.put(key, record)
        how = "timed now"
    choice, seconds = record["choice"], record["seconds"]
    other = "conv" if choice == "im2col" else "im2col"
    label = {"im2col": "im2col", "conv": "library Conv2D"}
    say(f"Convolution {name} ({policy}, batch {input_shape[0]}): {label[choice]}, forward + backward "
        f"{seconds[choice] * 1e3:.0f} ms vs {label[other]} {seconds.get(other, float('nan')) * 1e3:.0f} ms "
        f"({how}; cache {cache.path})")
    return record["choice"]


def tune_model(model: keras.Model, batch_size: int, explicit: str = "auto",
               cache: DecisionCache | None = None,
               timer: Callable[..., dict[str, float] | None] = time_conv_candidates, say: Say = print
               ) -> dict[str, str]:
    """Chooses the implementation of every `capsulelayers.Conv2D` of `model` left on `"auto"`.

    Call it after building the model and before its first step is traced: it sets each such layer's
    `tuned_implementation`, which the layer reads when it is traced. Layers built with an explicit
    implementation are left alone, as are layers where im2col does not apply.

    Args:
        model: the model to train.
        batch_size: its training batch (per device).
        explicit: `"auto"` (measure), or `"im2col"`/`"conv"`, the user's choice, which wins: set
            without timing.
        cache, timer, say: see `choose_conv`.

    Returns:
        the choices by layer name.
    """
    cache = cache or DecisionCache(say=say)
    choices = {}
    for layer, input_shape, input_grad in _auto_layers(model, batch_size):
        if explicit != "auto":
            layer.tuned_implementation = choices[layer.name] = explicit
            continue
        choice = choose_conv(layer.name, layer.get_config(), input_shape, input_grad=input_grad,
                             cache=cache, timer=timer, say=say)
        if choice is not None:
            layer.tuned_implementation = choice
            choices[layer.name] = choice
    return choices


def _auto_layers(model: keras.Model, batch_size: int) -> list[tuple[Any, tuple[int, ...], bool]]:
    """`(layer, input shape with the batch, whether its input needs a gradient)` of every
    `capsnet.layers.Conv2D` of `model` left on `"auto"` where im2col applies."""
    from capsnet.layers import Conv2D

    model_inputs = {id(t) for t in model.inputs}
    return [(layer, (int(batch_size), *(int(d) for d in layer.input.shape[1:])),
             id(layer.input) not in model_inputs)  # the first layer's input needs no gradient
            for layer in model.layers
            if isinstance(layer, Conv2D) and layer.implementation == "auto"
            and layer._im2col_applies(layer.input)]


# Key fields that name the software, not the machine or the layer.
SOFTWARE_FIELDS = frozenset({"backend", "keras", "numpy", "tensorflow", "jax", "torch",
                             "TF_ENABLE_ONEDNN_OPTS"})


def seconds_by_backend(model: keras.Model, batch_size: int, cache: DecisionCache | None = None
                       ) -> dict[str, float]:
    """What the cache holds of `model`'s tuned convolutions on every backend measured on this machine:
    the seconds of the faster candidate, forward + backward, summed over the layers, by backend (only
    backends where every layer was measured, in float32)."""
    cache = cache or DecisionCache()
    best: dict[str, dict[str, float]] = {}  # backend -> layer -> seconds
    layers = _auto_layers(model, batch_size)
    for layer, input_shape, input_grad in layers:
        wanted = conv_key(layer.get_config(), input_shape, "float32", input_grad)
        same = {k: v for k, v in wanted.items() if k not in SOFTWARE_FIELDS}
        for key, record in cache.records():
            if ({k: v for k, v in key.items() if k not in SOFTWARE_FIELDS} == same
                    and isinstance(record.get("seconds"), dict) and record["seconds"]):
                seconds = best.setdefault(str(key.get("backend")), {})
                seconds[layer.name] = min(seconds.get(layer.name, float("inf")), *record["seconds"].values())
    return {backend: sum(by_layer.values()) for backend, by_layer in best.items()
            if len(by_layer) == len(layers)}


def warn_if_slow_backend(model: keras.Model, batch_size: int, say: Say = print) -> None:
    """One line when JAX trains on a CPU, where another backend may be faster. Which one is depends on
    the CPU, so the line states what this machine measured (the model's convolutions, forward +
    backward, from the autotune cache) and stays silent where JAX measured no slower; without such a
    measurement it says how to measure, with no number."""
    if keras.backend.backend() != "jax":
        return
    import jax

    if jax.default_backend() != "cpu":
        return
    measured = seconds_by_backend(model, batch_size)
    if "jax" in measured and "tensorflow" in measured:
        if measured["jax"] > measured["tensorflow"]:
            say(f"Warning: JAX is running on the CPU, where this machine measured the model's "
                  f"convolutions (forward + backward, batch {batch_size}) at {measured['jax'] * 1e3:.0f} ms "
                  f"on JAX against {measured['tensorflow'] * 1e3:.0f} ms on TensorFlow (autotune cache): "
                  "TensorFlow, the default backend, may train faster here (unset KERAS_BACKEND).")
        return
    say("Note: JAX is running on the CPU. Which backend trains fastest on a CPU depends on the CPU: "
          "`python bench/epoch.py --dataset DATA --backends tensorflow jax torch` measures them here.")


# ---------------------------------------------------------------------------------------------
# bfloat16
# ---------------------------------------------------------------------------------------------


def bfloat16_support() -> Bfloat16Support:
    """Whether the device the backend computes on has bfloat16 arithmetic.

    GPUs: NVIDIA compute capability 8.0 or more (Ampere, Hopper and later). CPUs: the /proc/cpuinfo
    flags `avx512_bf16` or `amx_bf16` (x86) or `bf16` (Arm). Elsewhere bfloat16 is converted to and
    from float32 around every operation.
    """
    gpus = machine.accelerators()
    if gpus:
        gpu, capability = gpus[0]["name"], gpus[0]["compute_capability"]
        try:
            native = float(capability) >= 8.0
        except ValueError:  # not reported: not refused (current NVIDIA GPUs all compute bfloat16)
            return Bfloat16Support(True, f"{gpu} (compute capability not reported)", True)
        if native:
            return Bfloat16Support(True, f"{gpu} (compute capability {capability})", True)
        return Bfloat16Support(False, f"{gpu} (compute capability {capability}, below 8.0)", True)
    native = sorted(set(BFLOAT16_CPU_FLAGS) & machine.cpu_flags())
    cpu = machine.cpu_model()
    if native:
        return Bfloat16Support(True, f"{cpu} ({', '.join(native)})", False)
    return Bfloat16Support(False, f"{cpu} (no avx512_bf16 or amx_bf16 in its flags)", False)


def bfloat16_ratio(batch_size: int, cache: DecisionCache | None = None, say: Say = print) -> float | None:
    """bfloat16 time / float32 time of the PrimaryCaps convolution (9x9, stride 2, 256 -> 256 on
    `[batch, 20, 20, 256]`, ~94% of a training step's FLOPs), forward + backward, the faster
    implementation in each precision, at `min(batch_size, PROBE_BATCH)`; cached like the convolution
    decisions. None when timing is off or this backend has no timer."""
    if not autotune_enabled():
        return None
    cache = cache or DecisionCache(say=say)
    batch = min(int(batch_size), PROBE_BATCH)
    input_shape = (batch, 20, 20, 256)
    config = {"filters": 256, "kernel_size": (9, 9), "strides": (2, 2), "padding": "valid"}
    key = {"decision": "bfloat16", **machine.machine_key(), "input_shape": list(input_shape)}
    record = cache.get(key)
    if record is None or not isinstance(record.get("ratio"), (int, float)):
        from capsnet.layers import Conv2D

        full = Conv2D(**config).get_config()
        float32 = time_conv_candidates(full, input_shape, policy="float32", rounds=1)
        bfloat16 = time_conv_candidates(full, input_shape, policy=BFLOAT16_POLICY, rounds=1)
        if not float32 or not bfloat16:
            return None
        record = {"ratio": min(bfloat16.values()) / min(float32.values()), "float32": float32,
                  "bfloat16": bfloat16}
        cache.put(key, record)
    return float(record["ratio"])


def precision_policy(request: str | None, batch_size: int = 100,
                     support: Callable[[], Bfloat16Support] | None = None,
                     ratio: Callable[[int], float | None] | None = None, say: Say = print) -> str:
    """The dtype policy for `--mixed_precision`: `"float32"` or `"mixed_bfloat16"`.

    Args:
        request: None (flag absent: float32), `"auto"` (plain `--mixed_precision`: bfloat16 where it
            is native and, on a CPU, measured faster) or `"force"` (bfloat16 whatever the device).
        batch_size: the training batch (the probe uses at most `PROBE_BATCH` of it).
        support: `() -> Bfloat16Support`, `bfloat16_support` by default.
        ratio: `(batch) -> bfloat16 / float32 time` or None; `bfloat16_ratio` by default. Not called
            on a native GPU, where bfloat16 is not refused.
        say: where the one line goes when bfloat16 is refused.
    """
    if not request:
        return "float32"
    if request == "force":
        return BFLOAT16_POLICY
    native, device, gpu = (support or bfloat16_support)()
    if native and gpu:
        return BFLOAT16_POLICY
    measured = (ratio or bfloat16_ratio)(batch_size)
    how = (f"the bfloat16 PrimaryCaps convolution measured {measured:.2f}x the float32 time"
           if measured is not None else f"not timed ({ENV_AUTOTUNE} is off)")
    if not native:
        say(f"--mixed_precision: {device} has no native bfloat16 arithmetic ({how}): training in float32; "
            "`--mixed_precision force` uses bfloat16 anyway.")
        return "float32"
    if measured is not None and measured > 1.0:
        say(f"--mixed_precision: on {device} {how}: training in float32; `--mixed_precision force` "
            "uses bfloat16 anyway.")
        return "float32"
    if measured is not None:
        say(f"--mixed_precision: bfloat16 on {device} ({how}).")
    return BFLOAT16_POLICY
