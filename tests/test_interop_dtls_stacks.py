"""CoAPS with the other independent DTLS client stacks PyPI, npm and Debian offer (issue 27's proof), each
against `corem serve` on its own DTLS engine (the default): a reading POSTed to /telemetry over DTLS-PSK (a certificate
where a stack has no PSK), 2.04 and stored.

The stacks looked for, and what came of each (libcoap on OpenSSL and GnuTLS, python-mbedtls and the
engine's own client are tested elsewhere: test_interop_dtls.py, test_dtls*.py):

- PyPI `dtlssocket` 0.2.3 (tinydtls, through aiocoap's coaps://): tested below. tinydtls takes a PSK of at
  most 16 bytes (DTLS_PSK_MAX_KEY_LEN); with the spec's 21-byte key it sends a fatal internal_error (80)
  after its ClientKeyExchange on either engine, so its device has a 16-byte key. It offers
  TLS_PSK_WITH_AES_128_CCM_8 and _CCM, and sends extended_master_secret.
- npm `node-dtls-client` 2.0.3 (TypeScript): tested below with each PSK suite corem has. It sends a
  ClientHello with no extensions at all, so no extended_master_secret (RFC 7627): the corem engine
  refuses it by default (`require_ems`, corem/dtls/engine/__init__.py) with a
  fatal handshake_failure (40) answering its cookie-bearing ClientHello, counted as
  `no_extended_master_secret`, unless `dtls_extended_master_secret = optional` says to serve such a fleet.
- npm `node-coap-client` 2.1.0 (CoAP on node-dtls-client 1.x): tested below, as above; it always sends
  Content-Format 50, so its reading is JSON.
- npm `werift-dtls` 0.5.8 (TypeScript, WebRTC's DTLS): no PSK suite (TLS_ECDHE_ECDSA/RSA_WITH_AES_128_
  GCM_SHA256 only), so it is tested below with certificates: a registered device certificate from a CA
  the openssl CLI makes, TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256, client authentication required.
- Debian `golang-github-pion-dtls.v2-dev` (pion/dtls 2.2.6, Go, the stack under go-coap): tested below
  with each PSK suite, through a small client (tests/go/dtls_post) built in GOPATH mode with Debian's
  golang-go against /usr/share/gocode; it requires extended_master_secret itself. pion/dtls v4 from the
  Go module proxy was not used: there was no Go toolchain here before Debian's, and Debian has the stack.
- Debian `libwolfssl-dev` (wolfSSL 5.5.4, C, the DTLS stack of many constrained devices): tested below
  with certificates, through a small client (tests/c/wolfssl_post.c) built with gcc; Debian builds it
  without the plain PSK suites (PSK only with DHE or ECDHE, which corem does not implement), so its
  device has a registered certificate, on TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8 and _GCM_SHA256. It
  found that a certificate of the CA that was not registered completed its handshake and met an alert
  at its first request: it is now refused in the handshake with access_denied (49).
- Debian `libbctls-java` (Bouncy Castle 1.72's own DTLS, `org.bouncycastle.tls`, on its own crypto
  provider: the Java stack under many gateways and Android apps): tested below with each PSK suite,
  through a small client (tests/java/BcDtlsPost.java) compiled with the JDK's javac; it sends
  extended_master_secret. A wrong key is refused in the handshake.
- The project's own OpenSSL load generator (bench/dtls_loadgen.c: OpenSSL's DTLS client for the
  handshakes, its own records or libssl's for the readings), the client the CoAPS benchmark measures
  with: tested below on a small bounded load, every answer a 2.04 and every 2.04 a stored reading.
- Debian's own DTLS client tools are libcoap's (test_interop_dtls.py); tinydtls has none there. PyPI `dtls` and `python3-dtls` (PyDTLS, last released 2017 and 2020) and `aio-dtls`
  (0.0.4) were not tried.

wolfSSL's and Bouncy Castle's clients are also answered the way a slow bus makes corem answer: an
empty ACK, then a separate response they acknowledge (the Kafka broker frozen past the piggyback
timeout).

A stack that is not installed skips with its reason, except under CI=true (`make test` installs them:
the lock builds dtlssocket with Debian's autoconf and automake, and `make jsdeps` installs tests/js
when npm is there).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cbor2
import pytest

from .conftest import PIGGYBACKED, SPEC_IDENTITY, SPEC_KEY, corem_cli, start_corem, wait_for
from .test_kafka import broker, consume, pytestmark as needs_kafka  # noqa: F401 - (broker: the fixture)

READING = {"temperature": 22.5, "humidity": 65}
#: corem's engine (the default); the deprecated python-mbedtls one is tested end to end with libcoap
#: (test_interop_dtls.py) and in memory against these clients' peers (test_dtls_differential.py)
ENGINES = ("corem",)
#: every PSK suite both engines implement, named as `--dtls-ciphers` takes them
PSK_SUITES = ("TLS-PSK-WITH-AES-128-CCM-8", "TLS-PSK-WITH-AES-128-CCM", "TLS-PSK-WITH-AES-128-GCM-SHA256")
CI = os.environ.get("CI") == "true"
JS = Path(__file__).parent / "js"
NODE = shutil.which("node")
#: tinydtls's keys are at most 16 bytes: a device of its own
TINYDTLS_IDENTITY, TINYDTLS_KEY = "psk-identity-tinydtls", "s3cr3t-psk-16byt"
#: upper bounds only (a loaded 2-core CI machine): a client that never answers fails here
CLIENT_TIMEOUT = 150


def need(what: str, present: bool, how: str) -> None:
    """Skip when a client stack is missing, but never under CI, where `make test` installs it."""
    if present:
        return
    if CI:
        pytest.fail(f"{what} is not installed under CI=true: {how}")
    pytest.skip(f"{what} is not installed: {how}")


def need_node_package(name: str) -> None:
    if NODE is None:
        pytest.skip("node is not installed: the npm DTLS clients cannot run")
    need(f"npm {name}", (JS / "node_modules" / name / "package.json").is_file(),
         "run `make jsdeps` (npm install in tests/js; make test does when npm is there)")


def serve(data_dir: Path, engine: str, *extra: str):
    return start_corem(data_dir, "--dtls-engine", engine, "--dtls-ciphers", ",".join(PSK_SUITES), *extra,
                       env=PIGGYBACKED)


def run(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=CLIENT_TIMEOUT)


def answer(r: subprocess.CompletedProcess) -> dict:
    """A client program's one JSON line (its last), or its stderr when it printed none."""
    return json.loads(r.stdout.strip().splitlines()[-1]) if r.stdout.strip() else {"stderr": r.stderr}


