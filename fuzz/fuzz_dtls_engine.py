"""Fuzz corem's own DTLS engine (corem/dtls/engine) at every parser of untrusted bytes: records
(with and without CID), handshake fragments and messages, extensions, certificates, EC points and
signatures, stored sessions (plain and sealed); and the engine itself, fed a real handshake (PSK,
or ECDHE-ECDSA with a device certificate) from its client role with fuzzer-chosen
mutations, drops, repeats and injected datagrams at any step, and an established session fed
arbitrary records.  Nothing but DtlsDecodeError leaves a parser; nothing at all leaves the
engine; no session exists without the key; no unauthenticated peer is sent more than it sent."""

import sys

import atheris
from pki import CA, DER, DEVICE, SERVER

with atheris.instrument_imports():
    from corem.dtls.engine import Client, DtlsDecodeError, Engine, EngineParams, Params
    from corem.dtls.engine import certs
    from corem.dtls.engine import messages as m
    from corem.dtls.engine import state as session_state
    from corem.dtls.engine.crypto import IMPLEMENTED
    from corem.dtls.engine.records import parse_record_untrusted

PSK = b"0123456789abcdef"
KEYS = {b"device-1": PSK}
PEER = ("192.0.2.10", 40000)
SEAL_KEY = bytes(range(16))


SERVER_PARAMS = EngineParams(certificate_chain=(SERVER[0].public_bytes(DER),), private_key=SERVER[1],
                             verify_peer=certs.chain_verifier([CA[0]]), client_auth="optional")
ECDHE_CLIENT = Params(suites=tuple(s for s in IMPLEMENTED if s.kx == "ecdhe_ecdsa"),
                      certificate_chain=(DEVICE[0].public_bytes(DER),), private_key=DEVICE[1],
                      verify_peer=certs.chain_verifier([CA[0]]))
VERIFY = certs.chain_verifier([CA[0]])
DEVICE_DER = DEVICE[0].public_bytes(DER)
EPHEMERAL, _ = certs.ephemeral()


def _established() -> tuple[bytes, bytes]:
    """A session's state (bytes) and a genuine record for it, made once"""
    eng = Engine(KEYS.get)
    cl = Client(b"device-1", PSK)
    cl.start(0.0)
    for _ in range(6):
        for d in cl.datagrams_to_send():
            eng.receive(d, PEER, 0.0)
        for d, _p in eng.datagrams_to_send():
            cl.receive(d, 0.0)
    saved = eng.export(PEER)
    assert saved is not None
    return saved.to_bytes(), cl.wrap(b"genuine")


STATE, RECORD = _established()

PARSERS = (
    m.parse_fragments_untrusted, m.parse_client_hello_untrusted, m.parse_server_hello_untrusted,
    m.parse_psk_client_key_exchange_untrusted, m.parse_finished_untrusted,
    m.parse_hello_verify_request_untrusted,
    m.parse_cid_extension_untrusted, session_state.SessionState.from_bytes_untrusted,
    lambda b: session_state.open_sealed_untrusted(b, SEAL_KEY),
    m.parse_supported_groups_untrusted, m.parse_signature_algorithms_untrusted,
    m.parse_point_formats_untrusted,
    m.parse_certificate_untrusted, m.parse_server_key_exchange_ecdhe_untrusted,
    m.parse_certificate_request_untrusted, m.parse_ecdhe_client_key_exchange_untrusted,
    m.parse_certificate_verify_untrusted, certs.leaf_key_untrusted,
    lambda b: certs.ecdh_untrusted(EPHEMERAL, b),
    lambda b: certs.verify_untrusted(EPHEMERAL.public_key(), b, b"data", "fuzz"),
)

try:  # the server's PSK flights in C (_flights.c): any bytes in, None or an answer out, never an error
    from corem.dtls.engine import _flights

    PARSERS += (
        lambda b: _flights.server_hello(b, 1, repr(PEER).encode(), [b"k" * 32, b"j" * 32], b"\xc0\xa8\x00\xc0\xae\x01",
                                        True, b"r" * 32, b"c" * 6, 1200),
        lambda b: _flights.psk_finish(b, KEYS.get, 2, b"t" * 100, b"c" * 32, b"s" * 32, 0, True, b"", b"", 2, 3, 1200),
        lambda b: _flights.psk_finish(b, KEYS.get, 2, b"", b"c" * 32, b"s" * 32, 2, False, b"\x01" * 6, b"\x02",
                                      2, 3, 1200),
    )
except ImportError:  # (not built, or a pure-Python run: the engine's own path is what is fuzzed)
    pass


