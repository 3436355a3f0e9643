# GPU deployment in NVIDIA's NGC containers; `include docker/docker.mk` from the main Makefile.
#
#   make docker-export CHECKPOINT=/path/to/evf-sam   # ONNX + checks + model repository + TensorRT plans
#   make docker-serve                                # Triton on the GPU, published on 127.0.0.1 only
#   make hadolint                                    # lint both Dockerfiles
#
# The two tags must ship the same TensorRT (docker/README.md has the matrix); TENSORRT_VERSION is
# checked when the export image is built and against every plan's model.plan.json before serving.
# TRITON_SHM_SIZE (make docker-serve TRITON_SHM_SIZE=8gb) overrides compose.yaml's /dev/shm size.

PYTORCH_TAG ?= 25.01
TRITON_TAG ?= 25.01
TENSORRT_VERSION ?= 10.8.0.43
EXPORT_IMAGE ?= evf-sam-export:$(PYTORCH_TAG)
SERVER_IMAGE ?= evf-sam-triton-server:$(TRITON_TAG)
BUILD ?= build
ONNX_DIR ?= $(BUILD)/onnx
TRT_REPOSITORY ?= $(BUILD)/model_repository_tensorrt
TRT_TIMING_CACHE ?= $(BUILD)/trt/timing.cache
HADOLINT ?= $(firstword $(wildcard .venv/bin/hadolint) hadolint)
DOCKER ?= docker

# A local checkpoint directory is mounted read-only; anything else is passed on as a hub id.
_comma := ,
_CHECKPOINT_MOUNT = $(if $(wildcard $(CHECKPOINT)/config.json),--mount type=bind$(_comma)src=$(abspath $(CHECKPOINT))$(_comma)dst=/checkpoint$(_comma)readonly)
_CHECKPOINT_ARG = $(if $(_CHECKPOINT_MOUNT),/checkpoint,$(CHECKPOINT))

define _DOCKER_EXPORT_SCRIPT
set -e
python -m export --checkpoint $(_CHECKPOINT_ARG) --output-dir $(ONNX_DIR)
python -m export.trt_support $(ONNX_DIR)/*.onnx
python -m serving.repository --flavor tensorrt --device gpu --onnx-dir $(ONNX_DIR) --output $(TRT_REPOSITORY)
python -m export.tensorrt_build --onnx-dir $(ONNX_DIR) --repository $(TRT_REPOSITORY) --timing-cache $(TRT_TIMING_CACHE)
endef
export _DOCKER_EXPORT_SCRIPT

.PHONY: docker-export-image docker-server-image docker-export docker-serve docker-check-plans hadolint

docker-export-image:
	$(DOCKER) build -f docker/Dockerfile.export -t $(EXPORT_IMAGE) \
	  --build-arg PYTORCH_TAG=$(PYTORCH_TAG) --build-arg TENSORRT_VERSION=$(TENSORRT_VERSION) .

docker-server-image:
	$(DOCKER) build -f docker/Dockerfile.server -t $(SERVER_IMAGE) \
	  --build-arg TRITON_TAG=$(TRITON_TAG) --build-arg TENSORRT_VERSION=$(TENSORRT_VERSION) .

docker-export: docker-export-image
	@test -n "$(CHECKPOINT)" || { echo "usage: make docker-export CHECKPOINT=<checkpoint dir or hub id>" >&2; exit 2; }
	mkdir -p $(BUILD)
	$(DOCKER) run --rm --gpus all --user "$$(id -u):$$(id -g)" \
	  --mount type=bind,src=$(CURDIR),dst=/src,readonly \
	  --mount type=bind,src=$(abspath $(BUILD)),dst=/src/$(BUILD) \
	  $(_CHECKPOINT_MOUNT) -e HF_HOME=/src/$(BUILD)/huggingface \
	  $(EXPORT_IMAGE) bash -c "$$_DOCKER_EXPORT_SCRIPT"

# Every TensorRT model of the repository needs a plan built by the TensorRT the server image runs.
docker-check-plans:
	@configs=$$(grep -lE 'tensorrt_plan|backend: *"tensorrt"' $(TRT_REPOSITORY)/*/config.pbtxt 2>/dev/null); \
	test -n "$$configs" || { echo "no TensorRT models in $(TRT_REPOSITORY): run make docker-export CHECKPOINT=..." >&2; exit 2; }; \
	for config in $$configs; do \
	  meta=$$(dirname $$config)/1/model.plan.json; \
	  grep -qs '"tensorrt_version": "$(TENSORRT_VERSION)"' "$$meta" || \
	    { echo "$$meta: missing, or not built with TensorRT $(TENSORRT_VERSION) (TRITON_TAG=$(TRITON_TAG))" >&2; exit 2; }; \
	done

docker-serve: docker-check-plans
	MODEL_REPOSITORY=$(abspath $(TRT_REPOSITORY)) TRITON_TAG=$(TRITON_TAG) TENSORRT_VERSION=$(TENSORRT_VERSION) \
	  $(DOCKER) compose -f docker/compose.yaml up --build

hadolint:
	$(HADOLINT) docker/Dockerfile.export docker/Dockerfile.server
