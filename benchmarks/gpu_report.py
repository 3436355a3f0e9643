"""summary.md, results.json and plots of a `benchmarks.gpu_torch` run."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .plots import save_figure  # noqa: E402
from .report import fmt, table  # noqa: E402
from .stats import ratio  # noqa: E402

SAM_H_TFLOP = 5.9  # the SAM ViT-H encoder's work per 1024x1024 image, for orientation


def sig(value: Optional[float]) -> str:
    """Three significant digits: CPU smoke runs reach 0.05 TFLOP/s, GPUs hundreds."""
    return "–" if value is None else f"{value:.3g}"


def find(points: List[Dict], dtype: str, variant: str, batch: int) -> Optional[Dict]:
    return next((p for p in points if (p["dtype"], p["variant"], p["batch"]) == (dtype, variant, batch)), None)


def reference_point(results: Dict) -> Optional[Dict]:
    """Eager at batch 1 in the first dtype (fp16 on GPU: the upstream reference path)."""
    return find(results["points"], results["settings"]["dtypes"][0], "eager", results["settings"]["batches"][0])


def points_table(results: Dict) -> str:
    reference = reference_point(results)
    ceiling = results["matmul_ceiling"]["bf16"]["tflops"]
    rows = []
    for p in results["points"]:
        same = find(results["points"], p["dtype"], "eager", p["batch"])
        rows.append([
            p["dtype"], p["variant"], p["batch"], fmt(p["full"]["p50_ms"], 2), fmt(p["full"]["throughput"], 2),
            fmt(ratio(p["full"]["throughput"], same["full"]["throughput"] if same else None), 2, "×"),
            fmt(ratio(p["full"]["throughput"], reference["full"]["throughput"] if reference else None), 2, "×"),
            fmt(p["encoder"]["p50_ms"], 2), sig(p["encoder_tflops"]),
            fmt(100 * p["encoder_tflops"] / ceiling if ceiling else None, 0, "%"),
            f"{p['max_abs_diff_vs_eager']:.1e}", fmt(100 * p["mask_agreement_vs_eager"], 2, "%"), fmt(p["setup_s"], 1),
        ])
    return table(["dtype", "variant", "batch", "forward p50 ms", "images/s", "× eager (same dtype, batch)",
                  "× reference", "encoder p50 ms", "encoder TFLOP/s", "of bf16 matmul", "max abs Δ logits",
                  "mask agreement", "setup s"], rows)


def summary(results: Dict, plots: List[str]) -> str:
    device = results["device"]
    flops = results["encoder_flops_per_image"]
    smoke = not device["device"].startswith("cuda")
    lines = [f"# EVF-SAM PyTorch paths: `{results['size']}` model on {device['name']}, {results['date']}"]
    if smoke:
        lines.append("**Smoke run on CPU: these are not GPU numbers.** It only shows that every code path runs.")
    lines += [
        "\n".join([
            f"- Device: {device['name']}" + (f", {device['memory_gib']} GiB, compute capability "
                                             f"{device['capability']}, CUDA {device['cuda']}, cuDNN {device['cudnn']}"
                                             if not smoke else ""),
            f"- torch {device['torch']}; host CPU {device['machine']['cpu_model']} ({device['machine']['vcpus']} vCPUs)",
            f"- Command: `{results['command']}`; wall time {results['wall_seconds'] / 60:.1f} min; "
            f"{results['settings']['iters']} timed iterations after {results['settings']['warmup']} warm-up per point"]),
        "## Ceiling: dense matmul measured in this run",
        table(["dtype", "n", "TFLOP/s"], [[d, c["n"], sig(c["tflops"])] for d, c in results["matmul_ceiling"].items()]),
        f"Image encoder: **{flops / 1e12:.3f} TFLOP per 1024² image** (counted by torch.utils.flop_counter; SAM ViT-H "
        f"≈ {SAM_H_TFLOP} TFLOP). At the bf16 matmul ceiling that is at most "
        f"{fmt(results['matmul_ceiling']['bf16']['tflops'] * 1e12 / flops, 1)} images/s for the encoder.",
        "## Reference: upstream's eager pipeline end to end (batch 1)",
        f"`TorchPipeline` in {results['reference_pipeline']['dtype']} (decode, torch pre/post on the host, the model "
        f"on {device['device']}): p50 {fmt(results['reference_pipeline']['stats']['p50_ms'], 1)} ms, "
        f"p99 {fmt(results['reference_pipeline']['stats']['p99_ms'], 1)} ms.",
        "## Variants × batch size (model forward: encoder + BEiT-3 + decoder)",
        "`× reference` is against eager at batch 1 in the first dtype. `max abs Δ logits` and `mask agreement` compare "
        "each variant's low-res mask logits with eager's in the same dtype, same inputs.",
        points_table(results),
        "## Not measured",
        "\n".join(["- TensorRT: not measured in this run; no TensorRT numbers are reported.",
                   *[f"- {s}" for s in results["skipped"]]]),
        "## Plots", "\n".join(f"![{p}](plots/{p})" for p in plots),
    ]
    return "\n\n".join(lines) + "\n"


def throughput_plot(results: Dict, path: Path) -> str:
    dtypes = results["settings"]["dtypes"]
    fig, axes = plt.subplots(1, len(dtypes), figsize=(5 * len(dtypes), 3.8), squeeze=False)
    for ax, dtype in zip(axes[0], dtypes):
        for variant in dict.fromkeys(p["variant"] for p in results["points"]):
            pts = [p for p in results["points"] if p["dtype"] == dtype and p["variant"] == variant]
            ax.plot([p["batch"] for p in pts], [p["full"]["throughput"] for p in pts], marker="o", label=variant)
        ax.set(title=dtype, xlabel="batch size", ylabel="images / s (full forward)")
        ax.set_xticks(results["settings"]["batches"])
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    return save_figure(fig, path)


def tflops_plot(results: Dict, path: Path) -> str:
    fig, ax = plt.subplots(figsize=(7, 4))
    for dtype in results["settings"]["dtypes"]:
        for variant in dict.fromkeys(p["variant"] for p in results["points"]):
            pts = [p for p in results["points"] if p["dtype"] == dtype and p["variant"] == variant]
            ax.plot([p["batch"] for p in pts], [p["encoder_tflops"] for p in pts], marker="o", label=f"{dtype} {variant}")
    for dtype, ceiling in results["matmul_ceiling"].items():
        ax.axhline(ceiling["tflops"], linestyle="--", color="gray")
        ax.annotate(f"{dtype} matmul {ceiling['tflops']:.3g}", (results["settings"]["batches"][0], ceiling["tflops"]),
                    fontsize=7, va="bottom")
    ax.set(xlabel="batch size", ylabel="TFLOP/s", title="Image encoder: achieved TFLOP/s vs the matmul ceiling")
    ax.set_xticks(results["settings"]["batches"])
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def write_report(results: Dict, out: Path) -> None:
    (out / "plots").mkdir(parents=True, exist_ok=True)
    plots = [throughput_plot(results, out / "plots" / "throughput_vs_batch.png"),
             tflops_plot(results, out / "plots" / "encoder_tflops.png")]
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "summary.md").write_text(summary(results, plots))
