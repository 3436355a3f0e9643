"""The CPU benchmark suite, end to end (`make bench`).

    python -m benchmarks.run [--size tiny|vit-b|full] [--out benchmarks/results/<machine>-<date>]

1. a random-weight checkpoint of the chosen size and its ONNX export under build/bench/<size>/
   (reused when present);
2. in-process, same inputs, one run: (a) eager PyTorch vs (b) the three graphs on ONNX Runtime,
   end to end and per stage; batch-size and prompt-count scaling;
3. the python-ort model repository on the real tritonserver (free ports), perf_analyzer on
   `evf_sam` and on each engine model with --input-data made from the same real inputs;
4. encode once, prompt many: perf_analyzer on `evf_sam_prompts` with N = 1, 4, 16 prompts per
   request, embedding cache off vs on (image bytes again, image_key), checked against the server's
   cache and engine counters (benchmarks/prompt_sweep.py);
5. results.json, perf_analyzer's CSV + stdout, summary.md and PNG plots in the output folder.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import shlex
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, List, Tuple

from evfsam.specs import EVF_SAM, GRAPHS

from . import machine, plots, prompt_sweep, report
from . import perf_analyzer as pa
from .budgets import BUDGETS, Budget
from .inprocess import EagerPipeline, OrtPipeline
from .measure import EAGER, ORT, batch_scaling, prompt_scaling, side_by_side, stage_breakdown
from .samples import SAMPLE_IMAGE, derived_images, load_samples

RESULTS_DIR = Path(__file__).resolve().parent / "results"
CHECKPOINT_DONE = "sentencepiece.bpe.model"  # written last by export.tiny_checkpoint
ONNX_DONE = "manifest.json"  # written last by python -m export


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(BUDGETS), default="tiny")
    parser.add_argument("--out", type=Path, help="results folder (default benchmarks/results/<machine>-<date>[-<size>])")
    parser.add_argument("--build-dir", type=Path, help="checkpoint, ONNX, repository, inputs (default build/bench/<size>)")
    parser.add_argument("--images", type=Path, nargs="+", help="image files (default: assets/sample.jpg + 2 re-encodings)")
    parser.add_argument("--engine-samples", type=int, default=2, help="distinct inputs per engine model for perf_analyzer")
    parser.add_argument("--skip-triton", action="store_true", help="in-process measurements only (debugging)")
    parser.add_argument("--skip-prompt-sweep", action="store_true",
                        help="leave out the evf_sam_prompts sweep (4.), which starts two more servers")
    parser.add_argument("--render", type=Path, metavar="RESULTS_DIR",
                        help="measure nothing: redraw the plots and summary.md of RESULTS_DIR from its results.json")
    return parser.parse_args(argv)


@contextmanager
def phase(name: str, wall: Dict[str, float], others: Dict[str, float]):
    """Times a phase and records the share of the machine's CPU that other jobs took meanwhile."""
    print(f"== {name}", flush=True)
    start, share = time.perf_counter(), machine.CpuShare()
    yield
    wall[name], others[name] = time.perf_counter() - start, share.others()
    print(f"== {name}: {wall[name]:.0f} s (other jobs used {100 * (others[name] or 0):.0f}% of the CPUs)", flush=True)


def prepare_model(size: str, build_dir: Path) -> Tuple[Path, Path]:
    """The random-weight checkpoint and its ONNX graphs, made once and reused."""
    from export.__main__ import parse_args as export_args, run as export_run
    from export.tiny_checkpoint import write_tiny_checkpoint

    checkpoint, onnx_dir = build_dir / "checkpoint", build_dir / "onnx"
    if not (checkpoint / CHECKPOINT_DONE).is_file():
        write_tiny_checkpoint(checkpoint, size)
    if not (onnx_dir / ONNX_DONE).is_file():
        export_run(export_args(["--checkpoint", str(checkpoint), "--output-dir", str(onnx_dir)]))
    return checkpoint, onnx_dir


def parameter_counts(eager: EagerPipeline) -> Dict[str, int]:
    model = eager.pipeline.model
    encoder = sum(p.numel() for p in model.visual_model.image_encoder.parameters())
    beit3 = sum(p.numel() for p in model.mm_extractor.parameters())
    total = sum(p.numel() for p in model.parameters())
    return {"sam_image_encoder": encoder, "beit3": beit3, "decoder_and_rest": total - encoder - beit3, "total": total}


