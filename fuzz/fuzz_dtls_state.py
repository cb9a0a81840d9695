"""Fuzz the stored DTLS session (corem/dtls/engine/state.py), the one parser of untrusted bytes that
reads what a database -- possibly one other nodes write -- hands back: `from_bytes_untrusted` (the
versioned record) and `open_sealed_untrusted` (its AEAD-sealed form), then the engine and the
security layer restoring what they return.

Inputs: arbitrary bytes; genuine states (PSK sessions of each suite, with and without a CID, a
client's) mutated at a byte, a length, a number at its edges, cut short or grown; fuzzer-chosen
plaintexts sealed under the right key (what a node with the key, or a later version, could write);
genuine sealed blobs mutated, or opened under the wrong key or for the wrong row; and rows of the
session store restored by `EngineServer` when their peer sends.

What must hold: a parser returns only a valid session -- one that encodes back to exactly the bytes
it came from, with a known suite, keys and IVs of that suite's lengths, epoch 1 and record numbers
in range -- or raises DtlsDecodeError, nothing else; a sealed blob opens only when it is the very
blob sealed for that row under that key; the engine restores a valid session (or refuses a client's
or another CID length's with ValueError) and what it restored then takes arbitrary records without
an exception; the layer turns no row but a genuine one into a session, and raises nothing.  The
marks the bus carries (rows of packs): the lane's C fold and its Python twin agree, on a refusal's reason too,
and the store folds any rows at a restore without an exception."""

import sys
import threading
from pathlib import Path

import atheris

with atheris.instrument_imports():
    from corem.dtls import DtlsParams
    from corem.dtls.engine import Client, DtlsDecodeError, Engine, EngineParams, Params
    from corem.dtls.engine import state as st
    from corem.dtls.engine.crypto import PSK_AES_128_CCM, PSK_AES_128_CCM_8, PSK_AES_128_GCM_SHA256, SUITES
    from corem.dtls.engine.records import SEQ_MAX
    from corem.dtls.layer import BLOB_TAG, EngineServer
    from corem.dtls.store import SessionStore, _fold_packs, fold_packs, pack_marks, peer_key
    from corem.registry import Device

PSK = b"0123456789abcdef"
KEYS = {b"device-1": PSK}
PEER = ("192.0.2.10", 40000)
SEAL_KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
CONTEXT = peer_key(PEER)
DEVICE = Device(tenant="t", device="device-1", psk_identity="device-1", psk=PSK)


def _session(suite: int, cid: bytes | None) -> tuple[bytes, bytes, bytes]:
    """A genuine server session's state, its client's state, and a record the client sent after it"""
    suites = (SUITES[suite],)
    eng = Engine(KEYS.get, EngineParams(suites=suites))
    cl = Client(b"device-1", PSK, cid=cid, params=Params(suites=suites))
    cl.start(0.0)
    for _ in range(6):
        for d in cl.datagrams_to_send():
            eng.receive(d, PEER, 0.0)
        for d, _p in eng.datagrams_to_send():
            cl.receive(d, 0.0)
    saved = eng.export(PEER)
    assert saved is not None and cl.established
    return saved.to_bytes(), st.export(cl.conn).to_bytes(), cl.wrap(b"genuine")


SESSIONS = [_session(PSK_AES_128_CCM_8.code, b""), _session(PSK_AES_128_CCM_8.code, None),
            _session(PSK_AES_128_CCM.code, b"\x01\x02"), _session(PSK_AES_128_GCM_SHA256.code, b"")]
STATES = [s for server, client, _ in SESSIONS for s in (server, client)]
EXTREMES = (b"\x00\x00", b"\x00\x01", b"\x00\xff", b"\x01\x00", b"\x7f\xff", b"\x80\x00", b"\xff\xfe",
            b"\xff\xff")


