"""The CPU benchmark suite of one model family, end to end (`make bench`).

    python -m benchmarks.run [--family ori|sam2] [--size tiny|vit-b|full] [--out DIR]
    python -m benchmarks.run --render DIR      # redraw plots/ and summary.md from DIR/results.json

1. a random-weight checkpoint of the family at the chosen size and its ONNX export under
   build/bench/<family>-<size>/ (reused when present);
2. in-process, same inputs, one run: (a) eager PyTorch vs (b) the three graphs on ONNX Runtime with
   the served pipeline's numpy steps, end to end and per stage; row and prompt-count scaling;
3. tritonserver on the python-ort repository with the cache off (free ports): perf_analyzer on
   `evf_sam` over concurrency (every request a new image) and on each engine model alone, per-model
   breakdowns from Triton's statistics; the uncached points of 4.;
4. the same repository with the cache on: `evf_sam_prompts` with N = 1, 4, 16 prompts per request,
   uncached / cached image bytes / cached image_key, and a repeated image through `evf_sam` uncached vs
   cached, every point checked against the server's cache and encoder counters (prompt_sweep.py);
5. results.json (with machine, date, git commit), perf_analyzer's CSV + stdout, summary.md and PNG
   plots in benchmarks/results/<machine>-<date>[-sam2][-<size>]/.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import shlex
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from evfsam import provenance
from evfsam.specs import EVF_SAM, FAMILIES, FamilySpec

from . import machine, plots, prompt_sweep, report
from . import perf_analyzer as pa
from .budgets import BUDGETS, Budget
from .flops import image_encoder_flops
from .inprocess import EagerPipeline, OrtPipeline, exported_family
from .measure import EAGER, ORT, batch_scaling, prompt_scaling, side_by_side, stage_breakdown
from .samples import SAMPLE_IMAGE, Sample, derived_images, load_samples

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
CHECKPOINT_DONE = "sentencepiece.bpe.model"  # written last by export.tiny_checkpoint
# What the exported graphs are made of: an export by other code than the checkout's is made again.
MODEL_CODE = ("evfsam/modeling", "evfsam/specs.py", "evfsam/recipes.py", "evfsam/checkpoint.py", "export")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=sorted(FAMILIES), default="ori")
    parser.add_argument("--size", choices=sorted(BUDGETS), default="tiny")
    parser.add_argument("--out", type=Path, help="results folder (default benchmarks/results/<machine>-<date>[-sam2][-<size>])")
    parser.add_argument("--build-dir", type=Path, help="checkpoint, ONNX, repositories, inputs (default build/bench/<family>-<size>)")
    parser.add_argument("--images", type=Path, nargs="+", help="image files (default: assets/sample.jpg + 2 re-encodings)")
    parser.add_argument("--engine-samples", type=int, default=2, help="distinct inputs per engine model for perf_analyzer")
    parser.add_argument("--skip-triton", action="store_true", help="in-process measurements only (debugging)")
    parser.add_argument("--skip-prompt-sweep", action="store_true",
                        help="leave out the cache / N-prompts sweep (4.), which starts one more server")
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


def stale_export(onnx_dir: Path) -> Optional[str]:
    """Why the graphs in `onnx_dir` may not be what the checked-out code exports (None: they are)."""
    manifest = provenance.read_manifest(onnx_dir)
    if manifest is None:
        return "no export yet"
    commit = manifest.get("exporter_commit", "unknown")
    if commit == "unknown" or commit.endswith("-dirty"):
        return f"exported by code that was not committed ({commit})"
    for against in ([commit, "HEAD"], ["HEAD"]):  # since that commit, and uncommitted changes now
        changed = subprocess.run(["git", "-C", str(REPO_ROOT), "diff", "--quiet", *against, "--", *MODEL_CODE])
        if changed.returncode != 0:
            return f"the model or export code changed since the export ({commit})"
    return None


def prepare_model(size: str, build_dir: Path, family_name: str = "ori") -> Tuple[Path, Path]:
    """The random-weight checkpoint and its ONNX graphs, made once and reused while the code that
    exports them is unchanged."""
    from export.__main__ import parse_args as export_args, run as export_run
    from export.tiny_checkpoint import write_tiny_checkpoint

    checkpoint, onnx_dir = build_dir / "checkpoint", build_dir / "onnx"
    if not (checkpoint / CHECKPOINT_DONE).is_file():
        write_tiny_checkpoint(checkpoint, size, family=family_name)
    reason = stale_export(onnx_dir)
    if reason is not None:
        print(f"exporting {checkpoint}: {reason}", flush=True)
        export_run(export_args(["--checkpoint", str(checkpoint), "--output-dir", str(onnx_dir)]))
    return checkpoint, onnx_dir


def measure_inprocess(checkpoint: Path, onnx_dir: Path, samples: Sequence[Sample], budget: Budget,
                      inputs_dir: Path, engine_samples: int) -> Dict:
    """(a) and (b); also writes perf_analyzer's input files while the ORT sessions are loaded."""
    from .triton_sweep import write_input_data

    ort = OrtPipeline(onnx_dir)
    eager = EagerPipeline(checkpoint, ort.recipe.name)
    side = side_by_side(eager, ort, samples, budget)
    result = {"stages": list(ort.stages), "agreement": side.pop("agreement"), "side_by_side": side,
              "stages_ms": stage_breakdown(eager, ort, samples, budget)}
    print(f"  (a) eager p50 {side[EAGER]['stats']['p50_ms']:.0f} ms, (b) ORT p50 {side[ORT]['stats']['p50_ms']:.0f} ms; "
          f"masks agree on >= {100 * result['agreement']['min_pixel_agreement']:.2f}% of the pixels", flush=True)
    result["batch_scaling"] = batch_scaling(ort, samples, budget) if budget.batch_sizes else {}
    result["prompt_scaling"] = prompt_scaling(eager, ort, samples[0], budget) if budget.prompt_counts else {}
    result["parameters"] = eager.parameter_counts()
    result["exporter_commit"] = provenance.read_manifest(onnx_dir).get("exporter_commit")
    result["perf_inputs"] = write_input_data(ort, samples, engine_samples, max(budget.concurrency), inputs_dir)
    return result


