"""The benchmarks' reports: Markdown sections, and their place in `bench/RESULTS.md`.

`render(results)` turns what `bench.py` measured into one device's section; `render_replicas(...)` does
the same for `replicas.py`. `write_section` puts a section into RESULTS.md: each script owns the block
between `<!-- NAME:start -->` and `<!-- NAME:end -->`; inside it, one section per machine sits between
`<!-- NAME:device KEY -->` and `<!-- NAME:device-end KEY -->`. Rerunning a script on a machine replaces
that machine's section only; every other block, section and line of the file is kept.

Usage::

    import report

    section = report.render(results)                       # results: bench.run_benchmark's dict
    report.write_section(common.RESULTS_PATH, "bench", "cpu-xeon-2-cores", section, report.BENCH_INTRO)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import common
import flops  # its constants only: neither module imports TensorFlow at import
from common import BATCH, EPOCH_IMAGES, VALID_IMAGES

BENCH_INTRO = ("\n## Single-device speed (`python bench/bench.py`)\n\n"
               "Written by bench/bench.py, one section per device; rerun it to refresh.\n\n")
REPLICAS_INTRO = (
    "\n## Data-parallel replicas (`python bench/replicas.py`)\n\n"
    "Training throughput of `backends.TensorFlowSteps.train_step` (the step both scripts run) with 1 "
    "and 2 replicas at the same global batch, one section per machine; rerun it to refresh. "
    "Median over the measured steps, after warm-up steps that include tracing.\n\n"
)
PHASE_TITLES = {"steps": "Training step", "epoch": "End-to-end epoch", "inference": "Inference",
                "manipulation": "Manipulation grid", "memory": "Peak memory (child processes)",
                "threads": "Thread settings (child processes)"}
# The issues' targets, measured side by side: key -> (what, issue, threshold).
TARGETS = {
    "step_vs_floor": ("training step / fp32 floor", "12", 1.3),  # at most
    "mp_step_vs_floor": ("`--mixed_precision` step / fp32 floor", "12", 1.0),  # at most
    "epoch_speedup": ("end-to-end epoch speed-up (projected 60k + 10k)", "4, 12", 1.5),  # at least
    "inference_speedup": ("inference speed-up", "4", 1.3),
    "manipulation_speedup": ("manipulation grid speed-up", "4", 20.0),
}


# ---------------------------------------------------------------------------------------------
# RESULTS.md
# ---------------------------------------------------------------------------------------------


def write_section(path: Path, owner: str, key: str, section: str, intro: str) -> None:
    """Puts `section` as machine `key`'s part of `owner`'s block in `path`, atomically.

    Everything outside the block and the other machines' sections are kept; the file, the block
    (opened by `intro`) and the section are created when missing.
    """
    from capsnet import atomic  # the product's atomic writer (the caller has put the repository on sys.path)

    start, stop = f"<!-- {owner}:start -->", f"<!-- {owner}:end -->"
    begin, end = f"<!-- {owner}:device {key} -->", f"<!-- {owner}:device-end {key} -->"
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    block = f"{begin}\n{section}{end}\n\n"
    if start in text and stop in text.split(start, 1)[1]:
        head, rest = text.split(start, 1)
        inner, tail = rest.split(stop, 1)
    else:
        head, inner, tail = text.rstrip("\n") + "\n\n", "", "\n"
    if begin in inner and end in inner.split(begin, 1)[1]:
        before, after = inner.split(begin, 1)
        inner = before + block + after.split(end, 1)[1].lstrip("\n")
    else:
        inner = (inner if inner.strip() else intro) + block
    inner = inner if inner.endswith("\n") else inner + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text_atomic(path, head + start + inner + stop + tail)


def write_results(section: str, key: str, path: Path = common.RESULTS_PATH) -> None:
    """`bench.py`'s section for device `key` (its block: `<!-- bench:start -->` ... `:end -->`)."""
    write_section(path, "bench", key, section, BENCH_INTRO)


