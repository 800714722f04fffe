"""How much arithmetic CapsNet does, and how fast this machine can do arithmetic at all: the floor.

- `analytic_flops`: FLOPs per image of CapsNet's forward pass and training step, from the architecture
  (1,202.3 MFLOP per MNIST training image: 120.2 GFLOP per batch-100 step).
- `graph_flops`: the same counted on a traced TensorFlow function (the product's training step), as an
  independent check of the formulas.
- `measure_floor`: the best fp32 matrix product this machine reaches (NumPy's and TensorFlow's, several
  sizes and repeats). Every timed product is checked against a float64 NumPy product, so a timing that
  skipped work, or ran in reduced precision, cannot become the floor; and every rate is compared with
  the CPU's theoretical peak (`cpu_peak`): a rate above it is a timing artefact and is refused.
- `memory_bandwidth`: the best rate at which NumPy copies a large array, the floor of the parts of a
  step that only move data (Adam's update, the losses, the batches).

A training step's floor is then `analytic_flops()['train_total'] * batch / floor_gflops`.

Usage::

    import flops

    per_image = flops.analytic_flops()                      # {'forward': {...}, 'train_total': ...}
    traced = flops.graph_flops(steps.train_step.get_concrete_function(x, y))   # {'Conv2D': ...}
    floor = flops.measure_floor(sizes=(2048, 4096), repeats=3, gpu=False)
    print(floor['floor_gflops'], floor['peak']['gflops'])
"""

from __future__ import annotations

import math
import re
import subprocess
import time
from collections.abc import Callable, Sequence
from typing import Any

import common
import numpy as np

from capsnet import machine

# ---------------------------------------------------------------------------------------------
# CapsNet's FLOPs
# ---------------------------------------------------------------------------------------------


def conv_macs(in_hw: int, kernel: int, stride: int, c_in: int, c_out: int) -> tuple[int, int]:
    """Multiply-adds of a square 'valid' convolution per image, and its output size."""
    out_hw = (in_hw - kernel) // stride + 1
    return out_hw * out_hw * c_out * kernel * kernel * c_in, out_hw


def analytic_flops(input_shape: Sequence[int] = common.INPUT_SHAPE, n_class: int = common.N_CLASS,
                   routings: int = common.ROUTINGS) -> dict[str, Any]:
    """FLOPs per image of CapsNet (2 per multiply-add; matmul-like operations only).

    Counts conv1, the PrimaryCaps conv, `u_hat`, the routing contractions (`s = sum c u_hat` each
    iteration, the agreement `v . u_hat` in all but the last) and the decoder's three Dense layers.
    Training = forward + gradient w.r.t. the inputs + gradient w.r.t. the weights, each as costly
    as the forward, except: conv1 needs no input gradient (the image), and the first routing
    iteration's coupling coefficients are the constant softmax(0) = 1/n_class, so no gradient is
    computed for them. `train_total_all_couplings` keeps that last term (1202.6 MFLOP per MNIST
    image), as a count that ignores the constant would.

    Args:
        input_shape: `[rows, cols, channels]` (square images).

    Returns:
        `{'forward': {part: flops}, 'train': {part: flops}, 'forward_total', 'train_total',
        'train_total_all_couplings'}` per image.
    """
    rows, _, channels = (int(d) for d in input_shape)
    conv1, hw1 = conv_macs(rows, 9, 1, channels, 256)
    primary, hw2 = conv_macs(hw1, 9, 2, 256, 256)
    n_primary = hw2 * hw2 * 32  # 8-dimensional capsules, 32 types
    u_hat = n_class * n_primary * 16 * 8
    weighted_sum = n_class * n_primary * 16  # s_j = sum_i c_ij u_hat_ij, one iteration
    agreement = n_class * n_primary * 16  # b_ij += u_hat_ij . v_j
    decoder = 16 * n_class * 512 + 512 * 1024 + 1024 * rows * rows * channels
    forward = {
        "conv1": 2 * conv1,
        "primarycaps": 2 * primary,
        "u_hat": 2 * u_hat,
        "routing": 2 * (routings * weighted_sum + (routings - 1) * agreement),
        "decoder": 2 * decoder,
    }
    train = {part: 3 * flops for part, flops in forward.items()}
    train["conv1"] -= forward["conv1"]  # no gradient w.r.t. the input image
    train_total_all_couplings = sum(train.values())
    train["routing"] -= 2 * weighted_sum  # d/dc of the first iteration: c is a constant
    return {
        "forward": forward,
        "train": train,
        "forward_total": sum(forward.values()),
        "train_total": sum(train.values()),
        "train_total_all_couplings": train_total_all_couplings,
    }


