"""The reliability suite, end to end (`make reliability`, about an hour on 2 cores).

    python -m benchmarks.reliability [--soak-minutes 30] [--soak-vitb-minutes 10] [--goodput-seconds 60]
        [--fuzz-requests 10000] [--phases overload goodput cobatch fuzz faults soak soak-vitb] [--out DIR]

Random-weight checkpoints (tiny; SAM ViT-B for the second soak) exported to ONNX under
build/reliability/ and reused, python-ort repositories with a feature cache of a few images, real
tritonservers on free ports.  Phases (see each module's docstring): overload, goodput under client
deadlines, co-batching, fuzz, faults, soak (tiny), soak (ViT-B).  results.json, summary.md and the
plots go to benchmarks/results/<machine>-<date>-reliability/, results.json rewritten after every
phase; a phase that fails is recorded as failed and the others still run.
"""
from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict

from evfsam import provenance
from serving.server import TritonServer

from .. import machine
from . import cobatch, faults, fuzz, goodput, models, overload, report, soak
from .inputs import image_set
from .launcher import Launcher

RESULTS_DIR = Path(__file__).resolve().parents[1] / "results"
PHASES = ("overload", "goodput", "cobatch", "fuzz", "faults", "soak", "soak-vitb")
SOAK_IMAGES = 12


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.reliability", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="results folder (default benchmarks/results/<machine>-<date>-reliability)")
    parser.add_argument("--build-dir", type=Path, default=Path("build/reliability"))
    parser.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES))
    parser.add_argument("--soak-minutes", type=float, default=30.0, help="soak on the tiny model")
    parser.add_argument("--soak-vitb-minutes", type=float, default=10.0, help="soak with SAM ViT-B weights")
    parser.add_argument("--soak-warmup-minutes", type=float, default=3.0, help="RSS growth is measured after this")
    parser.add_argument("--soak-malloc", default="system", help="allocator of the soaked tritonserver "
                        "(serving.server ALLOCATORS); results under soak/<size>-<allocator> unless 'system'")
    parser.add_argument("--soak-concurrency", type=int, default=4, help="perf_analyzer concurrency per served model")
    parser.add_argument("--goodput-seconds", type=float, default=60.0)
    parser.add_argument("--single-stream-seconds", type=float, default=20.0)
    parser.add_argument("--fuzz-requests", type=int, default=10_000)
    parser.add_argument("--fuzz-seed", type=int, default=11)
    parser.add_argument("--launcher-faults", nargs="*", default=list(faults.LAUNCHER_TARGETS),
                        help=f"stubs to kill under python -m serving.server (default {' '.join(faults.LAUNCHER_TARGETS)})")
    parser.add_argument("--merge", action="store_true",
                        help="keep the other phases of --out's results.json (each phase records the commit it ran at)")
    parser.add_argument("--render", type=Path, metavar="RESULTS_DIR", help="measure nothing: redraw RESULTS_DIR")
    return parser.parse_args(argv)


