"""Start the real tritonserver from the `nvidia-pytriton` wheel on a model repository.

    python -m serving.server --repository build/model_repository [--http-port 8000 ...]

Runs in the foreground until SIGTERM / SIGINT, restarting tritonserver if it crashes (tritonserver
2.51 can crash when a gRPC client cancels a request in flight: triton-inference-server issue 7368) or
if one of its python-backend stub processes dies (2.51 never restarts a stub: its model instance then
fails every request it gets while readiness stays 200).
On a stop it drains first: it waits (up to --drain-timeout) until no request is inside `evf_sam` or
`evf_sam_prompts` (each counts its requests in and out in one try/finally, so a failed or rejected
request cannot leave a phantom) and none is queued at any model, and only then sends SIGTERM to
tritonserver.  Triton 2.51 alone would refuse the BLS calls of requests already in flight ("Server is
stopping"), failing them.  At start it prints what the repository serves (its provenance record).
The recipe (python-backend stub copied next to the backend, the running Python's LIBDIR first on
LD_LIBRARY_PATH) is in ../shared/triton-on-cpu.md.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from evfsam.specs import PIPELINE_FINISHED_METRIC, PIPELINE_STARTED_METRIC

from . import metrics, processes


CRASH_WINDOW_S = 600
# A tritonserver with a dead stub waits its whole --exit-timeout-secs for that model on SIGTERM: what
# is in flight elsewhere gets this long to finish before the launcher kills it and starts afresh.
DEAD_STUB_STOP_S = 10.0


class ServerError(RuntimeError):
    pass


@dataclass
class TritonInstall:
    binary: Path
    backends: Path
    stub: Path
    libs: Path

    @classmethod
    def find(cls) -> "TritonInstall":
        try:
            import pytriton
        except ImportError as exc:
            raise ServerError("nvidia-pytriton is not installed (pip install nvidia-pytriton==0.7.0)") from exc
        root = Path(pytriton.__file__).resolve().parent / "tritonserver"
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        install = cls(
            binary=root / "bin" / "tritonserver",
            backends=root / "backends",
            stub=root / "python_backend_stubs" / version / "triton_python_backend_stub",
            libs=root.parent.parent / "nvidia_pytriton.libs",
        )
        for path in (install.binary, install.backends, install.stub, install.libs):
            if not path.exists():
                raise ServerError(f"incomplete tritonserver install: {path} is missing")
        return install

    def backend_directory(self, work_dir: Path) -> Path:
        """The wheel's backends with the python-backend stub for this interpreter put beside it."""
        target = work_dir / "backends"
        if not target.exists():
            shutil.copytree(self.backends, target)
            shutil.copy2(self.stub, target / "python" / "triton_python_backend_stub")
        return target

    def environment(self) -> dict:
        env = dict(os.environ)
        libdir = sysconfig.get_config_var("LIBDIR")
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, str(self.libs), env.get("LD_LIBRARY_PATH")) if p)
        # The python-backend stub embeds an interpreter that finds its prefix through `python3` on
        # PATH (it ignores PYTHONPATH): put this interpreter's bin first so a virtual environment's
        # packages are the ones the models import.
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        return env


def free_ports(count: int) -> List[int]:
    """`count` distinct TCP ports free on the loopback right now (for test and benchmark servers)."""
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


# Memory allocators tritonserver (and its python-backend stubs, which inherit its environment) can run
# with, as Triton's docs advise against glibc's fragmentation growth; Debian packages libjemalloc2 and
# libtcmalloc-minimal4, the NGC images ship both.
ALLOCATORS = {"system": None, "jemalloc": "libjemalloc.so.2", "tcmalloc": "libtcmalloc_minimal.so.4"}
ALLOCATOR_PACKAGES = {"jemalloc": "libjemalloc2", "tcmalloc": "libtcmalloc-minimal4"}


