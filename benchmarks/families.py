"""EVF-SAM vs EVF-SAM2 side by side: same inputs, same machine, one run (`make bench-families`).

    python -m benchmarks.families [--size vit-b] [--families ori sam2] [--full-encoder-repeats 1] [--out DIR]
    python -m benchmarks.run --render DIR

For each family, the suite of `benchmarks.run` at `--size` with fewer points (no row or prompt-count
scaling, no engine-alone sweeps, N = 16 only in the served sweep): a random-weight checkpoint and its
export, (a) eager / (b) ONNX Runtime per stage, (c) `evf_sam` served over concurrency with Triton's
per-model breakdown, a repeated image uncached vs cached, and 16 prompts per `evf_sam_prompts` request.
`vit-b` pairs the families' base image encoders (SAM ViT-B, SAM-2 Hiera-B+); the BEiT-3 and mask
decoders are the same size in both.  On top: each image encoder's FLOPs at this size and at the
published size (SAM ViT-H, SAM-2 Hiera-L; torch.utils.flop_counter on the meta device), and the
published-size encoders alone in eager PyTorch (random weights, fp32, `--full-encoder-repeats` timed
passes each after one untimed pass; 0 skips it).  Results: benchmarks/results/<machine>-<date>-families-<size>/.
"""
from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Dict, List, Sequence

from evfsam import provenance
from evfsam.specs import FAMILIES, SAM_IMAGE_SIZE, family

from . import machine, report, run
from . import perf_analyzer as pa
from .budgets import BUDGETS, Budget
from .flops import image_encoder_flops
from .measure import EAGER, ORT
from .report import FAMILY_LABELS, fmt, share, table
from .stats import ratio
from .triton_sweep import point_at


def comparison_budget(size: str) -> Budget:
    return replace(BUDGETS[size], batch_sizes=(), prompt_counts=(), engine_concurrency=(), served_prompt_counts=(16,))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.families", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(BUDGETS), default="vit-b")
    parser.add_argument("--families", nargs="+", choices=sorted(FAMILIES), default=["ori", "sam2"])
    parser.add_argument("--full-encoder-repeats", type=int, default=1,
                        help="timed eager passes of each published-size image encoder (0: skip)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--build-root", type=Path, default=Path("build") / "bench",
                        help="each family's checkpoint and export go to <root>/<family>-<size> (shared with make bench)")
    return parser.parse_args(argv)


def full_size_encoder_seconds(family_name: str, repeats: int) -> List[float]:
    """Seconds per eager fp32 pass of the family's published-size image encoder (random weights, one
    1024x1024 image), after one untimed pass: SAM ViT-H's `image_encoder`, SAM-2's `forward_image`."""
    import torch

    from evfsam.modeling.builder import build_sam, build_sam2, config_from_dict
    from export.tiny_checkpoint import FAMILY_SIZES

    config = config_from_dict({"model_type": "evf", "out_dim": 256, **FAMILY_SIZES[family_name]["full"]}, family_name)
    torch.manual_seed(0)
    if family_name == "sam2":
        encode = build_sam2(config.sam).eval().forward_image
    else:
        encode = build_sam(config.sam).eval().image_encoder
    images = torch.randn(1, 3, SAM_IMAGE_SIZE, SAM_IMAGE_SIZE)
    seconds = []
    with torch.inference_mode():
        for index in range(repeats + 1):
            start = time.perf_counter()
            encode(images)
            if index:
                seconds.append(time.perf_counter() - start)
    return seconds


