"""`bench/step.py`'s report: one device's Markdown section (settings, the floor, one table per
measurement, the targets), written into `bench/RESULTS.md` by `common.write_section`.

Usage::

    import report

    section = report.render(results)                       # results: step.run_benchmark's dict
"""

from __future__ import annotations

from typing import Any

import flops  # its constants only: it imports no TensorFlow at import
from common import BATCH, EPOCH_IMAGES, table

INTRO = ("\n## The training step against the original formulation and the floor (`python bench/step.py`)"
         "\n\nWritten by `bench/step.py --write`, one section per device, rewritten in place.\n\n")
PHASE_TITLES = {"steps": "Training step", "inference": "Inference",
                "manipulation": "Manipulation grid", "memory": "Peak memory (child processes)",
                "threads": "Thread settings (child processes)"}
# The issues' targets, measured side by side: key -> (what, issue, threshold).
TARGETS = {
    "step_vs_floor": ("training step / fp32 floor", "12", 1.3),  # at most
    "mp_step_vs_floor": ("`--mixed_precision` step / fp32 floor", "12", 1.0),  # at most
    "inference_speedup": ("inference speed-up", "4", 1.3),
    "manipulation_speedup": ("manipulation grid speed-up", "4", 20.0),
}


# ---------------------------------------------------------------------------------------------
# The section
# ---------------------------------------------------------------------------------------------


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def floor_rate(results: dict[str, Any]) -> float | None:
    """The floor in FLOP/s, None when every matrix-product candidate was refused."""
    gflops = results["floor"].get("floor_gflops")
    return gflops * 1e9 if gflops else None


def render(results: dict[str, Any]) -> str:
    """The Markdown section for one device: settings, floor, and one table per measurement.

    Args:
        results: `{'meta', 'floor', 'flops'}` and any of `steps`, `inference`, `manipulation`,
            `memory`, `threads`, `errors` (`{phase: message}`), as `step.run_benchmark` returns them.
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
    for section in (_render_steps, _render_inference, _render_manipulation,
                    _render_memory, _render_threads, _render_targets):
        lines += section(results, rate)
    return "\n".join(lines).rstrip() + "\n"


def _render_floor(results: dict[str, Any]) -> list[str]:
    floor, counts = results["floor"], results["flops"]
    step_flops = counts["train_total"] * BATCH
    graph = counts.get("graph_train_per_image")
    lines = [
        f"**Floor.** Training FLOPs per image {counts['train_total'] / 1e6:.1f} M (forward "
        f"{counts['forward_total'] / 1e6:.1f} M; counting also the gradient of the constant first "
        f"coupling, {counts['train_total_all_couplings'] / 1e6:.1f} M"
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
    lines += table(["library", "n", "GFLOP/s", "error vs float64", ""], rows) + [""]
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
            "`backends.TensorFlowSteps.train_step`):", ""] + table(header, rows) + [""]


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
            ] + table(header, rows) + [""]


def _render_manipulation(results: dict[str, Any], rate: float | None) -> list[str]:
    grid = results.get("manipulation")
    if not grid:
        return []
    base = grid.get("baseline", {}).get("median")
    notes = {"product": "`capsulenet.manipulate_latent` as shipped (encoder once, one decoder batch)",
             "baseline": "176 predicts of batch 1"}
    rows = [[f"`{name}`", notes.get(name, ""), f"{s['median'] * 1e3:.0f}", s["n"],
             _ratio(base, s["median"])] for name, s in grid.items()]
    return ["**Manipulation grid** (16 x 11 reconstructions and `manipulate-5.png`):", ""] + table(
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
            ] + table(["variant", "peak RSS MiB", "RSS before build MiB", "RSS after build MiB",
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
            "before TensorFlow starts):", ""] + table(
                ["setting", "step ms (median)", "IQR ms", "x default"], rows) + [""]


def _render_targets(results: dict[str, Any], rate: float | None) -> list[str]:
    checks = target_checks(results, rate)
    if not checks:
        return []
    rows = [[what, issue, wanted, f"{value:.2f}x", "met" if ok else "**missed**"]
            for what, issue, wanted, value, ok in checks]
    return ["**Targets**, `product` as shipped:", ""] + table(
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
    for key, target in (("inference", "inference_speedup"), ("manipulation", "manipulation_speedup")):
        rows = results.get(key) or {}
        if "product" in rows and "baseline" in rows:
            at_least(target, rows["baseline"]["median"] / rows["product"]["median"])
    return checks