def allocator_library(name: str) -> Optional[str]:
    """The shared library to LD_PRELOAD for allocator `name` (None for the system's malloc)."""
    if name not in ALLOCATORS:
        raise ServerError(f"unknown allocator {name!r}; choose one of {', '.join(ALLOCATORS)}")
    library = ALLOCATORS[name]
    if library is None:
        return None
    multiarch = sysconfig.get_config_var("MULTIARCH") or f"{os.uname().machine}-linux-gnu"
    for directory in (f"/usr/lib/{multiarch}", "/usr/lib64", "/usr/lib", "/usr/local/lib"):
        candidate = Path(directory) / library
        if candidate.is_file():
            return str(candidate)
    raise ServerError(f"{library} not found for --malloc {name}: install it (Debian: apt-get install "
                      f"{ALLOCATOR_PACKAGES[name]}) or run with --malloc system")


def with_parent_death_signal(argv: List[str]) -> List[str]:
    """`argv` run under `setpriv --pdeathsig TERM` (util-linux): the program gets SIGTERM if the process
    that started it dies (no orphaned servers); as it is where setpriv is missing.  Not a `preexec_fn`
    calling prctl: that makes Popen fork and run Python in the child, and in a process that has used
    gRPC, grpcio's fork handlers then abort the child now and then ("epoll_wait error: Bad file
    descriptor", exit -6: 8 of 200 starts here; none without a preexec_fn)."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM", "--", *argv] if setpriv else list(argv)


class TritonEndpoints:
    """The client URLs of a tritonserver at `address` on `http_port`, `grpc_port` and `metrics_port`."""

    address: str
    http_port: int
    grpc_port: int
    metrics_port: int

    @property
    def http_url(self) -> str:
        return f"{self.address}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.address}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.address}:{self.metrics_port}/metrics"


@dataclass
class TritonServer(TritonEndpoints):
    repository: Path
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    address: str = "127.0.0.1"
    log_file: Optional[Path] = None
    extra_args: List[str] = field(default_factory=list)
    malloc: str = "system"  # ALLOCATORS: the allocator tritonserver and its stubs run with
    ready_timeout: float = 300.0  # for run() and `with`
    process: Optional[subprocess.Popen] = None
    work_dir: Optional[Path] = None
    stubs_at_ready: List[str] = field(default_factory=list)  # python-backend model instances seen ready
    shm_regions: List[str] = field(default_factory=list)  # their /dev/shm regions, removed once Triton is gone

    @classmethod
    def on_free_ports(cls, repository: Path, **options) -> "TritonServer":
        """A server on three loopback ports the OS says are free (tests, benchmarks)."""
        http, grpc, metrics = free_ports(3)
        return cls(repository, http, grpc, metrics, **options)

    def command(self, install: TritonInstall, backend_dir: Path) -> List[str]:
        return [
            str(install.binary),
            f"--model-repository={Path(self.repository).resolve()}",
            f"--backend-directory={backend_dir}",
            "--model-control-mode=none",
            f"--http-address={self.address}",
            f"--http-port={self.http_port}",
            f"--grpc-address={self.address}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-address={self.address}",
            f"--metrics-port={self.metrics_port}",
            "--allow-gpu-metrics=false",
            "--exit-timeout-secs=60",
            "--log-verbose=0",
            *self.extra_args,
        ]

    def check_ports_free(self) -> None:
        """Fail clearly when another process holds one of our ports: its readiness endpoint would
        answer for ours, and tritonserver would then exit on the port it cannot bind."""
        for name, port in (("HTTP", self.http_port), ("gRPC", self.grpc_port), ("metrics", self.metrics_port)):
            with socket.socket() as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind
                try:
                    probe.bind((self.address, port))
                except OSError as exc:
                    raise ServerError(f"{name} port {self.address}:{port} is not free ({exc.strerror}); "
                                      "stop what uses it or choose other ports") from None

    def environment(self, install: TritonInstall) -> dict:
        env = install.environment()
        library = allocator_library(self.malloc)
        if library is not None:
            env["LD_PRELOAD"] = os.pathsep.join(p for p in (library, env.get("LD_PRELOAD")) if p)
        return env

    def start(self, work_dir: Optional[Path] = None) -> "TritonServer":
        self.check_ports_free()
        install = TritonInstall.find()
        self.remove_leftover_shm()
        self.stubs_at_ready = []
        self.work_dir = Path(work_dir or tempfile.mkdtemp(prefix="evfsam-triton-"))
        backend_dir = install.backend_directory(self.work_dir)
        output = open(self.log_file, "ab") if self.log_file else None
        # cwd outside the source tree: the repository's python models must import their own copies
        self.process = subprocess.Popen(
            with_parent_death_signal(self.command(install, backend_dir)), env=self.environment(install), cwd=self.work_dir,
            stdout=output, stderr=subprocess.STDOUT if output else None,
            start_new_session=True,  # a terminal's Ctrl-C reaches only us; we drain, then stop Triton
        )
        return self

    def wait_ready(self, timeout: float = 300.0) -> None:
        deadline = time.time() + timeout
        url = f"http://{self.http_url}/v2/health/ready"
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise ServerError(f"tritonserver exited with code {self.process.returncode} before becoming ready"
                                  + (f"; see {self.log_file}" if self.log_file else ""))
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        self.stubs_at_ready = sorted(processes.stub_processes(self.process.pid))
                        self.shm_regions = processes.stub_shm_regions(self.process.pid)
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.5)
        raise ServerError(f"tritonserver not ready after {timeout:.0f} s")

    def dead_stubs(self) -> List[str]:
        """Model instances whose python-backend stub was alive at readiness and is gone now."""
        if self.process is None or self.process.poll() is not None:
            return []
        alive = processes.stub_processes(self.process.pid)
        return [instance for instance in self.stubs_at_ready if instance not in alive]

    def remove_leftover_shm(self) -> None:
        """After tritonserver has exited: the stubs' shared memory that a kill left in /dev/shm."""
        if self.process is not None and self.process.poll() is not None:
            processes.remove_shm_regions(self.shm_regions)
            self.shm_regions = []

    def requests_in_flight(self) -> int:
        """Requests inside the pipeline (started - finished) plus those queued at any model."""
        found = metrics.totals(metrics.scrape(self.metrics_url), (PIPELINE_STARTED_METRIC, PIPELINE_FINISHED_METRIC,
                                                                  "nv_inference_pending_request_count"))
        return int(found[PIPELINE_STARTED_METRIC] - found[PIPELINE_FINISHED_METRIC]
                   + found["nv_inference_pending_request_count"])

    def drain(self, timeout: float) -> bool:
        """Wait until nothing is in flight (seen twice in a row); False if `timeout` passes first."""
        deadline, idle_polls = time.time() + timeout, 0
        while time.time() < deadline and self.process.poll() is None:
            try:
                idle_polls = idle_polls + 1 if self.requests_in_flight() == 0 else 0
            except (OSError, ValueError):
                return False
            if idle_polls >= 2:
                return True
            time.sleep(0.1)
        return False

    def stop(self, timeout: float = 90.0, drain_timeout: float = 60.0) -> int:
        """Drain, then SIGTERM; SIGKILL if tritonserver does not exit within `timeout`."""
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.drain(drain_timeout)
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()
        finally:
            self.remove_leftover_shm()

    def run(self) -> "TritonServer":
        """Start and wait until ready (`ready_timeout`); stopped again if it never gets there."""
        self.start()
        try:
            self.wait_ready(self.ready_timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def __enter__(self) -> "TritonServer":
        return self.run()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving.server", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, default=Path("build/model_repository"))
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--address", default="127.0.0.1", help="bind address (default loopback only)")
    parser.add_argument("--ready-timeout", type=float, default=600.0)
    parser.add_argument("--drain-timeout", type=float, default=60.0)
    parser.add_argument("--malloc", choices=list(ALLOCATORS), default="system",
                        help="memory allocator of tritonserver and its python stubs (LD_PRELOAD; see README Reliability)")
    parser.add_argument("--max-restarts", type=int, default=5,
                        help=f"restart tritonserver after a crash, at most this often within {CRASH_WINDOW_S} s")
    args = parser.parse_args(argv)
    if not (args.repository / "evf_sam" / "config.pbtxt").is_file():
        print(f"error: {args.repository} has no evf_sam model; run `make repository` first", file=sys.stderr)
        return 2
    server = TritonServer(args.repository, args.http_port, args.grpc_port, args.metrics_port, args.address,
                          malloc=args.malloc)
    stop_requested = []
    signal.signal(signal.SIGTERM, lambda signum, _frame: stop_requested.append(signum))
    signal.signal(signal.SIGINT, lambda signum, _frame: stop_requested.append(signum))
    try:
        server.start()
        _wait_ready_unless_stopped(server, args.ready_timeout, stop_requested)
    except ServerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        server.stop(drain_timeout=0)
        return 1
    if not stop_requested:
        print(f"\n{served_model_line(args.repository)}\n"
              f"EVF-SAM is being served: HTTP {server.http_url}, gRPC {server.grpc_url}, metrics {server.metrics_url}\n"
              f"  python -m clients.segment --url {server.grpc_url} --protocol grpc --image IMAGE --prompt 'zebra top left'\n"
              f"  curl -s http://{server.http_url}/v2/models/evf_sam\n"
              "Stop with Ctrl-C (or SIGTERM): requests in flight are finished first.", flush=True)
    crashes: List[float] = []
    while not stop_requested:
        dead = server.dead_stubs()
        if server.process.poll() is None and not dead:
            time.sleep(0.2)
            continue
        crashes = [t for t in crashes if t > time.time() - CRASH_WINDOW_S] + [time.time()]
        if dead:
            print(f"error: the python-backend stub of {', '.join(dead)} died and tritonserver does not restart it",
                  file=sys.stderr)
            server.stop(timeout=DEAD_STUB_STOP_S, drain_timeout=0)
        else:
            print(f"error: tritonserver exited unexpectedly with code {server.process.returncode}", file=sys.stderr)
        if len(crashes) > args.max_restarts:
            print(f"error: {len(crashes)} exits within {CRASH_WINDOW_S} s; giving up", file=sys.stderr)
            return 1
        print("restarting tritonserver ...", file=sys.stderr, flush=True)
        try:
            server.start(server.work_dir)
            _wait_ready_unless_stopped(server, args.ready_timeout, stop_requested)
        except ServerError as exc:  # counted as one more exit by the next pass
            print(f"error: {exc}", file=sys.stderr, flush=True)
            time.sleep(1.0)
    print("stopping: finishing requests in flight ...", flush=True)
    code = server.stop(drain_timeout=args.drain_timeout)
    print(f"tritonserver stopped (exit code {code})", flush=True)
    return 0 if code == 0 else 1


def served_model_line(repository: Path) -> str:
    """What the repository serves, from the record it was generated with (serving/repository.py)."""
    from .repository import read_repository_provenance

    recorded = read_repository_provenance(repository)
    if recorded is None:
        return f"warning: {repository} has no provenance record; what it serves is unknown (run `make repository`)"
    export, options = recorded["export"], recorded["options"]
    return (f"model: {export['checkpoint']} (sha256 {export['checkpoint_sha256'][:12]}), family {export['family']}, "
            f"recipe {export['recipe']}; engines {options['flavor']} on {options['device']}")


def _wait_ready_unless_stopped(server: TritonServer, timeout: float, stop_requested: list) -> None:
    deadline = time.time() + timeout
    while not stop_requested:
        try:
            server.wait_ready(timeout=min(5.0, max(0.1, deadline - time.time())))
            return
        except ServerError:
            if time.time() >= deadline or server.process.poll() is not None:
                raise


if __name__ == "__main__":
    sys.exit(main())
