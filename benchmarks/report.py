"""The comparison (absolute numbers and ratios) and the Markdown summary of one family's run."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

from evfsam.specs import EVF_SAM, IMAGE_CACHE_NAME

from .measure import EAGER, ORT
from .stats import ratio, speedup
from .triton_sweep import point_at

FAMILY_LABELS = {"ori": "EVF-SAM", "sam2": "EVF-SAM2"}
SIZE_LABELS = {
    ("ori", "tiny"): "tiny (random weights: SAM ViT embed 32 x 2 blocks + BEiT-3 embed 32 x 2 layers; full-size mask decoder)",
    ("ori", "vit-b"): "ViT-B (random weights: SAM ViT-B image encoder + small BEiT-3)",
    ("ori", "full"): "full (random weights: SAM ViT-H + BEiT-3 large, the published architecture)",
    ("sam2", "tiny"): "tiny (random weights: SAM-2 Hiera embed 8, stages 1-2-3-1 + BEiT-3 embed 32 x 2 layers; "
                      "full-size FPN neck and mask decoder)",
    ("sam2", "vit-b"): "Hiera-B+ (random weights: SAM-2 Hiera-B+ image encoder + small BEiT-3)",
    ("sam2", "full"): "full (random weights: SAM-2 Hiera-L + BEiT-3 large, the published architecture)",
}
SERVED_MODES = {"uncached": "uncached (image bytes, cache off)", "cached_bytes": "cached (image bytes again)",
                "cached_key": "cached (image_key)"}


def fmt(value: Optional[float], digits: int = 1, suffix: str = "") -> str:
    if value is None:
        return "–"
    return f"{value:,.{digits}f}{suffix}"


def share(value: Optional[float]) -> str:
    return "–" if value is None else f"{100 * value:.0f}%"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def graphs(results: Dict) -> List[str]:
    """The family's three graphs (= Triton engine models), from the in-process stage list."""
    return results["inprocess"]["stages"][1:-1]


def title(meta: Dict) -> str:
    return f"{FAMILY_LABELS.get(meta['family'], meta['family'])} `{meta['size']}`"


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
    return {"rows": rows, "serving_overhead_c1": overhead, "targets": targets(results)}


def targets(results: Dict) -> Dict[str, Optional[float]]:
    """The two served numbers the project tracks: cached prompts/s at the largest N, and how many
    times faster a repeated image is through evf_sam than the same request uncached."""
    served = results.get("served", {})
    counts = served.get("prompt_counts") or [None]
    largest = str(max(c for c in counts if c is not None)) if counts[0] is not None else None
    cached = served.get("prompts", {}).get("cached_key", {}).get(largest, {}) if largest else {}
    repeated = served.get("repeated_image", {})
    uncached, hit = repeated.get("uncached"), repeated.get("cached_bytes")
    return {"prompts": int(largest) if largest else None, "cached_prompts_per_s": cached.get("prompts_per_s"),
            "repeated_image_speedup": ratio(uncached["mean_ms"], hit["mean_ms"]) if uncached and hit else None}


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
    head = f"{title(meta)}, {meta['machine']['cpu_model']} {meta['machine']['vcpus']} vCPU, {meta['date']}"
    return table([head, "p50 ms", "p99 ms", "req/s", "p50 speed-up vs eager", "req/s vs eager"], rows)


def server_parts(results: Dict) -> List[str]:
    return [IMAGE_CACHE_NAME, *graphs(results), "own"]


PART_LABELS = {IMAGE_CACHE_NAME: "cache", "own": "own work"}


def stage_table(results: Dict) -> str:
    stages = results["inprocess"]["stages_ms"]
    rows = [[stage, fmt(stages[EAGER][stage]), fmt(stages[ORT][stage])] for stage in results["inprocess"]["stages"]]
    rows.append(["**sum**", fmt(sum(stages[EAGER].values())), fmt(sum(stages[ORT].values()))])
    return table(["Stage", "(a) eager ms", "(b) ORT ms"], rows)


def server_model_table(point: Dict, parts: Sequence[str], served_model: str) -> str:
    """One measured point: each model's calls, queue and compute per served request."""
    models = point["models"]
    rows = [[f"`{served_model}` (total)", "1", fmt(models[served_model]["queue_ms"]),
             fmt(models[served_model]["compute_ms"]), "–"]]
    for part in parts:
        m = models[part]
        name = "own work (python: decode, views, tokens, masks; BLS round trips)" if part == "own" else f"`{part}`"
        rows.append([name, fmt(m["calls"], 2), fmt(m["queue_ms"]) if part != "own" else "–", fmt(m["compute_ms"]),
                     fmt(m["avg_batch"], 2) if part != "own" else "–"])
    return table(["model", "calls per request", "queue ms", "compute ms", "avg batch"], rows)


