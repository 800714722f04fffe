"""The training step against the original formulation and the floor, and the other single-device
rows: inference, the manipulation grid, peak memory, TensorFlow's thread settings.

One process builds every variant on synthetic MNIST-shaped data (28x28x1, 10 classes, batch 100) and
measures them in interleaved rounds (`capsnet.machine.interleave`: variant A, B, C, then again), so
that a machine that slows down or speeds up during the run affects every variant alike:

- the floor: training FLOPs (`flops.analytic_flops`, checked on the traced step) over the best fp32
  matrix product measured in the same run, each product checked against float64 NumPy and against
  the CPU's theoretical peak (`flops.measure_floor`); every variant as a ratio to it;
- training step: median ms after warm-up, samples/s, projected 60k-image epoch;
- inference ms per 100 images (`eval_model.predict`), the 16 x 11 manipulation grid;
- peak memory of a training process, one child process per variant (RSS high-water `VmHWM`, and the
  TensorFlow allocator's peak on a GPU): the high-water of one process that holds every variant
  cannot be split between them;
- on a CPU, TensorFlow thread settings (and oneDNN off), each in a child process (they cannot change
  once TensorFlow has started).

Variants, all built by `training.build` as the command line builds them: `product` (the CLI's step:
`autotune.tune_model` chooses the PrimaryCaps convolution), `product-im2col` and `product-conv` (that
choice forced), `product-xla` (jit_compile=True), `product-mp` (`--mixed_precision`: bfloat16),
`baseline` (bench/original_formulation.py: tile + per-sample map_fn, the same weights). Every
variant's step is timed through the same `backends.TensorFlowSteps.train_step`, so the rows compare
the model formulations. A whole epoch is `bench/epoch.py`'s question; where the step's time goes,
`bench/layers.py`'s.

Usage:
    python bench/step.py --write         # full run, rewrites this machine's section of RESULTS.md
    python bench/step.py --quick         # short run, printed only
    python bench/step.py --steps 20 --rounds 5 --variants product,product-im2col,product-conv,baseline
    python bench/step.py --only steps,inference --variants product,product-xla
    python bench/step.py --peak_gflops 240    # when the CPU's peak is known better than estimated
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import io
import json
import platform
import shlex
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import common
import flops
import numpy as np
import report
from common import BATCH

try:
    import tensorflow as tf
except ImportError as e:
    raise ImportError("bench/step.py needs TensorFlow (pip install -r requirements.txt); on a machine "
                      "without it, bench/epoch.py measures the CLI's epoch on JAX or PyTorch") from e
import keras  # noqa: E402
import original_formulation as original  # noqa: E402

import capsulenet  # noqa: E402
from capsnet import autotune, machine  # noqa: E402

VARIANTS = ("product", "baseline", "product-xla", "product-mp", "product-im2col", "product-conv")
DEFAULT_VARIANTS = VARIANTS[:4]
PHASES = ("steps", "inference", "manipulation", "memory", "threads")


# ---------------------------------------------------------------------------------------------
# Variants
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Variant:
    """One formulation under test: what `training.build` returned for it, and how it was built."""

    name: str
    kind: str  # 'product' or 'baseline'
    built: Any  # training.Built
    note: str = ""

    @property
    def steps(self) -> Any:
        return self.built.steps


def build_variant(name: str, source: keras.Model | None = None) -> Variant:
    """One of `VARIANTS`; the baseline starts from `source`'s weights when given."""
    if name == "baseline":
        note = f"tile + map_fn u_hat, {original.shift_backend()} per-image shifts, no XLA"
        return Variant(name, "baseline", common.build_original(source=source), note)
    options = {"product": {}, "product-xla": {"jit_compile": True},
               "product-mp": {"policy": autotune.BFLOAT16_POLICY},
               "product-im2col": {"implementation": "im2col"},
               "product-conv": {"implementation": "conv"}}
    if name not in options:
        raise ValueError(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
    built = common.build_product(**options[name])
    if options[name].get("jit_compile"):
        built.eval_model.jit_compile = True  # inference through XLA too
    note = ", ".join(f"{k}={v}" for k, v in options[name].items()) or "as the CLI (autotuned)"
    return Variant(name, "product", built, note)


# ---------------------------------------------------------------------------------------------
# One measurement each
# ---------------------------------------------------------------------------------------------


def train_step_seconds(variant: Variant, x: Any, y: Any) -> float:
    """One training step on tensors `x [100, 28, 28, 1]`, `y [100, 10]`; reading the losses back
    waits for it (also on a GPU)."""
    start = time.perf_counter()
    [float(v) for v in variant.steps.train_step(x, y)]
    return time.perf_counter() - start


def predict_seconds(variant: Variant, x: np.ndarray) -> float:
    """`eval_model.predict` over `x` in batches of 100, as the test command does."""
    return common.timed(lambda: variant.built.eval_model.predict(x, batch_size=BATCH, verbose=0))


def manipulation_seconds(variant: Variant, x: np.ndarray, y: np.ndarray, save_dir: str) -> float:
    """The 16 x 11 grid including `manipulate-5.png`: the product's `capsulenet.manipulate_latent`
    or the original's (176 predicts of 1), on the same randomly picked sample."""
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    if variant.kind == "product":
        with contextlib.redirect_stdout(io.StringIO()):  # its begin/end banner lines
            capsulenet.manipulate_latent(variant.built.manipulate_model, (x, y), common.DIGIT, save_dir,
                                         rng=rng)
    else:
        original.manipulate_latent(variant.built.manipulate_model, x, y, common.DIGIT, save_dir, rng)
    return time.perf_counter() - start


# ---------------------------------------------------------------------------------------------
# Phases: every variant, interleaved
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Config:
    """How much to measure; `--quick` and the device pick the defaults."""

    steps: int
    rounds: int
    warmup: int
    inference_images: int
    gemm_sizes: tuple[int, ...]
    gemm_repeats: int
    memory_steps: int
    min_slow_steps: int  # per round, for a variant over 3x slower than the fastest
    inference_calls: int  # predicts per variant and round
    thread_rounds: int


def make_config(args: argparse.Namespace, gpu: bool) -> Config:
    """Defaults per mode and device (a GPU step is ~50x shorter, so it affords more steps)."""
    if args.quick:
        config = Config(steps=20 if gpu else 3, rounds=2, warmup=3 if gpu else 1,
                        inference_images=1000 if gpu else 200,
                        gemm_sizes=(4096,) if gpu else (2048,), gemm_repeats=3, memory_steps=3,
                        min_slow_steps=1, inference_calls=3, thread_rounds=1)
    else:
        config = Config(steps=50 if gpu else 10, rounds=3, warmup=5 if gpu else 2,
                        inference_images=2000 if gpu else 500,
                        gemm_sizes=(4096, 8192) if gpu else (2048, 4096), gemm_repeats=5,
                        memory_steps=5, min_slow_steps=2, inference_calls=3, thread_rounds=2)
    for name in ("steps", "rounds"):
        if getattr(args, name) is not None:
            setattr(config, name, getattr(args, name))
    return config


def measure_floor(config: Config, device: dict[str, Any], peak_gflops: float | None) -> dict[str, Any]:
    """`flops.measure_floor` on this device (TF32 allowed on a GPU where TensorFlow allows it)."""
    gpu = device["kind"] == "GPU"
    tf32 = gpu and tf.config.experimental.tensor_float_32_execution_enabled()
    peak = None if gpu else flops.cpu_peak(override_gflops=peak_gflops)
    return flops.measure_floor(config.gemm_sizes, config.gemm_repeats, gpu=gpu, tf32=tf32, peak=peak)


def count_flops(product: Variant, x: Any, y: Any) -> dict[str, Any]:
    """The analytic count, and the same counted on the product's traced training step."""
    counts = flops.analytic_flops()
    traced = flops.graph_flops(product.steps.train_step.get_concrete_function(x, y))
    counts["graph_train_per_image"] = sum(traced.values()) / BATCH
    counts["graph_by_op"] = traced
    return counts


def measure_steps(variants: dict[str, Variant], config: Config, x: Any, y: Any,
                  log: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    """Median training-step time per variant, interleaved (XLA variants among themselves, after the
    others); slow variants time fewer steps per round so that they do not dominate the run."""
    first, warm = {}, {}
    for name, v in variants.items():
        first[name] = train_step_seconds(v, x, y)
        warm[name] = min(train_step_seconds(v, x, y) for _ in range(config.warmup))
        log(f"  {name}: first call {first[name]:.1f} s, warm step {warm[name] * 1e3:.0f} ms")
    fastest = min(warm.values())
    counts = {name: config.steps if t < 3 * fastest else max(config.min_slow_steps, config.steps // 4)
              for name, t in warm.items()}
    # XLA variants after the others, not interleaved with them: XLA's own CPU threads keep the cores
    # busy after its step, which slowed the step that followed it (bench/RESULTS.md, notes).
    xla = [name for name, v in variants.items() if "jit_compile=True" in v.note]
    samples: dict[str, list[float]] = {}
    for group in ([name for name in variants if name not in xla], xla):
        if group:
            fns = {name: functools.partial(lambda name: [train_step_seconds(variants[name], x, y)
                                                         for _ in range(counts[name])], name)
                   for name in group}
            samples.update(common.interleave(fns, config.rounds, log, self_timed=True))
    return {name: {**common.summarize(samples[name]), "first_call": first[name],
                   "note": variants[name].note} for name in variants}


def measure_inference(variants: dict[str, Variant], config: Config, log: Callable[[str], None]
                      ) -> dict[str, dict[str, Any]]:
    """ms per 100 images of `eval_model.predict`, product vs baseline, interleaved; each round
    makes `inference_calls` predicts of `inference_images` images per variant."""
    names = [n for n in ("product", "baseline") if n in variants]
    x, _ = common.synthetic_data(config.inference_images, seed=4)
    for name in names:
        predict_seconds(variants[name], x[:BATCH])
    fns = {name: functools.partial(lambda name: [predict_seconds(variants[name], x) * BATCH / len(x)
                                                 for _ in range(config.inference_calls)], name)
           for name in names}
    samples = common.interleave(fns, max(2, config.rounds), log, self_timed=True)
    return {name: common.summarize(samples[name]) for name in names}


def measure_manipulation(variants: dict[str, Variant], config: Config, log: Callable[[str], None]
                         ) -> dict[str, dict[str, Any]]:
    """The manipulation grid, product vs baseline, interleaved (the first call of each untimed)."""
    names = [n for n in ("product", "baseline") if n in variants]
    x, y = common.synthetic_data(200, seed=5)
    with tempfile.TemporaryDirectory() as tmp:
        fns = {name: functools.partial(manipulation_seconds, variants[name], x, y, tmp) for name in names}
        samples = common.interleave(fns, max(2, config.rounds), log, warmup=1)
    return {name: common.summarize(samples[name]) for name in names}


def measure_memory(names: Sequence[str], config: Config, log: Callable[[str], None]
                   ) -> dict[str, dict[str, Any]]:
    """Peak memory of one training process per variant, each in a fresh child process. They run
    side by side (each measures only itself; nothing is timed), which keeps a GPU run short."""
    children = {name: common.start_child("step.py", ["--probe", "memory", "--variant", name,
                                                     "--steps", str(config.memory_steps)])
                for name in names}
    memory = {}
    for name, child in children.items():
        memory[name] = common.finish_child(child)
        log(f"  {name}: {memory[name]}")
    return memory


def thread_configs(cores: int) -> list[tuple[str, int, int, dict[str, str]]]:
    """(label, inter_op, intra_op, extra environment) to try; 0 means TensorFlow's default."""
    half = max(1, cores // 2)
    configs = [("default", 0, 0, {})]
    for inter, intra in ((1, cores), (2, cores), (1, half), (2, half), (1, 1)):
        label = f"inter={inter}, intra={intra}"
        if all(c[0] != label for c in configs):
            configs.append((label, inter, intra, {}))
    configs.append(("default, TF_ENABLE_ONEDNN_OPTS=0", 0, 0, {"TF_ENABLE_ONEDNN_OPTS": "0"}))
    return configs


def measure_threads(config: Config, cores: int, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """The product's step under each thread setting, one child process per setting and round,
    the settings in a rotated order each round; the step times of all rounds are pooled."""
    configs = thread_configs(cores)
    times: dict[str, list[float]] = {label: [] for label, *_ in configs}
    errors: dict[str, str] = {}
    for r in range(config.thread_rounds):
        shift = r % len(configs)
        for label, inter, intra, env in configs[shift:] + configs[:shift]:
            result = common.run_child("step.py", ["--probe", "threads", "--inter", str(inter), "--intra",
                                                  str(intra), "--steps", str(max(3, config.steps))], env=env)
            if "error" in result:
                errors[label] = result["error"]
            else:
                times[label].extend(result["times"])
            log(f"  round {r + 1}/{config.thread_rounds} {label}: "
                + (result.get("error") or f"median {statistics.median(result['times']):.3f} s"))
    return [{"label": label, **(common.summarize(times[label]) if times[label]
                                else {"error": errors.get(label, "no result")})}
            for label, *_ in configs]


# ---------------------------------------------------------------------------------------------
# Child processes: peak memory and thread settings
# ---------------------------------------------------------------------------------------------


def gpu_peak_mb() -> float | None:
    """Peak bytes of TensorFlow's allocator on GPU:0, MiB; None without a GPU."""
    if not tf.config.list_physical_devices("GPU"):
        return None
    return tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**20


def probe_memory(variant_name: str, steps: int) -> dict[str, Any]:
    """Child: builds one variant, trains `steps` steps and validates 100 images."""
    before = common.rss_mb()  # TensorFlow and Keras imported, nothing built
    variant = build_variant(variant_name)
    built = common.rss_mb()
    x, y = common.synthetic_data((steps + 1) * BATCH, seed=1)
    for i in range(steps):
        variant.steps.train(x[i * BATCH:(i + 1) * BATCH], y[i * BATCH:(i + 1) * BATCH])
    variant.steps.evaluate(x[-BATCH:], y[-BATCH:])
    return {"variant": variant_name, "rss_before_build_mb": before, "rss_after_build_mb": built,
            "peak_rss_mb": common.peak_rss_mb(), "gpu_peak_mb": gpu_peak_mb()}


def probe_threads(inter: int, intra: int, steps: int) -> dict[str, Any]:
    """Child: the product's training step under the given TensorFlow thread settings."""
    tf.config.threading.set_inter_op_parallelism_threads(inter)
    tf.config.threading.set_intra_op_parallelism_threads(intra)
    variant = build_variant("product")
    x, y = (tf.constant(a) for a in common.synthetic_data(BATCH, seed=2))
    for _ in range(2):  # trace, then one warm step
        train_step_seconds(variant, x, y)
    times = [train_step_seconds(variant, x, y) for _ in range(steps)]
    return {"inter": inter, "intra": intra, "times": times}


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def describe_device() -> dict[str, Any]:
    """`{'kind': 'GPU'|'CPU', 'name', 'cpu', 'cores', 'key'}`; the GPU's name from TensorFlow."""
    gpus = tf.config.list_physical_devices("GPU")
    cpu = common.machine_name()
    if gpus:
        details = tf.config.experimental.get_device_details(gpus[0])
        name = details.get("device_name", gpus[0].name)
        if len(gpus) > 1:
            name = f"{name} (x{len(gpus)}, the benchmark uses one)"
        kind = "GPU"
    else:
        name, kind = cpu, "CPU"
    return {"kind": kind, "name": name, "cpu": cpu, "cores": machine.cpu_cores(),
            "key": common.slug(f"{kind} {name}")}


def enable_memory_growth() -> None:
    """Lets the parent and its child probes share a GPU (TensorFlow would otherwise take it all)."""
    for gpu in tf.config.list_physical_devices("GPU"):
        with contextlib.suppress(RuntimeError, ValueError):
            tf.config.experimental.set_memory_growth(gpu, True)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line; `--probe` and the flags after it are internal (child processes)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short run")
    parser.add_argument("--steps", type=int, help="timed training steps per variant and round")
    parser.add_argument("--rounds", type=int, help="interleaved rounds")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                        help=f"comma-separated, from {', '.join(VARIANTS)}")
    parser.add_argument("--threads", choices=("auto", "yes", "no"), default="auto",
                        help="thread-setting sweep (auto: on CPUs only)")
    parser.add_argument("--only", type=lambda v: [p.strip() for p in v.split(",") if p.strip()],
                        help=f"comma-separated phases to run, from {', '.join(PHASES)}")
    parser.add_argument("--peak_gflops", type=float,
                        help="the CPU's theoretical fp32 peak, when known better than the estimate "
                             "from /proc/cpuinfo (matrix products above it are refused as the floor)")
    parser.add_argument("--no_memory", action="store_true", help="skip the memory probes")
    parser.add_argument("--write", action="store_true",
                        help="rewrite this device's section of bench/RESULTS.md (a full run only: a partial "
                             "one, --only, would replace a full section with a few rows)")
    parser.add_argument("--results", default=str(common.RESULTS_PATH), help="Markdown file to update")
    parser.add_argument("--json", help="also write the raw results to this JSON file")
    parser.add_argument("--remark", default="", help="a note written under the heading")
    parser.add_argument("--probe", choices=("memory", "threads"), help=argparse.SUPPRESS)
    parser.add_argument("--variant", default="product", help=argparse.SUPPRESS)
    parser.add_argument("--inter", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--intra", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.variant_list = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(args.variant_list) - set(VARIANTS))
    if unknown:
        parser.error(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    unknown = sorted(set(args.only or ()) - set(PHASES))
    if unknown:
        parser.error(f"--only: unknown {unknown}; choose from {', '.join(PHASES)}")
    return args


def selected_phases(args: argparse.Namespace, gpu: bool) -> list[str]:
    """`--only`, else every phase; memory unless `--no_memory`; threads on CPUs unless `--threads`."""
    phases = [p for p in PHASES if p in args.only] if args.only else list(PHASES)
    if args.no_memory and "memory" in phases:
        phases.remove("memory")
    wanted = args.threads == "yes" or (args.threads == "auto" and not gpu)
    if "threads" in phases and not wanted and not args.only:
        phases.remove("threads")
    return phases


def run_phase(results: dict[str, Any], name: str, measure: Callable[[], Any],
              log: Callable[[str], None]) -> None:
    """Stores `measure()` under `name`; an exception is logged and recorded, not raised, so that
    one failing measurement (e.g. on a device this was never run on) keeps the others."""
    log(f"{report.PHASE_TITLES[name]} ...")
    try:
        results[name] = measure()
    except Exception as e:  # any failure: report it and go on
        traceback.print_exc()
        message = " ".join(f"{type(e).__name__}: {e}".split())
        results.setdefault("errors", {})[name] = message[:300]


def log_floor(floor: dict[str, Any], log: Callable[[str], None]) -> None:
    for c in floor["candidates"]:
        log(f"  {c['library']} n={c['n']}: {c['gflops']:.0f} GFLOP/s, error {c['error']:.1e}"
            + (f", refused: {c['refused']}" if "refused" in c else ""))
    if floor["peak"]:
        log(f"  theoretical peak {floor['peak']['gflops']:.0f} GFLOP/s ({floor['peak']['how']})")


def run_benchmark(args: argparse.Namespace, argv: Sequence[str]) -> dict[str, Any]:
    """Every measurement in one process (children only for memory and thread settings)."""
    device = describe_device()
    gpu = device["kind"] == "GPU"
    config = make_config(args, gpu)
    phases = selected_phases(args, gpu)
    log = print
    log(f"Device: {device['kind']} {device['name']} (CPU: {device['cpu']}); phases: "
        f"{', '.join(phases)}; variants: {', '.join(args.variant_list)}")
    keras.utils.set_random_seed(0)
    results: dict[str, Any] = {"meta": {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python bench/step.py " + shlex.join(argv),
        "mode": "quick" if args.quick else "full", "device": device,
        "tensorflow": tf.__version__, "keras": keras.__version__, "numpy": np.__version__,
        "python": platform.python_version(), "remark": args.remark,
        "rounds": str(config.rounds),
        "inference_images": config.inference_images, "memory_steps": config.memory_steps,
        "config": dataclasses.asdict(config)}}
    log("Floor: best fp32 matrix product ...")
    results["floor"] = measure_floor(config, device, args.peak_gflops)
    log_floor(results["floor"], log)
    in_process = [p for p in phases if p in ("steps", "inference", "manipulation")]
    variants: dict[str, Variant] = {}
    for name in args.variant_list:
        source = variants["product"].built.model if "product" in variants else None
        variants[name] = build_variant(name, source)
    x, y = (tf.constant(a) for a in common.synthetic_data(BATCH, seed=6))
    results["flops"] = count_flops(variants["product"], x, y) if "product" in variants \
        else flops.analytic_flops()
    measures = {
        "steps": lambda: measure_steps(variants, config, x, y, log),
        "inference": lambda: measure_inference(variants, config, log),
        "manipulation": lambda: measure_manipulation(variants, config, log),
    }
    for phase in in_process:
        run_phase(results, phase, measures[phase], log)
    # The products again after the work, in case the machine was busier at the start; best of both.
    log("Floor again ...")
    results["floor"] = flops.merge_floors(results["floor"],
                                          measure_floor(config, device, args.peak_gflops))
    log_floor(results["floor"], log)
    memory_names = [n for n in ("product", "baseline") if n in args.variant_list]
    if "memory" in phases:
        run_phase(results, "memory", lambda: measure_memory(memory_names, config, log), log)
    if "threads" in phases:
        run_phase(results, "threads", lambda: measure_threads(config, device["cores"], log), log)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if keras.backend.backend() != "tensorflow":
        sys.exit(f"bench/step.py measures the product's TensorFlow training path; KERAS_BACKEND is "
                 f"{keras.backend.backend()!r}. Unset it, or use bench/epoch.py for other backends.")
    if args.probe == "threads":  # before anything starts TensorFlow's thread pools
        print(json.dumps(probe_threads(args.inter, args.intra, args.steps or 5)))
        return 0
    enable_memory_growth()
    if args.probe == "memory":
        print(json.dumps(probe_memory(args.variant, args.steps or 3)))
        return 0
    results = run_benchmark(args, argv)
    section = report.render(results)
    print()
    print(section)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    if args.write and not args.only:
        common.write_section(Path(args.results), "step", results["meta"]["device"]["key"], section,
                             report.INTRO)
        print(f"Written to {args.results}")
    else:
        print(f"Not written to {args.results}" + (" (a partial run never is)" if args.only else
                                                    " (add --write)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
