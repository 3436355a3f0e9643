# Benchmarks, included from the Makefile.  Results land in benchmarks/results/<machine>-<date>[-<size>]/.
#   make bench        CPU suite, tiny model, end to end (< 15 min on 2 cores): eager vs ORT vs Triton
#   make bench-full   the same suite on the full-size model (SAM ViT-H + BEiT-3 large): hours on a small CPU
#   make bench-gpu    PyTorch paths on a CUDA GPU (needs a CUDA build of torch: GPU_PY=python in an NGC container)
BENCH_SIZE ?= tiny
BENCH_ARGS ?=
GPU_PY ?= $(PY)
BENCH_GPU_ARGS ?=

.PHONY: bench bench-full bench-gpu bench-deps

# perf_analyzer (tritonclient[all]==2.51.0, in the venv) links libb64.so.0d, a Debian package.
bench-deps: install
	@{ ldconfig -p 2>/dev/null || /sbin/ldconfig -p; } | grep -q 'libb64\.so\.0d' || { \
	  echo "installing libb64-0d for perf_analyzer"; \
	  apt-get update -qq && apt-get install -y -qq libb64-0d; }

bench: bench-deps
	$(PY) -m benchmarks.run --size $(BENCH_SIZE) --build-dir $(BUILD)/bench/$(BENCH_SIZE) $(BENCH_ARGS)

bench-full: bench-deps
	$(PY) -m benchmarks.run --size full --build-dir $(BUILD)/bench/full $(BENCH_ARGS)

bench-gpu: install
	$(GPU_PY) -m benchmarks.gpu_torch --device cuda --size full $(BENCH_GPU_ARGS)