def request_latencies(inprocess: Dict, family_spec: FamilySpec) -> Dict[str, float]:
    """Seconds per single request of each served model, to size perf_analyzer's request counts."""
    latencies = {EVF_SAM.name: inprocess["side_by_side"][ORT]["stats"]["mean_ms"] / 1000}
    for spec in family_spec.graphs:
        one_row = inprocess["batch_scaling"].get(spec.name, {}).get("1", {}).get("mean_ms")
        latencies[spec.name] = (one_row or inprocess["stages_ms"][ORT][spec.name]) / 1000
    return latencies


def measure_served(onnx_dir: Path, build_dir: Path, family_spec: FamilySpec, inprocess: Dict,
                   samples: Sequence[Sample], budget: Budget, out_dir: Path, sweep_prompts: bool,
                   wall: Dict[str, float], others: Dict[str, float]) -> Tuple[Dict, Dict]:
    """(c) and the cache / N-prompts sweep on two servers of the same graphs: the cache off, then on."""
    from serving.repository import RepositoryOptions, write_repository
    from serving.server import TritonServer

    from . import triton_sweep

    inputs_dir, pa_dir = build_dir / "perf_inputs", out_dir / "perf_analyzer"
    options = RepositoryOptions()
    uncached = write_repository(build_dir / "model_repository_uncached", onnx_dir, RepositoryOptions(cache_bytes=0))
    served_parts = []
    with phase("served-uncached: cache off: evf_sam and engine sweeps, uncached points", wall, others), \
            TritonServer.on_free_ports(uncached, log_file=build_dir / "tritonserver_uncached.log",
                                       ready_timeout=1800) as server:
        triton = triton_sweep.measure(server, family_spec, inprocess["perf_inputs"],
                                      request_latencies(inprocess, family_spec), budget, pa_dir)
        if sweep_prompts:
            served_parts.append(prompt_sweep.sweep(server, family_spec, (prompt_sweep.UNCACHED,), samples, budget,
                                                   inputs_dir, pa_dir))
    if sweep_prompts:
        cached = write_repository(build_dir / "model_repository_cached", onnx_dir, options)
        with phase("served-cached: cache on: cached points", wall, others), \
                TritonServer.on_free_ports(cached, log_file=build_dir / "tritonserver_cached.log",
                                           ready_timeout=1800) as server:
            served_parts.append(prompt_sweep.sweep(server, family_spec, (prompt_sweep.CACHED_BYTES, prompt_sweep.CACHED_KEY),
                                                   samples, budget, inputs_dir, pa_dir))
    served = {}
    if served_parts:
        served = {"cache_bytes": options.cache_budget(family_spec.name),
                  "prompt_counts": list(budget.served_prompt_counts), **prompt_sweep.merge(*served_parts)}
    return triton, served


def clear_previous(out_dir: Path) -> None:
    """Drop what an earlier run of this suite wrote there, so that no stale file survives."""
    for name in ("perf_analyzer", "plots"):
        shutil.rmtree(out_dir / name, ignore_errors=True)
    for name in ("results.json", "summary.md"):
        (out_dir / name).unlink(missing_ok=True)


def default_out(info: Dict, family_name: str, size: str, date: str, kind: str = "") -> Path:
    suffix = ("" if family_name == "ori" else f"-{family_name}") + ("" if size == "tiny" else f"-{size}")
    return RESULTS_DIR / f"{machine.slug(info)}-{date}{kind}{suffix}"


