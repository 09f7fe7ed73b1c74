# Everything a new user runs. Each target installs what it needs first.
SHELL := /bin/bash
# uv from PATH if present, else from the Python that is on the machine.
UV := $(shell command -v uv 2>/dev/null || echo python3 -m uv)

.PHONY: setup server test lint demo bench automations clean

setup:
	@$(UV) --version >/dev/null 2>&1 || python3 -m pip install --quiet uv
	$(UV) sync --locked

# A llama-server binary: $$LLAMA_SERVER_BIN, PATH, or a cached build (~10 min, once).
server: setup
	$(UV) run python -m harness.binary

lint: setup
	$(UV) run ruff check .
	$(UV) run ruff format --check .

test: lint server
	$(UV) run pytest

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
	rm -rf .venv .pytest_cache .ruff_cache