def measure_inprocess(checkpoint: Path, onnx_dir: Path, samples, budget: Budget, inputs_dir: Path,
                      engine_samples: int) -> Dict:
    """(a) and (b); also writes perf_analyzer's input files while the ORT sessions are loaded."""
    from .triton_sweep import write_input_data

    eager, ort = EagerPipeline(checkpoint), OrtPipeline(onnx_dir)
    result = {"side_by_side": side_by_side(eager, ort, samples, budget),
              "stages_ms": stage_breakdown(eager, ort, samples, budget)}
    print(f"  (a) eager p50 {result['side_by_side'][EAGER]['stats']['p50_ms']:.0f} ms, "
          f"(b) ORT p50 {result['side_by_side'][ORT]['stats']['p50_ms']:.0f} ms", flush=True)
    result["batch_scaling"] = batch_scaling(ort, samples, budget)
    result["prompt_scaling"] = prompt_scaling(eager, ort, samples[0], budget)
    result["parameters"] = parameter_counts(eager)
    result["perf_inputs"] = write_input_data(ort, samples, engine_samples, inputs_dir)
    return result


def request_latencies(inprocess: Dict) -> Dict[str, float]:
    """Seconds per single request of each served model, to size perf_analyzer's request counts."""
    latencies = {EVF_SAM.name: inprocess["side_by_side"][ORT]["stats"]["mean_ms"] / 1000}
    for spec in GRAPHS:
        latencies[spec.name] = inprocess["batch_scaling"][spec.name]["1"]["mean_ms"] / 1000
    return latencies


def measure_triton(onnx_dir: Path, build_dir: Path, inputs: Dict[str, Path], latencies: Dict[str, float],
                   budget: Budget, out_dir: Path) -> Dict:
    from serving.repository import RepositoryOptions, write_repository

    from .triton_sweep import measure

    repository = write_repository(build_dir / "model_repository", onnx_dir, RepositoryOptions())
    return measure(repository, inputs, latencies, budget, out_dir / "perf_analyzer",
                   build_dir / "tritonserver.log")


def measure_served_prompts(onnx_dir: Path, build_dir: Path, samples, budget: Budget, out_dir: Path) -> Dict:
    from serving.repository import RepositoryOptions

    return prompt_sweep.measure(onnx_dir, build_dir, samples, budget, out_dir / "perf_analyzer" / "evf_sam_prompts",
                                RepositoryOptions().cache_bytes)


def clear_previous(out_dir: Path) -> None:
    """Drop what an earlier run of this suite wrote there, so that no stale file survives."""
    for name in ("perf_analyzer", "plots"):
        shutil.rmtree(out_dir / name, ignore_errors=True)
    for name in ("results.json", "summary.md"):
        (out_dir / name).unlink(missing_ok=True)


def default_out(info: Dict, size: str, date: str) -> Path:
    suffix = "" if size == "tiny" else f"-{size}"
    return RESULTS_DIR / f"{machine.slug(info)}-{date}{suffix}"


def notes(others: Dict[str, float], budget: Budget) -> List[str]:
    found = [
        "Random weights: the masks are meaningless, the amount of computation is the real model's at this size.",
        f"perf_analyzer runs a fixed request count per concurrency level (about {budget.level_seconds:.0f} s of "
        "single-stream work); with few requests p99 is close to the slowest request.",
        "ONNX Runtime uses its default intra-op threads in (b) and in Triton's python-ort engines (1 instance each); "
        "Triton runs 2 instances each of preprocess and postprocess, as `make repository` generates.",
    ]
    busiest = max((v for v in others.values() if v is not None), default=0.0)
    if busiest > 0.05:
        shares = ", ".join(f"{name.split(':')[0]} {100 * v:.0f}%" for name, v in others.items() if v is not None)
        found.append(f"Other jobs shared this machine: they used {shares} of its CPU time during the phases. "
                     "PyTorch's OpenMP threads slow down far more under such contention than ONNX Runtime's (up to "
                     "8x against 2x was seen on this machine), so a busy run overstates (b)'s lead over (a); the "
                     "`min` column is the least disturbed figure.")
    return found