# ---------------------------------------------------------------------------------------------
# bench.py's section
# ---------------------------------------------------------------------------------------------


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def floor_rate(results: dict[str, Any]) -> float | None:
    """The floor in FLOP/s, None when every matrix-product candidate was refused."""
    gflops = results["floor"].get("floor_gflops")
    return gflops * 1e9 if gflops else None


def render(results: dict[str, Any]) -> str:
    """The Markdown section for one device: settings, floor, and one table per measurement.

    Args:
        results: `{'meta', 'floor', 'flops'}` and any of `steps`, `epoch`, `inference`,
            `manipulation`, `memory`, `threads`, `errors` (`{phase: message}`), as
            `bench.run_benchmark` returns them.
    """
    meta = results["meta"]
    lines = [
        f"### {meta['device']['kind']}: {meta['device']['name']}",
        "",
        f"Measured {meta['date']} with `{meta['command']}` ({meta['mode']} mode) - TensorFlow "
        f"{meta['tensorflow']}, Keras {meta['keras']}, NumPy {meta['numpy']}, Python "
        f"{meta['python']}; CPU {meta['device']['cpu']}. Interleaved rounds: {meta['rounds']}. "
        f"Synthetic MNIST-shaped data, batch {BATCH}. {meta['remark']}",
        "",
    ]
    lines += _render_floor(results)
    for phase, error in results.get("errors", {}).items():
        lines += [f"**{PHASE_TITLES[phase]} failed**: `{error}`", ""]
    rate = floor_rate(results)
    for section in (_render_steps, _render_epoch, _render_inference, _render_manipulation,
                    _render_memory, _render_threads, _render_targets):
        lines += section(results, rate)
    return "\n".join(lines).rstrip() + "\n"


def _render_floor(results: dict[str, Any]) -> list[str]:
    floor, counts = results["floor"], results["flops"]
    step_flops = counts["train_total"] * BATCH
    graph = counts.get("graph_train_per_image")
    lines = [
        f"**Floor.** Training FLOPs per image {counts['train_total'] / 1e6:.1f} M (forward "
        f"{counts['forward_total'] / 1e6:.1f} M; the SPEC's convention, which also counts the gradient "
        f"of the constant first coupling, {counts['spec_train_total'] / 1e6:.1f} M"
        + (f"; counted on the product's traced training step: {graph / 1e6:.1f} M" if graph else "")
        + f"), {step_flops / 1e9:.1f} GFLOP per step; per image for training, in MFLOP: "
        + ", ".join(f"{part} {value / 1e6:.1f}" for part, value in counts["train"].items()) + ".",
        "",
        "Best fp32 matrix products (square, n x n; a fresh left operand each repeat, the best repeat "
        f"counts). Each result is checked on {flops.CHECKED_ROWS} rows against NumPy in float64 and "
        f"refused above a relative error of {floor['tolerance']:.0e}"
        + (" (TF32 allowed, TensorFlow's default on this GPU, as in training)" if floor.get("tf32")
           else "")
        + " or above the theoretical peak:",
        "",
    ]
    rows = [[c["library"], c["n"], f"{c['gflops']:.0f}", f"{c['error']:.1e}",
             f"refused: {c['refused']}" if "refused" in c else "accepted"]
            for c in floor["candidates"]]
    lines += _table(["library", "n", "GFLOP/s", "error vs float64", ""], rows) + [""]
    peak = floor.get("peak")
    if peak:
        lines.append(f"Theoretical fp32 peak: {peak['gflops']:.0f} GFLOP/s = {peak['how']}.")
        if peak.get("bound_gflops", peak["gflops"]) > peak["gflops"]:
            lines.append(f"That clock is no maximum, so products are refused only above "
                         f"{peak['bound_gflops']:.0f} GFLOP/s (the same cores at "
                         f"{flops.ASSUMED_MAX_GHZ:g} GHz).")
    elif floor.get("gpu"):
        lines.append("No theoretical peak is computed for a GPU; the product check still applies.")
    if floor.get("floor_gflops"):
        rate = floor["floor_gflops"] * 1e9
        share = f" ({floor['floor_gflops'] / peak['gflops']:.0%} of the peak)" if peak else ""
        lines.append(f"Floor = {floor['floor_source']}, {floor['floor_gflops']:.0f} GFLOP/s{share}, "
                     f"i.e. {step_flops / rate * 1e3:.0f} ms per training step. Reduced-precision "
                     "variants are compared with the same fp32 floor.")
    else:
        lines.append("**No floor**: every candidate was refused, so no 'x floor' is given below.")
    return lines + [""]


