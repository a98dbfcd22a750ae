# toolmesh: the few commands a newcomer needs. `make help` lists them.
#
# Test peers (npm packages, a Python venv) are installed into the work tree
# (tests/js/node_modules, .cache/venv) from pinned versions, never globally.

CARGO ?= cargo
PYTHON ?= python3
VENV := .cache/venv
JS := tests/js

.PHONY: help deps quickstart test lint ci clean-deps bench bench-propagation fuzz

help:
	@echo "make quickstart  run the sidecar in front of the demo MCP server (Ctrl-C stops both)"
	@echo "make deps        install the test peers: npm packages and a Python venv with the mcp SDK"
	@echo "make test        run every test (installs the peers first)"
	@echo "make lint        cargo fmt --check and clippy with warnings as errors"
	@echo "make ci          what CI runs: lint, then test"
	@echo "make bench       the sidecar against the direct path and nginx, in one run (release build; installs nginx if missing)"
	@echo "make fuzz        run every fuzz target for FUZZ_SECONDS (60) each; needs nightly (not run in CI)"
	@echo "make bench-propagation  time a policy change reaching 1,000 and 5,000 sidecars (release build)"

deps: $(JS)/node_modules/.installed $(VENV)/.installed

$(JS)/node_modules/.installed: $(JS)/package.json $(JS)/package-lock.json
	cd $(JS) && npm ci --no-audit --no-fund
	touch $@

$(VENV)/.installed: tests/python/requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet -r tests/python/requirements.txt
	touch $@

quickstart:
	bash deploy/examples/quickstart.sh

test: deps
	$(CARGO) test --workspace

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

ci: lint test

# Release build of the control plane and the benchmark, then N simulated sidecars.
SIDECARS ?= 1000 5000
# BENCH_ARGS: e.g. --duration 10 --workload call-paced (see toolmesh-bench --help).
bench:
	command -v nginx >/dev/null || test -x /usr/sbin/nginx || (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q nginx-light)
	$(CARGO) build --release -p toolmesh-sidecar -p toolmesh-control-plane -p toolmesh-tests --bin toolmesh-sidecar --bin toolmesh-control-plane --bin toolmesh-bench --bin toolmesh-bench-upstream
	target/release/toolmesh-bench --out target/bench-report.md $(BENCH_ARGS)

fuzz:
	bash fuzz/run.sh

bench-propagation:
	$(CARGO) build --release -p toolmesh-control-plane -p toolmesh-tests --bin toolmesh-control-plane --bin toolmesh-propagation
	target/release/toolmesh-propagation $(foreach n,$(SIDECARS),--sidecars $(n))

clean-deps:
	rm -rf $(JS)/node_modules $(VENV)
