# corem: `make run` starts the server on embedded defaults; `make test` sets up and runs the tests.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed

.PHONY: run test deps sysdeps bench bench-codec bench-load bench-dtls fuzz soak clean

$(STAMP): pyproject.toml setup.py corem/codec/_speedups.c corem/fastlane/_lane.c
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[test,bench]'
	touch $(STAMP)

deps: $(STAMP)

# Debian packages the interop tests and benchmarks use: libcoap's real clients and servers, the
# openssl CLI (test certificates), gcc (the C decoder and the load generator), chromium and its
# chromedriver (the diagnostics UI's browser test).
DEBS := libcoap3-bin openssl gcc chromium chromium-driver
sysdeps:
	@missing=""; \
	command -v coap-client-notls >/dev/null 2>&1 || missing="$$missing libcoap3-bin"; \
	command -v openssl >/dev/null 2>&1 || missing="$$missing openssl"; \
	command -v gcc >/dev/null 2>&1 || missing="$$missing gcc"; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	command -v chromedriver >/dev/null 2>&1 || missing="$$missing chromium-driver"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing$$missing (Debian)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else \
	    echo "missing$$missing and cannot install (not root or no apt-get): the tests that need them are skipped"; \
	  fi; \
	fi

run: $(STAMP)
	$(VENV)/bin/corem serve

test: sysdeps $(STAMP)
	$(PY) -m pytest -q

bench: sysdeps $(STAMP) bench-codec bench-load bench-dtls

bench-codec: $(STAMP)
	$(PY) bench/codec_bench.py

bench-load: $(STAMP)
	$(PY) bench/load_bench.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis test-artifacts

bench-dtls: $(STAMP)
	$(PY) bench/dtls_bench.py

# Coverage-guided fuzzing of every parser that reads network bytes (atheris), FUZZ_SECONDS each.
FUZZ_SECONDS ?= 60
fuzz: $(STAMP)
	@mkdir -p fuzz/corpus fuzz/artifacts
	@for t in codec payload endpoint dtls frontdoors http lane; do \
	  echo "== fuzz_$$t ($(FUZZ_SECONDS) s)"; mkdir -p fuzz/corpus/$$t; \
	  $(PY) fuzz/fuzz_$$t.py fuzz/corpus/$$t -max_total_time=$(FUZZ_SECONDS) -max_len=512 \
	    -artifact_prefix=fuzz/artifacts/ 2>&1 | grep -E "Done|ERROR|Error|crash-" || exit 1; \
	done

# A long live attack (bench/udp_fuzzer.py) while valid devices send; SOAK_SECONDS, loopback only.
SOAK_SECONDS ?= 300
soak: $(STAMP)
	$(PY) bench/udp_fuzzer.py --seconds $(SOAK_SECONDS) --max-datagrams 100000000