class Run:
    def __init__(self, args: argparse.Namespace, out_dir: Path):
        self.args, self.out_dir = args, out_dir
        self.command = "python -m benchmarks.reliability " + shlex.join(sys.argv[1:])
        existing = out_dir / "results.json"
        if args.merge and existing.is_file():
            self.results = json.loads(existing.read_text())
        else:
            self.results = {"meta": {
                "date": datetime.date.today().isoformat(), "git_commit": provenance.git_commit(),
                "command": self.command, "machine": machine.machine_info(), "versions": machine.versions(),
                "load_average_start": machine.load_average(), "wall_seconds": {}, "cpu_share_others": {}}}
        self.results["meta"].setdefault("phase_runs", {})
        self.started = time.perf_counter()

    @contextmanager
    def phase(self, name: str):
        print(f"== {name}", flush=True)
        start, share = time.perf_counter(), machine.CpuShare()
        try:
            yield
        finally:
            meta = self.results["meta"]
            meta["wall_seconds"][name] = round(time.perf_counter() - start, 1)
            meta["cpu_share_others"][name] = share.others()
            meta["phase_runs"][name] = {"git_commit": provenance.git_commit(), "command": self.command,
                                        "finished": datetime.datetime.now().isoformat(timespec="seconds")}
            if not self.args.merge:
                meta["wall_seconds"]["total"] = round(time.perf_counter() - self.started, 1)
            print(f"== {name}: {meta['wall_seconds'][name]:.0f} s (other jobs used "
                  f"{100 * (meta['cpu_share_others'][name] or 0):.0f}% of the CPUs)", flush=True)
            self.save()

    def attempt(self, key: str, measure: Callable[[], Dict], place: Dict = None) -> None:
        """Run one scenario; a failure is recorded in its place and the suite goes on."""
        target = self.results if place is None else place
        try:
            target[key] = measure()
        except Exception as exc:  # noqa: BLE001 - reported in results.json and summary.md
            traceback.print_exc()
            target[key] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}

    def save(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.results["meta"]["load_average_end"] = machine.load_average()
        (self.out_dir / "results.json").write_text(json.dumps(self.results, indent=1))


def render(out_dir: Path) -> None:
    results = json.loads((out_dir / "results.json").read_text())
    plots = report.write_plots(results, out_dir)
    print(f"wrote {report.write_summary(results, out_dir, plots)}")


def server_for(repository: Path, log_file: Path, malloc: str = "system") -> TritonServer:
    """A tritonserver on free ports, started and made ready by `with`, stopped when the block ends."""
    return TritonServer.on_free_ports(repository, log_file=log_file, ready_timeout=900, malloc=malloc)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.render:
        render(args.render)
        return 0
    info = machine.machine_info()
    out_dir = args.out or RESULTS_DIR / f"{machine.slug(info)}-{datetime.date.today().isoformat()}-reliability"
    run = Run(args, out_dir)
    build, logs = args.build_dir, args.build_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with run.phase("model: tiny checkpoint, ONNX, repositories"):
        _, tiny_onnx = models.prepare_model("tiny", build / "tiny")
        repository = models.churn_repository(tiny_onnx, build / "tiny" / "repository")
    phases = set(args.phases)
    if "overload" in phases:
        with run.phase("overload"):
            def measure_overload():
                with server_for(repository, logs / "overload.log") as server:
                    return overload.run(server.http_url, server.grpc_url, repository)
            run.attempt("overload", measure_overload)
    if "goodput" in phases:
        run.results.setdefault("goodput", {})
        plan = goodput.GoodputPlan(args.goodput_seconds, single_stream_s=args.single_stream_seconds)
        for profile, options in goodput.PROFILES.items():
            with run.phase(f"goodput ({profile})"):
                def measure_goodput(profile=profile, options=options):
                    served = models.churn_repository(tiny_onnx, build / "tiny" / f"repository-{profile}", **options)
                    with Launcher(served, logs / f"goodput-{profile}.log") as launcher:
                        return {"repository_options": options, **goodput.run(launcher, plan)}
                run.attempt(profile, measure_goodput, run.results["goodput"])
    if "cobatch" in phases:
        with run.phase("cobatch"):
            def measure_cobatch():
                held = models.churn_repository(tiny_onnx, build / "tiny" / "repository-cobatch")
                models.hold_batches(held, [s.name for s in cobatch.BATCHED_ENGINES], cobatch.GROUP_SIZE,
                                    cobatch.HOLD_DELAY_US)
                with server_for(held, logs / "cobatch.log") as server:
                    return cobatch.run(server.http_url, server.grpc_url, tiny_onnx)
            run.attempt("cobatch", measure_cobatch)
    if "fuzz" in phases:
        with run.phase("fuzz"):
            def measure_fuzz():
                with server_for(repository, logs / "fuzz.log") as server:
                    return fuzz.run(server.http_url, server.grpc_url, args.fuzz_requests, args.fuzz_seed,
                                    stub_check=server.dead_stubs)
            run.attempt("fuzz", measure_fuzz)
    if "faults" in phases:
        with run.phase("faults"):
            run.attempt("faults", lambda: faults.run(repository, logs / "faults", build / "evaluation",
                                                     args.launcher_faults))
    run.results.setdefault("soak", {})
    warmup_s = 60 * args.soak_warmup_minutes
    if "soak" in phases:
        key = _soak_key("tiny", args.soak_malloc)
        with run.phase(f"soak ({key})"):
            plan = soak.SoakPlan(60 * args.soak_minutes, args.soak_concurrency, warmup_s=warmup_s)
            run.attempt(key, lambda: _soak(repository, plan, build / "tiny", logs / f"soak-{key}.log", args.soak_malloc),
                        run.results["soak"])
    if "soak-vitb" in phases:
        with run.phase("model: ViT-B checkpoint, ONNX, repository"):
            _, vitb_onnx = models.prepare_model("vit-b", build / "vit-b")
            vitb_repository = models.churn_repository(vitb_onnx, build / "vit-b" / "repository")
        key = _soak_key("vit-b", args.soak_malloc)
        with run.phase(f"soak ({key})"):
            plan = soak.SoakPlan(60 * args.soak_vitb_minutes, args.soak_concurrency, round_s=120.0,
                                 warmup_s=min(warmup_s, 60 * args.soak_vitb_minutes / 3))
            run.attempt(key, lambda: _soak(vitb_repository, plan, build / "vit-b", logs / f"soak-{key}.log",
                                           args.soak_malloc), run.results["soak"])
    run.save()
    render(out_dir)
    return 0


def _soak_key(size: str, malloc: str) -> str:
    return size if malloc == "system" else f"{size}-{malloc}"


def _soak(repository: Path, plan: soak.SoakPlan, work_dir: Path, log_file: Path, malloc: str) -> Dict:
    with server_for(repository, log_file, malloc) as server:
        return soak.run(server, image_set(SOAK_IMAGES), plan, work_dir / "soak")


if __name__ == "__main__":
    sys.exit(main())
