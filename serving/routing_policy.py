"""How requests are spread over Triton replicas: the one definition that both the local Envoy
(serving/envoy.py, `make serve-cluster`) and the Helm chart (deploy/helm/evf-sam-triton, its
`routing:` values) are made from.  tests/test_routing_policy.py asserts the chart's defaults are
`helm_values(DEFAULT_POLICY)`; edit here and regenerate that block with

    python -m serving.routing_policy > /tmp/routing.yaml   # paste under `routing:` in values.yaml

Why each choice (measured figures: docs/scaling-out.md):

* Consistent hashing on `x-image-key` (the image's sha256, `evfsam.affinity`) with Maglev: every
  request for an image reaches the replica whose embedding cache holds it.  Maglev rather than ring
  hash, measured through Envoy 1.40 (benchmarks/cluster.py, 2000 keys, 3 -> 4 replicas): Maglev
  remapped 25.4% of the keys (ideal 25%), all of them to the new replica; Envoy's ring hash
  (default ring size) remapped 34.4%, a quarter of those between the old replicas, i.e. caches lost
  for nothing.  Envoy Gateway's ConsistentHash is Maglev too, so local and in-cluster routing agree.
* Requests without a well-formed key (health probes, metadata, raw clients that do not send it) go
  to a least-request cluster over the same replicas: a hash policy that finds no header makes
  Envoy's Maglev pick a random host, which ignores load.
* Active health checks on Triton's readiness (`GET /v2/health/ready` on the replica's HTTP port, also
  for the gRPC endpoints), outlier ejection on gateway errors only (connect failure, reset, 502-504):
  an inference error (HTTP 500 / gRPC INTERNAL for a bad image) says nothing about the replica.
* Retries only where no response has started: connect failure, refused stream, reset before the
  response headers, gRPC UNAVAILABLE (Triton's "server is stopping").  A retry re-runs an
  inference whose replica died; inference has no side effect but the cache, so that is safe.
  Each retry goes to another host (previous-hosts predicate); Envoy never retries once response
  headers reached the client.  Up to `max_concurrent_retries` at once: a dead replica's requests are
  all retried together, and Envoy's default limit of 3 failed the fourth in a measured run.
* Timeouts: a full-size model on a CPU takes 80+ s per image, and a request may queue behind
  others, so the proxy allows `request_timeout_s`; a client's own shorter deadline (grpc-timeout)
  wins.  No per-try timeout: a retry is for a dead replica, not a slow one.
* Healthy panic threshold 0: with most replicas down, fail fast (503) instead of Envoy's default of
  spraying requests over unhealthy hosts.
* Drain: Envoy discourages connections (HTTP/2 GOAWAY, HTTP/1 `Connection: close`) for
  `drain_time_s` before closing its listeners; replicas drain their in-flight requests as
  `serving/server.py` does.  In Kubernetes, terminationGracePeriodSeconds is larger than the
  endpoint-removal delay plus the replica's drain budget (the chart's schema enforces it).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from typing import Dict, Tuple

from evfsam.affinity import AFFINITY_HEADER, AFFINITY_KEY_PATTERN
from evfsam.processing import DEFAULT_MAX_IMAGE_BYTES

# Room for the largest image a replica accepts plus the prompts, so that Envoy can buffer a request
# and replay it on another replica (a request larger than the buffer is not retried).
REQUEST_BUFFER_BYTES = DEFAULT_MAX_IMAGE_BYTES + 4 * 1024 * 1024


@dataclass(frozen=True)
class RoutingPolicy:
    affinity_header: str = AFFINITY_HEADER
    affinity_key_pattern: str = AFFINITY_KEY_PATTERN
    hash_algorithm: str = "Maglev"
    maglev_table_size: int = 65537  # prime; Envoy's and Envoy Gateway's default
    fallback_algorithm: str = "LeastRequest"
    request_timeout_s: int = 600
    connect_timeout_s: float = 2.0
    grpc_retry_on: Tuple[str, ...] = ("connect-failure", "refused-stream", "reset", "unavailable")
    http_retry_on: Tuple[str, ...] = ("connect-failure", "refused-stream", "reset")
    num_retries: int = 2
    # Retries in flight at once per cluster.  Envoy's default circuit breaker allows 3: when a replica
    # dies with more requests than that on it, the rest fail (measured: 1 of 3+ in flight).
    max_concurrent_retries: int = 64
    retry_backoff_base_s: float = 0.1
    retry_backoff_max_s: float = 1.0
    request_buffer_bytes: int = REQUEST_BUFFER_BYTES
    health_check_path: str = "/v2/health/ready"
    health_check_interval_s: float = 2.0
    health_check_timeout_s: float = 1.0
    unhealthy_threshold: int = 2
    healthy_threshold: int = 1
    outlier_consecutive_gateway_errors: int = 2
    # 0: never eject on 5xx (Envoy counts `++count == threshold`, which 0 never meets; Istio
    # documents 0 as disabled).  Envoy Gateway cannot set enforcing_consecutive_5xx, so the
    # threshold itself is what turns it off there.
    outlier_consecutive_5xx_errors: int = 0
    outlier_interval_s: float = 2.0
    outlier_base_ejection_s: float = 15.0
    outlier_max_ejection_percent: int = 50
    healthy_panic_threshold_percent: int = 0
    drain_time_s: int = 10
    # Kubernetes: how long a terminating pod keeps serving so that the proxies see its endpoint go.
    endpoint_removal_delay_s: int = 10
    # How long a replica waits for its requests in flight before Triton is stopped (serving/server.py).
    replica_drain_timeout_s: int = 60

    def __post_init__(self) -> None:
        if self.hash_algorithm not in ("Maglev", "RingHash"):
            raise ValueError(f"hash_algorithm must be Maglev or RingHash, got {self.hash_algorithm!r}")
        if self.fallback_algorithm not in ("LeastRequest", "RoundRobin", "Random"):
            raise ValueError(f"fallback_algorithm must be LeastRequest, RoundRobin or Random, got {self.fallback_algorithm!r}")
        if self.request_timeout_s <= 0 or self.health_check_timeout_s >= self.health_check_interval_s:
            raise ValueError("need request_timeout_s > 0 and health_check_timeout_s < health_check_interval_s, got "
                             f"{self.request_timeout_s} and {self.health_check_timeout_s} >= {self.health_check_interval_s}")

    @property
    def termination_grace_period_s(self) -> int:
        """Kubernetes' budget for a pod's stop: endpoint removal, then the replica's drain, plus margin."""
        return self.endpoint_removal_delay_s + self.replica_drain_timeout_s + 30