def measure_full_encoders(families: Sequence[str], repeats: int) -> Dict[str, Dict]:
    found = {}
    for name in families:
        share_meter = machine.CpuShare()
        seconds = full_size_encoder_seconds(name, repeats)
        found[name] = {"seconds": seconds, "other_jobs_cpu_share": share_meter.others()}
        print(f"  {name} full-size image encoder, eager: {', '.join(f'{s:.1f}' for s in seconds)} s", flush=True)
    return found


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    info, budget = machine.machine_info(), comparison_budget(args.size)
    date = datetime.date.today().isoformat()
    out_dir = args.out or run.RESULTS_DIR / f"{machine.slug(info)}-{date}-families-{args.size}"
    run.clear_previous(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results: Dict[str, object] = {"families": {}}
    loads = {"start": machine.load_average()}
    for name in args.families:
        wall, others, family_loads = {}, {}, {"start": machine.load_average()}
        family_out = out_dir / name
        run.clear_previous(family_out)
        found = run.run_family(name, args.size, args.build_root / f"{name}-{args.size}", budget, None, 2, False, False,
                               family_out, wall, others, family_loads)
        family_loads["end"] = machine.load_average()
        family_args = argparse.Namespace(size=args.size)
        results["families"][name] = run.collect(
            family_args, found["family_spec"], found["recipe"], info, budget, found["samples"], found["inprocess"],
            found["triton"], found["served"], wall, {"load_average": family_loads, "other_jobs_cpu_share": others}, date)
        results["families"][name]["meta"]["wall_seconds"]["total"] = sum(wall.values())
    full = {}
    if args.full_encoder_repeats > 0:
        print("== published-size image encoders, eager PyTorch", flush=True)
        full = measure_full_encoders(args.families, args.full_encoder_repeats)
    loads["end"] = machine.load_average()
    results["meta"] = {
        "size": args.size, "date": date, "git_commit": provenance.git_commit(),
        "command": "python -m benchmarks.families " + shlex.join(sys.argv[1:]), "machine": info,
        "versions": machine.versions(), "perf_analyzer_version": pa.version(), "budget": budget.to_dict(),
        "load_average": loads, "wall_seconds": {"total": time.perf_counter() - started},
        "flops": {name: {size: image_encoder_flops(name, size) for size in dict.fromkeys([args.size, "full"])}
                  for name in args.families},
        "full_size_encoders": full,
    }
    (out_dir / "results.json").write_text(json.dumps(results, indent=1, default=str))
    render(out_dir)
    print(f"wrote {out_dir}/summary.md ({results['meta']['wall_seconds']['total'] / 60:.1f} min)")
    return 0


def render(out_dir: Path) -> None:
    """summary.md of a comparison, and each family's own summary (its plots under <family>/plots)."""
    results = json.loads((out_dir / "results.json").read_text())
    for name, family_results in results["families"].items():
        family_dir = out_dir / name
        family_dir.mkdir(exist_ok=True)
        written = run.plots.write_all(family_results, family_dir / "plots")
        family_results["meta"]["files"] = sorted({str(p.relative_to(family_dir)) for p in family_dir.rglob("*")
                                                  if p.is_file()} | {"summary.md"})
        (family_dir / "summary.md").write_text(
            report.summary_markdown(family_results, report.comparison(family_results), written))
    (out_dir / "summary.md").write_text(summary_markdown(results))


def _encoder_rows(results: Dict) -> List[List[str]]:
    meta, rows = results["meta"], []
    for name, family_results in results["families"].items():
        spec = family(name)
        flops = meta["flops"][name]
        here = flops[meta["size"]]
        stages = family_results["inprocess"]["stages_ms"]
        encoder = spec.image_encoder.name
        full = flops.get("full")
        full_seconds = meta.get("full_size_encoders", {}).get(name, {}).get("seconds")
        full_best = min(full_seconds) if full_seconds else None
        rows.append([
            FAMILY_LABELS[name], here["encoder"], f"{here['parameters'] / 1e6:.1f} M", fmt(here["tflop"], 3),
            fmt(stages[EAGER][encoder]), fmt(stages[ORT][encoder]),
            fmt(here["tflop"] / (stages[ORT][encoder] / 1000), 3),
            full["encoder"] if full else "–", fmt(full["tflop"], 3) if full else "–",
            fmt(full_best, 1),
            fmt(full["tflop"] / full_best if full and full_best else None, 3),
            f"{spec.feature_bytes / 2**20:.0f} MiB",
        ])
    return rows


def _served_rows(results: Dict) -> List[List[str]]:
    rows = []
    for name, r in results["families"].items():
        cmp = report.comparison(r)
        side = r["inprocess"]["side_by_side"]
        points = r.get("triton", {}).get("models", {}).get("evf_sam", [])
        single, best = point_at(points, 1), report.best_point(points)
        repeated = r.get("served", {}).get("repeated_image", {})
        t = cmp["targets"]
        uncached16 = r.get("served", {}).get("prompts", {}).get("uncached", {}).get(str(t["prompts"]), {})
        rows.append([
            FAMILY_LABELS[name], fmt(side[EAGER]["stats"]["p50_ms"]), fmt(side[ORT]["stats"]["p50_ms"]),
            fmt(single["p50_ms"]) if single else "–",
            f"{fmt(best['throughput'], 2)} (c={best['concurrency']})" if best else "–",
            fmt(repeated.get("uncached", {}).get("mean_ms")), fmt(repeated.get("cached_bytes", {}).get("mean_ms")),
            fmt(t["repeated_image_speedup"], 1, "×"), fmt(uncached16.get("prompts_per_s"), 2),
            fmt(t["cached_prompts_per_s"], 2),
        ])
    return rows


def _stage_rows(results: Dict) -> List[List[str]]:
    rows = []
    for name, r in results["families"].items():
        single = point_at(r.get("triton", {}).get("models", {}).get("evf_sam", []), 1)
        stages = r["inprocess"]["stages_ms"]
        encoder, beit3, decoder = r["inprocess"]["stages"][1:-1]
        served = single["models"] if single else {}

        def served_ms(model):
            return fmt(served[model]["total_ms"]) if model in served else "–"

        rows.append([FAMILY_LABELS[name], fmt(stages[ORT]["preprocess"]), fmt(stages[ORT][encoder]), fmt(stages[ORT][beit3]),
                     fmt(stages[ORT][decoder]), fmt(stages[ORT]["postprocess"]), served_ms(encoder), served_ms(beit3),
                     served_ms(decoder), served_ms("image_feature_cache"),
                     fmt(served["own"]["compute_ms"]) if served else "–"])
    return rows


def _cached_stage_rows(results: Dict) -> List[List[str]]:
    rows = []
    for name, r in results["families"].items():
        served = r.get("served", {})
        count = str(max(served.get("prompt_counts") or [0]))
        point = served.get("prompts", {}).get("cached_key", {}).get(count)
        if not point:
            continue
        encoder, beit3, decoder = r["inprocess"]["stages"][1:-1]
        m = point["models"]
        rows.append([FAMILY_LABELS[name], count, fmt(point["mean_ms"]), fmt(m[beit3]["total_ms"]), fmt(m[decoder]["total_ms"]),
                     fmt(m["image_feature_cache"]["total_ms"]), fmt(m["own"]["compute_ms"])])
    return rows


def summary_markdown(results: Dict) -> str:
    meta = results["meta"]
    m = meta["machine"]
    names = list(results["families"])
    ratios = []
    if {"ori", "sam2"} <= set(names):
        for size, label in ((meta["size"], f"at `{meta['size']}`"), ("full", "at the published size")):
            ori, sam2 = meta["flops"]["ori"].get(size), meta["flops"]["sam2"].get(size)
            if ori and sam2:
                ratios.append(f"{ori['encoder']} / {sam2['encoder']} FLOPs {label}: **{ori['tflop'] / sam2['tflop']:.2f}×**")
        full = meta.get("full_size_encoders", {})
        if full.get("ori", {}).get("seconds") and full.get("sam2", {}).get("seconds"):
            ratios.append(f"published-size encoders, eager CPU time ViT-H / Hiera-L: "
                          f"**{ratio(min(full['ori']['seconds']), min(full['sam2']['seconds'])):.2f}×**")
    others = {name: r["meta"]["other_jobs_cpu_share"] for name, r in results["families"].items()}
    others_text = "; ".join(f"{FAMILY_LABELS[n]}: " + ", ".join(f"{k.split(':')[0]} {share(v)}" for k, v in o.items())
                            for n, o in others.items())
    full_shares = ", ".join(f"{FAMILY_LABELS[n]} {share(v['other_jobs_cpu_share'])}"
                            for n, v in meta.get("full_size_encoders", {}).items())
    sections = [
        f"# EVF-SAM vs EVF-SAM2 on {m['cpu_model']} ({m['vcpus']} vCPU), `{meta['size']}`, {meta['date']}",
        f"One run (`{meta['command']}`, **{meta['wall_seconds']['total'] / 60:.1f} min**), the same inputs for both "
        f"families, git commit `{meta['git_commit']}`. Random weights: the amount of computation is the real "
        "model's at each size; masks are meaningless. Each family's full report: "
        + ", ".join(f"[{FAMILY_LABELS[n]}]({n}/summary.md)" for n in names) + ".",
        *(["- " + "\n- ".join(ratios)] if ratios else []),
        "## Image encoders",
        "FLOPs per 1024² image by torch.utils.flop_counter on the meta device (a multiply-add = 2 FLOPs; attention "
        "matmuls included). Milliseconds: the in-process stage medians of (a) eager PyTorch and (b) ONNX Runtime at "
        f"`{meta['size']}`; published size: eager PyTorch fp32, best of the timed passes. Cached features: what one "
        "image's entry in the feature cache holds (float32).",
        table(["family", f"encoder at `{meta['size']}`", "parameters", "TFLOP", "(a) eager ms", "(b) ORT ms",
               "(b) TFLOP/s", "published encoder", "TFLOP", "eager s", "eager TFLOP/s", "cached features"],
              _encoder_rows(results)),
        "## End to end and served",
        "(a), (b) p50 in-process; (c) `evf_sam` on tritonserver with the cache off (every request a new image); "
        "repeated image: `evf_sam`, one prompt per request, the same images again, cache off vs on; "
        "`evf_sam_prompts` with 16 prompts per request, uncached vs cached (image_key). Concurrency 1 unless shown.",
        table(["family", "(a) p50 ms", "(b) p50 ms", "(c) p50 ms", "(c) best req/s", "repeated image uncached ms",
               "cached ms", "speed-up", "16 prompts uncached prompts/s", "cached prompts/s"], _served_rows(results)),
        "## Per stage",
        "(b) in-process medians, and the served `evf_sam` request at concurrency 1 by model (Triton's statistics: "
        "queue + compute per request; own work: the python model's time off the engines' critical path).",
        table(["family", "(b) preprocess ms", "(b) encoder ms", "(b) BEiT-3 ms", "(b) decoder ms", "(b) postprocess ms",
               "(c) encoder ms", "(c) BEiT-3 ms", "(c) decoder ms", "(c) cache ms", "(c) own work ms"], _stage_rows(results)),
        "Cached, `evf_sam_prompts` with 16 prompts (image_key), per request:",
        table(["family", "N", "mean ms", "BEiT-3 ms", "decoder ms", "cache ms", "own work ms"], _cached_stage_rows(results)),
        "## Machine and load",
        f"- {m['cpu_model']} (family/model {m['cpu_family_model']}), {m['vcpus']} vCPUs, ISA {m['isa'] or '–'}, "
        f"{m['memory_gib']} GiB; GPU {m['gpu'] or 'none'}; Python {m['python']}; "
        + ", ".join(f"{k} {v}" for k, v in meta["versions"].items() if k in ("torch", "onnxruntime", "nvidia-pytriton")),
        f"- CPU time other jobs took during each phase: {others_text}"
        + (f"; published-size encoders: {full_shares}" if full_shares else ""),
        f"- Load average at start {meta['load_average'].get('start')}, at end {meta['load_average'].get('end')}",
    ]
    return "\n\n".join(sections) + "\n"


if __name__ == "__main__":
    sys.exit(main())
