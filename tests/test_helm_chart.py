"""The Kubernetes deployment (deploy/helm/evf-sam-triton), offline: Helm itself renders and lints the
chart (the Helm v4 SDK of the helm-python-sdk wheel), every rendered built-in object is validated
against the Kubernetes 1.33 schemas in strict mode (kubernetes-validate), custom resources are checked
for the fields their controllers require, bad values fail at render time, and the chart's routing
matches serving/routing_policy.py, the policy the local Envoy runs.  No cluster is contacted."""
from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml

from evfsam.specs import PIPELINE_FINISHED_METRIC, PIPELINE_STARTED_METRIC, SAM_IMAGE_ENCODER
from serving.routing_policy import DEFAULT_POLICY, helm_values

REPO_ROOT = Path(__file__).resolve().parent.parent
CHART = REPO_ROOT / "deploy" / "helm" / "evf-sam-triton"
ADAPTER_RULES = REPO_ROOT / "deploy" / "prometheus-adapter-values.yaml"
KUBERNETES_VERSION = "1.33.0"
# API groups Kubernetes itself serves: a missing schema for one of these is a failure, not a skip.
BUILT_IN_GROUPS = {"", "apps", "policy", "autoscaling", "batch", "networking.k8s.io", "rbac.authorization.k8s.io"}
RELEASE, NAMESPACE = "evf-sam", "ml"
EVERYTHING_ON = {"istio": {"enabled": True},
                 "modelRepository": {"source": "fetch", "fetch": {
                     "image": "registry.example/tools:1", "command": ["sh", "-c", "copy-models /models"]}},
                 "triton": {"adminKeySecret": {"name": "triton-admin"}, "extraArgs": ["--log-verbose=1"]}}
KSERVE = {"mode": "kserve", "gateway": {"enabled": False}}


def render(values: Dict = None) -> List[Dict]:
    with helm.Chart.load(CHART) as chart:
        manifests = chart.render(values, name=RELEASE, namespace=NAMESPACE)
    return [document for path, text in sorted(manifests.items()) if path.endswith(".yaml")
            for document in yaml.safe_load_all(text) if document]


def by_kind(objects: List[Dict], kind: str) -> List[Dict]:
    return [o for o in objects if o["kind"] == kind]


def api_group(obj: Dict) -> str:
    return obj["apiVersion"].rpartition("/")[0]


@pytest.fixture(scope="module")
def default_objects():
    return render()


@pytest.fixture(scope="module", params=["defaults", "everything-on", "kserve"])
def variant(request):
    return request.param, render({"defaults": None, "everything-on": EVERYTHING_ON, "kserve": KSERVE}[request.param])


def test_helm_lint_strict():
    report = helm.lint(CHART, strict=True, kube_version=f"v{KUBERNETES_VERSION}")
    problems = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
    assert not problems, problems


def test_builtin_objects_validate_strictly(variant):
    name, objects = variant
    built_in = [o for o in objects if api_group(o) in BUILT_IN_GROUPS]
    assert built_in, name
    for obj in built_in:
        # SchemaNotFoundError for a built-in group propagates: it fails the test.
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def test_strict_validation_catches_a_misplaced_field(default_objects):
    deployment = by_kind(default_objects, "Deployment")[0]
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["gpus"] = 1  # not a container field
    with pytest.raises(kubernetes_validate.ValidationError, match="gpus"):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)
    custom = {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "GRPCRoute", "metadata": {"name": "x"}}
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):  # why custom resources are checked below
        kubernetes_validate.validate(custom, KUBERNETES_VERSION, strict=True)


