"""summary.md, results.json and plots of a `benchmarks.gpu_check` run."""
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


def sig(value: Optional[float]) -> str:
    """Three significant digits: CPU smoke runs reach 0.05 TFLOP/s, GPUs hundreds."""
    return "–" if value is None else f"{value:.3g}"


def find(points: List[Dict], variant: str, batch: int) -> Optional[Dict]:
    return next((p for p in points if (p["variant"], p["batch"]) == (variant, batch)), None)


def kernel_list(kernels: Optional[List[str]]) -> str:
    if kernels is None:
        return "–"
    return ", ".join(kernels) if kernels else "no SDPA (explicit matmul + softmax)"


def header(results: Dict) -> List[str]:
    device, versions = results["device"], results["versions"]
    smoke = not str(device["device"]).startswith("cuda")
    lines = [f"# EVF-SAM GPU check: `{results['settings']['size']}` models on {device.get('name', device['device'])}, "
             f"{results['date']}"]
    if smoke:
        lines.append("**Smoke run on CPU: these are not GPU numbers.** It only shows that every code path runs.")
    about = [f"- Device: {device.get('name', device['device'])}"
             + (f", {device['memory_gib']} GiB, compute capability {device['capability']}, "
                f"{device['multiprocessors']} SMs" if not smoke else ""),
             f"- Host: {results['host']['cpu_model']} ({results['host']['vcpus']} vCPUs)",
             f"- Git commit: `{results['git_commit']}`",
             "- Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
             f"- Command: `{results['command']}`; wall time {results['wall_seconds']:.0f} s of a "
             f"{results['settings']['budget_s']:.0f} s budget"
             + (f"; **stopped early: {results['stopped_early']}**" if results.get("stopped_early") else ""),
             f"- Timing: {results['settings']['warmup']} warm-up then {results['settings']['iters']} timed calls per "
             "point, " + ("CUDA events around each call" if not smoke else "perf_counter") + "; medians, spread p10–p90"]
    if results.get("clocks_before"):
        about.append(f"- Clocks (nvidia-smi, read only): before {results['clocks_before']}, after {results.get('clocks_after')}")
    lines.append("\n".join(about))
    ceilings = results.get("ceilings")
    if ceilings:
        lines += ["## Ceilings measured in this run", table(
            ["what", "size", "rate"],
            [["bf16 matmul (random data)", f"{ceilings['bf16_matmul']['n']}³", f"{sig(ceilings['bf16_matmul']['tflops'])} TFLOP/s"],
             ["fp16 matmul (random data)", f"{ceilings['fp16_matmul']['n']}³", f"{sig(ceilings['fp16_matmul']['tflops'])} TFLOP/s"],
             ["device-to-device copy (read + write)", f"{ceilings['copy']['bytes'] / 2**20:.0f} MiB",
              f"{sig(ceilings['copy']['gb_per_s'])} GB/s"]])]
    return lines


def points_table(dtype: str, points: List[Dict], bf16_ceiling: Optional[float]) -> str:
    rows = []
    for p in points:
        eager = find(points, "eager", p["batch"])
        agreement = p.get("vs_fp32")
        rows.append([
            dtype, p["variant"], p["batch"],
            f"{fmt(p['full']['p50_ms'], 2)} ({fmt(p['full']['p10_ms'], 2)}–{fmt(p['full']['p90_ms'], 2)})",
            fmt(p["full"]["per_second"], 2),
            fmt(ratio(p["full"]["per_second"], eager["full"]["per_second"] if eager else None), 2, "×"),
            fmt(p["encoder"]["p50_ms"], 2), sig(p["encoder_tflops"]),
            fmt(100 * p["encoder_tflops"] / bf16_ceiling if bf16_ceiling else None, 0, "%"),
            f"{agreement['iou_min']:.4f} / {agreement['iou_mean']:.4f}" if agreement else "–",
            f"{agreement['max_rel_logit_error']:.1e}" if agreement else "–",
            fmt(p["setup_s"], 1), fmt(p["peak_memory_gib"], 1),
        ])
    return table(["dtype", "variant", "batch", "forward p50 ms (p10–p90)", "pairs/s", "× eager", "encoder p50 ms",
                  "encoder TFLOP/s", "of bf16 matmul", "mask IoU vs fp32 min / mean", "max rel logit err",
                  "setup s", "peak GiB"], rows)


