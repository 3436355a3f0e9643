"""serving/routing_policy.py -> the Envoy bootstrap of `make serve-cluster` (serving/envoy.py): Envoy
itself validates it (`envoy --mode validate` builds every listener, route and cluster), and it says
what the policy says.  The chart's side of the agreement is tests/test_helm_chart.py."""
from __future__ import annotations

import dataclasses

import pytest

from serving.envoy import AFFINITY, LEAST_REQUEST, Replica, bootstrap, cluster_name, validate, write_config
from serving.routing_policy import DEFAULT_POLICY, RoutingPolicy, duration

REPLICAS = [Replica(f"replica-{i}", "127.0.0.1", 18000 + 10 * i, 18001 + 10 * i) for i in range(3)]


def make(policy: RoutingPolicy = DEFAULT_POLICY, use_affinity: bool = True) -> dict:
    return bootstrap(REPLICAS, "127.0.0.1", 19000, 19001, 19901, policy, use_affinity)


@pytest.mark.parametrize("use_affinity", [True, False], ids=["affinity", "baseline"])
def test_envoy_validates_the_bootstrap(tmp_path, use_affinity):
    result = validate(write_config(make(use_affinity=use_affinity), tmp_path / "envoy.json"))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "OK" in result.stdout + result.stderr


def test_envoy_rejects_a_broken_bootstrap(tmp_path):
    config = make()
    config["static_resources"]["clusters"][0]["lb_policy"] = "NO_SUCH_POLICY"
    assert validate(write_config(config, tmp_path / "envoy.json")).returncode != 0


def listener(config: dict, protocol: str) -> dict:
    found = next(l for l in config["static_resources"]["listeners"] if l["name"] == protocol)
    return found["filter_chains"][0]["filters"][0]["typed_config"]


def test_routes_hash_on_the_image_key_and_fall_back_to_least_request():
    config, policy = make(), DEFAULT_POLICY
    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}
    for protocol in ("grpc", "http"):
        manager = listener(config, protocol)
        by_key, rest = manager["route_config"]["virtual_hosts"][0]["routes"]
        assert by_key["match"]["headers"][0]["name"] == policy.affinity_header
        assert by_key["match"]["headers"][0]["string_match"]["safe_regex"]["regex"] == policy.affinity_key_pattern
        assert by_key["route"]["hash_policy"] == [{"header": {"header_name": policy.affinity_header}}]
        assert by_key["route"]["cluster"] == cluster_name(protocol, AFFINITY)
        assert "headers" not in rest["match"] and "hash_policy" not in rest["route"]
        assert rest["route"]["cluster"] == cluster_name(protocol, LEAST_REQUEST)
        for route in (by_key, rest):
            retry = route["route"]["retry_policy"]
            allowed = policy.grpc_retry_on if protocol == "grpc" else policy.http_retry_on
            assert retry["retry_on"].split(",") == list(allowed)
            assert "5xx" not in retry["retry_on"] and "gateway-error" not in retry["retry_on"]
            assert route["route"]["timeout"] == f"{policy.request_timeout_s}s"
        assert manager["stream_idle_timeout"] == f"{policy.request_timeout_s}s"  # not Envoy's 5 min default
        assert clusters[cluster_name(protocol, AFFINITY)]["lb_policy"] == "MAGLEV"
        assert clusters[cluster_name(protocol, LEAST_REQUEST)]["lb_policy"] == "LEAST_REQUEST"
    for cluster in clusters.values():
        check = cluster["health_checks"][0]
        assert check["http_health_check"]["path"] == policy.health_check_path
        assert check["interval"] == f"{policy.health_check_interval_s:g}s"
        endpoints = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
        # Health from the replica's HTTP port, hashing on its name: the same replica over gRPC and HTTP.
        assert [e["endpoint"]["health_check_config"]["port_value"] for e in endpoints] == [r.http_port for r in REPLICAS]
        assert [e["metadata"]["filter_metadata"]["envoy.lb"]["hash_key"] for e in endpoints] == [r.name for r in REPLICAS]
        assert cluster["outlier_detection"]["enforcing_consecutive_5xx"] == 0
        assert cluster["common_lb_config"]["healthy_panic_threshold"]["value"] == policy.healthy_panic_threshold_percent


def test_baseline_has_no_affinity_route():
    routes = listener(make(dataclasses.replace(DEFAULT_POLICY, fallback_algorithm="RoundRobin"), use_affinity=False),
                      "grpc")["route_config"]["virtual_hosts"][0]["routes"]
    assert [r["route"]["cluster"] for r in routes] == [cluster_name("grpc", LEAST_REQUEST)]


def test_policy_checks():
    with pytest.raises(ValueError, match="hash_algorithm"):
        RoutingPolicy(hash_algorithm="Random")
    with pytest.raises(ValueError, match="health_check_timeout_s"):
        RoutingPolicy(health_check_interval_s=1.0, health_check_timeout_s=1.0)
    assert duration(600) == "600s" and duration(0.1) == "100ms"
    assert DEFAULT_POLICY.termination_grace_period_s > DEFAULT_POLICY.endpoint_removal_delay_s + DEFAULT_POLICY.replica_drain_timeout_s
