"""Faults: processes killed in the middle of work.

1. SIGKILL of one python-backend stub (the image cache, each engine, one front instance) while
   requests are in flight, on a bare tritonserver: what the clients see, whether Triton restarts the
   stub, what readiness says, how later requests fare.
2. The same under `python -m serving.server`, which watches the stubs: time until it serves again.
3. SIGKILL of tritonserver under `python -m serving.server`: restart, readiness, time.
4. `python -m clients.evaluate` SIGKILLed half-way and run again: the same final JSON as an
   uninterrupted run (nothing lost, nothing counted twice).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from evfsam.specs import (BEIT3_FUSION_ENCODER, EVF_SAM, EVF_SAM_PROMPTS, IMAGE_CACHE_NAME, PROMPT_MASK_DECODER,
                          SAM_IMAGE_ENCODER)
from serving import processes
from serving.server import TritonServer

from . import probes
from .inputs import PROMPT, SAMPLE_IMAGE, evf_sam_inputs, unique_jpeg
from .launcher import REPO_ROOT, Launcher

MODELS = (EVF_SAM.name, EVF_SAM_PROMPTS.name, IMAGE_CACHE_NAME, SAM_IMAGE_ENCODER.name, BEIT3_FUSION_ENCODER.name,
          PROMPT_MASK_DECODER.name)
STUB_TARGETS = (f"{IMAGE_CACHE_NAME}_0_0", f"{SAM_IMAGE_ENCODER.name}_0_0", f"{BEIT3_FUSION_ENCODER.name}_0_0",
                f"{PROMPT_MASK_DECODER.name}_0_0", f"{EVF_SAM.name}_0_0")
LAUNCHER_TARGETS = (STUB_TARGETS[0], STUB_TARGETS[1], STUB_TARGETS[4])  # the cache, an engine, a front instance
IN_FLIGHT = 6
FOLLOW_UP = 8
SHM_DIR = Path(processes.SHM_DIR)
EVALUATION_SPLIT = "refcoco|unc|val"
# A tritonserver with a dead stub waits its whole exit timeout (60 s) on SIGTERM: killed after this.
BARE_STOP_TIMEOUT_S = 15.0


class Requests:
    """`evf_sam` requests in threads, each with a new image; outcomes as 'ok' or 'STATUS: message'."""

    def __init__(self, grpc_url: str, first_serial: int):
        self.grpc_url, self.serial = grpc_url, first_serial
        self.image = SAMPLE_IMAGE.read_bytes()

    def one(self, timeout: float = 120.0) -> Dict[str, object]:
        self.serial += 1
        inputs = evf_sam_inputs(grpcclient, unique_jpeg(self.image, self.serial), PROMPT.encode())
        started = time.monotonic()
        try:
            grpcclient.InferenceServerClient(self.grpc_url).infer(EVF_SAM.name, inputs, client_timeout=timeout)
            outcome = "ok"
        except InferenceServerException as exc:
            outcome = f"{exc.status()}: {(exc.message() or '')[:120]}"
        return {"outcome": outcome, "seconds": round(time.monotonic() - started, 2)}

    def in_background(self, count: int) -> Callable[[], List[Dict[str, object]]]:
        results: List[Dict[str, object]] = []
        threads = [threading.Thread(target=lambda: results.append(self.one())) for _ in range(count)]
        for thread in threads:
            thread.start()

        def collect() -> List[Dict[str, object]]:
            for thread in threads:
                thread.join()
            return results
        return collect


def _wait_in_flight(metrics_url: str, count: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = probes.counter_snapshot(metrics_url, (EVF_SAM.name,))[EVF_SAM.name]
        if row["started"] - row["finished"] >= min(count, 4):
            return
        time.sleep(0.05)


def stub_kill_bare(repository: Path, target: str, log_dir: Path, serial: int,
                   stop_timeout: float = BARE_STOP_TIMEOUT_S) -> Dict[str, object]:
    """Kill `target`'s stub under a bare tritonserver and watch what Triton does."""
    server = TritonServer.on_free_ports(repository, log_file=log_dir / f"bare-{target}.log").run()
    try:
        requests = Requests(server.grpc_url, serial)
        requests.one()  # one request through every model first
        regions = processes.stub_shm_regions(server.process.pid)
        victim = processes.stub_processes(server.process.pid)[target]
        collect = requests.in_background(IN_FLIGHT)
        _wait_in_flight(server.metrics_url, IN_FLIGHT)
        os.kill(victim, signal.SIGKILL)
        in_flight = collect()
        time.sleep(1.0)
        readiness = {"server": probes.server_ready(server.http_url),
                     **{m: probes.model_ready(server.http_url, m) for m in MODELS}}
        follow_up = [requests.one() for _ in range(FOLLOW_UP)]
        restarted = target in processes.stub_processes(server.process.pid)
        detected = server.dead_stubs()
    finally:
        stop_started = time.monotonic()
        server.stop(timeout=stop_timeout, drain_timeout=0)
        stop_s = time.monotonic() - stop_started
    return {"target": target, "in_flight": _tally(in_flight),
            "readiness_after": readiness, "follow_up": _tally(follow_up), "stub_restarted_by_triton": restarted,
            "launcher_check_sees": detected, "sigterm_to_exit_s": round(stop_s, 1),
            "killed_after_sigterm": stop_s >= stop_timeout,
            "shm_regions_left": [r for r in regions if (SHM_DIR / r).exists()]}