def _einsum_flops(op: Any) -> int:
    """2 x the product of every index's size: the multiply-adds of a contraction."""
    equation = op.get_attr("equation").decode()
    inputs, _ = equation.split("->")
    sizes: dict[str, int] = {}
    for letters, tensor in zip(inputs.split(","), op.inputs, strict=True):
        for letter, dim in zip(letters, tensor.shape.as_list(), strict=True):
            sizes[letter] = int(dim)
    return 2 * math.prod(sizes.values())


def _conv_backprop_flops(op: Any) -> int:
    """A convolution's gradient costs its forward: 2 x output elements x kernel volume.

    `Conv2DBackpropInput(input_sizes, filter, out_backprop)` reads the filter shape from its
    operand, `Conv2DBackpropFilter(input, filter_sizes, out_backprop)` from its output.
    """
    filter_tensor = op.outputs[0] if op.type == "Conv2DBackpropFilter" else op.inputs[1]
    filter_shape = filter_tensor.shape.as_list()
    out_backprop = op.inputs[2].shape.as_list()
    return 2 * math.prod(out_backprop) * math.prod(filter_shape[:3])


def _batch_matmul_flops(op: Any) -> int:
    """2 x output elements x the contracted size, which `adj_x` moves to the first operand's
    second-to-last axis (TensorFlow's registered count reads its last axis whatever `adj_x` says)."""
    x_shape = op.inputs[0].shape.as_list()
    contracted = x_shape[-2] if op.get_attr("adj_x") else x_shape[-1]
    return 2 * math.prod(op.outputs[0].shape.as_list()) * int(contracted)


def _live_ops(graph: Any) -> set[str]:
    """Names of the ops that a function's outputs or side effects depend on (dead code is pruned
    by TensorFlow before running, e.g. the gradient w.r.t. the input image)."""
    stack = [t.op for t in graph.outputs] + list(graph.control_outputs)
    seen: set[str] = set()
    while stack:
        op = stack.pop()
        if op.name not in seen:
            seen.add(op.name)
            stack.extend(t.op for t in op.inputs)
            stack.extend(op.control_inputs)
    return seen


def graph_flops(concrete_function: Any) -> dict[str, int]:
    """FLOPs of the live matmul-like ops of a traced TensorFlow function, by op type.

    `Conv2D` and `MatMul` use TensorFlow's own registered counts; `BatchMatMul` (whose registered count
    ignores `adj_x`) and `Einsum` (which has none) from their shapes and equation; the conv gradients
    from their operand shapes (TensorFlow's registered count for them ignores the stride).

    Raises:
        ValueError: the graph holds a loop (`map_fn`), whose trip count a static count cannot know.
    """
    from tensorflow.python.framework import ops as tf_ops
    from tensorflow.python.util import deprecation

    graph = concrete_function.graph
    live = _live_ops(graph)
    totals: dict[str, int] = {}
    for op in graph.get_operations():
        if op.name not in live:
            continue
        if op.type in ("While", "StatelessWhile"):
            raise ValueError("graph_flops cannot count loops; trace a graph without map_fn")
        if op.type == "Einsum":
            flops = _einsum_flops(op)
        elif op.type in ("Conv2DBackpropInput", "Conv2DBackpropFilter"):
            flops = _conv_backprop_flops(op)
        elif op.type in ("BatchMatMulV2", "BatchMatMulV3"):
            flops = _batch_matmul_flops(op)
        elif op.type in ("Conv2D", "MatMul"):
            with deprecation.silence():  # the registered counters use a TF1 shape helper
                flops = int(tf_ops.get_stats_for_node_def(graph, op.node_def, "flops").value)
        else:
            continue
        totals[op.type] = totals.get(op.type, 0) + flops
    return totals


# ---------------------------------------------------------------------------------------------
# The CPU's theoretical peak
# ---------------------------------------------------------------------------------------------

# How `cpu_clock_ghz` marks a clock that is no maximum (nominal or current): boost runs above it.
BOOST_CAVEAT = "boost may exceed it"