def sweep_table(points: Sequence[Dict]) -> str:
    return table(["concurrency", "requests", "infer/s", "mean ms", "p50 ms", "p90 ms", "p99 ms", "CPU ms per request",
                  "other jobs' CPU"],
                 [[p["concurrency"], p["request_count"], fmt(p["throughput"], 2), fmt(p["mean_ms"]), fmt(p["p50_ms"]),
                   fmt(p["p90_ms"]), fmt(p["p99_ms"]), fmt(p.get("cpu_ms_per_request")),
                   share(p.get("other_jobs_cpu_share"))] for p in points])


def served_concurrency_table(points: Sequence[Dict], parts: Sequence[str]) -> str:
    rows = []
    for p in points:
        models = p["models"]
        rows.append([p["concurrency"], fmt(models[EVF_SAM.name]["queue_ms"]), fmt(models[EVF_SAM.name]["compute_ms"]),
                     *(f"{fmt(models[m]['queue_ms'])} + {fmt(models[m]['compute_ms'])}" for m in parts if m != "own"),
                     fmt(models["own"]["compute_ms"]),
                     " / ".join(fmt(models[m]["avg_batch"], 2) for m in parts[1:-1])])
    return table(["concurrency", "evf_sam queue ms", "evf_sam compute ms",
                  *(f"{PART_LABELS.get(m, m)} queue + compute ms" for m in parts if m != "own"), "own work ms",
                  "avg batch (engines)"], rows)


def engine_table(points: Sequence[Dict]) -> str:
    return table(["concurrency", "requests", "infer/s", "p50 ms", "p99 ms", "queue ms", "compute ms", "avg batch",
                  "other jobs' CPU"],
                 [[p["concurrency"], p["request_count"], fmt(p["throughput"], 2), fmt(p["p50_ms"]), fmt(p["p99_ms"]),
                   fmt(p["queue_ms"]), fmt(p["compute_ms"]), fmt(p["avg_batch"], 2), share(p.get("other_jobs_cpu_share"))]
                  for p in points])


def batch_table(batch: Dict) -> str:
    rows = []
    for graph, by_batch in batch.items():
        base = by_batch.get("1")
        for size, stats in by_batch.items():
            rows.append([graph, size, fmt(stats["mean_ms"]), fmt(stats["throughput"], 2),
                         fmt(ratio(stats["throughput"], base["throughput"] if base else None), 2, "×")])
    return table(["graph", "rows (images or prompts)", "ms per call", "rows/s", "rows/s ÷ 1 row"], rows)


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


def single_prompt_baseline(results: Dict) -> Optional[float]:
    """Prompts/s of one-prompt `evf_sam` requests back to back, each a new image (concurrency 1)."""
    single = point_at(results.get("triton", {}).get("models", {}).get(EVF_SAM.name, []), 1)
    return 1000.0 * 1 / single["mean_ms"] if single else None


def served_prompt_rows(results: Dict) -> List[Dict]:
    """One row per N: prompts/s of each mode, the N-single-requests baseline and the gains."""
    served = results.get("served", {})
    points = served.get("prompts", {})
    baseline = single_prompt_baseline(results)
    rows = []
    for count in served.get("prompt_counts", []):
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


def served_points(results: Dict) -> List[Dict]:
    served = results.get("served", {})
    found = [served.get("repeated_image", {}).get(mode) for mode in SERVED_MODES]
    for count in served.get("prompt_counts", []):
        found += [served.get("prompts", {}).get(mode, {}).get(str(count)) for mode in SERVED_MODES]
    return [p for p in found if p]


def served_detail(results: Dict) -> str:
    parts = server_parts(results)
    rows = []
    for p in served_points(results):
        models, cache = p["models"], p["cache"]
        rows.append([f"`{p['model']}`", p["prompts"], p["mode"], p["request_count"], fmt(p["mean_ms"]), fmt(p["p99_ms"]),
                     *(fmt(models[m]["total_ms"] if m != "own" else models[m]["compute_ms"]) for m in parts),
                     f"{cache['hits']} / {cache['misses']}", fmt(p.get("cpu_ms_per_request")),
                     share(p.get("other_jobs_cpu_share"))])
    return table(["model", "N", "mode", "requests", "mean ms", "p99 ms", *(f"{PART_LABELS.get(m, m)} ms" for m in parts),
                  "cache hits / misses", "CPU ms per request", "other jobs' CPU"], rows)


