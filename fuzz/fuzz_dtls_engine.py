"""Fuzz corem's own DTLS engine (corem/dtls/engine) at every parser of untrusted bytes: records
(with and without CID), handshake fragments and messages, extensions, stored sessions (plain and
sealed); and the engine itself, fed a real handshake from its client role with fuzzer-chosen
mutations, drops, repeats and injected datagrams at any step, and an established session fed
arbitrary records.  Nothing but DtlsDecodeError leaves a parser; nothing at all leaves the
engine; no session exists without the key; no unauthenticated peer is sent more than it sent."""

import sys

import atheris

with atheris.instrument_imports():
    from corem.dtls.engine import Client, DtlsDecodeError, Engine
    from corem.dtls.engine import messages as m
    from corem.dtls.engine import state as session_state
    from corem.dtls.engine.records import parse_record_untrusted

PSK = b"0123456789abcdef"
KEYS = {b"device-1": PSK}
PEER = ("192.0.2.10", 40000)
SEAL_KEY = bytes(range(16))


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
    m.parse_psk_client_key_exchange_untrusted, m.parse_finished_untrusted, m.parse_hello_verify_request_untrusted,
    m.parse_cid_extension_untrusted, session_state.SessionState.from_bytes_untrusted,
    lambda b: session_state.open_sealed_untrusted(b, SEAL_KEY),
)


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


def mutate(fdp: atheris.FuzzedDataProvider, d: bytes) -> bytes:
    how = fdp.ConsumeIntInRange(0, 3)
    if how == 0 or not d:
        return d
    if how == 1:
        b = bytearray(d)
        for _ in range(fdp.ConsumeIntInRange(1, 4)):
            b[fdp.ConsumeIntInRange(0, len(b) - 1)] = fdp.ConsumeIntInRange(0, 255)
        return bytes(b)
    if how == 2:
        return d[:fdp.ConsumeIntInRange(0, len(d))]
    return d + fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 40))


def handshake(fdp: atheris.FuzzedDataProvider) -> None:
    eng = Engine(KEYS.get)
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
        assert conn.identity == b"device-1"
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
    mode = fdp.ConsumeIntInRange(0, 3)
    if mode <= 1:
        parsers(fdp)
    elif mode == 2:
        handshake(fdp)
    else:
        session(fdp)


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