def _render_steps(results: dict[str, Any], rate: float | None) -> list[str]:
    steps = results.get("steps")
    if not steps:
        return []
    step_floor = results["flops"]["train_total"] * BATCH / rate if rate else None
    base = steps.get("baseline", {}).get("median")
    rows = []
    for name, s in steps.items():
        median = s["median"]
        rows.append([
            f"`{name}`", s["note"], f"{median * 1e3:.0f}", f"{s['q1'] * 1e3:.0f}-{s['q3'] * 1e3:.0f}",
            s["n"], f"{s['first_call']:.1f}", f"{BATCH / median:.0f}",
            f"{EPOCH_IMAGES / BATCH * median:.0f}", _ratio(median, step_floor), _ratio(base, median),
        ])
    header = ["variant", "settings", "step ms (median)", "IQR ms", "steps", "first call s",
              "samples/s", "60k epoch s (projected)", "x floor", "speed-up vs baseline"]
    return ["**Training step** (batch 100, after warm-up; every variant through "
            "`backends.TensorFlowSteps.train_step`):", ""] + _table(header, rows) + [""]


def _render_epoch(results: dict[str, Any], rate: float | None) -> list[str]:
    epoch = results.get("epoch")
    if not epoch:
        return []
    flops, cfg = results["flops"], results["meta"]["epoch_config"]
    full_work = EPOCH_IMAGES * flops["train_total"] + VALID_IMAGES * flops["forward_total"]
    base = epoch.get("baseline", {})
    isolated = results.get("steps") or {}
    rows = []
    for name, s in epoch.items():
        step = s["per_step"]
        rows.append([
            f"`{name}`", s["n"], f"{s['seconds']['median']:.1f}", f"{step['median'] * 1e3:.0f}",
            f"{step['q1'] * 1e3:.0f}-{step['q3'] * 1e3:.0f}", step["n"],
            f"{s['call']['median'] * 1e3:.0f}",
            _ratio(step["median"], isolated.get(name, {}).get("median")),
            f"{BATCH / step['median']:.0f}", f"{s['other']:.1f}", f"{s['valid']:.1f}",
            f"{s['projected']:.0f}", _ratio(s["projected"], full_work / rate if rate else None),
            _ratio(base.get("projected"), s["projected"]),
            _ratio(base.get("seconds", {}).get("median"), s["seconds"]["median"]),
        ])
    header = [
        "variant", "epochs", f"epoch s ({cfg['steps']} steps + validation, median)",
        "ms per step in the loop (median)", "IQR ms", "steps timed", "of which the step call ms",
        "x isolated step", "train images/s", "other per-epoch s",
        f"validation s ({cfg['valid_images']} images)",
        "60k + 10k epoch s (projected)", "x floor (projected)", "speed-up vs baseline (projected)",
        "speed-up vs baseline (measured epochs)",
    ]
    return [f"**End-to-end epoch**: epochs of {cfg['steps']} steps of {BATCH} with random shifts "
            f"(0.1) and a validation pass over {cfg['valid_images']} images, each project's own loop: "
            "the product's `training.Trainer.train_epoch` + `evaluate` (NumPy shifts made ahead in a "
            "thread) vs the original's `model.fit(generator, validation_data)`. Each step's time in "
            "the loop is the time from its start to the next step's start (waiting for data "
            "included), taken inside the loop; 'of which the step call' excludes that wait. 'Other "
            "per-epoch' is the epoch's time outside its steps and its validation (set-up, teardown). "
            "Projection: 600 x the median step in the loop + other per-epoch + validation scaled to "
            "10k images. 'x isolated step' compares the step in the loop with the training-step table.",
            ""] + _table(header, rows) + [""]


