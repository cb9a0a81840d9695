"""TLS 1.2 on the engine's handshake (corem/dtls/engine/tls.py, coaps+tcp), sans-IO: the engine's own
client, python-mbedtls's TLS client (PSK) and Python's `ssl` (OpenSSL: ECDHE-ECDSA with
certificates) against the server role; one record checked byte for byte against RFC 5246 and RFC
5288; the framing (records and handshake messages cut anywhere, several to a record); and the
refusals, each answered by its alert and never by an exception."""

from __future__ import annotations

import datetime
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESCCM, AESGCM
from cryptography.x509.oid import NameOID

import corem.dtls.engine.messages as m
from corem.dtls.engine.certs import chain_verifier, fingerprint
from corem.dtls.engine.connection import CLOSED, FAILED, Params
from corem.dtls.engine.crypto import (ECDHE_ECDSA_AES_128_CCM_8, ECDHE_ECDSA_AES_128_GCM_SHA256,
                                      PSK_AES_128_CCM, PSK_AES_128_CCM_8, PSK_AES_128_GCM_SHA256)
from corem.dtls.engine.errors import (BAD_RECORD_MAC, DECODE_ERROR, FATAL, HANDSHAKE_FAILURE, NO_RENEGOTIATION,
                                      PROTOCOL_VERSION, RECORD_OVERFLOW, UNEXPECTED_MESSAGE, UNKNOWN_PSK_IDENTITY,
                                      WARNING, DtlsDecodeError)
from corem.dtls.engine.tls import (HandshakeReader, RecordReader, TlsClient, TlsConnection, handshake_message,
                                   record)

PSKS = {b"dev-1": b"s3cr3t-pre-shared-key"}
PSK_SUITES = (PSK_AES_128_CCM_8, PSK_AES_128_CCM, PSK_AES_128_GCM_SHA256)
ECDHE_SUITES = (ECDHE_ECDSA_AES_128_CCM_8, ECDHE_ECDSA_AES_128_GCM_SHA256)


# -- a PKI (P-256), made with `cryptography` -------------------------------------------------------
def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(cn: str, key: ec.EllipticCurvePrivateKey, issuer: str, issuer_key: ec.EllipticCurvePrivateKey,
          ca: bool) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    return (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(issuer))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .sign(issuer_key, hashes.SHA256()))


def make_pki(d: Path) -> Path:
    """ca.pem; server, dev1 and dev2 issued by it; rogue issued by rogueca (NAME.pem, NAME.key.pem)"""
    d.mkdir(parents=True, exist_ok=True)
    keys = {}
    for ca in ("ca", "rogueca"):
        keys[ca] = ec.generate_private_key(ec.SECP256R1())
        _write(d, ca, _cert(ca, keys[ca], ca, keys[ca], True), keys[ca])
    for name, ca in (("server", "ca"), ("dev1", "ca"), ("dev2", "ca"), ("rogue", "rogueca")):
        key = ec.generate_private_key(ec.SECP256R1())
        ca_cert = x509.load_pem_x509_certificate((d / f"{ca}.pem").read_bytes())
        cert = _cert(name, key, ca_cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value, keys[ca],
                     False)
        _write(d, name, cert, key)
    return d


