"""N tritonserver replicas on loopback behind one Envoy that routes by image (`make serve-cluster`).

    python -m serving.cluster --repository build/model_repository --replicas 2 [--http-port 8000 ...]

Clients talk to Envoy on --http-port / --grpc-port as they would to one Triton.  Envoy sends every
request carrying `x-image-key` (the project's clients always send it: evfsam/affinity.py) to the
replica that owns that key by consistent hashing, so an image's prompts meet its cached embedding;
requests without it go to the least-loaded replica.  Health checks, outlier ejection, retries and
timeouts follow serving/routing_policy.py, which the Helm chart's values also come from.

Replica i serves metrics on --metrics-port + i (scrape each; the cache counters are per replica);
its HTTP and gRPC ports are free loopback ports, printed at start.  A replica that crashes is
restarted (at most --max-restarts times within 10 minutes; Envoy routes around it meanwhile).

SIGTERM / SIGINT stops gracefully: Envoy drains its listeners (GOAWAY / `Connection: close`, then
closed after the policy's drain time) and the requests through it finish, then Envoy exits; then each
replica drains its own in-flight requests and stops (serving/server.py).
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple

from .envoy import Envoy, EnvoyError, Replica, bootstrap, write_config
from .routing_policy import DEFAULT_POLICY, RoutingPolicy
from .server import CRASH_WINDOW_S, ServerError, TritonServer, free_ports

SHARED_MEMORY_DIR = "/dev/shm"


@dataclass
class Cluster:
    replicas: List[TritonServer]
    address: str
    http_port: int
    grpc_port: int
    admin_port: int
    policy: RoutingPolicy = DEFAULT_POLICY
    use_affinity: bool = True  # False: every request by the fallback algorithm (benchmark baseline)
    log_dir: Optional[Path] = None
    envoy_concurrency: int = 1
    envoy: Optional[Envoy] = None
    work_dir: Optional[Path] = None
    ready_timeout: float = 300.0
    restarts: List[float] = field(default_factory=list)

    @classmethod
    def on_loopback(cls, repository: Path, count: int, address: str = "127.0.0.1", http_port: int = 8000,
                    grpc_port: int = 8001, metrics_port: Optional[int] = 8002, admin_port: int = 9901,
                    log_dir: Optional[Path] = None, **options) -> "Cluster":
        """`count` replicas on free loopback ports (metrics on metrics_port + i, or free if None)."""
        if count < 1:
            raise ValueError(f"a cluster needs at least one replica, got {count}")
        log_dir = Path(log_dir or tempfile.mkdtemp(prefix="evfsam-cluster-"))
        log_dir.mkdir(parents=True, exist_ok=True)
        replicas = []
        for index in range(count):
            http, grpc, free_metrics = free_ports(3)
            metrics = free_metrics if metrics_port is None else metrics_port + index
            replicas.append(TritonServer(repository, http, grpc, metrics, address,
                                         log_file=log_dir / f"replica-{index}.log"))
        return cls(replicas, address, http_port, grpc_port, admin_port, log_dir=log_dir, **options)

    @classmethod
    def on_free_ports(cls, repository: Path, count: int, **options) -> "Cluster":
        """Envoy and every replica on ports the OS says are free (tests, benchmarks)."""
        http, grpc, admin = free_ports(3)
        return cls.on_loopback(repository, count, http_port=http, grpc_port=grpc, metrics_port=None,
                               admin_port=admin, **options)

    @property
    def http_url(self) -> str:
        return f"{self.address}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.address}:{self.grpc_port}"

    def replica_names(self) -> List[str]:
        return [f"replica-{index}" for index in range(len(self.replicas))]

    def envoy_replicas(self) -> List[Replica]:
        return [Replica(name, server.address, server.http_port, server.grpc_port)
                for name, server in zip(self.replica_names(), self.replicas)]

    def start(self) -> "Cluster":
        """Start every replica and wait until ready, then Envoy, then wait until Envoy's health checks
        see every replica healthy.  Stops what it started if any step fails."""
        self.work_dir = Path(tempfile.mkdtemp(prefix="evfsam-cluster-work-"))
        try:
            for index, server in enumerate(self.replicas):
                server.start(self.work_dir / f"replica-{index}")
            for server in self.replicas:
                server.wait_ready(self.ready_timeout)
            self.start_envoy()
        except BaseException:
            self.stop(drain_timeout=0)
            raise
        return self

    def start_envoy(self, use_affinity: Optional[bool] = None, policy: Optional[RoutingPolicy] = None) -> Envoy:
        """(Re)start Envoy, possibly with another policy, and wait until it sees every replica healthy."""
        if self.envoy is not None:
            self.envoy.stop()
        self.use_affinity = self.use_affinity if use_affinity is None else use_affinity
        self.policy = policy or self.policy
        config = bootstrap(self.envoy_replicas(), self.address, self.http_port, self.grpc_port, self.admin_port,
                           self.policy, use_affinity=self.use_affinity)
        config_path = write_config(config, self.work_dir / "envoy.json")
        self.envoy = Envoy(config_path, self.address, self.admin_port, self.policy.drain_time_s, self.envoy_concurrency,
                           self.log_dir / "envoy.log" if self.log_dir else None).start()
        self.envoy.wait_ready()
        self.wait_healthy(len(self.replicas), timeout=self.policy.health_check_interval_s * 5 + 10)
        return self.envoy

    def healthy_replicas(self) -> List[str]:
        """Replicas every Envoy cluster currently routes to."""
        per_cluster = self.envoy.hosts()
        names = set(self.replica_names())
        for hosts in per_cluster.values():
            names &= {name for name, host in hosts.items() if host["healthy"]}
        return sorted(names)

    def wait_healthy(self, count: int, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if len(self.healthy_replicas()) >= count:
                return
            time.sleep(0.1)
        raise EnvoyError(f"Envoy sees {len(self.healthy_replicas())} healthy replicas, expected {count}, "
                         f"after {timeout:.0f} s")

    def kill_replica(self, index: int) -> float:
        """SIGKILL replica `index` as a crashed pod dies (tests, benchmarks): tritonserver and its
        python-backend stubs at once, then remove the shared-memory regions they leave in /dev/shm.
        Returns the time of the kill."""
        killed_at, regions = kill_process_tree(self.replicas[index].process)
        remove_shared_memory(regions)
        return killed_at

    def restart_crashed(self, max_restarts: int) -> None:
        """Restart replicas whose tritonserver exited; raises ServerError past `max_restarts` per window."""
        for index, server in enumerate(self.replicas):
            if server.process is None or server.process.poll() is None:
                continue
            now = time.time()
            self.restarts = [t for t in self.restarts if t > now - CRASH_WINDOW_S] + [now]
            print(f"error: replica-{index} exited with code {server.process.returncode}", file=sys.stderr, flush=True)
            if len(self.restarts) > max_restarts:
                raise ServerError(f"{len(self.restarts)} replica exits within {CRASH_WINDOW_S} s; giving up")
            print(f"restarting replica-{index} ...", file=sys.stderr, flush=True)
            server.start(self.work_dir / f"replica-{index}")

    def stop(self, drain_timeout: Optional[float] = None) -> int:
        """Graceful stop: Envoy drains (new work refused once its listeners close) and exits once
        nothing is in flight through it, then the replicas drain and stop.  Returns the first
        non-zero exit code, else 0."""
        budget = self.policy.request_timeout_s if drain_timeout is None else drain_timeout
        envoy_running = self.envoy is not None and self.envoy.process is not None and self.envoy.process.poll() is None
        if envoy_running and budget > 0:
            started = time.time()
            try:
                self.envoy.start_drain()
            except OSError as exc:
                print(f"warning: Envoy did not start draining: {exc}", file=sys.stderr)
            # Envoy's listeners accept connections until the drain time is over: the replicas outlive it.
            time.sleep(min(budget, self.policy.drain_time_s))
            self.envoy.wait_idle(max(0.0, budget - (time.time() - started)))
        # Envoy goes first: tritonserver's HTTP server waits (up to its exit timeout) for every open
        # connection, and Envoy keeps its upstream and health-check connections open while it runs.
        codes = [self.envoy.stop()] if self.envoy is not None else []
        with ThreadPoolExecutor(max(1, len(self.replicas))) as pool:
            codes += pool.map(lambda server: server.stop(drain_timeout=min(budget, self.policy.replica_drain_timeout_s)),
                              self.replicas)
        return next((code for code in codes if code), 0)

    def __enter__(self) -> "Cluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving.cluster", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, default=Path("build/model_repository"))
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--address", default="127.0.0.1", help="Envoy's and the replicas' bind address (loopback)")
    parser.add_argument("--http-port", type=int, default=8000, help="Envoy's HTTP listener")
    parser.add_argument("--grpc-port", type=int, default=8001, help="Envoy's gRPC listener")
    parser.add_argument("--metrics-port", type=int, default=8002, help="replica i's metrics on this + i")
    parser.add_argument("--admin-port", type=int, default=9901, help="Envoy's admin interface")
    parser.add_argument("--envoy-concurrency", type=int, default=1, help="Envoy worker threads")
    parser.add_argument("--log-dir", type=Path, default=Path("build/cluster-logs"))
    parser.add_argument("--ready-timeout", type=float, default=600.0)
    parser.add_argument("--drain-timeout", type=float, default=float(DEFAULT_POLICY.request_timeout_s),
                        help="the longest a stop waits for requests in flight")
    parser.add_argument("--drain-time", type=int, default=DEFAULT_POLICY.drain_time_s,
                        help="how long Envoy discourages connections before closing its listeners on a stop")
    parser.add_argument("--max-restarts", type=int, default=5,
                        help=f"restart crashed replicas at most this often within {CRASH_WINDOW_S} s")
    args = parser.parse_args(argv)
    if not (args.repository / "evf_sam" / "config.pbtxt").is_file():
        print(f"error: {args.repository} has no evf_sam model; run `make repository` first", file=sys.stderr)
        return 2
    if args.replicas < 1:
        print(f"error: --replicas must be at least 1, got {args.replicas}", file=sys.stderr)
        return 2
    cluster = Cluster.on_loopback(args.repository, args.replicas, args.address, args.http_port, args.grpc_port,
                                  args.metrics_port, args.admin_port, args.log_dir,
                                  envoy_concurrency=args.envoy_concurrency, ready_timeout=args.ready_timeout,
                                  policy=replace(DEFAULT_POLICY, drain_time_s=args.drain_time))
    stop_requested: List[int] = []
    signal.signal(signal.SIGTERM, lambda signum, _frame: stop_requested.append(signum))
    signal.signal(signal.SIGINT, lambda signum, _frame: stop_requested.append(signum))
    try:
        cluster.start()
    except (ServerError, EnvoyError) as exc:
        print(f"error: {exc} (logs in {args.log_dir})", file=sys.stderr)
        return 1
    _print_banner(cluster)
    try:
        while not stop_requested:
            cluster.restart_crashed(args.max_restarts)
            time.sleep(0.5)
    except ServerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        cluster.stop(drain_timeout=0)
        return 1
    print("stopping: Envoy drains, then the replicas finish their requests ...", flush=True)
    code = cluster.stop(drain_timeout=args.drain_timeout)
    print(f"cluster stopped (exit code {code})", flush=True)
    return 0 if code == 0 else 1


def _process_tree(pid: int) -> List[int]:
    children: Dict[int, List[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, frontier = [pid], [pid]
    while frontier:
        frontier = [child for parent in frontier for child in children.get(parent, [])]
        found += frontier
    return found


def _mapped_files(pid: int) -> Set[str]:
    try:
        lines = Path(f"/proc/{pid}/maps").read_text().splitlines()
    except OSError:
        return set()
    return {line.split(None, 5)[5] for line in lines if len(line.split(None, 5)) == 6}


def kill_process_tree(process: subprocess.Popen) -> Tuple[float, List[Path]]:
    """SIGKILL a tritonserver and its python-backend stubs (a stub busy in a model can outlive its
    killed parent for good); returns the time of the kill and the /dev/shm regions they had mapped."""
    pids = _process_tree(process.pid)
    regions = python_backend_shared_memory(process.pid)
    for pid in reversed(pids):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    killed_at = time.time()
    process.wait(30)
    return killed_at, regions


def python_backend_shared_memory(pid: int) -> List[Path]:
    """The python-backend regions in /dev/shm that tritonserver `pid` and its stubs have mapped."""
    mapped = set().union(*(_mapped_files(p) for p in _process_tree(pid)))
    return sorted(Path(f) for f in mapped if f.startswith(f"{SHARED_MEMORY_DIR}/triton_python_backend_shm_region_"))


def remove_shared_memory(regions: List[Path], timeout: float = 10.0) -> None:
    """Unlink the regions of a killed tritonserver once no process maps them (its stubs exit when
    they notice their parent is gone), or after `timeout`."""
    deadline = time.time() + timeout
    while time.time() < deadline and any(_mapped_by_anyone(region) for region in regions):
        time.sleep(0.1)
    for region in regions:
        region.unlink(missing_ok=True)


def _mapped_by_anyone(path: Path) -> bool:
    return any(str(path) in _mapped_files(int(e.name)) for e in Path("/proc").iterdir() if e.name.isdigit())


def _print_banner(cluster: Cluster) -> None:
    lines = [f"\nEVF-SAM is being served by {len(cluster.replicas)} replicas behind Envoy: "
             f"HTTP {cluster.http_url}, gRPC {cluster.grpc_url}, admin http://{cluster.address}:{cluster.admin_port}"]
    for name, server in zip(cluster.replica_names(), cluster.replicas):
        lines.append(f"  {name}: HTTP {server.http_url}, gRPC {server.grpc_url}, metrics {server.metrics_url}")
    lines += [f"  python -m clients.segment --url {cluster.grpc_url} --protocol grpc --image IMAGE --prompt 'zebra top left'",
              f"  curl -s http://{cluster.address}:{cluster.admin_port}/clusters   # per-replica request counts, health",
              f"Logs: {cluster.log_dir}.  Stop with Ctrl-C (or SIGTERM): requests in flight are finished first."]
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    sys.exit(main())
