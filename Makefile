# corem: `make run` starts the server on embedded defaults; `make test` sets up and runs the tests.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed

.PHONY: run test deps sysdeps bench bench-codec bench-load clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[test,bench]'
	touch $(STAMP)

deps: $(STAMP)

# Debian packages the interop tests and benchmarks use: libcoap's real clients and server.
sysdeps:
	@if ! command -v coap-client-notls >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing libcoap3-bin (Debian)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libcoap3-bin >/dev/null; \
	  else \
	    echo "libcoap3-bin is missing and cannot be installed (not root or no apt-get): interop tests will be skipped"; \
	  fi; \
	fi

run: $(STAMP)
	$(VENV)/bin/corem serve

test: $(STAMP) sysdeps
	$(PY) -m pytest -q

bench: $(STAMP) sysdeps bench-codec bench-load

bench-codec: $(STAMP)
	$(PY) bench/codec_bench.py

bench-load: $(STAMP) sysdeps
	$(PY) bench/load_bench.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
