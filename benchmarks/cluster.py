"""Replicas behind Envoy (`make bench-cluster`): what image-affinity routing buys, measured.

    python -m benchmarks.cluster [--out benchmarks/results/<machine>-<date>-cluster]

All on loopback, the real `envoy` in front of real tritonservers serving the tiny random-weight model
(`python -m export.tiny_checkpoint`, `python -m export`, `python -m serving.repository`), each replica's
embedding cache sized for CACHE_IMAGES images:

1. Hit rate and served prompts/s, affinity (Maglev on `x-image-key`) vs round robin, for N = 1, 2, 3
   replicas: K images x M prompts, one prompt per `evf_sam_prompts` request carrying the image bytes,
   arriving interleaved (image 0 prompt 0, image 1 prompt 0, ..., image 0 prompt 1, ...), CONCURRENCY
   requests in flight.  Every configuration gets images of its own (cold caches).  Hits and misses
   are the replicas' own `evf_sam_embedding_cache_*` counters.
2. Keys remapped when the replicas go from 3 to 4, against the ideal 1/4: Envoy's own Maglev and ring
   hash tables, read by sending REMAP_KEYS keys through Envoy to stand-in loopback HTTP servers that
   answer with their name (the mapping depends on Envoy's hashing alone, not on what serves).
3. A replica SIGKILLed mid-run (N = 3, affinity): requests failed at the client, requests Envoy
   retried, time until Envoy marks the replica unhealthy (no more requests to it), hit rate before
   and after.

Two CPU cores: the replicas share them, so throughput cannot grow with N; the hit rates and the
failure figures are what this run shows.
"""
from __future__ import annotations

import argparse
import datetime
import http.client
import http.server
import io
import json
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from clients import SegmentationClient
from evfsam.affinity import AFFINITY_HEADER
from evfsam.embedding_cache import image_key
from evfsam.specs import CACHE_METRICS
from serving import metrics
from serving.cluster import Cluster, kill_process_tree, remove_shared_memory
from serving.envoy import AFFINITY, Envoy, Replica, bootstrap, cluster_name, envoy_binary, write_config
from serving.repository import RepositoryOptions, write_repository
from serving.routing_policy import DEFAULT_POLICY, RoutingPolicy
from serving.server import free_ports

from . import machine
from .run import RESULTS_DIR, phase, prepare_model

REPLICA_COUNTS = (1, 2, 3)
IMAGES = 7  # prime: round robin over N = 2 or 3 replicas cannot line up with the image order by chance
PROMPTS_PER_IMAGE = 8
CONCURRENCY = 4
CACHE_IMAGES = 3  # per replica: 7 images fit in 3 replicas' caches, not in one or two
# One cached image of the tiny model: SAM embeddings [1, 256, 64, 64] + the BEiT-3 view [1, 3, 224, 224], float32.
CACHE_ENTRY_BYTES = 4 * (256 * 64 * 64 + 3 * 224 * 224)
IMAGE_SIZE = (240, 320)
REMAP_KEYS = 2000
KILL_PROMPTS_PER_IMAGE = 12
KILL_AFTER_FRACTION = 1 / 3
# The shipped policy, health-checked every second (the chart's default of 2 s doubles the detection time).
BENCH_POLICY = replace(DEFAULT_POLICY, health_check_interval_s=1.0, health_check_timeout_s=0.5, drain_time_s=1)
PROMPTS = ("left one", "the zebra", "top", "a person", "right side", "the sky", "bottom left", "the car",
           "a dog", "the tree", "the road", "a window")


@dataclass
class Outcome:
    started: float
    finished: float
    ok: bool
    error: str = ""