DEFAULT_POLICY = RoutingPolicy()


def helm_values(policy: RoutingPolicy = DEFAULT_POLICY) -> Dict[str, object]:
    """The chart's `routing:` values (camelCase, durations as Kubernetes / Gateway API strings)."""
    return {
        "affinityHeader": policy.affinity_header,
        "affinityKeyPattern": policy.affinity_key_pattern,
        "hashAlgorithm": policy.hash_algorithm,
        "maglevTableSize": policy.maglev_table_size,
        "fallbackAlgorithm": policy.fallback_algorithm,
        "requestTimeout": duration(policy.request_timeout_s),
        "connectTimeout": duration(policy.connect_timeout_s),
        "grpcRetryOn": list(policy.grpc_retry_on),
        "httpRetryOn": list(policy.http_retry_on),
        "numRetries": policy.num_retries,
        "maxConcurrentRetries": policy.max_concurrent_retries,
        "retryBackoffBase": duration(policy.retry_backoff_base_s),
        "retryBackoffMax": duration(policy.retry_backoff_max_s),
        "requestBufferBytes": policy.request_buffer_bytes,
        "healthCheck": {
            "path": policy.health_check_path,
            "interval": duration(policy.health_check_interval_s),
            "timeout": duration(policy.health_check_timeout_s),
            "unhealthyThreshold": policy.unhealthy_threshold,
            "healthyThreshold": policy.healthy_threshold,
        },
        "outlierDetection": {
            "consecutiveGatewayErrors": policy.outlier_consecutive_gateway_errors,
            "consecutive5xxErrors": policy.outlier_consecutive_5xx_errors,
            "interval": duration(policy.outlier_interval_s),
            "baseEjectionTime": duration(policy.outlier_base_ejection_s),
            "maxEjectionPercent": policy.outlier_max_ejection_percent,
        },
        "healthyPanicThresholdPercent": policy.healthy_panic_threshold_percent,
        "drainTimeSeconds": policy.drain_time_s,
        "endpointRemovalDelaySeconds": policy.endpoint_removal_delay_s,
        "replicaDrainTimeoutSeconds": policy.replica_drain_timeout_s,
    }


def duration(seconds: float) -> str:
    """Seconds as a Gateway API / Envoy duration string: 600 -> '600s', 0.1 -> '100ms'."""
    if float(seconds).is_integer():
        return f"{int(seconds)}s"
    milliseconds = seconds * 1000
    if not float(milliseconds).is_integer():
        raise ValueError(f"{seconds} s is not a whole number of milliseconds")
    return f"{int(milliseconds)}ms"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving.routing_policy", description=__doc__.splitlines()[0])
    parser.parse_args(argv)
    try:
        import yaml
    except ImportError:
        json.dump(helm_values(), sys.stdout, indent=2)
    else:
        yaml.safe_dump(helm_values(), sys.stdout, sort_keys=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
