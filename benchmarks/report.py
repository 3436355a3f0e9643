"""The comparison (absolute numbers and ratios) and the Markdown summary."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

from evfsam.specs import EVF_SAM, GRAPHS

from .inprocess import STAGES
from .measure import EAGER, ORT
from .stats import ratio, speedup

SIZE_LABELS = {
    "tiny": "tiny (random weights: SAM ViT embed 32 x 2 blocks + BEiT-3 embed 32 x 2 layers; full-size mask decoder)",
    "vit-b": "ViT-B (random weights: SAM ViT-B image encoder + small BEiT-3)",
    "full": "full (random weights: SAM ViT-H + BEiT-3 large, the published architecture)",
}


def fmt(value: Optional[float], digits: int = 1, suffix: str = "") -> str:
    if value is None:
        return "–"
    return f"{value:,.{digits}f}{suffix}"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def point_at(points: Sequence[Dict], concurrency: int) -> Optional[Dict]:
    return next((p for p in points if p["concurrency"] == concurrency), None)


def best_point(points: Sequence[Dict]) -> Optional[Dict]:
    return max(points, key=lambda p: p["throughput"]) if points else None


def deployment_row(name: str, stats: Dict, reference: Dict) -> Dict:
    return {
        "deployment": name, "min_ms": stats.get("min_ms"),
        "p50_ms": stats["p50_ms"], "p90_ms": stats["p90_ms"], "p95_ms": stats["p95_ms"], "p99_ms": stats["p99_ms"],
        "throughput": stats["throughput"],
        "latency_speedup_vs_eager": speedup(stats["p50_ms"], reference["p50_ms"]),
        "throughput_vs_eager": ratio(stats["throughput"], reference["throughput"]),
    }


def comparison(results: Dict) -> Dict:
    """(a), (b), (c) at concurrency 1 and at its best concurrency, as numbers and as ratios to (a);
    the serving overhead (c)/(b) at concurrency 1."""
    side = results["inprocess"]["side_by_side"]
    eager, ort = side[EAGER]["stats"], side[ORT]["stats"]
    points = results.get("triton", {}).get("models", {}).get(EVF_SAM.name, [])
    rows = [deployment_row("(a) eager PyTorch, fp32", eager, eager),
            deployment_row("(b) ONNX Runtime in-process, 3 graphs", ort, eager)]
    single, best = point_at(points, 1), best_point(points)
    if single:
        rows.append(deployment_row("(c) Triton evf_sam, concurrency 1", single, eager))
    if best and best is not single:
        rows.append(deployment_row(f"(c) Triton evf_sam, concurrency {best['concurrency']}", best, eager))
    overhead = None
    if single:
        overhead = {"p50_ratio": ratio(single["p50_ms"], ort["p50_ms"]),
                    "p50_extra_ms": single["p50_ms"] - ort["p50_ms"],
                    "throughput_ratio": ratio(single["throughput"], ort["throughput"])}
    return {"rows": rows, "serving_overhead_c1": overhead}


def deployment_table(rows: Sequence[Dict]) -> str:
    return table(
        ["Deployment", "min ms", "p50 ms", "p90 ms", "p95 ms", "p99 ms", "req/s", "p50 speed-up vs eager",
         "req/s vs eager"],
        [[r["deployment"], fmt(r["min_ms"]), fmt(r["p50_ms"]), fmt(r["p90_ms"]), fmt(r["p95_ms"]), fmt(r["p99_ms"]),
          fmt(r["throughput"], 2), fmt(r["latency_speedup_vs_eager"], 2, "×"), fmt(r["throughput_vs_eager"], 2, "×")]
         for r in rows])


def readme_snippet(results: Dict, cmp: Dict) -> str:
    meta = results["meta"]
    rows = [[r["deployment"], fmt(r["p50_ms"]), fmt(r["p99_ms"]), fmt(r["throughput"], 2),
             fmt(r["latency_speedup_vs_eager"], 2, "×"), fmt(r["throughput_vs_eager"], 2, "×")] for r in cmp["rows"]]
    title = f"{meta['size']} model, {meta['machine']['cpu_model']} {meta['machine']['vcpus']} vCPU, {meta['date']}"
    return table([f"EVF-SAM ({title})", "p50 ms", "p99 ms", "req/s", "p50 speed-up vs eager", "req/s vs eager"], rows)


def stage_table(results: Dict) -> str:
    stages = results["inprocess"]["stages_ms"]
    points = results.get("triton", {}).get("models", {}).get(EVF_SAM.name, [])
    single = point_at(points, 1)
    server = single["server"] if single else {}
    rows = []
    for stage in STAGES:
        composing = server.get(stage)
        rows.append([stage, fmt(stages[EAGER][stage]), fmt(stages[ORT][stage]),
                     fmt(composing["avg_latency_ms"]) if composing else "–",
                     fmt(composing["parts_ms"].get("compute infer")) if composing else "–"])
    rows.append(["**sum**", fmt(sum(stages[EAGER].values())), fmt(sum(stages[ORT].values())),
                 fmt(sum(server[s]["avg_latency_ms"] for s in STAGES if s in server)) if server else "–", ""])
    return table(["Stage (= Triton model)", "(a) eager ms", "(b) ORT ms", "(c) Triton avg ms (queue + compute)",
                  "(c) compute infer ms"], rows)


def share(value: Optional[float]) -> str:
    return "–" if value is None else f"{100 * value:.0f}%"


def sweep_table(points: Sequence[Dict]) -> str:
    return table(["concurrency", "requests", "infer/s", "p50 ms", "p90 ms", "p95 ms", "p99 ms", "other jobs' CPU"],
                 [[p["concurrency"], p["request_count"], fmt(p["throughput"], 2), fmt(p["p50_ms"]), fmt(p["p90_ms"]),
                   fmt(p["p95_ms"]), fmt(p["p99_ms"]), share(p.get("other_jobs_cpu_share"))] for p in points])


def composing_table(points: Sequence[Dict]) -> str:
    rows = []
    for p in points:
        for model in STAGES:
            s = p["server"].get(model)
            if s:
                parts = s["parts_ms"]
                rows.append([p["concurrency"], model, fmt(s["avg_latency_ms"]), fmt(parts.get("queue")),
                             fmt(parts.get("compute infer")), fmt(s["avg_batch"], 2)])
    return table(["concurrency", "composing model", "avg ms", "queue ms", "compute infer ms", "avg batch"], rows)


def batch_table(batch: Dict) -> str:
    rows = []
    for graph, by_batch in batch.items():
        base = by_batch.get("1")
        for size, stats in by_batch.items():
            rows.append([graph, size, fmt(stats["mean_ms"]), fmt(stats["throughput"], 2),
                         fmt(ratio(stats["throughput"], base["throughput"] if base else None), 2, "×")])
    return table(["graph", "batch", "ms per call", "items/s", "items/s ÷ batch 1"], rows)


def prompt_table(prompts: Dict) -> str:
    """Best of the repeats: few repeats of long calls, and a single stall would dominate a mean."""
    counts = list(next(iter(prompts.values())).keys())
    rows = []
    for count in counts:
        row = [count]
        for engine in (ORT, EAGER):
            once = prompts[f"{engine}/encoder_once"][count]["min_ms"]
            many = prompts[f"{engine}/n_pipelines"][count]["min_ms"]
            row += [fmt(once), fmt(many), fmt(ratio(many, once), 2, "×")]
        rows.append(row)
    return table(["N prompts", "ORT: encoder once ms", "ORT: N pipelines ms", "ORT gain", "eager: encoder once ms",
                  "eager: N pipelines ms", "eager gain"], rows)


SERVED_MODES = {"uncached": "uncached (image bytes, cache off)", "cached_bytes": "cached (image bytes again)",
                "cached_key": "cached (image_key)"}
SERVED_PARTS = {"sam_image_encoder": "encoder", "beit3_fusion_encoder": "BEiT-3", "prompt_mask_decoder": "decoder",
                "evf_sam_prompts": "evf_sam_prompts itself"}


def single_prompt_baseline(results: Dict) -> Optional[float]:
    """Prompts/s of one-prompt `evf_sam` requests back to back (concurrency 1): 1 / mean latency."""
    single = point_at(results.get("triton", {}).get("models", {}).get(EVF_SAM.name, []), 1)
    return 1000.0 / single["mean_ms"] if single else None


def served_prompt_rows(results: Dict) -> List[Dict]:
    """One row per N: prompts/s of each mode, the N-single-requests baseline and the gains."""
    points = results.get("served_prompts", {}).get("points", {})
    baseline = single_prompt_baseline(results)
    rows = []
    for count in results.get("served_prompts", {}).get("prompt_counts", []):
        rate = {mode: points.get(mode, {}).get(str(count), {}).get("prompts_per_s") for mode in SERVED_MODES}
        rows.append({"prompts": count, "baseline": baseline, **rate,
                     "uncached_vs_baseline": ratio(rate["uncached"], baseline),
                     "cached_vs_uncached": ratio(rate["cached_key"], rate["uncached"]),
                     "cached_vs_baseline": ratio(rate["cached_key"], baseline)})
    return rows


def served_prompt_table(rows: Sequence[Dict]) -> str:
    return table(
        ["N prompts", "N single-prompt `evf_sam` requests", *SERVED_MODES.values(), "uncached ÷ single requests",
         "cached (key) ÷ uncached", "cached (key) ÷ single requests"],
        [[r["prompts"], fmt(r["baseline"], 2), *(fmt(r[m], 2) for m in SERVED_MODES),
          fmt(r["uncached_vs_baseline"], 2, "×"), fmt(r["cached_vs_uncached"], 2, "×"),
          fmt(r["cached_vs_baseline"], 2, "×")] for r in rows])


def served_prompt_detail(served: Dict) -> str:
    rows = []
    for count in served["prompt_counts"]:
        for mode in SERVED_MODES:
            p = served["points"].get(mode, {}).get(str(count))
            if p:
                cache = p["cache"]
                rows.append([count, mode, p["request_count"], fmt(p["p50_ms"]), fmt(p["p99_ms"]),
                             *(fmt(p["engines"][part]["ms"]) for part in SERVED_PARTS),
                             f"{cache['hits']} / {cache['misses']}", share(p.get("other_jobs_cpu_share"))])
    return table(["N", "mode", "requests", "p50 ms", "p99 ms", *(f"{v} ms" for v in SERVED_PARTS.values()),
                  "cache hits / misses", "other jobs' CPU"], rows)


def _served_prompt_sections(results: Dict) -> List[str]:
    served = results.get("served_prompts")
    if not served or not served.get("points"):
        return []
    return [
        "## Encode once, prompt many: `evf_sam_prompts` served (perf_analyzer, concurrency 1)",
        "Prompts per second when one request carries N prompts for one image. *uncached*: the image bytes to a "
        "server whose embedding cache is off (every request runs the SAM encoder once); *cached (image bytes "
        "again)*: the same bytes after a first request (the sha256 of the bytes finds the embedding); *cached "
        "(image_key)*: only the key a first response returned. Baseline: N one-prompt requests to the `evf_sam` "
        "ensemble. Prompts/s = N ÷ mean request latency, one request at a time "
        f"(embedding cache {served['cache_bytes'] / 1024**2:.0f} MiB).",
        served_prompt_table(served_prompt_rows(results)),
        "Per request, from Triton's own counters over exactly the measured requests (engine models: queue + "
        "compute; `evf_sam_prompts itself`: decode, hash, tokenize, full-size masks and the BLS round trips). "
        "Each point was checked: uncached points show one miss and one encoder run per request, cached points "
        "no miss and no encoder run.",
        served_prompt_detail(served),
    ]


def _machine_lines(meta: Dict) -> List[str]:
    m, v = meta["machine"], meta["versions"]
    load = meta.get("load_average", {})
    others = ", ".join(f"{k.split(':')[0]} {share(v)}" for k, v in meta.get("other_jobs_cpu_share", {}).items())
    return [
        f"- CPU: {m['cpu_model']} (family/model {m['cpu_family_model']}), {m['vcpus']} vCPUs "
        f"({m['usable_cpus']} usable, {m['threads_per_core']} thread(s) per core), hypervisor {m['hypervisor'] or 'none'}, "
        f"ISA {m['isa'] or '–'}; memory {m['memory_gib']} GiB",
        f"- GPU: {m['gpu'] or 'none (CPU only)'}",
        f"- OS: {m['os']}; Python {m['python']}",
        f"- tritonserver {meta.get('tritonserver_version', '–')} (nvidia-pytriton {v.get('nvidia-pytriton', '–')}, "
        f"python backend, engine flavor python-ort); {meta.get('perf_analyzer_version', 'perf_analyzer –')} "
        f"(tritonclient {v.get('tritonclient', '–')})",
        "- " + ", ".join(f"{k} {v[k]}" for k in ("torch", "onnxruntime", "onnx", "numpy", "transformers",
                                                   "opencv-python-headless", "pillow", "tokenizers") if k in v),
        f"- Machine load average (1/5/15 min) at start {load.get('start')}, before Triton {load.get('before_triton')}, "
        f"at end {load.get('end')}; CPU time other jobs took during each phase: {others or '–'}",
    ]


def _model_lines(meta: Dict) -> List[str]:
    model = meta["model"]
    params = ", ".join(f"{k} {v / 1e6:.2f} M" for k, v in model["parameters"].items())
    return [f"- Size `{meta['size']}`: {SIZE_LABELS.get(meta['size'], meta['size'])}",
            f"- Parameters: {params}",
            f"- Inputs: {len(meta['samples'])} (image file, prompt) pairs, the same bytes for (a), (b) and (c):",
            *[f"  - {s['format']} {s['width']}x{s['height']} ({s['bytes']:,} bytes), prompt “{s['prompt']}”"
              for s in meta["samples"]]]


def summary_markdown(results: Dict, cmp: Dict, plots: Sequence[str]) -> str:
    meta = results["meta"]
    triton = results.get("triton", {}).get("models", {})
    overhead = cmp["serving_overhead_c1"]
    sections = [
        f"# EVF-SAM benchmark: `{meta['size']}` model on {meta['machine']['cpu_model']} "
        f"({meta['machine']['vcpus']} vCPU), {meta['date']}",
        "README snippet (single-stream latency, throughput at the concurrency shown; ratios to the eager reference):",
        readme_snippet(results, cmp),
        f"Whole suite (`{meta['command']}`): **{meta['wall_seconds']['total'] / 60:.1f} min** wall "
        f"({', '.join(f'{k} {v:.0f} s' for k, v in meta['wall_seconds'].items() if k != 'total')}).",
        "## Machine and versions", "\n".join(_machine_lines(meta)),
        "## Model and inputs", "\n".join(_model_lines(meta)),
        "## Side by side: same inputs, one run",
        "(a) `evfsam.pipeline.TorchPipeline`, upstream's eager `inference` path, fp32 on CPU; (b) the three exported "
        "graphs in this process on ONNX Runtime with the server's numpy pre/post-processing; (c) the `evf_sam` "
        "ensemble on tritonserver, measured by perf_analyzer over gRPC. (a) and (b) run one request at a time, their "
        "calls interleaved; each number includes decoding the file and producing the full-size mask.",
        deployment_table(cmp["rows"]),
    ]
    if overhead:
        sections.append(
            f"Serving overhead at concurrency 1, (c) ÷ (b): p50 latency **{overhead['p50_ratio']:.2f}×** "
            f"({overhead['p50_extra_ms']:+.1f} ms per request), throughput {overhead['throughput_ratio']:.2f}×.")
    sections += ["## Per-stage breakdown (ms per request, one request at a time)", stage_table(results),
                 "(c) is Triton's own per-composing-model average from perf_analyzer at concurrency 1 (queue + "
                 "compute; the python-backend stubs add their IPC to compute)."]
    if triton:
        sections += ["## Triton: throughput and latency vs concurrency (perf_analyzer)",
                     f"### `{EVF_SAM.name}` (the ensemble)", sweep_table(triton[EVF_SAM.name]),
                     "Per composing model:", composing_table(triton[EVF_SAM.name])]
        for spec in GRAPHS:
            if spec.name in triton:
                sections += [f"### `{spec.name}` alone (real preprocessed inputs)", sweep_table(triton[spec.name])]
    sections += ["## Batch-size scaling (in-process ONNX Runtime, each graph alone)", batch_table(results["batch_scaling"]),
                 "## N prompts on one image",
                 "Encoder once: the image is decoded and encoded once; ORT runs BEiT-3 and the decoder on a batch of N, "
                 "eager loops over the prompts as upstream's `segment_many`. N pipelines: N independent requests. "
                 f"Milliseconds for all N prompts, best of {meta['budget']['prompt_repeats']} runs.",
                 prompt_table(results["prompt_scaling"]),
                 *_served_prompt_sections(results),
                 "## Plots", "\n".join(f"![{p}](plots/{p})" for p in plots),
                 "## Not measured in this run", "\n".join(f"- {n}" for n in meta["not_measured"]),
                 "## Notes", "\n".join(f"- {n}" for n in meta["notes"]),
                 "## Files", "\n".join(f"- `{f}`" for f in meta["files"])]
    return "\n\n".join(sections) + "\n"