def parsers(fdp: atheris.FuzzedDataProvider) -> None:
    data = fdp.ConsumeBytes(fdp.remaining_bytes())
    for cid_length in (0, 6):
        offset = 0
        while offset < len(data):
            try:
                rec, offset = parse_record_untrusted(data, offset, cid_length)
            except DtlsDecodeError:
                break
            assert 0 <= rec.seq < 1 << 48
    for parse in PARSERS:
        try:
            parse(data)
        except DtlsDecodeError:
            pass
    try:
        hello = m.parse_client_hello_untrusted(data)
        hello.cid_offered()
    except DtlsDecodeError:
        pass
    assert VERIFY([data]) is None  # (a certificate chain the fuzzer wrote never verifies)


def certificate(fdp: atheris.FuzzedDataProvider) -> None:
    """A real device certificate, mutated, through the X.509 checks"""
    der = mutate(fdp, DEVICE_DER)
    try:
        certs.leaf_key_untrusted(der)
    except DtlsDecodeError:
        pass
    identity = VERIFY([der])
    assert identity is None or der == DEVICE_DER or identity == certs.fingerprint(der)


EXTREMES = (b"\x00\x00", b"\x00\x01", b"\x00\xff", b"\x01\x00", b"\x7f\xff", b"\xff\xfe", b"\xff\xff")


def mutate(fdp: atheris.FuzzedDataProvider, d: bytes) -> bytes:
    how = fdp.ConsumeIntInRange(0, 4)
    if how == 0 or not d:
        return d
    if how == 4:  # a length, a number, an epoch or a message_seq at its edges
        at = fdp.ConsumeIntInRange(0, max(0, len(d) - 2))
        return d[:at] + EXTREMES[fdp.ConsumeIntInRange(0, len(EXTREMES) - 1)] + d[at + 2:]
    if how == 1:
        b = bytearray(d)
        for _ in range(fdp.ConsumeIntInRange(1, 4)):
            b[fdp.ConsumeIntInRange(0, len(b) - 1)] = fdp.ConsumeIntInRange(0, 255)
        return bytes(b)
    if how == 2:
        return d[:fdp.ConsumeIntInRange(0, len(d))]
    return d + fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 40))


def handshake(fdp: atheris.FuzzedDataProvider) -> None:
    ecdhe = fdp.ConsumeBool()
    eng = Engine(KEYS.get, SERVER_PARAMS)
    if ecdhe:
        cl = Client(b"", b"", cid=None if fdp.ConsumeBool() else b"", params=ECDHE_CLIENT)
    else:
        cl = Client(b"device-1", PSK, cid=None if fdp.ConsumeBool() else b"")
    cl.start(0.0)
    now = 0.0
    for _ in range(fdp.ConsumeIntInRange(1, 8)):
        for d in cl.datagrams_to_send():
            for _copy in range(fdp.ConsumeIntInRange(0, 2)):  # dropped, delivered, repeated
                eng.receive(mutate(fdp, d), PEER, now)
        if fdp.ConsumeBool():
            eng.receive(fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 120)), PEER, now)
        for d, _p in eng.datagrams_to_send():
            if fdp.ConsumeBool():
                cl.receive(mutate(fdp, d), now)
        now += fdp.ConsumeIntInRange(0, 3)
        eng.tick(now)
        cl.tick(now)
    for conn in eng.sessions.values():
        assert conn.identity in (b"device-1", certs.fingerprint(DEVICE[0].public_bytes(DER)), b"")
    st = eng.stats
    assert st.bytes_out_unauthenticated <= st.bytes_in


def session(fdp: atheris.FuzzedDataProvider) -> None:
    eng = Engine(KEYS.get)
    raw = mutate(fdp, STATE) if fdp.ConsumeBool() else STATE
    try:
        saved = session_state.SessionState.from_bytes_untrusted(raw)
        eng.restore(saved, PEER, 0.0)
    except DtlsDecodeError:
        return
    except ValueError:
        return  # (a state of a client, or of another CID length: refused by restore)
    for i in range(fdp.ConsumeIntInRange(1, 4)):
        d = mutate(fdp, RECORD) if fdp.ConsumeBool() else fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 100))
        eng.receive(d, ("198.51.100.1", i), float(i))
        eng.datagrams_to_send()
    eng.wrap(b"answer", PEER)


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    mode = fdp.ConsumeIntInRange(0, 4)
    if mode == 4:
        certificate(fdp)
    elif mode <= 1:
        parsers(fdp)
    elif mode == 2:
        handshake(fdp)
    else:
        session(fdp)


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