def stub_kill_launcher(repository: Path, target: str, log_dir: Path, serial: int) -> Dict[str, object]:
    """Kill `target`'s stub under `python -m serving.server`: how long until it serves again."""
    with Launcher(repository, log_dir / f"launcher-{target}.log") as launcher:
        requests = Requests(launcher.grpc_url, serial)
        requests.one()
        server_pid = launcher.server_pid()
        victim = processes.stub_processes(server_pid)[target]
        collect = requests.in_background(IN_FLIGHT)
        _wait_in_flight(launcher.metrics_url, IN_FLIGHT)
        killed = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        recovery = _recover(launcher, requests, server_pid, killed)
        in_flight = collect()
    return {"target": target, "in_flight": _tally(in_flight), **recovery,
            "launcher_said": launcher.log_lines("died and tritonserver does not restart it")}


def server_kill_launcher(repository: Path, log_dir: Path, serial: int) -> Dict[str, object]:
    """SIGKILL tritonserver itself under `python -m serving.server`."""
    with Launcher(repository, log_dir / "launcher-tritonserver.log") as launcher:
        requests = Requests(launcher.grpc_url, serial)
        requests.one()
        server_pid = launcher.server_pid()
        collect = requests.in_background(IN_FLIGHT)
        _wait_in_flight(launcher.metrics_url, IN_FLIGHT)
        killed = time.monotonic()
        os.kill(server_pid, signal.SIGKILL)
        recovery = _recover(launcher, requests, server_pid, killed)
        in_flight = collect()
    return {"target": "tritonserver", "in_flight": _tally(in_flight), **recovery,
            "launcher_said": launcher.log_lines("exited unexpectedly")}


def _recover(launcher: Launcher, requests: Requests, old_pid: int, killed: float, timeout: float = 300.0):
    """Seconds from the kill until a new tritonserver is ready, and until a request succeeds again."""
    new_ready: Optional[float] = None
    not_ready_seen = False
    while time.monotonic() - killed < timeout:
        pid = launcher.server_pid()
        ready = probes.server_ready(launcher.http_url)
        not_ready_seen |= not ready
        if pid not in (None, old_pid) and ready and processes.stub_processes(pid):
            new_ready = time.monotonic() - killed
            break
        time.sleep(0.2)
    first_ok = None
    while new_ready is not None and time.monotonic() - killed < timeout:
        if requests.one()["outcome"] == "ok":
            first_ok = time.monotonic() - killed
            break
    return {"new_tritonserver_ready_s": _round(new_ready), "first_success_s": _round(first_ok),
            "readiness_went_down": not_ready_seen}