# Above this clock no CPU core runs: the bound used when the machine reports no clock at all (virtual
# machines often hide it), so that the peak stays an upper bound.
ASSUMED_MAX_GHZ = 5.0


def flops_per_cycle(flags: set[str], vendor: str, family: int) -> tuple[int, str]:
    """fp32 FLOPs one core can start per cycle, an upper bound, and why.

    2 FMA units x SIMD lanes x 2 FLOPs per FMA: AVX2 (8 lanes) gives 32; AVX-512 (16 lanes) gives 64 on
    cores with two full 512-bit FMA units (Intel's server cores, AMD Zen 5), but Zen 4 (AMD family
    0x19) runs AVX-512 on its 256-bit units, so 32. Intel parts with one 512-bit FMA unit reach half
    of 64; the bound stays an upper bound, which is what refusing a measured rate needs.
    """
    if "avx512f" in flags:
        if vendor == "AuthenticAMD" and family < 0x1A:
            return 32, "AVX-512 on 256-bit units (AMD Zen 4): 2 FMA x 8 lanes x 2"
        return 64, "AVX-512: 2 FMA x 16 lanes x 2"
    if "avx2" in flags and "fma" in flags:
        return 32, "AVX2: 2 FMA x 8 lanes x 2"
    if "avx" in flags:
        return 16, "AVX: 8-lane add + 8-lane multiply"
    return 8, "SSE: 4-lane add + 4-lane multiply"


def cpu_clock_ghz() -> tuple[float, str]:
    """The fastest clock a core may run at, in GHz, and where it came from.

    In order: `lscpu`'s "CPU max MHz", cpufreq's `cpuinfo_max_freq`, the "@ 3.70GHz" of the model name
    (nominal: boost may exceed it), /proc/cpuinfo's "cpu MHz" (the current clock), else
    `ASSUMED_MAX_GHZ`. Only the first two and the last are maxima (`clock_is_a_maximum`).
    """
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    match = re.search(r"^CPU max MHz:\s*([\d.]+)", out, re.MULTILINE)
    if match and float(match.group(1)) > 0:
        return float(match.group(1)) / 1000, "lscpu max MHz"
    try:
        with open("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq") as f:
            return int(f.read()) / 1e6, "cpufreq max"
    except (OSError, ValueError):
        pass
    info = machine.cpu_fields()
    match = re.search(r"@\s*([\d.]+)\s*GHz", info.get("model name", ""))
    if match:
        return float(match.group(1)), f"model name (nominal; {BOOST_CAVEAT})"
    if info.get("cpu MHz"):
        return float(info["cpu MHz"]) / 1000, f"/proc/cpuinfo cpu MHz (current; {BOOST_CAVEAT})"
    return ASSUMED_MAX_GHZ, f"none reported; {ASSUMED_MAX_GHZ:g} GHz assumed as an upper bound"


def clock_is_a_maximum(how: str) -> bool:
    """Whether `cpu_clock_ghz`'s clock (by its `how`) bounds every core's clock: a nominal or current
    clock does not (boost runs above it)."""
    return BOOST_CAVEAT not in how


def cpu_peak(cores: int | None = None, override_gflops: float | None = None) -> dict[str, Any]:
    """The theoretical fp32 peak of the cores this process may use: cores x FLOPs/cycle x clock.

    For example, 2 AMD Zen 4 cores x 32 FLOP/cycle x 3.7 GHz = 237 GFLOP/s.

    Args:
        cores: default: the cores this process may run on.
        override_gflops: a peak known better than this estimate (`--peak_gflops`).

    Returns:
        `{'gflops', 'bound_gflops', 'cores', 'flops_per_cycle', 'ghz', 'how'}`; `how` states the
        assumptions. `bound_gflops`, what a measured rate is refused above, is `gflops` when the clock
        is a maximum, else the peak at `ASSUMED_MAX_GHZ`: a product measured faster than a nominal or
        current clock allows ran under boost, and refusing it would make the floor slower than the
        machine (and every ratio to it look better than it is).
    """
    cores = cores or machine.cpu_cores()
    if override_gflops:
        return {"gflops": float(override_gflops), "bound_gflops": float(override_gflops), "cores": cores,
                "flops_per_cycle": None, "ghz": None, "how": "given with --peak_gflops"}
    info = machine.cpu_fields()
    family = int(info.get("cpu family", "0") or 0)
    per_cycle, why = flops_per_cycle(set(info.get("flags", "").split()), info.get("vendor_id", ""),
                                     family)
    ghz, clock = cpu_clock_ghz()
    bound_ghz = ghz if clock_is_a_maximum(clock) else max(ghz, ASSUMED_MAX_GHZ)
    return {"gflops": cores * per_cycle * ghz, "bound_gflops": cores * per_cycle * bound_ghz,
            "cores": cores, "flops_per_cycle": per_cycle, "ghz": ghz,
            "how": f"{cores} cores x {per_cycle} FLOP/cycle ({why}) x {ghz:.2f} GHz (clock: {clock})"}


