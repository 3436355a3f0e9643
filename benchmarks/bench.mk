# Benchmarks, included from the Makefile.  Results land in benchmarks/results/<machine>-<date>[-sam2][-<size>]/.
#   make bench        CPU suite of one family (BENCH_FAMILY=ori|sam2), tiny model, end to end: eager vs ORT vs
#                     Triton, the feature cache and N prompts per request served (BENCH_SIZE=tiny|vit-b|full)
#   make bench BENCH_FAMILIES="ori sam2"   EVF-SAM vs EVF-SAM2 side by side at BENCH_SIZE, one run
#   make bench-families  the same at BENCH_FAMILIES_SIZE (default vit-b: SAM ViT-B vs SAM-2 Hiera-B+)
#                     -> benchmarks/results/<machine>-<date>-families-<size>/
#   make bench-full   the suite on the full-size model (SAM ViT-H or Hiera-L + BEiT-3 large): hours on a small CPU
#   make gpu-check    EVF-SAM's GPU paths in <= 10 minutes on one H100 / H200 with the machine's own python
#                     (GPU_PY, default python3: torch with CUDA, onnx, onnxruntime, opencv, pillow, tokenizers,
#                     matplotlib, safetensors, sentencepiece, plus segment-anything==1.0, a pure-Python wheel to
#                     carry where there is no network); no Docker, TensorRT or network
#   make bench-gpu    the same script without the ten-minute budget: bigger sweeps (BENCH_GPU_ARGS)
#   make bench-cluster replicas behind Envoy: affinity vs round robin, key remapping, a replica killed (< 15 min)
BENCH_SIZE ?= tiny
BENCH_FAMILY ?= ori
BENCH_FAMILIES ?=
BENCH_FAMILIES_SIZE ?= vit-b
BENCH_ARGS ?=
GPU_PY ?= python3
GPU_PYTHONPATH ?=  # extra import paths for GPU_PY (e.g. a --target dir of carried wheels): the Makefile sets PYTHONPATH
GPU_CHECK_ARGS ?=
BENCH_GPU_ARGS ?= --budget-s 3000 --batches 1 2 4 8 16 32 --compile-batches 1 4 8 16
#   make bench-processing  pre/post-processing on one core, before vs after the numpy rewrite (~2 min)
BENCH_PROCESSING_ARGS ?=

.PHONY: bench bench-families bench-full bench-gpu gpu-check bench-processing bench-cluster

# perf_analyzer (tritonclient[all]==2.51.0, in the venv) links Debian's libb64.so.0d; where it is missing,
# benchmarks/perf_analyzer.py builds benchmarks/libb64_compat.c (same interface) with cc into build/libb64/.
bench: install
ifeq ($(strip $(BENCH_FAMILIES)),)
	$(PY) -m benchmarks.run --family $(BENCH_FAMILY) --size $(BENCH_SIZE) \
		--build-dir $(BUILD)/bench/$(BENCH_FAMILY)-$(BENCH_SIZE) $(BENCH_ARGS)
else
	$(PY) -m benchmarks.families --size $(BENCH_SIZE) --families $(BENCH_FAMILIES) --build-root $(BUILD)/bench $(BENCH_ARGS)
endif

bench-families: install
	$(PY) -m benchmarks.families --size $(BENCH_FAMILIES_SIZE) --families $(or $(strip $(BENCH_FAMILIES)),ori sam2) \
		--build-root $(BUILD)/bench $(BENCH_ARGS)

bench-full: install
	$(PY) -m benchmarks.run --family $(BENCH_FAMILY) --size full --build-dir $(BUILD)/bench/$(BENCH_FAMILY)-full $(BENCH_ARGS)

# No `install` prerequisite: the GPU machine's python has its own CUDA torch (the venv's is the CPU build).
_GPU_ENV = PYTHONPATH=$(CURDIR)$(if $(strip $(GPU_PYTHONPATH)),:$(strip $(GPU_PYTHONPATH)))
_GPU_PREFLIGHT = $(_GPU_ENV) $(GPU_PY) -c "import importlib.util as u, sys; sys.exit(u.find_spec('segment_anything') is None)" || \
	{ echo "$(GPU_PY) has no segment_anything: pip install segment-anything==1.0 (pure Python, no dependencies)" >&2; exit 2; }

gpu-check:
	@$(_GPU_PREFLIGHT)
	$(_GPU_ENV) $(GPU_PY) -m benchmarks.gpu_check --device cuda --size full $(GPU_CHECK_ARGS)

bench-gpu:
	@$(_GPU_PREFLIGHT)
	$(_GPU_ENV) $(GPU_PY) -m benchmarks.gpu_check --device cuda --size full $(BENCH_GPU_ARGS)

bench-processing: install
	$(PY) -m benchmarks.processing $(BENCH_PROCESSING_ARGS)

bench-cluster: install
	$(PY) -m benchmarks.cluster --build-dir $(BUILD)/bench/cluster $(BENCH_ARGS)