def mutate(fdp: atheris.FuzzedDataProvider, d: bytes) -> bytes:
    how = fdp.ConsumeIntInRange(0, 5)
    if how == 0 or not d:
        return d
    if how == 1:
        b = bytearray(d)
        for _ in range(fdp.ConsumeIntInRange(1, 4)):
            b[fdp.ConsumeIntInRange(0, len(b) - 1)] = fdp.ConsumeIntInRange(0, 255)
        return bytes(b)
    if how == 2:
        return d[:fdp.ConsumeIntInRange(0, len(d))]
    if how == 3:
        at = fdp.ConsumeIntInRange(0, len(d))
        return d[:at] + fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 40)) + d[at:]
    if how == 4:  # a length, a number, the suite, the epoch at its edges
        at = fdp.ConsumeIntInRange(0, max(0, len(d) - 2))
        return d[:at] + EXTREMES[fdp.ConsumeIntInRange(0, len(EXTREMES) - 1)] + d[at + 2:]
    at = fdp.ConsumeIntInRange(0, len(d))  # bytes dropped from the middle
    return d[:at] + d[at + fdp.ConsumeIntInRange(1, 8):]


def check(state: st.SessionState, data: bytes) -> None:
    """What a parser may return: a valid session, encoded by exactly these bytes"""
    assert isinstance(state, st.SessionState)
    assert state.to_bytes() == bytes(data), "not the one encoding of what was parsed"
    suite = SUITES[state.suite]
    assert state.role in st.ROLES and state.epoch == 1
    assert len(state.read_key) == len(state.write_key) == suite.key_length
    assert len(state.read_iv) == len(state.write_iv) == suite.iv_length
    assert 0 <= state.write_seq <= SEQ_MAX and -1 <= state.window_top <= SEQ_MAX
    assert 0 <= state.window_bits < 1 << 64


def parse(data: bytes) -> st.SessionState | None:
    try:
        state = st.SessionState.from_bytes_untrusted(data)
    except DtlsDecodeError:
        return None
    check(state, data)
    return state


def unseal(blob: bytes, key: bytes, context: bytes) -> st.SessionState | None:
    try:
        state = st.open_sealed_untrusted(blob, key, context)
    except DtlsDecodeError:
        return None
    return state


def restore(fdp: atheris.FuzzedDataProvider, state: st.SessionState) -> None:
    """The engine takes it over (or refuses a client's, or another CID length's), then arbitrary
    records and genuine ones come for it"""
    eng = Engine(KEYS.get)
    try:
        eng.restore(state, PEER, 0.0)
    except ValueError:
        assert state.role != "server" or len(state.cid_in) not in (0, eng.params.cid_length)
        return
    assert eng.sessions[PEER].state == "established"
    for i in range(fdp.ConsumeIntInRange(0, 3)):
        _, _, record = SESSIONS[fdp.ConsumeIntInRange(0, len(SESSIONS) - 1)]
        d = mutate(fdp, record) if fdp.ConsumeBool() else fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 80))
        eng.receive(d, PEER if fdp.ConsumeBool() else ("198.51.100.1", i), float(i))
        eng.datagrams_to_send()
    eng.wrap(b"answer", PEER)


def plain(fdp: atheris.FuzzedDataProvider) -> None:
    if fdp.ConsumeBool():
        data = mutate(fdp, STATES[fdp.ConsumeIntInRange(0, len(STATES) - 1)])
    else:
        data = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 200))
    state = parse(data)
    if state is not None:
        restore(fdp, state)


def sealed(fdp: atheris.FuzzedDataProvider) -> None:
    how = fdp.ConsumeIntInRange(0, 2)
    if how == 0:  # a plaintext of the fuzzer's, sealed under the right key: the parser behind the seal
        if fdp.ConsumeBool():
            data = mutate(fdp, STATES[fdp.ConsumeIntInRange(0, len(STATES) - 1)])
        else:
            data = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 200))
        nonce = bytes(12)
        blob = nonce + st.AESGCM(SEAL_KEY).encrypt(nonce, data, st.SEAL_AAD + CONTEXT)
        state = unseal(blob, SEAL_KEY, CONTEXT)
        if state is not None:
            check(state, data)
        else:
            assert parse(data) is None
        return
    genuine = st.SessionState.from_bytes_untrusted(STATES[fdp.ConsumeIntInRange(0, len(STATES) - 1)])
    blob = st.seal(genuine, SEAL_KEY, CONTEXT)
    if how == 1:  # the blob mutated (or not), or arbitrary bytes
        data = mutate(fdp, blob) if fdp.ConsumeBool() else fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 200))
        state = unseal(data, SEAL_KEY, CONTEXT)
        assert (state == genuine) if data == blob else state is None
        return
    # the genuine blob under another key, or for another row
    key, context = (OTHER_KEY, CONTEXT) if fdp.ConsumeBool() else (SEAL_KEY, mutate(fdp, CONTEXT))
    state = unseal(blob, key, context)
    assert (state == genuine) if (key, context) == (SEAL_KEY, CONTEXT) else state is None


