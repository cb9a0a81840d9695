# corem: `make run` starts the server on embedded defaults; `make test` sets up and runs the tests.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed

# Every dependency, runtime, optional (the extras), test and bench, at the exact version and hash in
# requirements.lock (pyproject.toml keeps lower bounds for people who install corem as a library);
# requirements-runtime.lock, the same versions of only what every corem needs (a single node on
# the embedded bus: 13 packages, for the wheel `make dist` builds).  `make lock` regenerates both;
# `make test-latest` runs the suite against the newest releases instead.
LOCK   := requirements.lock
RUNTIME_LOCK := requirements-runtime.lock
UV     := uv==0.13.9

.PHONY: dist run test deps sysdeps jsdeps bench bench-codec bench-formats bench-load bench-dtls bench-coaps-plain bench-import bench-workers bench-transports fuzz soak clean lock test-latest

$(STAMP): pyproject.toml setup.py $(LOCK) corem/codec/_speedups.c corem/fastlane/_lane.c corem/bus/_reports.c \
	  corem/dtls/engine/_records.c corem/dtls/engine/dtls_records.h
	$(PYTHON) -m venv $(VENV)
	@echo "installing the pinned dependencies from $(LOCK) ($$(grep -c '^[a-z]' $(LOCK)) packages, hash-checked)"
	@# (the lock less dtlssocket, then dtlssocket: a test-only sdist that builds with autoconf and
	@# automake; without them it is left out and its interop tests skip, the rest installs as ever)
	@awk '/^[a-z0-9]/ { sdist = ($$0 ~ /^dtlssocket==/) } !sdist' $(LOCK) > $(VENV)/lock-wheels.txt
	@awk '/^[a-z0-9]/ { sdist = ($$0 ~ /^dtlssocket==/) } sdist' $(LOCK) > $(VENV)/lock-sdists.txt
	$(PIP) install -q --require-hashes --no-deps -r $(VENV)/lock-wheels.txt
	$(PIP) install -q --require-hashes --no-deps -r $(VENV)/lock-sdists.txt || \
	  echo "dtlssocket (tinydtls, tests only) did not build: it needs Debian's autoconf and automake (make sysdeps)"
	$(PIP) install -q --no-deps --no-build-isolation -e .
	$(PIP) check
	touch $(STAMP)

deps: $(STAMP)

# Debian packages the interop tests and benchmarks use: libcoap's real clients and servers, the
# openssl CLI (test certificates), gcc (the C decoder and the load generator), chromium and its
# chromedriver (the diagnostics UI's browser test), protoc (the protobuf profiles' schemas are
# checked against the descriptors it makes, and its classes encode the test payloads), PostgreSQL
# (the shared DTLS session store of several nodes), nftables and conntrack (the kernel's UDP load
# balancer in front of two nodes), libssl-dev (OpenSSL's libcrypto and its headers: the DTLS engine's
# record protection in C, corem/dtls/engine/_records.c), autoconf and automake (the lock's dtlssocket,
# tinydtls for the DTLS interop tests, is an sdist whose build runs tinydtls's autogen.sh), golang-go
# and golang-github-pion-dtls.v2-dev (pion/dtls, another DTLS client of those tests, built from source),
# libwolfssl-dev (wolfSSL, a third: its client is tests/c/wolfssl_post.c), libbctls-java and a JDK's
# javac (Bouncy Castle's DTLS, a fourth: its client is tests/java/BcDtlsPost.java),
# prometheus for its promtool (the alert rules, the dashboard's queries and a real scrape are checked
# with it; no test uses its server, which Debian starts on a host with systemd, on :9090 -- in a
# container policy-rc.d keeps it stopped).
sysdeps:
	@missing=""; \
	command -v coap-client-notls >/dev/null 2>&1 || missing="$$missing libcoap3-bin"; \
	command -v openssl >/dev/null 2>&1 || missing="$$missing openssl"; \
	command -v gcc >/dev/null 2>&1 || missing="$$missing gcc"; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	command -v chromedriver >/dev/null 2>&1 || missing="$$missing chromium-driver"; \
	command -v protoc >/dev/null 2>&1 || missing="$$missing protobuf-compiler"; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	command -v nft >/dev/null 2>&1 || [ -x /usr/sbin/nft ] || missing="$$missing nftables"; \
	command -v conntrack >/dev/null 2>&1 || [ -x /usr/sbin/conntrack ] || missing="$$missing conntrack"; \
	[ -f /usr/include/openssl/evp.h ] || missing="$$missing libssl-dev"; \
	command -v autoreconf >/dev/null 2>&1 || missing="$$missing autoconf"; \
	command -v automake >/dev/null 2>&1 || missing="$$missing automake"; \
	command -v go >/dev/null 2>&1 || missing="$$missing golang-go"; \
	[ -d /usr/share/gocode/src/github.com/pion/dtls/v2 ] || missing="$$missing golang-github-pion-dtls.v2-dev"; \
	[ -f /usr/include/wolfssl/ssl.h ] || missing="$$missing libwolfssl-dev"; \
	[ -f /usr/share/java/bctls.jar ] || missing="$$missing libbctls-java"; \
	command -v javac >/dev/null 2>&1 || missing="$$missing default-jdk-headless"; \
	command -v promtool >/dev/null 2>&1 || missing="$$missing prometheus"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing$$missing (Debian)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else \
	    echo "missing$$missing and cannot install (not root or no apt-get): the tests that need them are skipped"; \
	  fi; \
	fi