def evaluation_resume(grpc_url: str, work_dir: Path, kill_after: int = 6) -> Dict[str, object]:
    """Uninterrupted vs SIGKILLed-and-resumed `python -m clients.evaluate`: the final JSON must match."""
    from tests.test_evaluate import write_synthetic_refcoco  # the test suite's RefCOCO-format writer

    dataset = work_dir / "refcoco"
    if not dataset.exists():
        write_synthetic_refcoco(dataset)
    args = ["--url", grpc_url, "--dataset-dir", str(dataset), "--split", EVALUATION_SPLIT, "--concurrency", "2",
            "--no-progress"]
    whole = work_dir / "uninterrupted.json"
    resumed = work_dir / "resumed.json"
    for path in (whole, resumed, Path(f"{resumed}.progress.jsonl")):
        path.unlink(missing_ok=True)
    first = _evaluate(args + ["--output", str(whole)])
    progress = Path(f"{resumed}.progress.jsonl")
    process = _evaluate(args + ["--output", str(resumed)], wait=False)
    while process.poll() is None and _records(progress) < kill_after:
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    saved = _records(progress)
    second = _evaluate(args + ["--output", str(resumed)])
    a, b = json.loads(whole.read_text()), json.loads(resumed.read_text())
    same = _without_timing(a) == _without_timing(b)
    return {"split": EVALUATION_SPLIT, "expressions": a["count"], "killed_after_saved": saved,
            "evaluated_after_resume": b["throughput"]["evaluated_this_run"],
            "exit_codes": [first.returncode, second.returncode], "identical_results": same,
            "nothing_lost_nothing_twice": same and b["count"] == a["count"]
            and b["throughput"]["evaluated_this_run"] == a["count"] - saved,
            "results": _without_timing(a)}


def _evaluate(args: Sequence[str], wait: bool = True):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    process = subprocess.Popen([sys.executable, "-m", "clients.evaluate", *args], cwd=REPO_ROOT, env=env,
                               stdout=subprocess.PIPE if wait else subprocess.DEVNULL,
                               stderr=subprocess.PIPE if wait else subprocess.DEVNULL, text=True)
    if wait:
        out, err = process.communicate(timeout=900)
        if process.returncode != 0:
            raise RuntimeError(f"clients.evaluate exited {process.returncode}: {err[-1000:]}")
    return process


def _records(progress: Path) -> int:
    """Complete expression lines in a progress file (the first line is its header)."""
    try:
        return max(0, progress.read_bytes().count(b"\n") - 1)
    except OSError:
        return 0


def _without_timing(results: Dict) -> Dict:
    return {k: v for k, v in results.items() if k != "throughput"}


def _tally(results) -> Dict[str, Dict[str, float]]:
    """outcome -> how many, and the longest a client waited for it."""
    found: Dict[str, Dict[str, float]] = {}
    for result in results:
        entry = found.setdefault(result["outcome"], {"count": 0, "max_s": 0.0})
        entry["count"] += 1
        entry["max_s"] = max(entry["max_s"], result["seconds"])
    return found


def _round(value: Optional[float]) -> Optional[float]:
    return None if value is None else round(value, 1)


def run(repository: Path, log_dir: Path, work_dir: Path, launcher_targets: Sequence[str],
        evaluation: bool = True) -> Dict[str, object]:
    log_dir.mkdir(parents=True, exist_ok=True)
    results: Dict[str, object] = {"stub_kill_bare": [], "stub_kill_launcher": []}
    serial = 7_000_000
    for target in STUB_TARGETS:
        serial += 1000
        print(f"   bare tritonserver, SIGKILL {target}", flush=True)
        results["stub_kill_bare"].append(stub_kill_bare(repository, target, log_dir, serial))
    for target in launcher_targets:
        serial += 1000
        print(f"   serving.server, SIGKILL {target}", flush=True)
        results["stub_kill_launcher"].append(stub_kill_launcher(repository, target, log_dir, serial))
    print("   serving.server, SIGKILL tritonserver", flush=True)
    results["server_kill_launcher"] = server_kill_launcher(repository, log_dir, serial + 1000)
    if evaluation:
        print("   clients.evaluate SIGKILLed and resumed", flush=True)
        with Launcher(repository, log_dir / "launcher-evaluate.log") as launcher:
            work_dir.mkdir(parents=True, exist_ok=True)
            results["evaluation_resume"] = evaluation_resume(launcher.grpc_url, work_dir)
            results["evaluation_resume"]["server_restarts"] = len(launcher.log_lines("restarting tritonserver"))
    return results
