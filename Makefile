# Every target is self-sufficient on a fresh clone: it creates .venv and
# installs what it needs (pip extras, and Debian packages for system tools).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
APT    := DEBIAN_FRONTEND=noninteractive apt-get -y -q

.PHONY: install run demo serve test soak bench bench-tools profile lint clean sysdeps

$(VENV)/.base: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.dev: $(VENV)/.base
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

$(VENV)/.bench: $(VENV)/.dev
	$(PY) -m pip install -q -e '.[bench]' || echo "bench: some optional bench packages could not be installed"
	touch $@

# ss (iproute2) and strace are used by tests; install them when missing.
sysdeps:
	@missing=""; \
	command -v ss >/dev/null || missing="$$missing iproute2"; \
	command -v strace >/dev/null || missing="$$missing strace"; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  ($(APT) update >/dev/null && $(APT) install $$missing >/dev/null) || echo "could not install$$missing"; \
	fi

install: $(VENV)/.base

# The demo suggests `nc`; fetch it when missing (best effort: the demo runs regardless).
run: $(VENV)/.base
	@command -v nc >/dev/null || [ "$$(id -u)" != 0 ] || \
	  ($(APT) update >/dev/null && $(APT) install netcat-openbsd >/dev/null) || \
	  echo "(could not install netcat-openbsd: use any TCP client to try the demo)"
	$(VENV)/bin/reactor demo

serve: $(VENV)/.base
	$(VENV)/bin/reactor serve

test: $(VENV)/.dev sysdeps
	$(PY) -m pytest -q

soak: $(VENV)/.dev sysdeps
	$(PY) -m pytest -q -m soak -p no:cacheprovider --timeout 600

# The bench's peers and tools: haproxy, go (for the Go seed gateway) and strace from
# Debian when missing and we are root; a peer that is still missing is skipped by the
# bench with a note. Then the C load generator, echo backends and Go seed are built.
bench-tools: $(VENV)/.bench
	@missing=""; \
	command -v haproxy >/dev/null || missing="$$missing haproxy"; \
	command -v go >/dev/null || missing="$$missing golang-go"; \
	command -v strace >/dev/null || missing="$$missing strace"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing:$$missing"; \
	    ($(APT) update >/dev/null && $(APT) install $$missing >/dev/null) || echo "bench: could not install$$missing"; \
	  else echo "bench: missing$$missing (apt-get install$$missing)"; fi; \
	fi
	$(PY) -m bench.build

bench: bench-tools
	$(PY) -m bench $(if $(QUICK),--quick,)

# Where the gateway's CPU goes, workload by workload: py-spy over each measured window
# (bench/pyspy.py); writes bench/results/profile.md. WORKLOADS=churn,pingpong-50 to narrow.
profile: bench-tools
	$(PY) -m bench --profile $(if $(WORKLOADS),--workloads $(WORKLOADS),)

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check reactor tests bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
