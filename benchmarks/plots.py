"""PNG plots of a results.json (matplotlib, no display needed)."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # noqa: E402

from evfsam.specs import EVF_SAM  # noqa: E402

from .measure import EAGER, ORT  # noqa: E402
from .report import PART_LABELS, SERVED_MODES, served_points, server_parts, single_prompt_baseline  # noqa: E402
from .triton_sweep import point_at  # noqa: E402

PERCENTILE_KEYS = ("p50_ms", "p90_ms", "p95_ms", "p99_ms")


def _plain_log_axis(axis) -> None:
    """Log scale ticked at 1, 2, 5 x 10^k and labelled as plain numbers."""
    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.set_minor_formatter(NullFormatter())


def save_figure(fig, path: Path) -> str:
    """Write a figure as PNG, close it, and return the file name."""
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path.name


def throughput_vs_concurrency(results: Dict, path: Path) -> str:
    models = results["triton"]["models"]
    fig, ax = plt.subplots(figsize=(9, 4.2))
    for model, points in models.items():
        ax.plot([p["concurrency"] for p in points], [p["throughput"] for p in points], marker="o",
                linewidth=2.5 if model == EVF_SAM.name else 1.2, label=model)
    side = results["inprocess"]["side_by_side"]
    for name, style in ((EAGER, ":"), (ORT, "--")):
        ax.axhline(side[name]["stats"]["throughput"], linestyle=style, color="gray",
                   label=f"{name} in-process, 1 stream (full pipeline)")
    ax.set(xlabel="concurrent requests (perf_analyzer)", ylabel="inferences / s", yscale="log",
           title="Throughput vs concurrency (Triton)")
    ax.set_xticks(sorted({p["concurrency"] for pts in models.values() for p in pts}))
    _plain_log_axis(ax.yaxis)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.grid(alpha=0.3, which="both")
    return save_figure(fig, path)


def latency_percentiles(results: Dict, path: Path) -> str:
    side = results["inprocess"]["side_by_side"]
    groups = {"(a) eager": side[EAGER]["stats"], "(b) ORT": side[ORT]["stats"]}
    for p in results.get("triton", {}).get("models", {}).get(EVF_SAM.name, []):
        groups[f"(c) Triton c={p['concurrency']}"] = p
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    width = 0.8 / len(PERCENTILE_KEYS)
    for i, key in enumerate(PERCENTILE_KEYS):
        ax.bar([g + i * width for g in range(len(groups))], [s[key] for s in groups.values()], width,
               label=key.replace("_ms", ""))
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], list(groups), fontsize=8)
    ax.set(ylabel="latency per request, ms", title="End-to-end latency percentiles (file bytes + prompt -> mask)")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path)


def stage_breakdown(results: Dict, path: Path) -> str:
    """In-process stages of (a) and (b); the served request's time by model (Triton's statistics)."""
    stages = results["inprocess"]["stages"]
    measured = results["inprocess"]["stages_ms"]
    bars: Dict[str, Dict[str, float]] = {"(a) eager": measured[EAGER], "(b) ORT": measured[ORT]}
    single = point_at(results.get("triton", {}).get("models", {}).get(EVF_SAM.name, []), 1)
    parts = server_parts(results)
    if single:
        bars["(c) Triton c=1"] = {part: single["models"][part]["total_ms" if part != "own" else "compute_ms"]
                                  for part in parts}
    labels = list(dict.fromkeys([*stages, *(p for p in parts if p not in stages)]))
    fig, ax = plt.subplots(figsize=(8, 3.8))
    for row, values in enumerate(bars.values()):
        left = 0.0
        for index, label in enumerate(labels):
            value = max(values.get(label, 0.0), 0.0)
            ax.barh(row, value, left=left, color=f"C{index}", label=PART_LABELS.get(label, label) if row == 0 else None)
            left += value
    ax.set_yticks(range(len(bars)), list(bars))
    ax.invert_yaxis()
    ax.set(xlabel="ms per request (one at a time)", title="Per-stage breakdown (Triton: per model)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=f"C{i}") for i in range(len(labels))]
    ax.legend(handles, [PART_LABELS.get(label, label) for label in labels], fontsize=7, ncol=4, loc="upper center",
              bbox_to_anchor=(0.5, -0.22))
    ax.grid(axis="x", alpha=0.3)
    return save_figure(fig, path)


def batch_scaling(results: Dict, path: Path) -> str:
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for graph, by_batch in results["batch_scaling"].items():
        sizes = [int(b) for b in by_batch]
        ax.plot(sizes, [by_batch[str(b)]["throughput"] for b in sizes], marker="o", label=graph)
    ax.set(xlabel="batch size", ylabel="items / s", yscale="log", title="Batch-size scaling (in-process ORT)")
    ax.set_xticks(sizes)
    _plain_log_axis(ax.yaxis)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    return save_figure(fig, path)


def _prompt_count_axes(ax, counts: List[int], legend_size: int = 8) -> None:
    """Log-log axes with the prompt counts as plain x ticks."""
    ax.set(xscale="log", yscale="log")
    ax.set_xticks(counts, [str(c) for c in counts])
    ax.xaxis.set_minor_formatter(NullFormatter())
    _plain_log_axis(ax.yaxis)
    ax.legend(fontsize=legend_size)
    ax.grid(alpha=0.3, which="both")


def prompt_scaling(results: Dict, path: Path) -> str:
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, by_count in results["prompt_scaling"].items():
        counts = [int(c) for c in by_count]
        ax.plot(counts, [by_count[str(c)]["min_ms"] / 1000 for c in counts], marker="o",
                linestyle="-" if name.endswith("encoder_once") else "--", label=name)
    ax.set(xlabel="prompts on one image", ylabel="seconds for all prompts (best run)", title="Cost of N prompts on one image")
    _prompt_count_axes(ax, counts)
    return save_figure(fig, path)


def served_prompts(results: Dict, path: Path) -> str:
    """Left: prompts/s against N per mode, with the one-prompt-per-request baseline. Right: where each
    served request's time went (Triton's statistics), per point."""
    served = results["served"]
    counts, points = served["prompt_counts"], served.get("prompts", {})
    fig, (rate_ax, time_ax) = plt.subplots(1, 2, figsize=(12, 4.6), gridspec_kw={"width_ratios": [1, 1.4]})
    for mode, label in SERVED_MODES.items():
        found = [c for c in counts if str(c) in points.get(mode, {})]
        rate_ax.plot(found, [points[mode][str(c)]["prompts_per_s"] for c in found], marker="o", label=label)
    baseline = single_prompt_baseline(results)
    if baseline:
        rate_ax.axhline(baseline, linestyle="--", color="gray", label="one prompt per evf_sam request")
    rate_ax.set(xlabel="prompts per request (one image)", ylabel="prompts / s",
                title="evf_sam_prompts throughput (concurrency 1)")
    _prompt_count_axes(rate_ax, counts, legend_size=7)
    parts = server_parts(results)
    bars = served_points(results)
    for row, point in enumerate(bars):
        left = 0.0
        for index, part in enumerate(parts):
            value = max(point["models"][part]["total_ms" if part != "own" else "compute_ms"], 0.0)
            time_ax.barh(row, value, left=left, color=f"C{index}", label=PART_LABELS.get(part, part) if row == 0 else None)
            left += value
    time_ax.set_yticks(range(len(bars)), [f"{p['model']} {p['mode'].replace('_', ' ')} N={p['prompts']}" for p in bars],
                       fontsize=7)
    time_ax.invert_yaxis()
    time_ax.set(xlabel="ms per request (Triton's statistics)", title="Where a request's time goes")
    time_ax.legend(fontsize=7)
    time_ax.grid(axis="x", alpha=0.3)
    return save_figure(fig, path)


def write_all(results: Dict, out_dir: Path) -> List[str]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [latency_percentiles(results, out_dir / "latency_percentiles.png"),
               stage_breakdown(results, out_dir / "stage_breakdown.png")]
    if results.get("batch_scaling"):
        written.append(batch_scaling(results, out_dir / "batch_scaling.png"))
    if results.get("prompt_scaling"):
        written.append(prompt_scaling(results, out_dir / "prompt_scaling.png"))
    if results.get("triton", {}).get("models"):
        written.insert(0, throughput_vs_concurrency(results, out_dir / "throughput_vs_concurrency.png"))
    if results.get("served", {}).get("prompts"):
        written.append(served_prompts(results, out_dir / "served_prompts.png"))
    return written
