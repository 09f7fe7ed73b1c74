# Everything a new user runs. Each target installs what it needs first.
SHELL := /bin/bash
# uv from PATH if present, else from the Python that is on the machine.
UV := $(shell command -v uv 2>/dev/null || echo python3 -m uv)
# Root installs OS packages itself; anyone else through sudo.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# A Python 3.13 for the second test run; found or installed by harness/python313.sh when empty.
PYTHON313 ?=

.PHONY: setup server test test-3.13 lint demo bench automations clean

# The browser test (tests/ui) drives Debian's Chromium through Playwright: Playwright's own
# browser download is never used. When it cannot be installed, setup goes on and the browser
# test fails, saying how to install it.
setup:
	@$(UV) --version >/dev/null 2>&1 || python3 -m pip install --quiet uv
	$(UV) sync --locked
	@command -v chromium >/dev/null 2>&1 || [ -n "$$CHROMIUM_BIN" ] || { \
	  echo "Installing Debian's chromium for the browser test (tests/ui)"; \
	  { $(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q chromium; } \
	  || echo "warning: chromium could not be installed; tests/ui will fail until it is (apt-get install chromium, or set CHROMIUM_BIN)"; }
	@{ command -v prometheus && command -v prometheus-pushgateway && command -v promtool; } >/dev/null 2>&1 || { \
	  echo "Installing Debian's prometheus and prometheus-pushgateway for the metrics tests"; \
	  { $(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends prometheus prometheus-pushgateway; } \
	  || echo "warning: prometheus could not be installed; the metrics tests will fail until it is"; }

# A llama-server binary: $$LLAMA_SERVER_BIN, PATH, or a cached build (~10 min, once).
server: setup
	$(UV) run python -m harness.binary

lint: setup
	$(UV) run ruff check .
	$(UV) run ruff format --check .

# Everything on the locked Python (3.11), then the unit and flow tests again on 3.13.
test: lint server
	UV="$(UV)" $(UV) run pytest
	$(MAKE) --no-print-directory test-3.13

# The unit and flow tests on Python 3.13, in their own environment (.venv-3.13), less four
# that kill processes or run the Prefect CLI (about a minute of the run's four here); they run
# on 3.11 above. CI has 90 minutes for everything on a shared 2-core machine.
PY313_DESELECT := \
	tests/flows/test_batch_hardening.py::test_sigkill_of_the_flow_process_loses_and_repeats_nothing \
	tests/flows/test_batch_flow.py::test_server_killed_mid_batch_then_rerun_loses_and_repeats_nothing \
	tests/flows/test_deployments.py::test_prefect_deploy_all_creates_every_deployment \
	tests/flows/test_block.py::test_register_cli
test-3.13: setup
	@py="$$(PYTHON313='$(PYTHON313)' UV='$(UV)' bash harness/python313.sh)" && \
	echo "Python 3.13: $$py" && \
	UV_PROJECT_ENVIRONMENT=.venv-3.13 $(UV) sync --locked --python "$$py" && \
	UV_PROJECT_ENVIRONMENT=.venv-3.13 $(UV) run --no-sync --python "$$py" \
	  pytest tests/unit tests/flows $(addprefix --deselect ,$(PY313_DESELECT))

demo: server
	$(UV) run python -m demo

bench: server
	$(UV) run python -m benchmarks.batch_throughput

# Alert automations (automations/llamacpp-alerts.yaml) on the Prefect server PREFECT_API_URL
# points at, sending through the notification block NOTIFY=<block type slug>/<block name>.
WINDOW ?= 900
automations: setup
	@test -n "$(NOTIFY)" || { echo "usage: make automations NOTIFY=slack-webhook/llamacpp-alerts [WINDOW=900]"; exit 2; }
	$(UV) run python -m automations.install --notify "$(NOTIFY)" --window "$(WINDOW)" --replace

clean:
	rm -rf .venv .venv-3.13 .pytest_cache .ruff_cache
