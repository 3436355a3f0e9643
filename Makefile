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
DEMO_PROMPT := the striped square
CHECKPOINT ?= $(DEMO_CHECKPOINT)
ONNX_DIR ?= $(BUILD)/onnx
REPO_DIR ?= $(BUILD)/model_repository
FLAVOR ?= python-ort
HTTP_PORT ?= 8000
GRPC_PORT ?= 8001
METRICS_PORT ?= 8002
ADDRESS ?= 127.0.0.1
PROMPT ?= $(DEMO_PROMPT)
IMAGE ?= $(DEMO_IMAGE)
PYTEST_ARGS ?=
export PYTHONPATH := $(CURDIR)

.PHONY: help install test test-slow demo export onnx engines repository serve bench clean

help:
	@echo "make demo        set up, export a checkpoint, serve it, run one request (CHECKPOINT=dir|hub-id IMAGE= PROMPT=)"
	@echo "make test        set up and run the test suite (real tritonserver, real ONNX Runtime)"
	@echo "make export      ONNX graphs + validation (+ TensorRT plans where TensorRT is importable)"
	@echo "make repository  generate the Triton model repository (FLAVOR=python-ort|onnxruntime|tensorrt)"
	@echo "make serve       run tritonserver in the foreground (HTTP_PORT, GRPC_PORT, METRICS_PORT, ADDRESS)"
	@echo "make bench       CPU benchmark suite -> benchmarks/results/<machine>-<date>/"

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
	set -o pipefail; $(PY) -m pip install --quiet --disable-pip-version-check -e ".[all]" 2>&1 | { grep -v "^WARNING: Location" || true; }
	touch $@

test: install
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

test-slow: install
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

ifeq ($(CHECKPOINT),$(DEMO_CHECKPOINT))
DEMO_FLAGS := --demo-model
endif
ifeq ($(IMAGE),$(DEMO_IMAGE))  # the mask names its prompt; the demo scores only that prompt
DEMO_FLAGS += --ground-truth assets/demo_scene_mask.png
endif

onnx: install
	$(PY) -m export --checkpoint $(CHECKPOINT) --output-dir $(ONNX_DIR)

export: onnx engines

# TensorRT plans where TensorRT is importable (NGC containers: make docker-export); PLANS=1 makes
# their absence an error.
engines: install
	@if $(PY) -c "import tensorrt" 2>/dev/null; then \
	  $(PY) -m export.trt_support $(ONNX_DIR)/*.onnx && \
	  $(PY) -m serving.repository --flavor tensorrt --onnx-dir $(ONNX_DIR) --output $(TRT_REPOSITORY) && \
	  $(PY) -m export.tensorrt_build --onnx-dir $(ONNX_DIR) --repository $(TRT_REPOSITORY) --timing-cache $(TRT_TIMING_CACHE); \
	else \
	  echo "TensorRT is not importable here: stopping after ONNX (TensorRT plans: make docker-export)"; \
	  test "$(PLANS)" != 1 || exit 3; \
	fi

repository: install
	$(PY) -m serving.repository --flavor $(FLAVOR) --onnx-dir $(ONNX_DIR) --output $(REPO_DIR)

serve: install
	@test -f $(REPO_DIR)/evf_sam/config.pbtxt || $(MAKE) --no-print-directory onnx repository
	$(PY) -m serving.server --repository $(REPO_DIR) --address $(ADDRESS) \
		--http-port $(HTTP_PORT) --grpc-port $(GRPC_PORT) --metrics-port $(METRICS_PORT)

demo: onnx repository
	$(PY) -m serving.demo --repository $(REPO_DIR) --image $(IMAGE) --prompt "$(PROMPT)" \
		--http-port $(HTTP_PORT) --grpc-port $(GRPC_PORT) --metrics-port $(METRICS_PORT) $(DEMO_FLAGS)

clean:
	rm -rf $(BUILD) demo_output

-include docker/docker.mk
-include benchmarks/bench.mk