def _render_inference(results: dict[str, Any], rate: float | None) -> list[str]:
    inference = results.get("inference")
    if not inference:
        return []
    per_100_floor = results["flops"]["forward_total"] * BATCH / rate if rate else None
    base = inference.get("baseline", {}).get("median")
    rows = [[f"`{name}`", f"{s['median'] * 1e3:.0f}", s["n"], f"{BATCH / s['median']:.0f}",
             _ratio(s["median"], per_100_floor), _ratio(base, s["median"])]
            for name, s in inference.items()]
    header = ["variant", "ms per 100 images", "rounds", "images/s", "x floor", "speed-up vs baseline"]
    calls = results["meta"]["config"]["inference_calls"]
    return [f"**Inference** (`eval_model.predict`, batch 100, {calls} predicts of "
            f"{results['meta']['inference_images']} images per variant and round):", ""
            ] + _table(header, rows) + [""]


def _render_manipulation(results: dict[str, Any], rate: float | None) -> list[str]:
    grid = results.get("manipulation")
    if not grid:
        return []
    base = grid.get("baseline", {}).get("median")
    notes = {"product": "`capsulenet.manipulate_latent` as shipped (encoder once, one decoder batch)",
             "baseline": "176 predicts of batch 1"}
    rows = [[f"`{name}`", notes.get(name, ""), f"{s['median'] * 1e3:.0f}", s["n"],
             _ratio(base, s["median"])] for name, s in grid.items()]
    return ["**Manipulation grid** (16 x 11 reconstructions and `manipulate-5.png`):", ""] + _table(
        ["variant", "how", "ms", "rounds", "speed-up vs baseline"], rows) + [""]


def _render_memory(results: dict[str, Any], rate: float | None) -> list[str]:
    memory = results.get("memory")
    if not memory:
        return []
    rows = []
    for name, m in memory.items():
        if "error" in m:
            rows.append([f"`{name}`", m["error"], "", "", ""])
            continue
        gpu = "-" if m.get("gpu_peak_mb") is None else f"{m['gpu_peak_mb']:.0f}"
        rows.append([f"`{name}`", f"{m['peak_rss_mb']:.0f}", f"{m['rss_before_build_mb']:.0f}",
                     f"{m['rss_after_build_mb']:.0f}", gpu])
    return ["**Peak memory of a training process**: one child process per variant builds it, "
            f"trains {results['meta']['memory_steps']} steps end to end and validates; RSS "
            "high-water `VmHWM` from /proc/self/status (it includes what importing TensorFlow "
            "takes, shown as RSS before build), GPU peak from "
            "`tf.config.experimental.get_memory_info`.", ""
            ] + _table(["variant", "peak RSS MiB", "RSS before build MiB", "RSS after build MiB",
                        "GPU peak MiB"], rows) + [""]


def _render_threads(results: dict[str, Any], rate: float | None) -> list[str]:
    threads = results.get("threads")
    if not threads:
        return []
    default = next((t.get("median") for t in threads if t["label"] == "default"), None)
    rows = []
    for t in threads:
        if "error" in t:
            rows.append([t["label"], t["error"], "", ""])
        else:
            rows.append([t["label"], f"{t['median'] * 1e3:.0f}",
                         f"{t['q1'] * 1e3:.0f}-{t['q3'] * 1e3:.0f}", _ratio(t["median"], default)])
    rounds = results["meta"]["config"]["thread_rounds"]
    return ["**TensorFlow thread settings** (`product` training step, one child process per "
            f"setting and round, {rounds} round(s) in rotated order, `tf.config.threading` set "
            "before TensorFlow starts):", ""] + _table(
                ["setting", "step ms (median)", "IQR ms", "x default"], rows) + [""]


def _render_targets(results: dict[str, Any], rate: float | None) -> list[str]:
    checks = target_checks(results, rate)
    if not checks:
        return []
    rows = [[what, issue, wanted, f"{value:.2f}x", "met" if ok else "**missed**"]
            for what, issue, wanted, value, ok in checks]
    return ["**Targets**, `product` as shipped:", ""] + _table(
        ["target", "issue", "wanted", "measured", ""], rows) + [""]