def assert_stored(server, device: str = "sensor-7") -> None:
    [point] = server.points()
    assert (point["tenant"], point["device"]) == ("acme", device)  # from the session
    assert point["numeric_values"] == {"temperature": 22.5, "humidity": 65.0}
    m = server.metrics()
    assert m['corem_coap_responses_total{code="2.04",transport="dtls"}'] == 1
    assert m["corem_dtls_handshakes_completed_total"] >= 1


def assert_refused_for_no_ems(server, out: dict) -> None:
    """The corem engine's answer to a hello without extended_master_secret: handshake_failure, no session."""
    assert out.get("error") == "received fatal alert: handshake_failure", out
    assert server.points() == []
    m = server.metrics()
    assert m['corem_dtls_handshakes_failed_total{reason="no_extended_master_secret"}'] >= 1
    assert m["corem_dtls_handshakes_completed_total"] == 0


# -- tinydtls (PyPI dtlssocket) through aiocoap ------------------------------------------------------------

AIOCOAP_POST = """
import asyncio, sys
from aiocoap import Context, Message, POST

async def main(port, identity, key, payload):
    ctx = await Context.create_client_context(transports=["tinydtls"])
    ctx.client_credentials.load_from_dict({f"coaps://127.0.0.1:{port}/*": {"dtls": {
        "psk": {"ascii": key}, "client-identity": {"ascii": identity}}}})
    uri = f"coaps://127.0.0.1:{port}/telemetry"
    request = Message(code=POST, uri=uri, payload=payload, content_format=60)
    response = await asyncio.wait_for(ctx.request(request).response, 120)
    print(response.code.dotted)
    await ctx.shutdown()

asyncio.run(main(int(sys.argv[1]), sys.argv[2], sys.argv[3], bytes.fromhex(sys.argv[4])))
"""