def make_images(count: int, seed: int) -> List[bytes]:
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        pixels = rng.integers(0, 256, size=(*IMAGE_SIZE, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "PNG")
        images.append(buffer.getvalue())
    return images


def interleaved(images: Sequence[bytes], prompts_per_image: int) -> List[Tuple[bytes, str]]:
    return [(image, PROMPTS[p % len(PROMPTS)]) for p in range(prompts_per_image) for image in images]


def run_workload(url: str, requests: Sequence[Tuple[bytes, str]], concurrency: int = CONCURRENCY,
                 on_progress=None) -> List[Outcome]:
    """Send every request (one prompt each) through `url`, `concurrency` at a time; failures are recorded, not raised."""
    outcomes: List[Optional[Outcome]] = [None] * len(requests)
    next_index, lock = [0], threading.Lock()

    def worker() -> None:
        with SegmentationClient(url, "grpc", timeout=120.0, concurrency=1) as client:
            while True:
                with lock:
                    index = next_index[0]
                    if index >= len(requests):
                        return
                    next_index[0] += 1
                image, prompt = requests[index]
                started = time.time()
                try:
                    client.segment_prompts(image, [prompt])
                    outcomes[index] = Outcome(started, time.time(), True)
                except Exception as exc:  # noqa: BLE001 - a failed request is a measurement
                    outcomes[index] = Outcome(started, time.time(), False, f"{type(exc).__name__}: {exc}"[:300])
                if on_progress is not None:
                    on_progress(sum(o is not None for o in outcomes))

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return [o for o in outcomes if o is not None]


def cache_counts(cluster: Cluster) -> List[Dict[str, int]]:
    found = []
    for server in cluster.replicas:
        if server.process is None or server.process.poll() is not None:
            found.append({key: 0 for key in CACHE_METRICS})
            continue
        samples = metrics.scrape(server.metrics_url)
        found.append({key: int(metrics.total(samples, name)) for key, name in CACHE_METRICS.items()})
    return found


def per_host(cluster: Cluster, envoy_cluster: str = cluster_name("grpc", AFFINITY)) -> Dict[str, int]:
    return {name: host.get("rq_total", 0) for name, host in cluster.envoy.hosts()[envoy_cluster].items()}


def owner_of(cluster: Cluster, key: str) -> str:
    """The replica Envoy sends `key` to (a readiness request through the HTTP listener, counted per host)."""
    before = per_host(cluster, cluster_name("http", AFFINITY))
    connection = http.client.HTTPConnection(cluster.address, cluster.http_port, timeout=10)
    connection.request("GET", "/v2/health/ready", headers={AFFINITY_HEADER: key})
    connection.getresponse().read()
    connection.close()
    after = per_host(cluster, cluster_name("http", AFFINITY))
    return next(name for name in after if after[name] > before.get(name, 0))


def per_host_all(cluster: Cluster) -> Dict[str, int]:
    """Requests per replica over the gRPC clusters (affinity and fallback)."""
    total: Counter = Counter()
    for name in (cluster_name("grpc", AFFINITY), cluster_name("grpc", "least_request")):
        total.update({host: stats.get("rq_total", 0) for host, stats in cluster.envoy.hosts()[name].items()})
    return dict(total)


def minus(after: Sequence[Dict[str, int]], before: Sequence[Dict[str, int]]) -> List[Dict[str, int]]:
    return [{key: a[key] - b.get(key, 0) for key in a} for a, b in zip(after, before)]


def hit_rate(deltas: Sequence[Dict[str, int]]) -> Optional[float]:
    hits, misses = sum(d["hits"] for d in deltas), sum(d["misses"] for d in deltas)
    return hits / (hits + misses) if hits + misses else None


def measure_routing(cluster: Cluster, affinity: bool, seed: int) -> Dict:
    policy = BENCH_POLICY if affinity else replace(BENCH_POLICY, fallback_algorithm="RoundRobin")
    cluster.start_envoy(use_affinity=affinity, policy=policy)
    images = make_images(IMAGES, seed)
    requests = interleaved(images, PROMPTS_PER_IMAGE)
    owners = Counter(owner_of(cluster, image_key(image)) for image in images) if affinity else None
    caches_before, hosts_before = cache_counts(cluster), per_host_all(cluster)
    started = time.time()
    outcomes = run_workload(cluster.grpc_url, requests)
    wall = time.time() - started
    caches = minus(cache_counts(cluster), caches_before)
    hosts = {name: count - hosts_before.get(name, 0) for name, count in per_host_all(cluster).items()}
    point = {
        "replicas": len(cluster.replicas), "routing": "affinity (Maglev on x-image-key)" if affinity else "round robin",
        "affinity": affinity, "requests": len(requests), "failed": sum(not o.ok for o in outcomes),
        "wall_s": round(wall, 2), "prompts_per_s": round(sum(o.ok for o in outcomes) / wall, 2),
        "hit_rate": hit_rate(caches), "cache_per_replica": caches,
        "requests_per_replica": hosts,  # includes the clients' metadata requests
        "images_per_replica": dict(sorted(owners.items())) if owners is not None else None,
        "latency_p50_ms": round(1000 * float(np.median([o.finished - o.started for o in outcomes])), 1),
    }
    print(f"   N={point['replicas']} {point['routing']}: hit rate {point['hit_rate']:.2f}, "
          f"{point['prompts_per_s']} prompts/s, failed {point['failed']}", flush=True)
    return point


class _NameServer(http.server.ThreadingHTTPServer):
    daemon_threads = True


def stand_in(name: str) -> Tuple[_NameServer, int]:
    """A loopback HTTP server answering every GET with `name` (readiness included)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            body = name.encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        disable_nagle_algorithm = True  # one small response per request: no 40 ms delayed-ACK stalls

        def log_message(self, *args) -> None:
            pass

    server = _NameServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, server.server_address[1]


def owners_through_envoy(replicas: Sequence[Replica], keys: Sequence[str], policy: RoutingPolicy, work_dir: Path) -> List[str]:
    http_port, grpc_port, admin_port = free_ports(3)
    config = write_config(bootstrap(replicas, "127.0.0.1", http_port, grpc_port, admin_port, policy), work_dir / "remap.json")
    envoy = Envoy(config, "127.0.0.1", admin_port, drain_time_s=0, log_file=work_dir / "remap-envoy.log").start()
    try:
        envoy.wait_ready()
        deadline = time.time() + 30
        while any(not host["healthy"] for host in envoy.hosts()[cluster_name("http", AFFINITY)].values()):
            if time.time() > deadline:
                raise RuntimeError("stand-in replicas never became healthy in Envoy")
            time.sleep(0.1)
        connection = http.client.HTTPConnection("127.0.0.1", http_port, timeout=10)
        owners = []
        for key in keys:
            connection.request("GET", "/whoami", headers={AFFINITY_HEADER: key})
            owners.append(connection.getresponse().read().decode())
        connection.close()
        return owners
    finally:
        envoy.stop()


def measure_remap(work_dir: Path) -> Dict:
    servers = [stand_in(f"replica-{index}") for index in range(4)]
    replicas = [Replica(f"replica-{index}", "127.0.0.1", port, port) for index, (_, port) in enumerate(servers)]
    keys = [image_key(f"remap key {index}".encode()) for index in range(REMAP_KEYS)]
    found = {}
    try:
        for algorithm in ("Maglev", "RingHash"):
            policy = replace(BENCH_POLICY, hash_algorithm=algorithm)
            before = owners_through_envoy(replicas[:3], keys, policy, work_dir)
            after = owners_through_envoy(replicas, keys, policy, work_dir)
            moved = [b != a for b, a in zip(before, after)]
            shares = Counter(after)
            found[algorithm] = {
                "remapped_fraction": sum(moved) / len(keys), "ideal": 1 / 4,
                "moved_to_new_replica": sum(m and a == "replica-3" for m, a in zip(moved, after)) / max(1, sum(moved)),
                "share_per_replica_3": {k: v / len(keys) for k, v in sorted(Counter(before).items())},
                "share_per_replica_4": {k: v / len(keys) for k, v in sorted(shares.items())},
                "max_share_over_ideal_4": max(shares.values()) / len(keys) * 4,
            }
            print(f"   {algorithm}: {100 * found[algorithm]['remapped_fraction']:.1f}% of {len(keys)} keys remapped "
                  f"going 3 -> 4 replicas (ideal 25%)", flush=True)
    finally:
        for server, _ in servers:
            server.shutdown()
    return found


def measure_kill(cluster: Cluster, seed: int) -> Dict:
    cluster.start_envoy(use_affinity=True, policy=BENCH_POLICY)
    images = make_images(IMAGES, seed)
    requests = interleaved(images, KILL_PROMPTS_PER_IMAGE)
    owners = Counter(owner_of(cluster, image_key(image)) for image in images)
    victim_name = owners.most_common(1)[0][0]  # the replica that owns the most images
    victim_index = cluster.replica_names().index(victim_name)
    kill_at = int(len(requests) * KILL_AFTER_FRACTION)
    state = {"killed_at": None, "unhealthy_at": None, "last_request_at": None, "in_flight_at_kill": None}
    retry_stat = f"cluster.{cluster_name('grpc', AFFINITY)}.upstream_rq_retry"
    retries_before = cluster.envoy.stat(retry_stat)
    overflow_stat = f"cluster.{cluster_name('grpc', AFFINITY)}.upstream_rq_retry_overflow"
    overflows_before = cluster.envoy.stat(overflow_stat)
    caches_start = cache_counts(cluster)
    caches_at_kill: List = []
    stop_watch = threading.Event()

    claim = threading.Lock()
    leftovers: List[Path] = []  # what the killed replica leaves in /dev/shm, removed after the run

    def kill_when(done: int) -> None:
        if done < kill_at or not claim.acquire(blocking=False):
            return  # not yet, or another worker is (or was) the one that kills
        if state["killed_at"] is None:
            hosts = cluster.envoy.hosts()[cluster_name("grpc", AFFINITY)]
            state["in_flight_at_kill"] = hosts[victim_name].get("rq_active", 0)
            caches_at_kill.extend(cache_counts(cluster))
            state["killed_at"], regions = kill_process_tree(cluster.replicas[victim_index].process)
            leftovers.extend(regions)
        # the lock stays held: nobody kills twice

    def watch() -> None:
        last_total = None
        while not stop_watch.is_set():
            try:
                host = cluster.envoy.hosts()[cluster_name("grpc", AFFINITY)][victim_name]
            except OSError:
                time.sleep(0.05)
                continue
            killed = state["killed_at"]
            if killed and killed > 0:
                if last_total is not None and host.get("rq_total", 0) > last_total:
                    state["last_request_at"] = time.time()
                if not host["healthy"] and state["unhealthy_at"] is None:
                    state["unhealthy_at"], state["unhealthy_flags"] = time.time(), host["flags"]
            last_total = host.get("rq_total", 0)
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    started = time.time()
    outcomes = run_workload(cluster.grpc_url, requests, on_progress=kill_when)
    stop_watch.set()
    watcher.join()
    remove_shared_memory(leftovers)
    killed_at = state["killed_at"]
    after_kill = [o for o in outcomes if o.started >= killed_at]
    survivors = [i for i in range(len(cluster.replicas)) if i != victim_index]
    caches_end = cache_counts(cluster)
    failures = [o.error for o in outcomes if not o.ok]
    result = {
        "replicas": len(cluster.replicas), "requests": len(requests), "killed": victim_name,
        "images_owned_per_replica": dict(sorted(owners.items())),
        "killed_after_requests": kill_at, "in_flight_at_victim_when_killed": state["in_flight_at_kill"],
        "failed_at_client": len(failures), "failures": failures[:5],
        "envoy_retries": cluster.envoy.stat(retry_stat) - retries_before,
        "envoy_retry_overflows": cluster.envoy.stat(overflow_stat) - overflows_before,
        "seconds_until_envoy_marks_unhealthy": None if state["unhealthy_at"] is None
        else round(state["unhealthy_at"] - killed_at, 2),
        "unhealthy_flags": state.get("unhealthy_flags"),
        "last_request_to_victim_after_kill_s": None if state["last_request_at"] is None
        else round(state["last_request_at"] - killed_at, 2),
        "hit_rate_before_kill": hit_rate(minus(caches_at_kill, caches_start)),
        "hit_rate_after_kill": hit_rate([minus(caches_end, caches_at_kill)[i] for i in survivors]),
        "requests_after_kill": len(after_kill),
        "prompts_per_s": round(sum(o.ok for o in outcomes) / (time.time() - started), 2),
        "timeline": [[round(o.started - started, 3), round(o.finished - started, 3), o.ok] for o in outcomes],
        "killed_at_s": round(killed_at - started, 3),
        "health_check_interval_s": BENCH_POLICY.health_check_interval_s,
        "unhealthy_threshold": BENCH_POLICY.unhealthy_threshold,
    }
    print(f"   killed {victim_name}: {result['failed_at_client']} client failures, {result['envoy_retries']} retries, "
          f"unhealthy after {result['seconds_until_envoy_marks_unhealthy']} s", flush=True)
    return result


def git_commit() -> Dict[str, object]:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=Path(__file__).parent).stdout.strip()

    # Results folders are rewritten by the run itself: only changes to the code make a run "dirty".
    changed = git("status", "--porcelain", "--untracked-files=no", "--", ":(top)", ":(top,exclude)benchmarks/results")
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(changed)}


def envoy_version() -> str:
    output = subprocess.run([str(envoy_binary()), "--version"], capture_output=True, text=True).stdout
    return output.strip().split("version:")[-1].strip()


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cluster", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="results folder (default benchmarks/results/<machine>-<date>-cluster)")
    parser.add_argument("--build-dir", type=Path, default=Path("build/bench/cluster"))
    parser.add_argument("--render", type=Path, help="only redraw plots/ and summary.md of this results folder")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    from . import cluster_report

    args = parse_args(argv)
    if args.render:
        cluster_report.render(args.render)
        return 0
    started, wall, others = time.perf_counter(), {}, {}
    info, date, code = machine.machine_info(), datetime.date.today().isoformat(), git_commit()
    out_dir = args.out or RESULTS_DIR / f"{machine.slug(info)}-{date}-cluster"
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    args.build_dir.mkdir(parents=True, exist_ok=True)
    with phase("model: tiny checkpoint, ONNX export, repository", wall, others):
        _, onnx_dir = prepare_model("tiny", args.build_dir)
        repository = write_repository(args.build_dir / "model_repository", onnx_dir, RepositoryOptions(
            flavor="python-ort", ort_threads=1, cache_bytes=int((CACHE_IMAGES + 0.5) * CACHE_ENTRY_BYTES)))
    points, seed = [], 100
    for count in REPLICA_COUNTS:
        with phase(f"routing: {count} replica(s), affinity vs round robin", wall, others):
            cluster = Cluster.on_free_ports(repository, count, log_dir=args.build_dir / f"logs-{count}",
                                            policy=BENCH_POLICY).start()
            try:
                for affinity in (True, False):
                    seed += 1
                    points.append(measure_routing(cluster, affinity, seed))
                kill = None
                if count == REPLICA_COUNTS[-1]:
                    with phase("failure: a replica SIGKILLed mid-run", wall, others):
                        kill = measure_kill(cluster, seed + 1)
            finally:
                cluster.stop(drain_timeout=10)
    with phase("remap: keys moved going from 3 to 4 replicas", wall, others):
        remap = measure_remap(args.build_dir)
    results = {
        "meta": {"date": date, "command": "python -m benchmarks.cluster " + " ".join(sys.argv[1:]), "machine": info,
                 "git": code, "versions": {**machine.versions(), "envoy": envoy_version()},
                 "workload": {"images": IMAGES, "prompts_per_image": PROMPTS_PER_IMAGE, "concurrency": CONCURRENCY,
                              "cache_images_per_replica": CACHE_IMAGES, "image_size": list(IMAGE_SIZE),
                              "request": "evf_sam_prompts, image bytes + 1 prompt, gRPC through Envoy",
                              "order": "interleaved: every image's prompt p before any image's prompt p+1"},
                 "policy": {k: v for k, v in BENCH_POLICY.__dict__.items()},
                 "wall_seconds": {**wall, "total": time.perf_counter() - started}, "other_jobs_cpu_share": others},
        "routing": points, "kill": kill, "remap": remap,
    }
    (out_dir / "results.json").write_text(json.dumps(results, indent=1, default=str))
    cluster_report.render(out_dir)
    print(f"wrote {out_dir}/summary.md ({results['meta']['wall_seconds']['total'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