# Regenerate the locks from pyproject.toml (+ requirements-build.in): newest releases that satisfy
# the bounds, every platform's hashes; the runtime lock takes the full one's versions.  Review the
# diff, run `make test`, commit them.
lock: $(STAMP)
	$(PIP) install -q '$(UV)'
	$(VENV)/bin/uv pip compile pyproject.toml requirements-build.in --all-extras \
	  --generate-hashes --universal --python-version 3.11 --upgrade -o $(LOCK)
	$(VENV)/bin/uv pip compile pyproject.toml -c $(LOCK) \
	  --generate-hashes --universal --python-version 3.11 -o $(RUNTIME_LOCK)

# corem's wheel, with its C parts built here and made manylinux by auditwheel (the libcrypto they use
# put in it: any glibc at least this machine's), in dist/.  Install it with the runtime lock (docs/operating.md):
# `pip install --require-hashes -r requirements-runtime.lock && pip install --no-deps dist/corem-*.whl`.
dist: $(STAMP)
	rm -rf dist build/wheel && $(PIP) wheel -q --no-deps --no-build-isolation -w build/wheel .
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/auditwheel repair -w dist build/wheel/corem-*.whl
	@ls dist/*.whl

# The suite against the newest releases (unpinned, in its own virtualenv): an upgrade is a
# deliberate, tested step -- green here, then `make lock`.
LATEST := .venv-latest
test-latest: sysdeps
	rm -rf $(LATEST) && $(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/pip install -q --upgrade pip
	$(LATEST)/bin/pip install -q -e '.[test,bench]'
	$(LATEST)/bin/pip list --format=freeze > $(LATEST)/versions.txt
	@echo "newest releases: $$(tr '\n' ' ' < $(LATEST)/versions.txt)"
	$(LATEST)/bin/python -m pytest -q -n $(TEST_WORKERS)

run: $(STAMP)
	$(VENV)/bin/corem serve

# The npm DTLS clients of tests/test_interop_dtls_stacks.py (tests/js), at the versions and integrity
# hashes of its package-lock.json, when npm is there; without it those tests skip and say why.
# (`npm install --no-save`, not `npm ci`: the registry reachable here lacks node-aead-crypto's
# optional builds for other platforms, so the lock cannot list them and `npm ci` calls it out of sync.)
jsdeps:
	@if command -v npm >/dev/null 2>&1; then \
	  cd tests/js && npm install --no-save --no-audit --no-fund --loglevel=error; \
	else \
	  echo "npm is not installed: the npm DTLS clients' interop tests are skipped"; \
	fi

# The suite in pytest-xdist workers, two a core: a test waits (on timers, the network, the processes
# it starts) about half of its time, so one worker a core left the cores idle that long.  Measured
# on 2 cores with other jobs on the machine: 1,468 tests in ~270 s with 4 workers, ~310 s with 3,
# ~370 s with 2 (~10 minutes serially).  Every test keeps to its own temporary directory and to
# ports the OS picks; a module's costly fixture (a PostgreSQL, a broker, a built wheel) is made by
# each worker that runs one of its tests; a test marked `alone` has the machine to itself
# (tests/conftest.py).  TEST_WORKERS=0 runs them one after another in pytest's own process.
TEST_WORKERS ?= $(shell echo $$(( 2 * $$(nproc) )))
test: sysdeps $(STAMP) jsdeps
	$(PY) -m mypy
	$(PY) -m pytest -q -n $(TEST_WORKERS) --durations=15

bench: sysdeps $(STAMP) bench-codec bench-formats bench-load bench-formats-load bench-dtls bench-coaps-plain bench-import bench-transports

bench-codec: $(STAMP)
	$(PY) bench/codec_bench.py

bench-formats: $(STAMP)
	$(PY) bench/formats_bench.py

bench-load: $(STAMP)
	$(PY) bench/load_bench.py

bench-formats-load: $(STAMP)
	$(PY) bench/formats_load_bench.py

clean:
	rm -rf $(VENV) $(LATEST) build *.egg-info .pytest_cache .hypothesis .mypy_cache test-artifacts

bench-import: $(STAMP)
	$(PY) bench/import_bench.py

bench-workers: $(STAMP)
	$(PY) bench/workers_bench.py --kafka

bench-dtls: $(STAMP)
	$(PY) bench/dtls_bench.py

bench-coaps-plain: $(STAMP)
	$(PY) bench/coaps_plain_pairs.py --pairs 20

bench-transports: $(STAMP)
	$(PY) bench/transports_bench.py

# Coverage-guided fuzzing of every parser that reads network bytes (atheris), FUZZ_SECONDS each.
FUZZ_SECONDS ?= 60
fuzz: $(STAMP)
	@mkdir -p fuzz/corpus fuzz/artifacts
	@for t in codec payload formats proto_schema endpoint dtls frontdoors http lane oscore tcp_frame dtls_engine dtls_records dtls_state tls_stream efento; do \
	  echo "== fuzz_$$t ($(FUZZ_SECONDS) s)"; mkdir -p fuzz/corpus/$$t; \
	  $(PY) fuzz/fuzz_$$t.py fuzz/corpus/$$t -max_total_time=$(FUZZ_SECONDS) -max_len=512 \
	    -artifact_prefix=fuzz/artifacts/ > fuzz/artifacts/$$t.log 2>&1; rc=$$?; \
	  grep -E "Done|ERROR|Error|crash-" fuzz/artifacts/$$t.log; \
	  [ $$rc -eq 0 ] || { echo "fuzz_$$t failed (exit $$rc): fuzz/artifacts/$$t.log"; exit 1; }; \
	done

# A long live attack (bench/udp_fuzzer.py) while valid devices send; SOAK_SECONDS, loopback only.
SOAK_SECONDS ?= 300
soak: $(STAMP)
	$(PY) bench/udp_fuzzer.py --seconds $(SOAK_SECONDS) --max-datagrams 100000000