def have_dtlssocket() -> bool:
    try:
        import DTLSSocket.dtls  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.parametrize("suite", ["TLS-PSK-WITH-AES-128-CCM-8", "TLS-PSK-WITH-AES-128-CCM"])
@pytest.mark.parametrize("engine", ENGINES)
def test_tinydtls_through_aiocoap_posts_a_reading(data_dir, engine, suite):
    need("dtlssocket (tinydtls)", have_dtlssocket(), "it is in requirements.lock; building it needs "
         "Debian's autoconf and automake (make sysdeps)")
    corem_cli("devices", "add", "--tenant", "acme", "--device", "sensor-8",
              "--psk-identity", TINYDTLS_IDENTITY, "--psk", TINYDTLS_KEY, data_dir=data_dir)
    server = start_corem(data_dir, "--dtls-engine", engine, "--dtls-ciphers", suite)
    try:
        r = run([sys.executable, "-c", AIOCOAP_POST, str(server.coaps_port), TINYDTLS_IDENTITY, TINYDTLS_KEY,
                 cbor2.dumps(READING).hex()])
        assert r.returncode == 0 and r.stdout.split() == ["2.04"], r.stdout + r.stderr
        assert_stored(server, "sensor-8")
    finally:
        server.stop()


# -- pion/dtls v2 (Debian golang-github-pion-dtls.v2-dev) ------------------------------------------------

GOPATH = Path("/usr/share/gocode")  # where Debian's Go library packages put their source
GO = shutil.which("go")