NOT_MEASURED = [
    "GPU: not measured in this run (no GPU here). `make gpu-check` runs benchmarks/gpu_check.py on a CUDA machine.",
    "TensorRT: not measured (no TensorRT run); no TensorRT numbers are reported anywhere.",
]


def collect(args, info, budget, samples, inprocess, triton, served, wall, load: Dict, date) -> Dict:
    meta = {
        "size": args.size, "date": date, "command": "python -m benchmarks.run " + shlex.join(sys.argv[1:]),
        "machine": info, "versions": machine.versions(), "perf_analyzer_version": pa.version(),
        "tritonserver_version": triton.get("tritonserver_version") if triton else None,
        "model": {"parameters": inprocess["parameters"]}, "samples": [s.describe() for s in samples],
        "budget": budget.to_dict(), "wall_seconds": wall, **load,
        "not_measured": NOT_MEASURED + (["Triton: skipped (--skip-triton)."] if not triton else [])
        + (["evf_sam_prompts sweep: skipped."] if not served else []),
        "notes": notes(load["other_jobs_cpu_share"], budget),
    }
    return {"meta": meta, "inprocess": {k: inprocess[k] for k in ("side_by_side", "stages_ms")},
            "batch_scaling": inprocess["batch_scaling"], "prompt_scaling": inprocess["prompt_scaling"],
            "triton": triton or {}, "served_prompts": served or {}}


def write_outputs(results: Dict, out_dir: Path, started: float) -> None:
    results["comparison"] = report.comparison(results)
    results["meta"]["wall_seconds"]["total"] = time.perf_counter() - started
    (out_dir / "results.json").write_text(json.dumps(results, indent=1, default=str))
    render(out_dir)


def render(out_dir: Path) -> None:
    """plots/ and summary.md from the folder's results.json (also after changing the report code)."""
    results = json.loads((out_dir / "results.json").read_text())
    written = plots.write_all(results, out_dir / "plots")
    results["meta"]["files"] = sorted({str(p.relative_to(out_dir)) for p in out_dir.rglob("*") if p.is_file()}
                                      | {"summary.md"})
    (out_dir / "summary.md").write_text(report.summary_markdown(results, report.comparison(results), written))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.render:
        render(args.render)
        return 0
    started, wall, others = time.perf_counter(), {}, {}
    info, budget = machine.machine_info(), BUDGETS[args.size]
    date = datetime.date.today().isoformat()
    build_dir = args.build_dir or Path("build") / "bench" / args.size
    out_dir = args.out or default_out(info, args.size, date)
    clear_previous(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    loads = {"start": machine.load_average()}
    with phase("model: random checkpoint + ONNX export", wall, others):
        checkpoint, onnx_dir = prepare_model(args.size, build_dir)
    images = args.images or derived_images(SAMPLE_IMAGE, build_dir / "images")
    samples = load_samples(images)[: budget.samples]
    with phase("in-process: (a) eager PyTorch, (b) ONNX Runtime", wall, others):
        inprocess = measure_inprocess(checkpoint, onnx_dir, samples, budget, build_dir / "perf_inputs", args.engine_samples)
    gc.collect()
    loads["before_triton"] = machine.load_average()
    triton = served = None
    if not args.skip_triton:
        with phase("triton: perf_analyzer sweeps", wall, others):
            triton = measure_triton(onnx_dir, build_dir, inprocess["perf_inputs"], request_latencies(inprocess),
                                    budget, out_dir)
    if not (args.skip_triton or args.skip_prompt_sweep):
        with phase("prompts: evf_sam_prompts sweep, cache off vs on", wall, others):
            served = measure_served_prompts(onnx_dir, build_dir, samples, budget, out_dir)
    loads["end"] = machine.load_average()
    results = collect(args, info, budget, samples, inprocess, triton, served, wall, {"load_average": loads,
                      "other_jobs_cpu_share": others}, date)
    write_outputs(results, out_dir, started)
    print(f"wrote {out_dir}/summary.md ({results['meta']['wall_seconds']['total'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