def notes(others: Dict[str, float], budget: Budget) -> List[str]:
    found = [
        "Random weights: the masks are meaningless, the amount of computation is the real model's at this size.",
        f"perf_analyzer runs a fixed request count per concurrency level (about {budget.level_seconds:.0f} s of "
        "single-stream work); with few requests p99 is close to the slowest request.",
        "ONNX Runtime uses its default intra-op threads in (b) and in Triton's python-ort engines (1 instance each); "
        "`evf_sam` and `evf_sam_prompts` run 4 instances each, the cache 1, as `make repository` generates.",
        "(c) and the uncached points run on a repository generated with the cache off (cache_bytes 0), the cached "
        "points on the default repository; both serve the same ONNX files.",
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


def collect(args, family_spec: FamilySpec, recipe: str, info, budget, samples, inprocess, triton, served, wall,
            load: Dict, date) -> Dict:
    meta = {
        "family": family_spec.name, "recipe": recipe, "size": args.size, "date": date,
        "git_commit": provenance.git_commit(),
        "command": "python -m benchmarks.run " + shlex.join(sys.argv[1:]),
        "machine": info, "versions": machine.versions(), "perf_analyzer_version": pa.version(),
        "tritonserver_version": triton.get("tritonserver_version") if triton else None,
        "model": {"parameters": inprocess["parameters"], "encoder_flops": image_encoder_flops(family_spec.name, args.size),
                  "exporter_commit": inprocess.get("exporter_commit")},
        "samples": [s.describe() for s in samples], "budget": budget.to_dict(), "wall_seconds": wall, **load,
        "not_measured": NOT_MEASURED + (["Triton: skipped (--skip-triton)."] if not triton else [])
        + (["Cache / N-prompts sweep: skipped."] if not served else []),
        "notes": notes(load["other_jobs_cpu_share"], budget),
    }
    return {"meta": meta, "inprocess": {k: inprocess[k] for k in ("stages", "agreement", "side_by_side", "stages_ms")},
            "batch_scaling": inprocess["batch_scaling"], "prompt_scaling": inprocess["prompt_scaling"],
            "triton": triton or {}, "served": served or {}}


def write_outputs(results: Dict, out_dir: Path, started: float) -> None:
    results["comparison"] = report.comparison(results)
    results["meta"]["wall_seconds"]["total"] = time.perf_counter() - started
    (out_dir / "results.json").write_text(json.dumps(results, indent=1, default=str))
    render(out_dir)


def render(out_dir: Path) -> None:
    """plots/ and summary.md from the folder's results.json (also after changing the report code)."""
    results = json.loads((out_dir / "results.json").read_text())
    if "families" in results:  # a family comparison (benchmarks/families.py)
        from . import families

        families.render(out_dir)
        return
    written = plots.write_all(results, out_dir / "plots")
    results["meta"]["files"] = sorted({str(p.relative_to(out_dir)) for p in out_dir.rglob("*") if p.is_file()}
                                      | {"summary.md"})
    (out_dir / "summary.md").write_text(report.summary_markdown(results, report.comparison(results), written))


def run_family(family_name: str, size: str, build_dir: Path, budget: Budget, samples_from: Optional[Sequence[Path]],
               engine_samples: int, skip_triton: bool, skip_prompt_sweep: bool, out_dir: Path,
               wall: Dict[str, float], others: Dict[str, float], loads: Dict) -> Dict:
    """Every measurement of one family; returns what `collect` needs."""
    with phase(f"model: random {family_name} {size} checkpoint + ONNX export", wall, others):
        checkpoint, onnx_dir = prepare_model(size, build_dir, family_name)
    family_spec, recipe = exported_family(onnx_dir)
    images = samples_from or derived_images(SAMPLE_IMAGE, build_dir / "images")
    samples = load_samples(images)[: budget.samples]
    with phase("in-process: (a) eager PyTorch, (b) ONNX Runtime", wall, others):
        inprocess = measure_inprocess(checkpoint, onnx_dir, samples, budget, build_dir / "perf_inputs", engine_samples)
    gc.collect()
    loads["before_triton"] = machine.load_average()
    triton = served = None
    if not skip_triton:
        triton, served = measure_served(onnx_dir, build_dir, family_spec, inprocess, samples, budget, out_dir,
                                        not skip_prompt_sweep, wall, others)
    return {"family_spec": family_spec, "recipe": recipe, "samples": samples, "inprocess": inprocess,
            "triton": triton, "served": served}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.render:
        render(args.render)
        return 0
    started, wall, others = time.perf_counter(), {}, {}
    info, budget = machine.machine_info(), BUDGETS[args.size]
    date = datetime.date.today().isoformat()
    build_dir = args.build_dir or Path("build") / "bench" / f"{args.family}-{args.size}"
    out_dir = args.out or default_out(info, args.family, args.size, date)
    clear_previous(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    loads = {"start": machine.load_average()}
    found = run_family(args.family, args.size, build_dir, budget, args.images, args.engine_samples, args.skip_triton,
                       args.skip_prompt_sweep, out_dir, wall, others, loads)
    loads["end"] = machine.load_average()
    results = collect(args, found["family_spec"], found["recipe"], info, budget, found["samples"], found["inprocess"],
                      found["triton"], found["served"], wall, {"load_average": loads, "other_jobs_cpu_share": others},
                      date)
    write_outputs(results, out_dir, started)
    print(f"wrote {out_dir}/summary.md ({results['meta']['wall_seconds']['total'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
