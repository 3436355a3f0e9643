# The reliability suite (issue 11), included from the Makefile.  Results land in
# benchmarks/results/<machine>-<date>-reliability/ (results.json, summary.md, plots).
#   make reliability   soak 30 min (tiny) + 10 min (SAM ViT-B weights), overload, goodput under client
#                      deadlines, faults (killed stubs / tritonserver / evaluation client), fuzz (10,000
#                      requests), co-batching: about an hour on 2 cores
#   make reliability RELIABILITY_ARGS="--soak-minutes 5 --soak-vitb-minutes 3 --fuzz-requests 2000"   shorter
#   make reliability RELIABILITY_ARGS="--phases fuzz cobatch"                                        some phases
RELIABILITY_ARGS ?=

.PHONY: reliability

reliability: install
	$(PY) -m benchmarks.reliability $(RELIABILITY_ARGS)