def repeated_image_table(results: Dict) -> str:
    repeated = results["served"]["repeated_image"]
    uncached = repeated.get("uncached")
    rows = []
    for mode, point in repeated.items():
        rows.append([SERVED_MODES[mode], point["request_count"], fmt(point["mean_ms"]), fmt(point["p50_ms"]),
                     fmt(point["p99_ms"]), fmt(ratio(uncached["mean_ms"], point["mean_ms"]) if uncached else None, 2, "×"),
                     fmt(point.get("cpu_ms_per_request")), share(point.get("other_jobs_cpu_share"))])
    return table(["`evf_sam`, one prompt per request", "requests", "mean ms", "p50 ms", "p99 ms",
                  "speed-up vs uncached (mean)", "CPU ms per request", "other jobs' CPU"], rows)


def _served_sections(results: Dict) -> List[str]:
    served = results.get("served")
    if not served or not (served.get("prompts") or served.get("repeated_image")):
        return []
    sections = ["## Served: the image-feature cache and many prompts per request (perf_analyzer, concurrency 1)"]
    if served.get("repeated_image"):
        sections += [
            "### A repeated image through `evf_sam`",
            "The same images again and again, one prompt per request: *uncached* on a server whose cache is off "
            "(every request decodes, encodes and decodes masks), *cached* on a server with the cache on (after one "
            "warm-up pass the image encoder never runs: the cache `evf_sam` and `evf_sam_prompts` share holds the "
            "features).",
            repeated_image_table(results)]
    if served.get("prompts"):
        sections += [
            "### `evf_sam_prompts`: N prompts per request",
            "Prompts per second when one request carries N prompts for one image. *uncached*: the image bytes to a "
            "server whose cache is off (every request runs the image encoder once); *cached (image bytes again)*: "
            "the same bytes after a first request (the sha256 of the bytes finds the features); *cached "
            "(image_key)*: only the key a first response returned. Baseline: N one-prompt `evf_sam` requests, each "
            "a new image (its concurrency-1 point above). Prompts/s = N ÷ mean request latency, one request at a "
            f"time (cache {served['cache_bytes'] / 1024**2:.0f} MiB).",
            served_prompt_table(served_prompt_rows(results))]
    sections += [
        "Per request, from Triton's statistics over exactly the measured requests (each model: queue + compute; "
        "*own work*: the served model's compute time less the calls on its critical path, i.e. its python work "
        "and the BLS round trips). Every point was checked: uncached points show one cache miss and one "
        "image-encoder run per request, cached points no miss and no encoder run, and no request failed.",
        served_detail(results)]
    return sections


