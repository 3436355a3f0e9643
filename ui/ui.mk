# The page to try the server (docs/ui.md), included from the Makefile.
#   make ui              the page on http://UI_ADDRESS:UI_PORT/ in front of the Triton server at GRPC_URL and
#                        HTTP_URL (a running `make serve`; URL overrides the one of PROTOCOL, the protocol
#                        selected at first); when none answers there, it prepares CHECKPOINT and starts
#                        tritonserver itself as `make serve` would, and stops it with the page
#   make ui-screenshots  docs/screenshots/ui-*.png: the page with masks and with an error, for CHECKPOINT
#   make browser         Debian's chromium + chromium-driver, which the page's tests drive (apt-get, as root)
UI_PORT ?= 7860
UI_ADDRESS ?= 127.0.0.1
PROTOCOL ?= grpc
GRPC_URL ?= $(ADDRESS):$(GRPC_PORT)
HTTP_URL ?= $(ADDRESS):$(HTTP_PORT)
URL ?=
UI_TIMEOUT ?= 300
UI_SCREENSHOT_ARGS ?=
CHROMIUM_PACKAGES := chromium chromium-driver

.PHONY: ui ui-screenshots browser

_UI_GRPC_URL = $(if $(and $(URL),$(filter grpc,$(PROTOCOL))),$(URL),$(GRPC_URL))
_UI_HTTP_URL = $(if $(and $(URL),$(filter http,$(PROTOCOL))),$(URL),$(HTTP_URL))
_UI_ARGS = --host $(UI_ADDRESS) --port $(UI_PORT) --protocol $(PROTOCOL) --timeout $(UI_TIMEOUT) \
	--grpc-url $(_UI_GRPC_URL) --http-url $(_UI_HTTP_URL)

# --probe: 0 a server answers, 3 none does (then prepare and start one), else it answers wrongly.
ui: install
	@$(PY) -m ui $(_UI_ARGS) --probe; status=$$?; \
	if [ $$status = 0 ]; then \
	  exec $(PY) -m ui $(_UI_ARGS); \
	elif [ $$status = 3 ]; then \
	  $(MAKE) --no-print-directory prepare && \
	  exec $(PY) -m ui $(_UI_ARGS) --start-server $(REPO_DIR) --metrics-port $(METRICS_PORT); \
	else \
	  exit $$status; \
	fi

ui-screenshots: prepare | browser
	$(PY) -m ui.screenshots --repository $(REPO_DIR) --output docs/screenshots $(UI_SCREENSHOT_ARGS)

# CI runs `make test` as root on a fresh Debian 12: the browser is installed there on first use.
test: | browser

browser:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then exit 0; fi; \
	if ! command -v apt-get >/dev/null 2>&1; then \
	  echo "error: the page's tests drive Chromium at /usr/bin/chromium and /usr/bin/chromedriver, and there is no apt-get to install them" >&2; exit 2; \
	elif [ "$$(id -u)" != 0 ]; then \
	  echo "error: the page's tests need Debian's $(CHROMIUM_PACKAGES); install them as root: sudo make browser" >&2; exit 2; \
	fi; \
	apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $(CHROMIUM_PACKAGES)