# What each custom resource's controller needs (from the CRDs' required fields and the fields this
# chart relies on); kubernetes-validate has no schemas for CRDs.
CUSTOM_RESOURCE_SCHEMAS = {
    ("gateway.networking.k8s.io", "GRPCRoute"): {"required": ["spec"], "properties": {"spec": {
        "required": ["parentRefs", "rules"], "properties": {
            "parentRefs": {"minItems": 1, "items": {"required": ["name"]}},
            "rules": {"minItems": 1, "items": {"required": ["backendRefs"], "properties": {
                "backendRefs": {"minItems": 1, "items": {"required": ["name", "port"]}},
                "matches": {"items": {"properties": {"headers": {"items": {
                    "required": ["name", "value"], "properties": {"type": {"enum": ["Exact", "RegularExpression"]}}}}}}}}}}}}}},
    ("gateway.networking.k8s.io", "HTTPRoute"): {"required": ["spec"], "properties": {"spec": {
        "required": ["parentRefs", "rules"], "properties": {
            "parentRefs": {"minItems": 1, "items": {"required": ["name"]}},
            "rules": {"minItems": 1, "items": {"required": ["backendRefs"], "properties": {
                "backendRefs": {"minItems": 1, "items": {"required": ["name", "port"]}}}}}}}}},
    ("gateway.envoyproxy.io", "BackendTrafficPolicy"): {"required": ["spec"], "properties": {"spec": {
        "required": ["targetRefs", "loadBalancer"], "properties": {
            "targetRefs": {"minItems": 1, "items": {"required": ["group", "kind", "name"]}},
            "loadBalancer": {"required": ["type"], "properties": {
                "type": {"enum": ["ConsistentHash", "LeastRequest", "Random", "RoundRobin"]}},
                "if": {"properties": {"type": {"const": "ConsistentHash"}}},
                "then": {"required": ["consistentHash"], "properties": {"consistentHash": {
                    "required": ["type", "headers"], "properties": {"type": {"const": "Headers"}}}}}},
            "healthCheck": {"properties": {"active": {
                "required": ["type", "http", "interval", "timeout", "unhealthyThreshold", "healthyThreshold"]}}},
            "retry": {"properties": {"retryOn": {"required": ["triggers"]}}}}}}},
    ("networking.istio.io", "DestinationRule"): {"required": ["spec"], "properties": {"spec": {
        "required": ["host", "trafficPolicy"], "properties": {"trafficPolicy": {"required": ["loadBalancer"], "properties": {
            "loadBalancer": {"required": ["consistentHash"], "properties": {
                "consistentHash": {"required": ["httpHeaderName"]}}}}}}}}},
    ("networking.istio.io", "VirtualService"): {"required": ["spec"], "properties": {"spec": {
        "required": ["hosts", "http"], "properties": {"http": {"items": {"required": ["route"]}}}}}},
    ("monitoring.coreos.com", "ServiceMonitor"): {"required": ["spec"], "properties": {"spec": {
        "required": ["selector", "endpoints"], "properties": {"endpoints": {"minItems": 1, "items": {"required": ["port"]}}}}}},
    ("serving.kserve.io", "InferenceService"): {"required": ["spec"], "properties": {
        "metadata": {"properties": {"annotations": {"required": ["serving.kserve.io/deploymentMode"],
                                                    "properties": {"serving.kserve.io/deploymentMode": {"const": "RawDeployment"}}}}},
        "spec": {"required": ["predictor"], "properties": {"predictor": {"required": ["model"], "properties": {
            "model": {"required": ["modelFormat", "storageUri", "image"], "properties": {
                "modelFormat": {"properties": {"name": {"const": "triton"}}}}}}}}}}},
}


def test_custom_resources_have_required_fields(variant):
    name, objects = variant
    custom = [o for o in objects if api_group(o) not in BUILT_IN_GROUPS]
    for obj in custom:
        key = (api_group(obj), obj["kind"])
        assert key in CUSTOM_RESOURCE_SCHEMAS, f"{name}: no check for {key}"
        assert obj["metadata"].get("name"), obj
        jsonschema.validate(obj, CUSTOM_RESOURCE_SCHEMAS[key])


def test_variants_render_what_they_promise(default_objects):
    kinds = sorted({o["kind"] for o in default_objects})
    assert kinds == sorted(["BackendTrafficPolicy", "Deployment", "GRPCRoute", "HTTPRoute", "HorizontalPodAutoscaler",
                            "PodDisruptionBudget", "Service", "ServiceAccount", "ServiceMonitor"])
    everything = render(EVERYTHING_ON)
    assert {"DestinationRule", "VirtualService"} <= {o["kind"] for o in everything}
    assert [s["spec"].get("clusterIP") for s in by_kind(everything, "Service")] == ["None", None]
    init = by_kind(everything, "Deployment")[0]["spec"]["template"]["spec"]["initContainers"]
    assert init[0]["command"] == ["sh", "-c", "copy-models /models"]
    kserve = render(KSERVE)
    assert sorted(o["kind"] for o in kserve) == ["HorizontalPodAutoscaler", "InferenceService",
                                                 "PodDisruptionBudget", "ServiceAccount"]
    hpa = by_kind(kserve, "HorizontalPodAutoscaler")[0]
    assert hpa["spec"]["scaleTargetRef"]["name"] == f"{RELEASE}-evf-sam-triton-predictor"


