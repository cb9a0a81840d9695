"""CoAPS certificate mode end to end: a real PKI made with the openssl CLI, libcoap's DTLS clients."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from .conftest import (DTLS_CLIENTS, SPEC_IDENTITY, SPEC_KEY, coap_client, corem_cli, needs_libcoap, start_corem,
                       wait_for, write_cbor)

pytestmark = [needs_libcoap, pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI missing")]


def _ssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _key(name: str, d: Path) -> None:
    _ssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", f"{name}.key.pem", cwd=d)


def _issue(name: str, ca: str, d: Path) -> None:
    _key(name, d)
    _ssl("req", "-new", "-key", f"{name}.key.pem", "-subj", f"/CN={name}", "-out", f"{name}.csr", cwd=d)
    _ssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key.pem",
         "-CAcreateserial", "-days", "2", "-out", f"{name}.pem", cwd=d)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """ECDSA P-256: a CA with a server and two device certificates, and a rogue CA with one."""
    d = tmp_path_factory.mktemp("pki")
    for ca in ("ca", "rogueca"):
        _key(ca, d)
        _ssl("req", "-x509", "-new", "-key", f"{ca}.key.pem", "-subj", f"/CN={ca}", "-days", "2", "-out", f"{ca}.pem", cwd=d)
    for name in ("server", "dev1", "dev2"):
        _issue(name, "ca", d)
    _issue("rogue", "rogueca", d)
    return d


def start(data_dir: Path, pki: Path, *extra: str):
    return start_corem(
        data_dir, "--dtls-cert", str(pki / "server.pem"), "--dtls-key", str(pki / "server.key.pem"),
        "--dtls-ca", str(pki / "ca.pem"), *extra,
    )


def post_with_cert(
    server, pki: Path, name: str | None, reading: Path, client: str, path: str = "telemetry", timeout: float = 20
):
    args = ["-m", "post", "-C", str(pki / "ca.pem"), "-t", "application/cbor", "-f", str(reading)]
    if name is not None:
        args += ["-c", str(pki / f"{name}.pem"), "-j", str(pki / f"{name}.key.pem")]
    return coap_client(f"coaps://127.0.0.1:{server.coaps_port}/{path}", *args, binary=client, timeout=timeout)


#: both implementations of CoAPS's security layer (dtls_engine)
engines = pytest.mark.parametrize("engine", ["mbedtls", "corem"])
#: the longer one on the default engine alone (the suite's time)
default_engine = pytest.mark.parametrize("engine", ["corem"])


@default_engine
@pytest.mark.parametrize("client", DTLS_CLIENTS)
def test_registered_certificate_connects_others_do_not(data_dir, pki, tmp_path, client, engine):
    corem_cli("devices", "add", "--tenant", "acme", "--device", "cert-dev-1", "--cert", str(pki / "dev1.pem"),
              data_dir=data_dir)
    server = start(data_dir, pki, "--dtls-engine", engine)
    try:
        reading = write_cbor(tmp_path / "r.cbor", {"temperature": 19.5})
        r = post_with_cert(server, pki, "dev1", reading, client)
        assert r.code == "2.04", r.output
        assert [(p["tenant"], p["device"]) for p in server.points()] == [("acme", "cert-dev-1")]
        refused = dict(timeout=3)  # a refused handshake is over in well under a second
        assert post_with_cert(server, pki, "dev2", reading, client, **refused).code is None  # trusted CA, unregistered
        assert post_with_cert(server, pki, "rogue", reading, client, **refused).code is None  # untrusted CA
        assert post_with_cert(server, pki, None, reading, client, **refused).code is None  # no certificate at all
        assert len(server.points()) == 1
        # (counted as the server refuses, which on a busy machine may be after a client gave up waiting)
        def failed(reason: str) -> float:
            return server.metrics().get(f'corem_dtls_handshakes_failed_total{{reason="{reason}"}}', 0)

        wait_for(lambda: failed("unregistered_certificate") >= 1, what="the unregistered certificate's refusal")
        # OpenSSL's client sends the rogue certificate (refused: not trusted); GnuTLS's sends none,
        # because it matches the CA names in the server's CertificateRequest (refused: none given)
        wait_for(lambda: failed("certificate_not_trusted") + failed("no_client_certificate") >= 2,
                 what="the untrusted and the missing certificates' refusals")
        # PSK devices keep working beside certificate ones
        psk = coap_client(
            f"coaps://127.0.0.1:{server.coaps_port}/telemetry", "-m", "post", "-u", SPEC_IDENTITY, "-k", SPEC_KEY,
            "-t", "application/cbor", "-f", str(reading), binary=client, timeout=20,
        )
        assert psk.code == "2.04", psk.output
    finally:
        server.stop()


@engines
def test_one_way_mode_encrypts_and_the_device_names_itself_by_token(data_dir, pki, tmp_path, engine):
    server = start(data_dir, pki, "--dtls-client-auth", "none", "--dtls-engine", engine)
    try:
        reading = write_cbor(tmp_path / "r.cbor", {"temperature": 19.5})
        client = DTLS_CLIENTS[0]
        assert post_with_cert(server, pki, None, reading, client).code == "4.01"  # no identity in the session
        r = post_with_cert(server, pki, None, reading, client, path="api/v1/T0KEN-1/telemetry")
        assert r.code == "2.04", r.output
        assert [p["device"] for p in server.points()] == ["sensor-1"]
    finally:
        server.stop()


@pytest.mark.parametrize("client", DTLS_CLIENTS)
def test_optional_mode_a_sent_certificate_must_verify_a_device_without_one_names_itself_by_token(
        data_dir, pki, tmp_path, client):
    """dtls_client_auth = optional (the corem engine only): a registered certificate names its
    device; a device that sends none is let in and names itself by its token; a certificate that
    does not verify (another CA) or is not registered is refused."""
    corem_cli("devices", "add", "--tenant", "acme", "--device", "cert-dev-1", "--cert", str(pki / "dev1.pem"),
              data_dir=data_dir)
    server = start(data_dir, pki, "--dtls-client-auth", "optional", "--dtls-engine", "corem")
    try:
        reading = write_cbor(tmp_path / "r.cbor", {"temperature": 19.5})
        r = post_with_cert(server, pki, "dev1", reading, client)
        assert r.code == "2.04", r.output
        assert post_with_cert(server, pki, None, reading, client).code == "4.01"  # no identity in the session
        r = post_with_cert(server, pki, None, reading, client, path="api/v1/T0KEN-1/telemetry")
        assert r.code == "2.04", r.output
        refused = dict(timeout=3)
        assert post_with_cert(server, pki, "dev2", reading, client, **refused).code is None  # unregistered
        assert [(p["tenant"], p["device"]) for p in server.points()] == [("acme", "cert-dev-1"), ("acme", "sensor-1")]

        def failed(reason: str) -> float:
            return server.metrics().get(f'corem_dtls_handshakes_failed_total{{reason="{reason}"}}', 0)

        wait_for(lambda: failed("unregistered_certificate") >= 1, what="the unregistered certificate's refusal")
        # OpenSSL's client sends the rogue certificate (refused: not trusted); GnuTLS's sends none (it
        # matches the CA names of the CertificateRequest), which optional lets in: no identity, 4.01
        rogue = post_with_cert(server, pki, "rogue", reading, client, **refused)
        assert rogue.code in (None, "4.01")
        if rogue.code is None:
            wait_for(lambda: failed("certificate_not_trusted") >= 1, what="the untrusted certificate's refusal")
        assert len(server.points()) == 2
    finally:
        server.stop()


def test_optional_client_auth_needs_the_corem_engine(data_dir, pki):
    bad = start_corem_failing(data_dir, pki)
    assert "'optional' needs dtls_engine = corem" in bad


def start_corem_failing(data_dir: Path, pki: Path) -> str:
    import sys

    r = subprocess.run([sys.executable, "-m", "corem", "serve", "--data-dir", str(data_dir), "--coap", "off",
                        "--coaps", "127.0.0.1:0", "--http", "off", "--dtls-client-auth", "optional", "--dtls-engine", "mbedtls",
                        "--dtls-cert", str(pki / "server.pem"), "--dtls-key", str(pki / "server.key.pem"),
                        "--dtls-ca", str(pki / "ca.pem")], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    return r.stderr


def test_certificate_registration_errors(data_dir, pki):
    bad = corem_cli("devices", "add", "--tenant", "a", "--device", "x", "--cert", str(pki / "dev1.key.pem"),
                    data_dir=data_dir, check=False)
    assert bad.returncode == 2 and "cert:" in bad.stderr
    corem_cli("devices", "add", "--tenant", "a", "--device", "x", "--cert", str(pki / "dev1.pem"), data_dir=data_dir)
    dup = corem_cli("devices", "add", "--tenant", "a", "--device", "y", "--cert", str(pki / "dev1.pem"),
                    data_dir=data_dir, check=False)
    assert dup.returncode == 2 and "already registered" in dup.stderr


@needs_libcoap
@pytest.mark.parametrize("client", DTLS_CLIENTS)
def test_coaps_over_tcp_takes_the_same_certificates(data_dir, pki, tmp_path, client):
    """RFC 8323's TLS listener with the DTLS settings: a registered certificate names its device,
    an unregistered one gets no connection."""
    corem_cli("devices", "add", "--tenant", "acme", "--device", "cert-dev-1", "--cert", str(pki / "dev1.pem"),
              data_dir=data_dir)
    server = start(data_dir, pki, "--coaps-tcp", "127.0.0.1:0")
    try:
        reading = write_cbor(tmp_path / "r.cbor", {"temperature": 18.5})
        url = f"coaps+tcp://127.0.0.1:{server.coaps_tcp_port}/telemetry"
        args = ["-m", "post", "-C", str(pki / "ca.pem"), "-t", "application/cbor", "-f", str(reading)]
        ok = coap_client(url, *args, "-c", str(pki / "dev1.pem"), "-j", str(pki / "dev1.key.pem"), binary=client,
                         timeout=20)
        assert ok.code == "2.04", ok.output
        refused = coap_client(url, *args, "-c", str(pki / "dev2.pem"), "-j", str(pki / "dev2.key.pem"), binary=client,
                              timeout=3)
        assert refused.code is None
        assert [(p["tenant"], p["device"]) for p in server.points()] == [("acme", "cert-dev-1")]
        key = 'corem_tcp_connections_aborted_total{reason="unregistered_certificate",transport="tls"}'
        wait_for(lambda: server.metrics().get(key), what="the refusal")  # (the client may give up first)
        assert server.metrics()[key] == 1
    finally:
        server.stop()