def _write(d: Path, name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
    (d / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (d / f"{name}.key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    return make_pki(tmp_path_factory.mktemp("pki"))


def der(pki: Path, name: str) -> bytes:
    return x509.load_pem_x509_certificate((pki / f"{name}.pem").read_bytes()).public_bytes(serialization.Encoding.DER)


def private_key(pki: Path, name: str) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key((pki / f"{name}.key.pem").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key


def server_params(pki: Path | None = None, client_auth: str = "none", **kw) -> Params:
    if pki is None:
        return Params(**kw)
    verify = chain_verifier([x509.load_pem_x509_certificate((pki / "ca.pem").read_bytes())]) \
        if client_auth != "none" else None
    return Params(certificate_chain=(der(pki, "server"),), private_key=private_key(pki, "server"),
                  verify_peer=verify, client_auth=client_auth, **kw)


def server(params: Params | None = None) -> TlsConnection:
    return TlsConnection("server", params or Params(), ("192.0.2.1", 5684), 0.0, psk_for=PSKS.get)


def pump(client: TlsClient, srv: TlsConnection, rounds: int = 10) -> None:
    for _ in range(rounds):
        out = client.data_to_send()
        if out:
            srv.receive_untrusted(out, 0.0)
        back = srv.data_to_send()
        if back:
            client.receive(back, 0.0)
        if not out and not back:
            return


def alerts(data: bytes) -> list[tuple[int, int]]:
    """The plaintext alerts among the records of `data`"""
    out = []
    for ctype, fragment in RecordReader().feed_untrusted(data):
        if ctype == 21:
            out.append((fragment[0], fragment[1]))
    return out


def established_pair(suite=PSK_AES_128_CCM_8) -> tuple[TlsClient, TlsConnection]:
    client = TlsClient(b"dev-1", PSKS[b"dev-1"], params=Params(suites=(suite,)))
    srv = server()
    client.start(0.0)
    pump(client, srv)
    assert client.established and srv.established, (client.conn.reason, srv.reason)
    return client, srv


# -- the engine against itself -------------------------------------------------------------------
@pytest.mark.parametrize("suite", PSK_SUITES, ids=lambda s: s.name)
def test_psk_handshake_and_data_both_ways(suite):
    client, srv = established_pair(suite)
    assert srv.suite == suite and srv.ems and srv.identity == b"dev-1" and srv.alpn_agreed
    srv.receive_untrusted(client.wrap(b"GET /"), 0.0)
    assert srv.take_app() == b"GET /"
    big = bytes(range(256)) * 200  # 51,200 bytes: four records
    sealed = srv.seal(big)
    assert sealed is not None and len(RecordReader().feed_untrusted(sealed)) == 4
    assert client.receive(sealed, 0.0) == big


@pytest.mark.parametrize("suite", ECDHE_SUITES, ids=lambda s: s.name)
@pytest.mark.parametrize("client_auth", ["none", "optional", "required"])
def test_ecdhe_ecdsa_with_and_without_a_client_certificate(pki, suite, client_auth):
    mine = Params(suites=(suite,), certificate_chain=(der(pki, "dev1"),), private_key=private_key(pki, "dev1"))
    client = TlsClient(params=mine)
    srv = server(server_params(pki, client_auth))
    client.start(0.0)
    pump(client, srv)
    assert client.established and srv.established, (client.conn.reason, srv.reason)
    want = fingerprint(der(pki, "dev1")) if client_auth != "none" else b""
    assert srv.suite == suite and srv.identity == want
    srv.receive_untrusted(client.wrap(b"hi"), 0.0)
    assert srv.take_app() == b"hi"


def test_bytes_cut_anywhere_and_a_flight_in_one_record():
    """Records and handshake messages come whole out of a stream fed a byte at a time; the server's
    first flight (ServerHello, ServerHelloDone) is one record with two 4-byte-header messages"""
    client = TlsClient(b"dev-1", PSKS[b"dev-1"])
    srv = server()
    client.start(0.0)
    hello = client.data_to_send()
    for i in range(len(hello)):
        srv.receive_untrusted(hello[i:i + 1], 0.0)
    flight = srv.data_to_send()
    [(ctype, fragment)] = RecordReader().feed_untrusted(flight)
    assert ctype == 22 and flight[:3] == b"\x16\x03\x03"
    messages = HandshakeReader().feed_untrusted(fragment)
    assert [t for t, _ in messages] == [m.SERVER_HELLO, m.SERVER_HELLO_DONE]
    sh = m.parse_server_hello_untrusted(messages[0][1])
    assert sh.version == 0x0303 and m.EXT_EXTENDED_MASTER_SECRET in sh.extensions
    assert sh.extensions[16] == b"\x00\x05\x04coap"  # ALPN (RFC 8323 §4.3)
    for i in range(len(flight)):
        client.receive(flight[i:i + 1], 0.0)
    out = client.data_to_send()
    for i in range(len(out)):
        srv.receive_untrusted(out[i:i + 1], 0.0)
    client.receive(srv.data_to_send(), 0.0)
    assert client.established and srv.established


def test_a_message_may_span_records():
    """The client's ClientHello re-cut into records of 7 bytes, its ClientKeyExchange into 3:
    the server reassembles both (RFC 5246 §6.2.1: handshake messages may be fragmented)"""
    client = TlsClient(b"dev-1", PSKS[b"dev-1"])
    srv = server()
    client.start(0.0)

    def recut(fragment: bytes, size: int) -> bytes:
        return b"".join(record(22, fragment[i:i + size]) for i in range(0, len(fragment), size))

    [(ctype, hello)] = RecordReader().feed_untrusted(client.data_to_send())
    srv.receive_untrusted(recut(hello, 7), 0.0)
    client.receive(srv.data_to_send(), 0.0)
    records = RecordReader().feed_untrusted(client.data_to_send())
    assert [t for t, _ in records] == [22, 20, 22]  # ClientKeyExchange, ChangeCipherSpec, Finished (protected)
    srv.receive_untrusted(recut(records[0][1], 3) + record(*records[1]) + record(*records[2]), 0.0)
    client.receive(srv.data_to_send(), 0.0)
    assert srv.established and client.established


def test_one_record_byte_for_byte_against_rfc_5246_and_5288():
    """The server's first application data record under TLS_PSK_WITH_AES_128_GCM_SHA256: header
    type 23, version 3.3, length; the explicit nonce is the sequence number (1: its Finished was 0);
    nonce = server_write_IV(4) + explicit(8); additional_data = seq_num(8) + type + version +
    length of the plaintext; decrypted here with AES-GCM by hand."""
    client, srv = established_pair(PSK_AES_128_GCM_SHA256)
    rec = srv.seal(b"hello, device")
    assert rec is not None
    assert rec[:3] == b"\x17\x03\x03" and int.from_bytes(rec[3:5], "big") == len(rec) - 5 == 8 + 13 + 16
    explicit = rec[5:13]
    assert explicit == (1).to_bytes(8, "big")
    keys = srv.keys
    assert keys is not None
    additional = (1).to_bytes(8, "big") + b"\x17\x03\x03" + (13).to_bytes(2, "big")
    assert AESGCM(keys.server_key).decrypt(keys.server_iv + explicit, rec[13:], additional) == b"hello, device"
    # the client's records: its own sequence numbers, from 0 (its Finished) then 1
    up = client.wrap(b"x")
    assert up[5:13] == (1).to_bytes(8, "big")
    additional = (1).to_bytes(8, "big") + b"\x17\x03\x03" + (1).to_bytes(2, "big")
    assert AESGCM(keys.client_key).decrypt(keys.client_iv + up[5:13], up[13:], additional) == b"x"


def test_ccm_8_record_layout():
    """RFC 6655: the same nonce and additional data as GCM, an 8-byte tag"""
    client, srv = established_pair(PSK_AES_128_CCM_8)
    rec = srv.seal(b"abc")
    assert rec is not None and len(rec) == 5 + 8 + 3 + 8
    keys = srv.keys
    assert keys is not None
    additional = (1).to_bytes(8, "big") + b"\x17\x03\x03" + (3).to_bytes(2, "big")
    assert AESCCM(keys.server_key, tag_length=8).decrypt(keys.server_iv + rec[5:13], rec[13:], additional) == b"abc"


def test_the_transcript_holds_tls_message_headers():
    """Finished verifies over 4-byte headers: a transcript with DTLS's 12 would not (the handshake
    completing with two other stacks below says the same); here: what the server hashed"""
    client = TlsClient(b"dev-1", PSKS[b"dev-1"])
    client.start(0.0)
    hello = client.data_to_send()
    srv = server()
    srv.receive_untrusted(hello, 0.0)
    assert bytes(srv.transcript).startswith(hello[5:])  # (the ClientHello as the wire had it, 4-byte header)
    assert hello[5] == m.CLIENT_HELLO and int.from_bytes(hello[6:9], "big") == len(hello) - 9


# -- other stacks ----------------------------------------------------------------------------------
@pytest.mark.parametrize("cipher", ["TLS-PSK-WITH-AES-128-CCM-8", "TLS-PSK-WITH-AES-128-CCM",
                                    "TLS-PSK-WITH-AES-128-GCM-SHA256"])
def test_python_mbedtls_tls_client_with_psk(cipher):
    tls = pytest.importorskip("mbedtls.tls")
    ctx = tls.ClientContext(tls.TLSConfiguration(
        pre_shared_key=("dev-1", PSKS[b"dev-1"]), ciphers=(cipher,), validate_certificates=False,
        lowest_supported_version=tls.TLSVersion.TLSv1_2, highest_supported_version=tls.TLSVersion.TLSv1_2))
    buf = ctx.wrap_buffers(None)
    srv = server()

    def exchange() -> None:
        out = buf.peek_outgoing(1 << 20)
        buf.consume_outgoing(len(out))
        if out:
            srv.receive_untrusted(bytes(out), 0.0)
        back = srv.data_to_send()
        if back:
            buf.receive_from_network(back)

    for _ in range(100):
        if buf._handshake_state.name == "HANDSHAKE_OVER":
            break
        try:
            buf.do_handshake()
        except (tls.WantReadError, tls.WantWriteError):
            exchange()
    exchange()
    assert srv.established, srv.reason
    assert srv.suite is not None and srv.suite.name.replace("_", "-") == cipher and srv.ems
    buf.write(b"ping")
    exchange()
    assert srv.take_app() == b"ping"
    buf.receive_from_network(srv.seal(b"pong"))
    assert buf.read(100) == b"pong"


def test_python_mbedtls_tls_client_with_a_wrong_psk_gets_bad_record_mac():
    tls = pytest.importorskip("mbedtls.tls")
    ctx = tls.ClientContext(tls.TLSConfiguration(
        pre_shared_key=("dev-1", b"not-the-key"), ciphers=("TLS-PSK-WITH-AES-128-CCM-8",),
        validate_certificates=False, lowest_supported_version=tls.TLSVersion.TLSv1_2,
        highest_supported_version=tls.TLSVersion.TLSv1_2))
    buf = ctx.wrap_buffers(None)
    srv = server()
    sent = b""
    for _ in range(20):
        try:
            buf.do_handshake()
        except (tls.WantReadError, tls.WantWriteError):
            out = buf.peek_outgoing(1 << 20)
            buf.consume_outgoing(len(out))
            srv.receive_untrusted(bytes(out), 0.0)
            back = srv.data_to_send()
            sent += back
            buf.receive_from_network(back)
        except Exception:  # (Mbed TLS's client reads the alert: its error, not ours)
            break
        if srv.state == FAILED:
            break
    assert srv.state == FAILED and srv.reason == "finished_not_authentic"
    assert alerts(sent)[-1] == (FATAL, BAD_RECORD_MAC)


def _ssl_handshake(ctx: ssl.SSLContext, srv: TlsConnection) -> ssl.SSLObject:
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing)
    for _ in range(10):
        try:
            obj.do_handshake()
            break
        except ssl.SSLWantReadError:
            pass
        srv.receive_untrusted(outgoing.read(), 0.0)
        incoming.write(srv.data_to_send())
    srv.receive_untrusted(outgoing.read(), 0.0)
    obj.outgoing = outgoing  # type: ignore[attr-defined]
    obj.incoming = incoming  # type: ignore[attr-defined]
    return obj


def _ssl_context(pki: Path, cert: str | None, cipher: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(pki / "ca.pem")
    ctx.check_hostname = False
    ctx.set_ciphers(cipher)
    ctx.set_alpn_protocols(["coap"])
    if cert is not None:
        ctx.load_cert_chain(pki / f"{cert}.pem", pki / f"{cert}.key.pem")
    return ctx


@pytest.mark.parametrize("cipher", ["ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-AES128-CCM8"])
@pytest.mark.parametrize("client_auth", ["none", "optional", "required"])
def test_python_ssl_client_with_certificates(pki, cipher, client_auth):
    """OpenSSL, through Python's ssl, as an independent TLS 1.2 client: it verifies corem's
    certificate against the CA, and shows its own when asked"""
    try:
        ctx = _ssl_context(pki, "dev1" if client_auth != "none" else None, cipher)
    except ssl.SSLError:
        pytest.skip(f"this OpenSSL has no {cipher}")
    srv = server(server_params(pki, client_auth))
    obj = _ssl_handshake(ctx, srv)
    assert srv.established, srv.reason
    assert obj.version() == "TLSv1.2" and obj.cipher()[0] == cipher and obj.selected_alpn_protocol() == "coap"
    assert srv.identity == (fingerprint(der(pki, "dev1")) if client_auth != "none" else b"")
    obj.write(b"ping")
    srv.receive_untrusted(obj.outgoing.read(), 0.0)
    assert srv.take_app() == b"ping"
    obj.incoming.write(srv.seal(b"pong"))
    assert obj.read() == b"pong"
    # close_notify from the client: the connection is over, cleanly
    try:
        obj.unwrap()
    except ssl.SSLWantReadError:
        pass
    srv.receive_untrusted(obj.outgoing.read(), 0.0)
    assert srv.state == CLOSED and srv.reason == "close_notify"
    obj.incoming.write(srv.data_to_send())  # (answered by corem's close_notify, RFC 5246 §7.2.1)
    obj.unwrap()


def test_python_ssl_client_without_a_certificate_when_one_is_required(pki):
    ctx = _ssl_context(pki, None, "ECDHE-ECDSA-AES128-GCM-SHA256")
    srv = server(server_params(pki, "required"))
    with pytest.raises(ssl.SSLError):
        _ssl_handshake(ctx, srv)
    assert srv.state == FAILED and srv.reason == "no_client_certificate"


def test_python_ssl_client_with_a_certificate_of_another_ca(pki):
    ctx = _ssl_context(pki, "rogue", "ECDHE-ECDSA-AES128-GCM-SHA256")
    srv = server(server_params(pki, "required"))
    with pytest.raises(ssl.SSLError):
        _ssl_handshake(ctx, srv)
    assert srv.state == FAILED and srv.reason == "bad_certificate"


# -- refusals: an alert, never an exception --------------------------------------------------------
def _refused(data: bytes, params: Params | None = None) -> tuple[TlsConnection, list[tuple[int, int]]]:
    srv = server(params)
    srv.receive_untrusted(data, 0.0)
    return srv, alerts(srv.data_to_send())


def _hello(client: TlsClient) -> bytes:
    client.start(0.0)
    return client.data_to_send()


def test_a_wrong_psk_gets_bad_record_mac():
    client = TlsClient(b"dev-1", b"not-the-key")
    srv = server()
    client.start(0.0)
    srv.receive_untrusted(client.data_to_send(), 0.0)
    client.receive(srv.data_to_send(), 0.0)
    srv.receive_untrusted(client.data_to_send(), 0.0)
    assert srv.state == FAILED and srv.reason == "finished_not_authentic"
    assert alerts(srv.data_to_send()) == [(FATAL, BAD_RECORD_MAC)]


def test_an_unknown_identity_gets_unknown_psk_identity():
    client = TlsClient(b"nobody", b"whatever")
    srv = server()
    client.start(0.0)
    srv.receive_untrusted(client.data_to_send(), 0.0)
    client.receive(srv.data_to_send(), 0.0)
    srv.receive_untrusted(client.data_to_send(), 0.0)
    assert srv.state == FAILED and alerts(srv.data_to_send()) == [(FATAL, UNKNOWN_PSK_IDENTITY)]


def test_no_suite_in_common_gets_handshake_failure():
    hello = _hello(TlsClient(b"dev-1", b"k", params=Params(suites=(PSK_AES_128_CCM,))))
    hello = hello.replace(PSK_AES_128_CCM.code.to_bytes(2, "big"), b"\x00\x2f")  # TLS_RSA_WITH_AES_128_CBC_SHA
    srv, got = _refused(hello, Params(suites=(PSK_AES_128_CCM_8,)))
    assert srv.reason == "no_shared_suite" and got == [(FATAL, HANDSHAKE_FAILURE)]
    # an ECDHE suite to a server without a certificate: none in common either
    srv, got = _refused(_hello(TlsClient(params=Params(suites=ECDHE_SUITES))))
    assert srv.reason == "no_shared_suite" and got == [(FATAL, HANDSHAKE_FAILURE)]


def test_a_hello_without_extended_master_secret_gets_handshake_failure():
    srv, got = _refused(_hello(TlsClient(b"dev-1", PSKS[b"dev-1"], ems=False)))
    assert srv.reason == "no_extended_master_secret" and got == [(FATAL, HANDSHAKE_FAILURE)]
    # unless the server is told to let such clients in (the DTLS engine's require_ems)
    client = TlsClient(b"dev-1", PSKS[b"dev-1"], ems=False, params=Params(require_ems=False))
    srv = server(Params(require_ems=False))
    client.start(0.0)
    pump(client, srv)
    assert srv.established and not srv.ems


def test_below_tls_1_2_gets_protocol_version():
    hello = bytearray(_hello(TlsClient(b"dev-1", PSKS[b"dev-1"])))
    hello[9:11] = b"\x03\x01"  # client_version TLS 1.0 (the record may say 3.1: Appendix E.1)
    hello[1:3] = b"\x03\x01"
    srv, got = _refused(bytes(hello))
    assert srv.reason == "protocol_version" and got == [(FATAL, PROTOCOL_VERSION)]


def test_renegotiation_gets_a_warning_and_the_session_stays():
    client, srv = established_pair()
    fresh = TlsClient(b"dev-1", PSKS[b"dev-1"])
    fresh.start(0.0)
    hello = fresh.data_to_send()[5:]  # the ClientHello message, now inside the session's protection
    assert client.conn._write_record(True, 22, hello)  # (sealed under the session's keys)
    srv.receive_untrusted(client.data_to_send(), 0.0)
    assert srv.established and srv.renegotiations == 1
    [(ctype, fragment)] = RecordReader().feed_untrusted(srv.data_to_send())
    assert ctype == 21  # the alert, protected: level warning, no_renegotiation
    tls_read = client.conn.tls_read
    assert tls_read is not None
    assert tls_read.open_untrusted(21, client.conn.read_seq, fragment) == bytes((WARNING, NO_RENEGOTIATION))
    client.conn.read_seq += 1
    srv.receive_untrusted(client.wrap(b"still here"), 0.0)
    assert srv.take_app() == b"still here"


def test_a_record_full_of_renegotiations_gets_a_few_warnings_then_the_session_ends():
    """4096 empty ClientHellos in one authenticated record were 4096 sealed alerts (~6x the bytes in,
    past the connection's write bound: an adversarial run grew corem by 142 MB over coaps+tcp);
    MAX_RENEGOTIATIONS warnings, then a fatal handshake_failure and the session ends"""
    from corem.dtls.engine.connection import MAX_RENEGOTIATIONS

    client, srv = established_pair()
    assert client.conn._write_record(True, 22, b"\x01\x00\x00\x00" * 4096)
    srv.receive_untrusted(client.data_to_send(), 0.0)
    alerts = RecordReader().feed_untrusted(srv.data_to_send())
    assert len(alerts) == MAX_RENEGOTIATIONS + 1 and {ctype for ctype, _ in alerts} == {21}
    assert srv.over and srv.reason == "renegotiations"


def test_out_of_order_handshake_messages_get_unexpected_message():
    # a ClientKeyExchange first
    srv, got = _refused(record(22, handshake_message(m.CLIENT_KEY_EXCHANGE, b"\x00\x05dev-1")))
    assert srv.reason == "expected_client_hello" and got == [(FATAL, UNEXPECTED_MESSAGE)]
    # ChangeCipherSpec before the ClientKeyExchange
    srv = server()
    srv.receive_untrusted(_hello(TlsClient(b"dev-1", PSKS[b"dev-1"])), 0.0)
    srv.data_to_send()
    srv.receive_untrusted(record(20, b"\x01"), 0.0)
    assert srv.state == FAILED and alerts(srv.data_to_send()) == [(FATAL, UNEXPECTED_MESSAGE)]
    # Finished in the clear (before ChangeCipherSpec)
    srv = server()
    srv.receive_untrusted(_hello(TlsClient(b"dev-1", PSKS[b"dev-1"])), 0.0)
    srv.data_to_send()
    srv.receive_untrusted(record(22, handshake_message(m.FINISHED, bytes(12))), 0.0)
    assert srv.state == FAILED and alerts(srv.data_to_send()) == [(FATAL, UNEXPECTED_MESSAGE)]
    # application data before the handshake
    srv, got = _refused(record(23, b"GET"))
    assert got == [(FATAL, UNEXPECTED_MESSAGE)]
    # a second ClientHello during the handshake
    hello = _hello(TlsClient(b"dev-1", PSKS[b"dev-1"]))
    srv, got = _refused(hello + hello)
    assert got == [(FATAL, UNEXPECTED_MESSAGE)]


@pytest.mark.parametrize("data, alert", [
    (b"\x80\x2e\x01\x03\x01", UNEXPECTED_MESSAGE),  # an SSLv2-format hello
    (b"\x18\x03\x03\x00\x01\x01", UNEXPECTED_MESSAGE),  # heartbeat (not a content type here)
    (b"\x16\x02\x00\x00\x01\x01", PROTOCOL_VERSION),  # SSL 2.0 record version
    (b"\x16\x03\x03\x48\x01", RECORD_OVERFLOW),  # a record over 2^14 + 2048, refused from its header
    (b"\x16\x03\x03\x00\x04\x01\x00\x00\x00", DECODE_ERROR),  # an empty ClientHello
    (b"\x16\x03\x03\x00\x04\x01\x01\x00\x00", 47),  # a ClientHello of 64 KiB: illegal_parameter at once
    (b"\x15\x03\x03\x00\x01\x02", DECODE_ERROR),  # an alert of one byte
])
def test_malformed_bytes_get_their_alert(data, alert):
    srv, got = _refused(data)
    assert srv.state == FAILED and got == [(FATAL, alert)]
    srv.receive_untrusted(b"more", 0.0)  # over: taken and ignored
    assert srv.data_to_send() == b""


def test_a_tampered_record_after_the_handshake_gets_bad_record_mac():
    client, srv = established_pair()
    rec = bytearray(client.wrap(b"data"))
    rec[-1] ^= 1
    srv.receive_untrusted(bytes(rec), 0.0)
    assert srv.state == FAILED and srv.reason == "bad_record_mac"
    # (the alert is protected: the server had sent its ChangeCipherSpec)
    [(ctype, _)] = RecordReader().feed_untrusted(srv.data_to_send())
    assert ctype == 21
    assert srv.seal(b"x") is None


def test_a_replayed_record_does_not_authenticate():
    """The sequence number is implicit: the same record twice is the second one's forgery"""
    client, srv = established_pair()
    rec = client.wrap(b"once")
    srv.receive_untrusted(rec, 0.0)
    assert srv.take_app() == b"once"
    srv.receive_untrusted(rec, 0.0)
    assert srv.state == FAILED and srv.reason == "bad_record_mac"


def test_readers_hold_one_record_and_one_message_at_most():
    r = RecordReader()
    assert r.feed_untrusted(b"\x17\x03\x03\x40\x00" + bytes(100)) == [] and r.buffered == 105
    with pytest.raises(DtlsDecodeError):
        RecordReader().feed_untrusted(b"\x17\x03\x03\x50\x00")
    h = HandshakeReader()
    assert h.feed_untrusted(b"\x0b\x00\x20\x00") == []
    with pytest.raises(DtlsDecodeError):
        HandshakeReader().feed_untrusted(b"\x0b\x00\x20\x01")  # 8193 bytes: over messages.MAX_MESSAGE