def test_triton_pod(default_objects):
    pod = by_kind(default_objects, "Deployment")[0]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    for probe in ("startupProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 900  # engine load budget
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    assert volumes["models"]["persistentVolumeClaim"]["readOnly"] is True
    service = by_kind(default_objects, "Service")[0]["spec"]
    assert service["clusterIP"] == "None"
    assert [p["name"] for p in service["ports"]] == ["grpc-infer", "http-infer", "http-metrics"]
    policy = DEFAULT_POLICY
    assert pod["terminationGracePeriodSeconds"] == policy.termination_grace_period_s
    assert pod["terminationGracePeriodSeconds"] > policy.endpoint_removal_delay_s + policy.replica_drain_timeout_s
    exit_timeout = int(next(a for a in container["args"] if a.startswith("--exit-timeout-secs=")).split("=")[1])
    # Worst case: endpoint removal + preStop drain + tritonserver's exit, all inside the grace period.
    assert (policy.endpoint_removal_delay_s + policy.replica_drain_timeout_s + exit_timeout
            < pod["terminationGracePeriodSeconds"])


def test_routing_values_are_the_routing_policy():
    with helm.Chart.load(CHART) as chart:
        assert chart.values["routing"] == helm_values(DEFAULT_POLICY)
        assert chart.values["drain"]["startedMetric"] == PIPELINE_STARTED_METRIC
        assert chart.values["drain"]["finishedMetric"] == PIPELINE_FINISHED_METRIC


def test_gateway_objects_carry_the_policy(default_objects):
    policy, values = DEFAULT_POLICY, helm_values(DEFAULT_POLICY)
    policies = {p["metadata"]["name"]: p["spec"] for p in by_kind(default_objects, "BackendTrafficPolicy")}
    assert len(policies) == 4
    for name, spec in policies.items():
        by_image = name.endswith("-by-image")
        balancer = spec["loadBalancer"]
        if by_image:
            assert balancer["consistentHash"] == {"type": "Headers", "headers": [{"name": policy.affinity_header}],
                                                  "tableSize": policy.maglev_table_size}
        else:
            assert balancer == {"type": policy.fallback_algorithm}
        grpc = "-grpc" in name
        assert spec["retry"]["retryOn"]["triggers"] == list(policy.grpc_retry_on if grpc else policy.http_retry_on)
        assert spec["timeout"]["http"]["requestTimeout"] == values["requestTimeout"]
        active = spec["healthCheck"]["active"]
        assert active["http"]["path"] == policy.health_check_path and active["overrides"]["port"] == 8000
        assert spec["healthCheck"]["passive"]["consecutiveGatewayErrors"] == policy.outlier_consecutive_gateway_errors
    routes = by_kind(default_objects, "GRPCRoute") + by_kind(default_objects, "HTTPRoute")
    for route in routes:
        matches = route["spec"]["rules"][0].get("matches", [])
        headers = [h for m in matches for h in m.get("headers", [])]
        if route["metadata"]["name"].endswith("-by-image"):
            assert headers == [{"type": "RegularExpression", "name": policy.affinity_header,
                                "value": policy.affinity_key_pattern}]
        else:
            assert headers == []


def test_autoscaling_on_the_image_encoders_queue(default_objects):
    hpa = by_kind(default_objects, "HorizontalPodAutoscaler")[0]["spec"]
    metric = hpa["metrics"][0]
    rules = yaml.safe_load(ADAPTER_RULES.read_text())["rules"]["custom"]
    rule = next(r for r in rules if r["name"]["as"] == metric["pods"]["metric"]["name"])
    assert f'model="{SAM_IMAGE_ENCODER.name}"' in rule["seriesQuery"]
    assert "nv_inference_queue_duration_us" in rule["metricsQuery"]
    assert "nv_inference_request_success" in rule["metricsQuery"]
    assert hpa["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 300


BAD_VALUES = [
    ({"replicaCount": 0}, "/replicaCount"),
    ({"podSecurityContext": {"runAsUser": 0}}, "/podSecurityContext/runAsUser"),
    ({"gpusPerReplica": 0}, "/gpusPerReplica"),
    ({"modelRepository": {"source": "s3"}}, "/modelRepository/source"),
    ({"modelRepository": {"pvc": {"claimName": ""}}}, "/modelRepository/pvc/claimName"),
    ({"routing": {"requestTimeout": 600}}, "/routing/requestTimeout"),
    ({"routing": {"grpcRetryOn": ["5xx"]}}, "/routing/grpcRetryOn/0"),
    ({"routing": {"hashAlgorithm": "RingHash"}}, "/routing/hashAlgorithm"),
    ({"sharedMemorySizeLimit": "lots"}, "/sharedMemorySizeLimit"),
    ({"replicas": 3}, "replicas"),  # a typo of replicaCount: unknown keys are errors
    ({"mode": "statefulset"}, "/mode"),
]


@pytest.mark.parametrize("values, where", BAD_VALUES, ids=[w for _, w in BAD_VALUES])
def test_bad_values_fail_at_render_time(values, where):
    with pytest.raises(helm.HelmError, match=re.escape(where)):
        render(values)


def test_inconsistent_values_fail_at_render_time():
    with pytest.raises(helm.HelmRenderError, match="minReplicas"):
        render({"autoscaling": {"minReplicas": 9, "maxReplicas": 3}})
    with pytest.raises(helm.HelmRenderError, match="exitTimeoutSeconds"):
        render({"triton": {"exitTimeoutSeconds": 45}})
    with pytest.raises(helm.HelmRenderError, match="KServe"):
        render({**KSERVE, "istio": {"enabled": True}})


def test_prestop_drain_script_runs_against_real_triton(triton_server):
    """The preStop hook's script, as rendered, against a real tritonserver's metrics: idle -> it returns."""
    port = int(triton_server.metrics_url.rsplit(":", 1)[1].split("/")[0])
    values = {"routing": {"endpointRemovalDelaySeconds": 0, "replicaDrainTimeoutSeconds": 30},
              "triton": {"ports": {"metrics": port}}}
    container = by_kind(render(values), "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[:2] == ["python3", "-c"]
    started = time.time()
    subprocess.run([sys.executable, "-c", command[2]], check=True, timeout=60)
    assert time.time() - started < 10  # idle server: two idle polls, not the 30 s budget