# ---------------------------------------------------------------------------------------------
# The floor: the best verified fp32 matrix product
# ---------------------------------------------------------------------------------------------

# Largest error of a timed product against float64, relative to the largest entry: fp32 accumulation
# stays near 1e-6 at these sizes; bfloat16 or TF32 inputs are near 1e-3.
FP32_TOLERANCE = 2e-5
TF32_TOLERANCE = 5e-3
CHECKED_ROWS = 16  # rows of each product recomputed in float64


def _relative_error(rows: np.ndarray, reference: np.ndarray) -> float:
    return float(np.abs(rows - reference).max() / np.abs(reference).max())


def check_fp32_product(rows: np.ndarray, reference: np.ndarray, what: str = "tf.matmul") -> None:
    """Refuses a product to be timed as a floor whose checked `rows` differ from their float64
    `reference` by more than float32 accumulation explains (work skipped, or reduced precision).

    Raises:
        RuntimeError: naming `what` and the relative error.
    """
    error = _relative_error(rows, reference)
    if not error < FP32_TOLERANCE:
        raise RuntimeError(f"{what} differs from NumPy (float64) by {error:.2e} (relative), above the "
                           f"float32 tolerance {FP32_TOLERANCE:g}: not a floor")


def _gemm_candidate(library: str, n: int, run: Callable[[Any, np.ndarray], np.ndarray], repeats: int,
                    chain: int, b: np.ndarray, rng: np.random.Generator,
                    prepare: Callable[[np.ndarray], Any] = lambda a: a) -> dict[str, Any]:
    """Times `run(prepare(a), rows)`: `chain` products `a @ b @ b ...` returning the result's `rows`,
    on a fresh `a` each repeat (so that nothing can be cached), and checks every result in float64.

    Returns:
        `{'library', 'n', 'chain', 'gflops' (best repeat), 'error'}` (`error`: the worst repeat's
        largest deviation from float64, relative to the largest entry).
    """
    rows = rng.choice(n, CHECKED_ROWS, replace=False)
    b64 = b.astype(np.float64)
    best, worst_error = math.inf, 0.0
    for i in range(repeats + 1):  # the first call starts thread pools (and traces): not timed
        a = rng.standard_normal((n, n), dtype=np.float32)
        operand = prepare(a)  # e.g. copied to the device, before the clock starts
        start = time.perf_counter()
        result = run(operand, rows)
        seconds = time.perf_counter() - start
        reference = a[rows].astype(np.float64)
        for _ in range(chain):
            reference = reference @ b64
        worst_error = max(worst_error, _relative_error(result, reference))
        if i > 0:
            best = min(best, seconds)
    return {"library": library, "n": n, "chain": chain,
            "gflops": 2 * n**3 * chain / best / 1e9, "error": worst_error}


def numpy_gemm(n: int, repeats: int, rng: np.random.Generator) -> dict[str, Any]:
    """Best GFLOP/s of a float32 `n x n` NumPy product (its BLAS, every core) over `repeats`."""
    b = rng.standard_normal((n, n), dtype=np.float32)
    return _gemm_candidate("NumPy", n, lambda a, rows: (a @ b)[rows], repeats, 1, b, rng)


