"""Run the real perf_analyzer (tritonclient==2.51.0 wheel) and read what it reports.

One perf_analyzer process per concurrency level with a fixed `--request-count`: 2.51 rejects a
request count with a concurrency range, and a fixed count keeps the run time bounded on a busy
machine, where time-window stabilisation can fail ("Failed to obtain stable measurement").

The CSV (`-f`, `--verbose-csv`) holds the client's view: throughput, p50/p90/p95/p99 latency, the
server-side totals.  stdout is kept next to it; its `Server:` block (counts, and the average request
split into queue and compute) is parsed as well.  The served models call the others through BLS, which
perf_analyzer does not see: the per-model breakdown comes from Triton's statistics (server_stats.py).
"""
from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
import sys
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

COUNT_COLUMNS = ("Concurrency", "Inferences/Second")  # every other CSV column is in microseconds
COUNT_LINE = re.compile(r"^\s*(?P<key>Inference count|Execution count|Successful request count): (?P<value>\d+)")
LATENCY_LINE = re.compile(r"^\s*Avg request latency: (?P<total>\d+) usec \((?P<parts>[^)]*)\)")
PART = re.compile(r"(?P<name>[a-z ]+?) (?P<usec>\d+) usec")


class PerfAnalyzerError(RuntimeError):
    pass


@dataclass
class ServerBreakdown:
    """Triton's average per request of one model, in milliseconds, as perf_analyzer prints it."""

    inference_count: int = 0
    execution_count: int = 0
    avg_latency_ms: float = 0.0
    parts_ms: Dict[str, float] = field(default_factory=dict)  # overhead, queue, compute input/infer/output

    @property
    def avg_batch(self) -> float:
        return self.inference_count / self.execution_count if self.execution_count else 0.0


@dataclass
class PerfPoint:
    model: str
    concurrency: int
    request_count: int
    throughput: float  # inferences per second
    mean_ms: float
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    client_ms: Dict[str, float]  # every latency column of the CSV (send, network, queue, ...), milliseconds
    server: Dict[str, ServerBreakdown]  # {the model: its Server block}

    def to_dict(self) -> Dict[str, object]:
        data = asdict(self)
        for name, breakdown in self.server.items():
            data["server"][name]["avg_batch"] = breakdown.avg_batch
        return data


def binary() -> str:
    """perf_analyzer installed by the wheel next to this interpreter, else on PATH."""
    beside = Path(sys.executable).parent / "perf_analyzer"
    found = str(beside) if beside.is_file() else shutil.which("perf_analyzer")
    if not found:
        raise PerfAnalyzerError('perf_analyzer not found: pip install "tritonclient[all]==2.51.0"')
    return found


LIBB64 = "libb64.so.0d"
LIBB64_COMPAT_SOURCE = Path(__file__).with_name("libb64_compat.c")
LIBB64_COMPAT_DIR = Path(__file__).resolve().parent.parent / "build" / "libb64"


def missing_libraries(executable: str, env: Dict[str, str]) -> List[str]:
    """The shared libraries the dynamic loader cannot find for `executable` under `env` (asked of the
    loader itself, which lists them and exits without running the program)."""
    trace = subprocess.run([executable], env={**env, "LD_TRACE_LOADED_OBJECTS": "1"}, capture_output=True, text=True)
    return [line.split("=>")[0].strip() for line in trace.stdout.splitlines() if "=> not found" in line]


_LIBB64_BUILD = threading.Lock()  # the soak's two perf_analyzer loops start at once, in one process


def build_libb64_compat(out_dir: Path = LIBB64_COMPAT_DIR) -> Path:
    """Compile benchmarks/libb64_compat.c to out_dir/libb64.so.0d (once per source change); returns out_dir.
    Safe from several threads (one builds, the others wait) and processes (each builds its own file and
    renames it into place)."""
    with _LIBB64_BUILD:
        return _build_libb64_compat(out_dir)


def _build_libb64_compat(out_dir: Path) -> Path:
    target = out_dir / LIBB64
    if target.is_file() and target.stat().st_mtime >= LIBB64_COMPAT_SOURCE.stat().st_mtime:
        return out_dir
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        raise PerfAnalyzerError(f"perf_analyzer needs {LIBB64}: install Debian's libb64-0d, or a C compiler (cc) "
                                f"to build {LIBB64_COMPAT_SOURCE.name}")
    out_dir.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{LIBB64}.{os.getpid()}.tmp")
    result = subprocess.run([compiler, "-O2", "-shared", "-fPIC", f"-Wl,-soname,{LIBB64}", "-o", str(partial),
                             str(LIBB64_COMPAT_SOURCE)], capture_output=True, text=True)
    if result.returncode != 0:
        raise PerfAnalyzerError(f"building {LIBB64} from {LIBB64_COMPAT_SOURCE.name} failed:\n{result.stderr[-2000:]}")
    os.replace(partial, target)
    return out_dir