def family_section(name: str, record: Dict, bf16_ceiling: Optional[float]) -> List[str]:
    flops = record.get("encoder_flops_per_image")
    if "encoder_flops_per_image" not in record:  # failed before it measured anything
        return [f"## {name}: `{record['size']}`", "**Failed:** " + "; ".join(record["errors"])]
    lines = [f"## {name}: `{record['size']}`, {record['parameters'] / 1e6:.0f} M parameters (random weights)",
             f"Image encoder: {flops / 1e12:.4g} TFLOP per 1024² image (torch.utils.flop_counter on the eager model)"
             + (f"; at the bf16 matmul ceiling at most {fmt(bf16_ceiling * 1e12 / flops, 1)} images/s" if bf16_ceiling else "")
             + f".  Built in {record['build_seconds']} s."]
    if record["errors"]:
        lines.append("**Failures** (the run went on without them): " + "; ".join(f"`{e}`" for e in record["errors"]))
    for dtype, out in record["dtypes"].items():
        lines.append(f"### {dtype}")
        if out["fast_attention"]:
            lines.append("Fast path: " + "; ".join(out["fast_attention"]) + ".")
        if out["kernels"]:
            sites = list(dict.fromkeys(site for kernels in out["kernels"].values() for site in kernels))
            lines.append(table(["attention site", "eager (upstream-style)", "fast path"],
                               [[site, kernel_list(out["kernels"].get("eager", {}).get(site)),
                                 kernel_list(out["kernels"].get("fast", {}).get(site))] for site in sites]))
        if out["attention_blocks"]:
            lines.append(table(["block (batch 1)", "implementation", "p50 ms", "SDPA kernels", "max rel error vs fp32"],
                               [[f"{r['block']} {r['grid'][0]}×{r['grid'][1]} × {r['windows']}", r["implementation"],
                                 fmt(r["p50_ms"], 3), kernel_list(r["kernels"]), f"{r['max_rel_error_vs_fp32']:.1e}"]
                                for r in out["attention_blocks"]]))
        lines.append(points_table(dtype, out["points"], bf16_ceiling))
    return lines


def onnx_section(results: Dict) -> List[str]:
    ort = results.get("onnx_runtime")
    if not ort:
        return []
    return ["## ONNX graphs on onnxruntime execution providers", ort["note"] + f"; batch {ort['batch']}.",
            table(["graph", "provider", "first run s", "p50 ms", "max rel vs first provider"],
                  [[r["graph"], r["provider"], fmt(r["first_run_s"], 1), fmt(r["p50_ms"], 2),
                    f"{r['max_rel_vs_first_provider']:.1e}"] for r in ort["rows"]])]


def summary(results: Dict, plots: List[str]) -> str:
    ceilings = results.get("ceilings") or {}
    bf16 = ceilings.get("bf16_matmul", {}).get("tflops")
    lines = header(results)
    for name, record in results["families"].items():
        lines += family_section(name, record, bf16)
    lines += onnx_section(results)
    lines += ["## Not measured in this run",
              "\n".join(["- TensorRT engines: not built or timed by this check (python -m export.tensorrt_build "
                         "builds them, accuracy-gated); no TensorRT number is reported here."]
                        + [f"- {s}" for s in results["skipped"]])]
    if plots:
        lines += ["## Plots", "\n".join(f"![{p}](plots/{p})" for p in plots)]
    return "\n\n".join(lines) + "\n"


def throughput_plot(results: Dict, path: Path) -> Optional[str]:
    panels = [(name, dtype, out["points"]) for name, record in results["families"].items()
              for dtype, out in record["dtypes"].items() if out["points"]]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8), squeeze=False)
    for ax, (name, dtype, points) in zip(axes[0], panels):
        for variant in dict.fromkeys(p["variant"] for p in points):
            pts = [p for p in points if p["variant"] == variant]
            ax.plot([p["batch"] for p in pts], [p["full"]["per_second"] for p in pts], marker="o", label=variant)
        ax.set(title=f"{name} {dtype}", xlabel="batch (image, prompt pairs)", ylabel="pairs / s (full forward)")
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save_figure(fig, path)


def tflops_plot(results: Dict, path: Path) -> Optional[str]:
    series = [(f"{name} {dtype} {variant}", [p for p in out["points"] if p["variant"] == variant])
              for name, record in results["families"].items() for dtype, out in record["dtypes"].items()
              for variant in dict.fromkeys(p["variant"] for p in out["points"])]
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, pts in series:
        ax.plot([p["batch"] for p in pts], [p["encoder_tflops"] for p in pts], marker="o", label=label)
    for name in ("bf16_matmul", "fp16_matmul"):
        ceiling = (results.get("ceilings") or {}).get(name)
        if ceiling:
            ax.axhline(ceiling["tflops"], linestyle="--", color="gray")
            ax.annotate(f"{name.replace('_', ' ')} {ceiling['tflops']:.3g}", (1, ceiling["tflops"]), fontsize=7,
                        va="bottom")
    ax.set(xlabel="batch", ylabel="TFLOP/s", title="Image encoder: achieved TFLOP/s vs the matmul ceiling")
    ax.set_xscale("log", base=2)
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def write_report(results: Dict, out: Path) -> None:
    (out / "plots").mkdir(parents=True, exist_ok=True)
    plots = [p for p in (throughput_plot(results, out / "plots" / "throughput_vs_batch.png"),
                         tflops_plot(results, out / "plots" / "encoder_tflops.png")) if p]
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "summary.md").write_text(summary(results, plots))