def tf_gemm(n: int, repeats: int, rng: np.random.Generator, chain: int = 1) -> dict[str, Any]:
    """Best GFLOP/s of a float32 `n x n` `tf.matmul` on TensorFlow's default device.

    `chain` dependent products run in one `tf.function` (a GPU's launch latency amortised; grappler
    cannot merge them); the inputs are arguments, not captured constants, so nothing is folded at
    trace time; reading the checked rows back waits for the device.
    """
    import tensorflow as tf

    # Scaled so that a chain of products keeps its entries near 1 (no overflow, same relative error).
    b = (rng.standard_normal((n, n), dtype=np.float32) / np.float32(math.sqrt(n)))
    b_tensor = tf.constant(b)

    @tf.function
    def product(a: Any, b: Any, rows: Any) -> Any:
        for _ in range(chain):
            a = tf.matmul(a, b)
        return tf.gather(a, rows)

    def run(a: Any, rows: np.ndarray) -> np.ndarray:
        return product(a, b_tensor, tf.constant(rows)).numpy()

    return _gemm_candidate("tf.matmul", n, run, repeats, chain, b, rng, prepare=tf.constant)


def measure_floor(sizes: Sequence[int], repeats: int, gpu: bool, tf32: bool = False,
                  peak: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every (library, size) candidate for the floor, checked, and the floor chosen among them.

    On a GPU only `tf.matmul` on the GPU counts (it is what trains) and no CPU peak applies; on a CPU
    NumPy's and TensorFlow's both count.

    Args:
        sizes: matrix sizes `n` to try.
        repeats: timed products per candidate (the best counts).
        gpu: whether TensorFlow's default device is a GPU.
        tf32: whether TensorFlow may use TF32 for fp32 products there (its default on Ampere and
            later, as in training): the check then allows TF32's error.
        peak: `cpu_peak()` (default: computed here); ignored on a GPU.

    Returns:
        `{'candidates': [...], 'peak', 'tolerance', 'gpu', ...}` with the floor chosen as in
        `choose_floor`.
    """
    rng = np.random.default_rng(0)
    candidates = []
    for n in sizes:
        if not gpu:
            candidates.append(numpy_gemm(n, repeats, rng))
        candidates.append(tf_gemm(n, repeats, rng, chain=10 if gpu else 1))
    floor = {"candidates": candidates, "gpu": gpu, "tf32": tf32,
             "peak": None if gpu else (peak or cpu_peak()),
             "tolerance": TF32_TOLERANCE if tf32 else FP32_TOLERANCE}
    choose_floor(floor)
    return floor


def choose_floor(floor: dict[str, Any]) -> None:
    """Marks each candidate accepted or refused (`'refused'`: why), and sets `floor_gflops` and
    `floor_source` to the fastest accepted one (None when every one was refused).

    A candidate is refused when its product differs from float64 by more than `floor['tolerance']`
    (work skipped, or done in reduced precision) or when its rate exceeds the CPU's theoretical peak
    (a timing artefact, or a peak assumption that is wrong for this CPU: `--peak_gflops`).
    """
    peak = floor.get("peak")
    bound = peak.get("bound_gflops", peak["gflops"]) if peak else None  # results saved before the bound
    for c in floor["candidates"]:
        c.pop("refused", None)
        if not c["error"] <= floor["tolerance"]:
            c["refused"] = f"error {c['error']:.1e} vs float64 above {floor['tolerance']:.0e}"
        elif bound and c["gflops"] > bound:
            c["refused"] = f"above the theoretical peak of {bound:.0f} GFLOP/s"
    accepted = [c for c in floor["candidates"] if "refused" not in c]
    best = max(accepted, key=lambda c: c["gflops"], default=None)
    floor["floor_gflops"] = best["gflops"] if best else None
    floor["floor_source"] = f"{best['library']} n={best['n']}" if best else None


def merge_floors(first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any]:
    """Both measurements' candidates (e.g. before and after the other work, in case the machine was
    busier at one time), the floor chosen again among all of them."""
    merged = {**first, "candidates": first["candidates"] + second["candidates"]}
    choose_floor(merged)
    return merged


def memory_bandwidth(megabytes: int = 256, repeats: int = 5) -> float:
    """Bytes per second NumPy moves copying a `megabytes` float32 array into another (one read and
    one write per element), the best of `repeats` copies after one untimed; checked element for
    element, so that a copy that skipped work cannot become the floor."""
    source = np.random.default_rng(0).random(megabytes * 2**20 // 4, dtype=np.float32)
    target = np.empty_like(source)
    best = math.inf
    for i in range(repeats + 1):
        start = time.perf_counter()
        np.copyto(target, source)
        seconds = time.perf_counter() - start
        if i > 0:
            best = min(best, seconds)
    if not np.array_equal(target, source):
        raise RuntimeError("the copy timed as the memory floor is not a copy")
    return 2 * source.nbytes / best