def layer(fdp: atheris.FuzzedDataProvider) -> None:
    """A row of the session store, sealed or not, genuine or not, restored when its peer sends"""
    srv = EngineServer({"device-1": DEVICE}.get, DtlsParams(checkpoint=False), state_key=SEAL_KEY,
                       store=SessionStore(), device_lookup=lambda tenant, name: DEVICE)
    server_state, _, record = SESSIONS[1]  # (no CID: its row is found by address)
    genuine = st.SessionState.from_bytes_untrusted(server_state)
    blob = BLOB_TAG + st.seal(genuine, SEAL_KEY, CONTEXT)
    how = fdp.ConsumeIntInRange(0, 3)
    if how == 0:
        row_blob = blob
    elif how == 1:
        row_blob = mutate(fdp, blob)
    elif how == 2:  # a plain state, or a pickle's worth of bytes, where a sealed one belongs
        row_blob = mutate(fdp, server_state) if fdp.ConsumeBool() else fdp.ConsumeBytes(100)
    else:
        row_blob = BLOB_TAG + fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 150))
    srv.store.put([(CONTEXT, row_blob, "t", "device-1", 0.0, fdp.ConsumeIntInRange(-1, 3))])
    srv.offloaded.add(CONTEXT)
    out = srv.receive(record if fdp.ConsumeBool() else mutate(fdp, record), PEER, 1.0)
    srv.datagrams_to_send()
    if row_blob != blob:
        assert PEER not in srv.sessions and not out
    elif PEER in srv.sessions:
        assert srv.sessions[PEER].identity == b"device-1"


def marks(fdp: atheris.FuzzedDataProvider) -> None:
    """Rows of the session store's marks log (packs the bus carries: bus/sqlite.py `carry`, or the
    store's own log of them), genuine, mutated or
    arbitrary, folded by the lane's C `fold_marks` and by its Python twin, and by the store's fold
    and its restore."""
    genuine = [pack_marks([(fdp.ConsumeIntInRange(-1, 2**63 - 1), fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 20)))
                           for _ in range(fdp.ConsumeIntInRange(0, 4))]) for _ in range(fdp.ConsumeIntInRange(0, 3))]
    rows = [p if fdp.ConsumeBool() else mutate(fdp, p) for p in genuine]
    if fdp.ConsumeBool():
        rows.append(fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 60)))
    try:
        want = _fold_packs(rows)
    except ValueError as e:
        try:
            fold_packs(rows)
        except ValueError as c_error:
            assert str(c_error) == str(e)
        else:
            raise AssertionError("the C fold took what its twin refused")
    else:
        assert fold_packs(rows) == want
    store = SessionStore()
    if fdp.ConsumeBool():  # the packs the bus carries (in memory here)
        store.read_marks_from(Path(":memory:"), threading.Lock())
        table, unread = "bus.carried", "SELECT count(*) FROM bus.carried WHERE n > (SELECT upto FROM rx_folded)"
    else:  # the store's own log of them (a sink that cannot carry them: Kafka)
        store.log_marks_here()
        table, unread = "rx_packs", "SELECT count(*) FROM rx_packs"
    store.put([(CONTEXT, b"row", "t", "device-1", 0.0, 0)])
    for row in rows:
        store.db.execute(f"INSERT INTO {table} (blob) VALUES (?)", (row,))
    if fdp.ConsumeBool():  # (a row that is no blob at all: TEXT stays TEXT in SQLite)
        store.db.execute(f"INSERT INTO {table} (blob) VALUES (?)", (fdp.ConsumeUnicodeNoSurrogates(20),))
    taken = store.take(CONTEXT)  # (folds first, whatever the rows: never an exception)
    assert taken is not None and taken[5] >= 0 and store.db.execute(unread).fetchone()[0] == 0


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    mode = fdp.ConsumeIntInRange(0, 4)
    if mode <= 1:
        plain(fdp)
    elif mode == 2:
        sealed(fdp)
    elif mode == 3:
        layer(fdp)
    else:
        marks(fdp)


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