def target_checks(results: dict[str, Any], rate: float | None
                  ) -> list[tuple[str, str, str, float, bool]]:
    """(what, issue, wanted, measured, met) for each target whose rows were measured."""
    checks = []

    def at_most(key: str, value: float) -> None:
        what, issue, limit = TARGETS[key]
        checks.append((what, issue, f"<= {limit}x", value, value <= limit))

    def at_least(key: str, value: float) -> None:
        what, issue, limit = TARGETS[key]
        checks.append((what, issue, f">= {limit}x", value, value >= limit))

    steps = results.get("steps") or {}
    if rate:
        step_floor = results["flops"]["train_total"] * BATCH / rate
        for key, name in (("step_vs_floor", "product"), ("mp_step_vs_floor", "product-mp")):
            if name in steps:
                at_most(key, steps[name]["median"] / step_floor)
    epoch = results.get("epoch") or {}
    if "product" in epoch and "baseline" in epoch:
        at_least("epoch_speedup", epoch["baseline"]["projected"] / epoch["product"]["projected"])
    for key, target in (("inference", "inference_speedup"), ("manipulation", "manipulation_speedup")):
        rows = results.get(key) or {}
        if "product" in rows and "baseline" in rows:
            at_least(target, rows["baseline"]["median"] / rows["product"]["median"])
    return checks


# ---------------------------------------------------------------------------------------------
# replicas.py's section
# ---------------------------------------------------------------------------------------------

DEVICE_LABELS = {"cpu": ("1 CPU device", "{r} logical CPU devices"), "gpu": ("1 GPU", "{r} GPUs"),
                 "gpu-logical": ("1 GPU", "{r} logical GPUs on one GPU")}
STRATEGY_NAMES = {"_DefaultDistributionStrategy": "default (one device)"}


def replicas_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of `replicas.py`'s configurations; speed-ups against the 1-replica row of the
    same device kind. Each row: `kind`, `replicas`, `batch`, and `ms_per_step`, `samples_per_s`,
    `strategy` or `error`."""
    lines = ["| replicas | devices | strategy | global batch | ms/step | samples/s | vs 1 replica |",
             "|---:|---|---|---:|---:|---:|---:|"]
    base = {}
    for row in rows:
        kind = row["kind"].split("-")[0]
        label = DEVICE_LABELS[row["kind"]][row["replicas"] > 1].format(r=row["replicas"])
        if "error" in row:
            lines.append(f"| {row['replicas']} | {label} | - | {row['batch']} | failed: "
                         f"{row['error'].replace('|', '/')} | | |")
            continue
        if row["replicas"] == 1:
            base[kind] = row["samples_per_s"]
        ratio = f"{row['samples_per_s'] / base[kind]:.2f}x" if kind in base else "-"
        strategy = STRATEGY_NAMES.get(row["strategy"], row["strategy"])
        lines.append(f"| {row['replicas']} | {label} | {strategy} | {row['batch']} | "
                     f"{row['ms_per_step']:.0f} | {row['samples_per_s']:.1f} | {ratio} |")
    return "\n".join(lines) + "\n"


def render_replicas(rows: list[dict[str, Any]], machine: str, cores: int, gpu: str | None,
                    versions: str, today: str) -> str:
    """`replicas.py`'s section for one machine: notes, then `replicas_table(rows)`."""
    notes = [f"- Machine: {machine}. {versions}, {today}.",
             f"- The logical CPU devices are slices of the same {cores} cores: two of them share "
             "those cores, so the 2-replica CPU row measures the cost of the data-parallel path "
             "(split batch, all-reduce, per-replica kernels on fewer threads each), not a speed-up."]
    if gpu:
        notes.append("- Logical GPUs (when only one GPU is present) share one chip likewise; real "
                     "speed-ups need as many physical GPUs as replicas.")
    return f"### {machine}, {today}\n\n" + "\n".join(notes) + "\n\n" + replicas_table(rows)
