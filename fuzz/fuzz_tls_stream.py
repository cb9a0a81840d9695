"""Fuzz the engine's TLS 1.2 (corem/dtls/engine/tls.py, coaps+tcp) at its stream parsers and its
server role: the record and handshake readers on any bytes cut anywhere (only DtlsDecodeError
leaves them; what they hand out is the stream's prefix, and they hold at most one record and one
message); a server fed arbitrary bytes; and a server fed a real handshake from the engine's TLS
client (PSK, or ECDHE-ECDSA with a device certificate) with fuzzer-chosen mutations, cuts and
injected bytes at any step, then data.  Nothing at all leaves `receive_untrusted`; once FAILED or
CLOSED a connection sends nothing more; no connection is established without the key, and
application data comes out only of an established one."""

import sys

import atheris
from pki import CA, DER, DEVICE, SERVER

with atheris.instrument_imports():
    from corem.dtls.engine import DtlsDecodeError, Params
    from corem.dtls.engine import certs
    from corem.dtls.engine import messages as m
    from corem.dtls.engine.crypto import IMPLEMENTED
    from corem.dtls.engine.tls import (HEADER, HS_HEADER, MAX_FRAGMENT, HandshakeReader, RecordReader, TlsClient,
                                       TlsConnection)

PSK = b"0123456789abcdef"
KEYS = {b"device-1": PSK}


SERVER_PARAMS = Params(certificate_chain=(SERVER[0].public_bytes(DER),), private_key=SERVER[1],
                       verify_peer=certs.chain_verifier([CA[0]]), client_auth="optional")
ECDHE_CLIENT = Params(suites=tuple(s for s in IMPLEMENTED if s.kx == "ecdhe_ecdsa"),
                      certificate_chain=(DEVICE[0].public_bytes(DER),), private_key=DEVICE[1])


def readers(fdp: atheris.FuzzedDataProvider) -> None:
    stream = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 600))
    for reader, header, limit in ((RecordReader(), HEADER, MAX_FRAGMENT), (HandshakeReader(), HS_HEADER, m.MAX_MESSAGE)):
        got = b""
        fed = 0
        try:
            pos = 0
            while pos < len(stream):
                step = fdp.ConsumeIntInRange(1, 50) if fdp.remaining_bytes() else len(stream)
                chunk = stream[pos:pos + step]
                pos += len(chunk)
                fed = pos
                for t, body in reader.feed_untrusted(chunk):
                    if header == HEADER:
                        got += stream[len(got):len(got) + 3] + len(body).to_bytes(2, "big") + body
                    else:
                        got += bytes((t,)) + len(body).to_bytes(3, "big") + body
                assert reader.buffered < header + limit
                assert got == stream[:len(got)] and fed - len(got) == reader.buffered
        except DtlsDecodeError:
            pass


def server(fdp: atheris.FuzzedDataProvider) -> TlsConnection:
    params = SERVER_PARAMS if fdp.ConsumeBool() else Params()
    return TlsConnection("server", params, ("192.0.2.1", 1), 0.0, psk_for=KEYS.get)


def feed(conn: TlsConnection, data: bytes, fdp: atheris.FuzzedDataProvider) -> bytes:
    """`data` cut where the fuzzer says; what the connection answers.  Nothing is raised."""
    over_before = conn.over
    out = b""
    pos = 0
    while pos < len(data):
        step = fdp.ConsumeIntInRange(1, 300) if fdp.remaining_bytes() else len(data)
        conn.receive_untrusted(data[pos:pos + step], 0.0)
        pos += step
        sent = conn.data_to_send()
        assert not (over_before and sent), "a connection over sent more"
        over_before = conn.over
        out += sent
    return out


def mutate(data: bytes, fdp: atheris.FuzzedDataProvider) -> bytes:
    d = bytearray(data)
    for _ in range(fdp.ConsumeIntInRange(0, 3)):
        op = fdp.ConsumeIntInRange(0, 4)
        if op == 0 and d:
            d[fdp.ConsumeIntInRange(0, len(d) - 1)] ^= fdp.ConsumeIntInRange(1, 255)
        elif op == 1:
            d = d[:fdp.ConsumeIntInRange(0, len(d))]
        elif op == 2:
            at = fdp.ConsumeIntInRange(0, len(d))
            d[at:at] = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 20))
        elif op == 3:
            d += d[:fdp.ConsumeIntInRange(0, len(d))]
        # op 4: unchanged
    return bytes(d)


def handshake(fdp: atheris.FuzzedDataProvider) -> None:
    ecdhe = fdp.ConsumeIntInRange(0, 7) == 0  # (ECDHE is ~50 times slower: a few inputs of many)
    key = PSK if fdp.ConsumeIntInRange(0, 3) else fdp.ConsumeBytes(16)
    client = TlsClient(params=ECDHE_CLIENT, ems=fdp.ConsumeIntInRange(0, 7) > 0) if ecdhe else \
        TlsClient(b"device-1", key, ems=fdp.ConsumeIntInRange(0, 7) > 0)
    srv = TlsConnection("server", SERVER_PARAMS if ecdhe or fdp.ConsumeBool() else Params(), ("192.0.2.1", 1), 0.0,
                        psk_for=KEYS.get)
    client.start(0.0)
    for _ in range(4):
        out = client.data_to_send()
        if fdp.ConsumeIntInRange(0, 3) == 0:
            out = mutate(out, fdp)
        back = feed(srv, out, fdp)
        client.receive(back, 0.0)
        if srv.over or client.state in ("failed", "closed"):
            break
    if srv.established:
        assert ecdhe or key == PSK, "established without the key"
        assert srv.ems or not srv.params.require_ems
        data = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 64))
        if client.established and not srv.over:
            sealed = client.wrap(data)
            changed = mutate(sealed, fdp) if fdp.ConsumeBool() else sealed
            clean = srv.records.buffered == 0  # (not behind injected bytes that started a record)
            feed(srv, changed, fdp)
            got = srv.take_app()
            # (the AEAD: a changed record gives the data whole (bytes added after it) or nothing)
            assert got in (b"", data) and (got == data or changed != sealed or not clean), (got, data)
        feed(srv, fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 100)), fdp)
    elif not srv.over:
        assert srv.take_app() == b""


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    what = fdp.ConsumeIntInRange(0, 2)
    if what == 0:
        readers(fdp)
    elif what == 1:
        srv = server(fdp)
        feed(srv, fdp.ConsumeBytes(fdp.remaining_bytes()), fdp)
        assert not srv.established
        assert srv.take_app() == b""
    else:
        handshake(fdp)


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