@pytest.fixture(scope="module")
def pion_client(tmp_path_factory) -> str:
    need("Go with pion/dtls v2", GO is not None and (GOPATH / "src/github.com/pion/dtls/v2").is_dir(),
         "Debian's golang-go and golang-github-pion-dtls.v2-dev (make sysdeps installs them as root)")
    assert GO is not None
    out = tmp_path_factory.mktemp("pion")
    env = {**os.environ, "GO111MODULE": "off", "GOPATH": str(GOPATH), "GOCACHE": str(out / "cache"),
           "GOFLAGS": ""}
    r = subprocess.run([GO, "build", "-o", str(out / "dtls_post"), "."], cwd=Path(__file__).parent / "go" /
                       "dtls_post", env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return str(out / "dtls_post")


@pytest.mark.parametrize("suite", PSK_SUITES)
@pytest.mark.parametrize("engine", ENGINES)
def test_pion_dtls_posts_a_reading(data_dir, pion_client, engine, suite):
    posts_a_reading(data_dir, engine, [pion_client], suite)


def posts_a_reading(data_dir: Path, engine: str, client: list[str], suite: str) -> None:
    """A client program that takes PORT IDENTITY KEY SUITE PAYLOAD_HEX and prints {"code", "suite"}
    (pion's, Bouncy Castle's): its reading over `suite` answered 2.04 and stored."""
    server = serve(data_dir, engine)
    try:
        r = run([*client, str(server.coaps_port), SPEC_IDENTITY, SPEC_KEY, suite.replace("-", "_"),
                 cbor2.dumps(READING).hex()])
        out = answer(r)
        assert out == {"code": "2.04", "suite": suite.replace("-", "_")}, (out, r.stderr)
        assert_stored(server)
    finally:
        server.stop()


# -- Bouncy Castle (Debian libbctls-java) -------------------------------------------------------------------

BC_JARS = [Path("/usr/share/java") / f"{name}.jar" for name in ("bctls", "bcprov", "bcutil")]
JAVAC, JAVA = shutil.which("javac"), shutil.which("java")


@pytest.fixture(scope="module")
def bc_client(tmp_path_factory) -> list[str]:
    """The Bouncy Castle client compiled: the command that runs it, but for its arguments."""
    need("Bouncy Castle's DTLS and a JDK", all(j.is_file() for j in BC_JARS) and JAVAC is not None and JAVA is not None,
         "Debian's libbctls-java and default-jdk-headless (make sysdeps installs them as root)")
    assert JAVAC is not None and JAVA is not None
    out = tmp_path_factory.mktemp("bc")
    classpath = ":".join(map(str, BC_JARS))
    r = subprocess.run([JAVAC, "-cp", classpath, "-d", str(out), str(Path(__file__).parent / "java" / "BcDtlsPost.java")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return [JAVA, "-cp", f"{classpath}:{out}", "BcDtlsPost"]


@pytest.mark.parametrize("suite", PSK_SUITES)
@pytest.mark.parametrize("engine", ENGINES)
def test_bouncy_castle_dtls_posts_a_reading(data_dir, bc_client, engine, suite):
    posts_a_reading(data_dir, engine, bc_client, suite)


def test_bouncy_castle_with_a_wrong_key_fails_its_handshake(data_dir, bc_client):
    """The device's identity with another key: its Finished does not verify, nothing is stored."""
    server = serve(data_dir, "corem")
    try:
        r = run([*bc_client, str(server.coaps_port), SPEC_IDENTITY, "not-" + SPEC_KEY, "TLS_PSK_WITH_AES_128_CCM_8",
                 cbor2.dumps(READING).hex()])
        out = answer(r)
        assert out.get("error") == "org.bouncycastle.tls.TlsFatalAlert: bad_record_mac(20)", (out, r.stderr)
        assert server.points() == []
        m = server.metrics()
        assert m["corem_dtls_handshakes_completed_total"] == 0
        # (its Finished record does not open under the keys the server derived; >= 1: a slow server
        # may see the client's flight again)
        assert m['corem_dtls_handshakes_failed_total{reason="bad_mac"}'] >= 1
    finally:
        server.stop()


# -- node-dtls-client (npm) --------------------------------------------------------------------------------

@pytest.mark.parametrize("suite", PSK_SUITES)
@pytest.mark.parametrize("engine", ENGINES)
def test_node_dtls_client_posts_a_reading(data_dir, engine, suite):
    need_node_package("node-dtls-client")
    server = serve(data_dir, engine)
    try:
        r = run([NODE, str(JS / "dtls_post.js"), str(server.coaps_port), SPEC_IDENTITY, SPEC_KEY,
                 suite.replace("-", "_"), cbor2.dumps(READING).hex()])
        out = answer(r)
        # no extended_master_secret in its hello: refused by default (see the top; served with
        # dtls_extended_master_secret = optional below)
        assert_refused_for_no_ems(server, out)
    finally:
        server.stop()


# -- node-coap-client (npm) --------------------------------------------------------------------------------

@pytest.mark.parametrize("engine", ENGINES)
def test_node_coap_client_posts_a_json_reading(data_dir, engine):
    need_node_package("node-coap-client")
    server = serve(data_dir, engine)
    try:
        r = run([NODE, str(JS / "coap_post.js"), str(server.coaps_port), SPEC_IDENTITY, SPEC_KEY,
                 json.dumps(READING)])
        out = answer(r)
        # node-dtls-client underneath: no extended_master_secret, refused by default
        assert_refused_for_no_ems(server, out)
    finally:
        server.stop()


@pytest.mark.parametrize("client", ["node-dtls-client", "node-coap-client"])
def test_clients_without_ems_are_served_by_the_corem_engine_when_the_setting_allows(data_dir, client):
    """`dtls_extended_master_secret = optional`: the npm clients' hellos carry no extended master
    secret; such a fleet is served on RFC 5246's master secret (counted as handshakes like any)."""
    need_node_package(client)
    server = serve(data_dir, "corem", "--dtls-extended-master-secret", "optional")
    try:
        if client == "node-dtls-client":
            suite = PSK_SUITES[0]
            r = run([NODE, str(JS / "dtls_post.js"), str(server.coaps_port), SPEC_IDENTITY, SPEC_KEY,
                     suite.replace("-", "_"), cbor2.dumps(READING).hex()])
            want = {"code": "2.04", "suite": suite.replace("-", "_")}
        else:
            r = run([NODE, str(JS / "coap_post.js"), str(server.coaps_port), SPEC_IDENTITY, SPEC_KEY,
                     json.dumps(READING)])
            want = {"code": "2.04"}
        out = answer(r)
        assert out == want, (out, r.stderr)
        assert_stored(server)
    finally:
        server.stop()


# -- werift-dtls (npm): certificates, its only mode -------------------------------------------------------

def _ssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """ECDSA P-256: a CA, the server's certificate and a device's (its key also as PKCS#8, for werift)."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl CLI is not installed")
    d = tmp_path_factory.mktemp("pki")
    _ssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "ca.key.pem", cwd=d)
    _ssl("req", "-x509", "-new", "-key", "ca.key.pem", "-subj", "/CN=ca", "-days", "2", "-out", "ca.pem",
         cwd=d)
    for name in ("server", "dev1", "dev2"):
        _ssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", f"{name}.key.pem", cwd=d)
        _ssl("req", "-new", "-key", f"{name}.key.pem", "-subj", f"/CN={name}", "-out", f"{name}.csr", cwd=d)
        _ssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key.pem", "-CAcreateserial",
             "-days", "2", "-out", f"{name}.pem", cwd=d)
    _ssl("pkcs8", "-topk8", "-nocrypt", "-in", "dev1.key.pem", "-out", "dev1.p8.pem", cwd=d)
    return d


@pytest.mark.parametrize("engine", ENGINES)
def test_werift_dtls_posts_a_reading_with_a_registered_certificate(data_dir, pki, engine):
    need_node_package("werift-dtls")
    server = serve_certificates(data_dir, pki, "--dtls-engine", engine)  # (werift chooses the GCM one)
    try:
        r = run([NODE, str(JS / "werift_post.js"), str(server.coaps_port), str(pki / "dev1.pem"),
                 str(pki / "dev1.p8.pem"), cbor2.dumps(READING).hex()])
        out = answer(r)
        assert out == {"code": "2.04"}, (out, r.stderr)
        assert_stored(server, "cert-dev-1")
    finally:
        server.stop()


# -- wolfSSL (Debian libwolfssl-dev): certificates, the suites Debian's build has -------------------------

WOLFSSL_HEADER = Path("/usr/include/wolfssl/ssl.h")
#: wolfSSL's names of the two ECDHE-ECDSA suites corem implements
WOLFSSL_SUITES = {"ECDHE-ECDSA-AES128-CCM-8": "TLS-ECDHE-ECDSA-WITH-AES-128-CCM-8",
                  "ECDHE-ECDSA-AES128-GCM-SHA256": "TLS-ECDHE-ECDSA-WITH-AES-128-GCM-SHA256"}


@pytest.fixture(scope="module")
def wolfssl_client(tmp_path_factory) -> str:
    need("wolfSSL", WOLFSSL_HEADER.is_file() and shutil.which("gcc") is not None,
         "Debian's libwolfssl-dev and gcc (make sysdeps installs them as root)")
    out = tmp_path_factory.mktemp("wolfssl") / "wolfssl_post"
    r = subprocess.run(["gcc", "-O2", "-Wall", "-o", str(out), str(Path(__file__).parent / "c" / "wolfssl_post.c"),
                        "-lwolfssl"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return str(out)


def serve_certificates(data_dir: Path, pki: Path, *extra: str):
    """corem with dev1's certificate registered (client certificates required), on both ECDHE suites"""
    corem_cli("devices", "add", "--tenant", "acme", "--device", "cert-dev-1", "--cert", str(pki / "dev1.pem"),
              data_dir=data_dir)
    return start_corem(data_dir, "--dtls-cert", str(pki / "server.pem"), "--dtls-key", str(pki / "server.key.pem"),
                       "--dtls-ca", str(pki / "ca.pem"), "--dtls-client-auth", "required",
                       "--dtls-ciphers", ",".join(WOLFSSL_SUITES.values()), *extra, env=PIGGYBACKED)


def wolfssl_post(client: str, server, pki: Path, suite: str, device: str) -> dict:
    return answer(run([client, str(server.coaps_port), suite, cbor2.dumps(READING).hex(), str(pki / f"{device}.pem"),
                       str(pki / f"{device}.key.pem"), str(pki / "ca.pem")]))


@pytest.mark.parametrize("suite", WOLFSSL_SUITES)
def test_wolfssl_posts_a_reading_with_a_registered_certificate(data_dir, pki, wolfssl_client, suite):
    server = serve_certificates(data_dir, pki)
    try:
        out = wolfssl_post(wolfssl_client, server, pki, suite, "dev1")
        assert out == {"code": "2.04", "suite": suite}, out
        assert_stored(server, "cert-dev-1")
    finally:
        server.stop()


def test_wolfssl_with_an_unregistered_certificate_fails_its_handshake(data_dir, pki, wolfssl_client):
    """dev2's certificate is of the CA but not registered: wolfSSL's handshake fails with corem's
    access_denied (before this, it completed and the first request met an alert)"""
    server = serve_certificates(data_dir, pki)
    try:
        out = wolfssl_post(wolfssl_client, server, pki, "ECDHE-ECDSA-AES128-CCM-8", "dev2")
        assert out.get("error", "").startswith("handshake:"), out
        assert server.points() == []
        m = server.metrics()
        assert m['corem_dtls_handshakes_failed_total{reason="unregistered_certificate"}'] == 1
        assert m["corem_dtls_handshakes_completed_total"] == 0
        # and the registered device beside it is served
        assert wolfssl_post(wolfssl_client, server, pki, "ECDHE-ECDSA-AES128-CCM-8", "dev1")["code"] == "2.04"
    finally:
        server.stop()


# -- a separate answer, to the stacks that wait for one ------------------------------------------------------

@needs_kafka
@pytest.mark.parametrize("stack", ["wolfssl", "bouncy_castle"])
def test_a_reading_answered_separately_reaches_the_stacks_that_wait_for_it(data_dir, pki, stack, broker, request):
    """The bus slower than the piggyback timeout (Kafka, its broker frozen): corem answers the CON
    request with an empty ACK, then, once the broker has the reading, with a separate CON response
    (RFC 7252 §5.2.2) -- over DTLS, to wolfSSL's and Bouncy Castle's clients, which wait the empty
    ACK out and acknowledge the answer.  2.04, and the reading in the topic once.  (The broker
    is resumed on the empty ACK's count, not after a delay: the order holds however slow the
    machine.  A broker of COREM_KAFKA_BOOTSTRAP cannot be frozen: its `pause` skips the test.)"""
    separately = ("--bus", f"kafka://{broker.bootstrap}", "--piggyback-timeout", "0.05")
    if stack == "wolfssl":
        client = request.getfixturevalue("wolfssl_client")
        server = serve_certificates(data_dir, pki, *separately)
        device, suite = "cert-dev-1", "ECDHE-ECDSA-AES128-CCM-8"
        argv = [client, str(server.coaps_port), suite, cbor2.dumps(READING).hex(), str(pki / "dev1.pem"),
                str(pki / "dev1.key.pem"), str(pki / "ca.pem")]
    else:
        server = serve(data_dir, "corem", *separately)
        device, suite = "sensor-7", "TLS_PSK_WITH_AES_128_CCM_8"
        argv = [*request.getfixturevalue("bc_client"), str(server.coaps_port), SPEC_IDENTITY, SPEC_KEY, suite,
                cbor2.dumps(READING).hex()]
    empty_acks = 'corem_coap_responses_total{code="0.00",transport="dtls"}'
    try:
        broker.pause()
        client_run = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_for(lambda: server.metrics().get(empty_acks, 0) >= 1 or client_run.poll() is not None,
                     timeout=CLIENT_TIMEOUT, what="the empty ACK")
        finally:
            broker.resume()
        stdout, stderr = client_run.communicate(timeout=CLIENT_TIMEOUT)
        out = answer(subprocess.CompletedProcess(argv, client_run.returncode, stdout, stderr))
        assert out == {"code": "2.04", "suite": suite}, (out, stderr)
        m = server.metrics()
        assert m[empty_acks] >= 1 and m['corem_coap_responses_total{code="2.04",transport="dtls"}'] == 1
        [record] = consume(broker.bootstrap, "telemetry.raw.acme", 1)
        assert record.key == device.encode()
    finally:
        server.stop()


# -- the project's OpenSSL load generator (bench/dtls_loadgen.c) --------------------------------------------

LOADGEN_SRC = Path(__file__).parent.parent / "bench" / "dtls_loadgen.c"


@pytest.fixture(scope="module")
def dtls_loadgen(tmp_path_factory) -> str:
    """bench/dtls_loadgen.c built here (gcc and libssl-dev: what corem's own C extensions need)"""
    need("gcc", shutil.which("gcc") is not None, "apt-get install gcc")
    out = tmp_path_factory.mktemp("dtls_loadgen") / "dtls_loadgen"
    subprocess.run(["gcc", "-O2", "-Wall", "-o", str(out), str(LOADGEN_SRC), "-lssl", "-lcrypto"],
                   check=True, capture_output=True, timeout=CLIENT_TIMEOUT)
    return str(out)


@pytest.mark.parametrize("records", ["its own", "libssl's"])
def test_the_benchmarks_openssl_load_generator_is_answered_and_every_reading_stored(data_dir, dtls_loadgen, records):
    """The client the CoAPS benchmark measures with, on a small bounded load: its handshakes one at a
    time and 4 at once (OpenSSL's client; at once through the generator's own datagram BIO), each
    phase 1 s (the machine may be loaded: a phase that finishes none fails), then 4 sessions x 2 POSTs in
    flight with its records sealed by its own code (libcrypto's TLS record mode) or by libssl
    (DTLS_LOADGEN_SSL_RECORDS=1): no handshake fails, every answer is a 2.04 that authenticates, and
    every 2.04 is a stored reading (so the benchmark's rows count readings, not errors)."""
    server = serve(data_dir, "corem", "--rate-limit-per-source", "0")
    try:
        env = dict(os.environ, DTLS_LOADGEN_SSL_RECORDS="1" if records == "libssl's" else "0")
        r = subprocess.run([dtls_loadgen, "127.0.0.1", str(server.coaps_port), "4", "2", "1", "0.5", SPEC_IDENTITY,
                            SPEC_KEY, "2", "telemetry", cbor2.dumps(READING).hex(), "60", "4"],
                           capture_output=True, text=True, timeout=CLIENT_TIMEOUT, env=env)
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        assert out["handshakes"] > 0 and out["concurrent_handshakes"] > 0, out
        assert out["handshake_failures"] == 0 and out["concurrent_failures"] == 0, out
        assert out["answered"] > 0 and out["ok_2xx"] == out["answered"], out
        assert out["other"] == 0 and out["bad_records"] == 0 and out["timeouts"] == 0, out
        server.stop()  # (every 2.04 was sent after its reading's commit; the count read back at rest)
        points = server.points()
        # (the last requests in flight when the run ended: stored, their answers not waited for)
        assert out["ok_2xx"] <= len(points) <= out["sent"], (len(points), out)
        assert {(p["tenant"], p["device"]) for p in points} == {("acme", "sensor-7")}
        assert all(p["numeric_values"] == {"temperature": 22.5, "humidity": 65.0} for p in points)
    finally:
        server.stop()
