# EVF-SAM on Triton. `make demo` and `make test` work from a fresh clone: they create .venv first.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BUILD ?= build
# The committed demo model (trained on generated shapes: assets/demo-checkpoint/TRAINING.md) and a
# scene it was not trained on, with the ground truth of the default prompt.
DEMO_CHECKPOINT := assets/demo-checkpoint
DEMO_IMAGE := assets/demo_scene.png
DEMO_PROMPT := the red triangle
CHECKPOINT ?= $(DEMO_CHECKPOINT)
ONNX_DIR ?= $(BUILD)/onnx
REPO_DIR ?= $(BUILD)/model_repository
FLAVOR ?= python-ort
# cpu | gpu: instance kinds, ONNX Runtime providers / accelerators, and onnxruntime-gpu in the venv
DEVICE ?= cpu
RECIPE ?=
REPO_ARGS ?=
HTTP_PORT ?= 8000
GRPC_PORT ?= 8001
METRICS_PORT ?= 8002
ADDRESS ?= 127.0.0.1
REPLICAS ?= 2
ENVOY_ADMIN_PORT ?= 9901
PROMPT ?= $(DEMO_PROMPT)
IMAGE ?= $(DEMO_IMAGE)
PYTEST_ARGS ?=
# Meta's SAM-2, the reference of the SAM-2 parity tests (see the install recipe).
SAM2_REFERENCE := sam2==1.1.0
SETUPTOOLS := setuptools==84.2.1
export PYTHONPATH := $(CURDIR)

.PHONY: help install test test-slow demo export onnx engines repository prepare serve serve-cluster bench clean

help:
	@echo "make demo        set up, export a checkpoint, serve it, run one request (CHECKPOINT=dir|hub-id IMAGE= PROMPT=)"
	@echo "make test        set up and run the test suite (real tritonserver, real ONNX Runtime)"
	@echo "make export      ONNX graphs + validation (+ TensorRT plans where TensorRT is importable)"
	@echo "make repository  generate the Triton model repository (FLAVOR=python-ort|onnxruntime|tensorrt, DEVICE=cpu|gpu)"
	@echo "make serve       serve CHECKPOINT (re-exports / regenerates what is stale) in the foreground"
	@echo "                 (HTTP_PORT, GRPC_PORT, METRICS_PORT, ADDRESS, FLAVOR, DEVICE, RECIPE)"
	@echo "make serve-cluster  REPLICAS=N tritonservers behind Envoy routing by image (same knobs, ENVOY_ADMIN_PORT)"
	@echo "make ui          a web page to try the server: masks over an image (UI_PORT, URL, PROTOCOL; docs/ui.md)"
	@echo "make bench       CPU benchmark suite -> benchmarks/results/<machine>-<date>/"
	@echo "make reliability  soak, overload, client deadlines, faults, fuzz, co-batching (~1 h) -> benchmarks/results/<machine>-<date>-reliability/"
	@echo "make bench-cluster  replicas behind Envoy: affinity vs round robin, remapping, a killed replica"

install: $(VENV)/.installed $(if $(filter gpu,$(DEVICE)),$(VENV)/.installed-gpu)

# DEVICE=gpu: onnxruntime-gpu (same version) in place of the CPU onnxruntime, for the python-ort flavor.
ORT_VERSION = $(shell sed -n 's/.*"onnxruntime==\([0-9.]*\)".*/\1/p' pyproject.toml)
$(VENV)/.installed-gpu: $(VENV)/.installed
	$(PY) -m pip uninstall --quiet --yes onnxruntime
	$(PY) -m pip install --quiet --disable-pip-version-check onnxruntime-gpu==$(ORT_VERSION)
	touch $@

# sam2 (SAM2_REFERENCE) ships as an sdist whose setup.py imports torch, and it declares torchvision
# and hydra-core, which would replace the CPU torch: it is built against the installed torch, without
# its CUDA extension and without its dependencies (what its modeling package imports comes with
# ".[all]": iopath, portalocker).
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
	set -o pipefail; $(PY) -m pip install --quiet --disable-pip-version-check -e ".[all]" 2>&1 | { grep -v "^WARNING: Location" || true; }
	$(PY) -m pip install --quiet --disable-pip-version-check $(SETUPTOOLS)
	SAM2_BUILD_CUDA=0 $(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation $(SAM2_REFERENCE)
	touch $@

test: install
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

test-slow: install
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

ifeq ($(CHECKPOINT),$(DEMO_CHECKPOINT))
DEMO_FLAGS := --demo-model
endif
ifeq ($(IMAGE),$(DEMO_IMAGE))  # the mask names its prompt; the demo scores only that prompt
DEMO_FLAGS += --ground-truth assets/ground_truth/demo_scene.png
endif

onnx: install
	$(PY) -m export --checkpoint $(CHECKPOINT) --output-dir $(ONNX_DIR) $(if $(RECIPE),--recipe $(RECIPE))

export: onnx engines

# TensorRT plans where TensorRT is importable (NGC containers: make docker-export); PLANS=1 makes
# their absence an error.
engines: install
	@if $(PY) -c "import tensorrt" 2>/dev/null; then \
	  $(PY) -m export.trt_support $(ONNX_DIR)/*.onnx && \
	  $(PY) -m serving.repository --flavor tensorrt --device gpu --onnx-dir $(ONNX_DIR) --output $(TRT_REPOSITORY) && \
	  $(PY) -m export.tensorrt_build --onnx-dir $(ONNX_DIR) --repository $(TRT_REPOSITORY) --timing-cache $(TRT_TIMING_CACHE); \
	else \
	  echo "TensorRT is not importable here: stopping after ONNX (TensorRT plans: make docker-export)"; \
	  test "$(PLANS)" != 1 || exit 3; \
	fi

repository: install
	$(PY) -m serving.repository --flavor $(FLAVOR) --device $(DEVICE) --onnx-dir $(ONNX_DIR) --output $(REPO_DIR) $(REPO_ARGS)

# The repository always serves CHECKPOINT: whatever was exported or generated from something else is rebuilt.
prepare: install
	$(PY) -m serving.prepare --checkpoint $(CHECKPOINT) $(if $(RECIPE),--recipe $(RECIPE)) --onnx-dir $(ONNX_DIR) \
		--repository $(REPO_DIR) --flavor $(FLAVOR) --device $(DEVICE) $(REPO_ARGS)

serve: prepare
	$(PY) -m serving.server --repository $(REPO_DIR) --address $(ADDRESS) \
		--http-port $(HTTP_PORT) --grpc-port $(GRPC_PORT) --metrics-port $(METRICS_PORT)

# Envoy on HTTP_PORT / GRPC_PORT, replica i's metrics on METRICS_PORT + i (serving/cluster.py).
serve-cluster: prepare
	$(PY) -m serving.cluster --repository $(REPO_DIR) --replicas $(REPLICAS) --address $(ADDRESS) \
		--http-port $(HTTP_PORT) --grpc-port $(GRPC_PORT) --metrics-port $(METRICS_PORT) \
		--admin-port $(ENVOY_ADMIN_PORT) --log-dir $(BUILD)/cluster-logs

demo: prepare
	$(PY) -m serving.demo --repository $(REPO_DIR) --image $(IMAGE) --prompt "$(PROMPT)" \
		--http-port $(HTTP_PORT) --grpc-port $(GRPC_PORT) --metrics-port $(METRICS_PORT) $(DEMO_FLAGS)

clean:
	rm -rf $(BUILD) demo_output

-include docker/docker.mk
-include benchmarks/bench.mk
-include benchmarks/reliability.mk
-include ui/ui.mk