def _machine_lines(meta: Dict) -> List[str]:
    m, v = meta["machine"], meta["versions"]
    load = meta.get("load_average", {})
    others = ", ".join(f"{k.split(':')[0]} {share(v)}" for k, v in meta.get("other_jobs_cpu_share", {}).items())
    return [
        f"- Date {meta['date']}, git commit `{meta.get('git_commit', 'unknown')}`",
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
    flops = model.get("encoder_flops")
    lines = [f"- Family `{meta['family']}` ({FAMILY_LABELS.get(meta['family'], '')}), recipe `{meta['recipe']}`, "
             f"size `{meta['size']}`: {SIZE_LABELS.get((meta['family'], meta['size']), meta['size'])}",
             f"- Parameters: {params}"]
    if model.get("exporter_commit"):
        lines.append(f"- ONNX graphs exported by commit `{model['exporter_commit']}`")
    if flops:
        lines.append(f"- Image encoder ({flops['encoder']}): {flops['tflop']:.3f} TFLOP per 1024² image "
                     "(torch.utils.flop_counter, a multiply-add = 2 FLOPs)")
    lines += [f"- Inputs: {len(meta['samples'])} (image file, prompt) pairs, the same bytes for (a), (b) and (c):",
              *[f"  - {s['format']} {s['width']}x{s['height']} ({s['bytes']:,} bytes), prompt “{s['prompt']}”"
                for s in meta["samples"]]]
    return lines


def _target_lines(cmp: Dict) -> List[str]:
    t = cmp["targets"]
    lines = []
    if t["cached_prompts_per_s"] is not None:
        lines.append(f"- Cached `evf_sam_prompts`, N = {t['prompts']}: **{t['cached_prompts_per_s']:.1f} prompts/s** "
                     "(image_key, concurrency 1)")
    if t["repeated_image_speedup"] is not None:
        lines.append(f"- A repeated image through `evf_sam`: **{t['repeated_image_speedup']:.1f}×** faster cached than "
                     "uncached (mean latency)")
    return lines


def summary_markdown(results: Dict, cmp: Dict, plots: Sequence[str]) -> str:
    meta = results["meta"]
    triton = results.get("triton", {}).get("models", {})
    overhead = cmp["serving_overhead_c1"]
    parts = server_parts(results)
    sections = [
        f"# {title(meta)} benchmark on {meta['machine']['cpu_model']} ({meta['machine']['vcpus']} vCPU), {meta['date']}",
        "README snippet (single-stream latency, throughput at the concurrency shown; ratios to the eager reference):",
        readme_snippet(results, cmp),
        *(["Served, with the image-feature cache:", "\n".join(_target_lines(cmp))] if _target_lines(cmp) else []),
        f"Whole suite (`{meta['command']}`): **{meta['wall_seconds']['total'] / 60:.1f} min** wall "
        f"({', '.join(f'{k} {v:.0f} s' for k, v in meta['wall_seconds'].items() if k != 'total')}).",
        "## Machine, versions, commit", "\n".join(_machine_lines(meta)),
        "## Model and inputs", "\n".join(_model_lines(meta)),
        "## Side by side: same inputs, one run",
        "(a) upstream's eager `inference` path (`evfsam.pipeline`), fp32 on CPU; (b) the three exported graphs in this "
        "process on ONNX Runtime with the served pipeline's numpy steps; (c) `evf_sam` on tritonserver (one python "
        "model calling the image-feature cache and the three engines through BLS), measured by perf_analyzer over "
        "gRPC on a server whose cache is off, every request a new image's bytes. (a) and (b) run one request at a "
        "time, their calls interleaved; each number includes decoding the file and producing the full-size mask.",
        deployment_table(cmp["rows"]),
    ]
    agreement = results["inprocess"].get("agreement")
    if agreement:
        sections.append(f"(a) and (b) masks agree on {100 * agreement['min_pixel_agreement']:.3f}% of the pixels or more "
                        f"(per sample; scores differ by at most {agreement['max_score_difference']:.2g}).")
    if overhead:
        sections.append(
            f"Serving overhead at concurrency 1, (c) ÷ (b): p50 latency **{overhead['p50_ratio']:.2f}×** "
            f"({overhead['p50_extra_ms']:+.1f} ms per request), throughput {overhead['throughput_ratio']:.2f}×.")
    sections += ["## Per-stage breakdown (ms per request, one request at a time)",
                 "In-process, median per stage (`preprocess`: decode, views, tokens; `postprocess`: the mask at the "
                 "original size):", stage_table(results)]
    single = point_at(triton.get(EVF_SAM.name, []), 1)
    if single:
        sections += ["Served, `evf_sam` at concurrency 1 (Triton's statistics over exactly the measured requests; the "
                     "python work runs inside `evf_sam` itself):", server_model_table(single, parts, EVF_SAM.name)]
    if triton:
        sections += ["## Triton: throughput and latency vs concurrency (perf_analyzer)",
                     f"### `{EVF_SAM.name}` (cache off, every request a new image)", sweep_table(triton[EVF_SAM.name]),
                     "Per model, per `evf_sam` request (Triton's statistics):",
                     served_concurrency_table(triton[EVF_SAM.name], parts)]
        for graph in graphs(results):
            if graph in triton:
                sections += [f"### `{graph}` alone (real preprocessed inputs)", engine_table(triton[graph])]
    if results.get("batch_scaling"):
        sections += ["## Row scaling (in-process ONNX Runtime, each graph alone)",
                     "Rows: images for the image encoder, prompts for BEiT-3 and the mask decoder (one image's features "
                     "broadcast over them, as served).", batch_table(results["batch_scaling"])]
    if results.get("prompt_scaling"):
        sections += ["## N prompts on one image, in-process",
                     "Encoder once: the image is decoded and encoded once; ORT runs BEiT-3 and the decoder on the N "
                     "prompts together, eager loops over them as upstream's `segment_many`. N pipelines: N independent "
                     f"requests. Milliseconds for all N prompts, best of {meta['budget']['prompt_repeats']} runs.",
                     prompt_table(results["prompt_scaling"])]
    sections += [*_served_sections(results),
                 "## Plots", "\n".join(f"![{p}](plots/{p})" for p in plots),
                 "## Not measured in this run", "\n".join(f"- {n}" for n in meta["not_measured"]),
                 "## Notes", "\n".join(f"- {n}" for n in meta["notes"]),
                 "## Files", "\n".join(f"- `{f}`" for f in meta["files"])]
    return "\n\n".join(sections) + "\n"