def environment() -> Dict[str, str]:
    """perf_analyzer links libcudart.so.12 even on CPU: take it from the nvidia-cuda-runtime-cu12 wheel.
    It also links Debian's libb64.so.0d: where the system lacks it, our own build of the same interface."""
    env = dict(os.environ)
    try:
        import nvidia.cuda_runtime as cuda_runtime

        libdirs = [str(Path(p) / "lib") for p in cuda_runtime.__path__]
    except ImportError:
        libdirs = []
    env["LD_LIBRARY_PATH"] = os.pathsep.join([*libdirs, env.get("LD_LIBRARY_PATH", "")]).rstrip(os.pathsep)
    if LIBB64 in missing_libraries(binary(), env):
        env["LD_LIBRARY_PATH"] = os.pathsep.join([str(build_libb64_compat()), env["LD_LIBRARY_PATH"]]).rstrip(os.pathsep)
    return env


def version() -> str:
    result = subprocess.run([binary(), "--version"], capture_output=True, text=True, env=environment())
    return (result.stdout + result.stderr).strip().splitlines()[-1] if result.returncode == 0 else "unknown"


def command(model: str, url: str, input_data: Path, concurrency: int, request_count: int, csv_path: Path) -> List[str]:
    """gRPC, synchronous requests; every input's shape comes from the --input-data JSON."""
    return [binary(), "-m", model, "-u", url, "-i", "grpc", "--input-data", str(input_data),
            "--concurrency-range", str(concurrency), "--request-count", str(request_count),
            "-f", str(csv_path), "--verbose-csv"]


def run_point(model: str, url: str, input_data: Path, concurrency: int, request_count: int, out_dir: Path,
              timeout: float = 900.0) -> PerfPoint:
    """One measurement; keeps `<model>_c<k>.csv` and `<model>_c<k>.log` (stdout) in out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / f"{model}_c{concurrency}.csv"
    args = command(model, url, input_data, concurrency, request_count, csv_path)
    result = subprocess.run(args, capture_output=True, text=True, env=environment(), timeout=timeout)
    log = strip_noise(result.stdout + result.stderr)
    (out_dir / f"{model}_c{concurrency}.log").write_text(log)
    if result.returncode != 0 or not csv_path.is_file():
        raise PerfAnalyzerError(f"perf_analyzer on {model} at concurrency {concurrency} failed "
                                f"(exit {result.returncode}):\n{log[-2000:]}")
    return read_point(model, request_count, csv_path, log)


def strip_noise(text: str) -> str:
    """Drop the GPU-metric warnings a CPU-only server triggers."""
    return "\n".join(line for line in text.splitlines() if "Unable to parse 'nv_gpu" not in line) + "\n"


def read_point(model: str, request_count: int, csv_path: Path, log: str) -> PerfPoint:
    (row,) = read_csv(csv_path)
    return PerfPoint(
        model=model,
        concurrency=int(row["Concurrency"]),
        request_count=request_count,
        throughput=row["Inferences/Second"],
        mean_ms=row["Avg latency"] / 1000.0,
        p50_ms=row["p50 latency"] / 1000.0,
        p90_ms=row["p90 latency"] / 1000.0,
        p95_ms=row["p95 latency"] / 1000.0,
        p99_ms=row["p99 latency"] / 1000.0,
        client_ms={column: usec / 1000.0 for column, usec in row.items() if column not in COUNT_COLUMNS},
        server=parse_server_breakdowns(log, model),
    )


def read_csv(path: Path) -> List[Dict[str, float]]:
    """perf_analyzer's CSV rows with every non-empty cell as a float (the GPU columns are empty on CPU)."""
    with open(path, newline="") as handle:
        return [{k: float(v) for k, v in row.items() if k and v not in ("", None)} for row in csv.DictReader(handle)]


def parse_server_breakdowns(text: str, model: str) -> Dict[str, ServerBreakdown]:
    """The `Server:` block of stdout, keyed by `model`."""
    breakdowns: Dict[str, ServerBreakdown] = {}
    current: Optional[ServerBreakdown] = None
    for line in text.splitlines():
        if line.strip() == "Server:":
            current = breakdowns.setdefault(model, ServerBreakdown())
        elif current is not None and COUNT_LINE.match(line):
            _set_count(current, COUNT_LINE.match(line))
        elif current is not None and LATENCY_LINE.match(line):
            match = LATENCY_LINE.match(line)
            current.avg_latency_ms = int(match["total"]) / 1000.0
            current.parts_ms = {p["name"].strip(): int(p["usec"]) / 1000.0 for p in PART.finditer(match["parts"])}
    return breakdowns


def _set_count(breakdown: ServerBreakdown, match: re.Match) -> None:
    if match["key"] == "Inference count":
        breakdown.inference_count = int(match["value"])
    elif match["key"] == "Execution count":
        breakdown.execution_count = int(match["value"])
