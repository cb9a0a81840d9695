"""Fuzz the fast lane (corem/fastlane/_lane.c) against the Python path: the fuzzer's bytes become a
sequence of datagrams (a telemetry POST template, CBOR or JSON, or a Drogue `/v1/{channel}` one with
its query and option 4209, it mutates, or raw bytes), bus verdicts, clock
steps and new DTLS sessions, fed to the lane in front of the Python path and to the Python path
alone; or (a quarter of the inputs) CoAPS records of a session of corem's DTLS engine, which the
lane opens itself in front of the engine (`DtlsTwin`: replays, forgeries, cuts, two records in a
datagram, an alert, another address); or (another quarter) OSCORE requests of a device whose context
the lane holds (`oscore_input`: sealed from the fuzzer's choices -- number, inner options, payload,
type, method -- and then maybe mutated; forged, replayed, retransmitted).  Both must store and answer
the same, and nothing may escape.  (Eviction under the dedup
bound is tested in tests/test_fastlane.py: the lane also remembers datagrams the codec then
refuses, so the two fill their bounds at different rates.)"""

import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

with atheris.instrument_imports():
    from corem.codec import Code, Message, Type, encode
    from corem.codec import OptionNumber as O
    from corem.codec.options import UNDERSTOOD_CRITICAL
    from corem.devices.downlink import Downlink
    from corem.frontdoors.drogue import Drogue
    from corem.identity import session_identity
    from corem.oscore import Oscore
    from corem.oscore import layer as oscore_layer
    from corem.oscore.context import derive
    from corem.oscore.protect import aad, plaintext
    from corem.registry.db import Db
    from corem.registry.management import Management
    from corem.registry.oscore import OscoreState
    from corem.registry.store import OscoreKeys
    from tests.lane_twin import Twin

from cryptography.hazmat.primitives.ciphers.aead import AESCCM

TWIN = Twin()
#: an OSCORE device of the default profile, and one with a kid context of ThingsBoard's (oscore_input)
OSCORE_KEYS = (OscoreKeys(sender_id=b"\x01", recipient_id=b"\x02", secret=b"0123456789abcdef0123", salt=b"\x9e\x7c"),
               OscoreKeys(sender_id=b"", recipient_id=b"\x07" * 7, secret=bytes(range(16)), id_context=b"\x37\xcb"))
TWIN.registry.add_device("acme", "os-1", oscore=OSCORE_KEYS[0])
TWIN.registry.add_device("acme", "os-2", oscore=OSCORE_KEYS[1], profile="tb")
TWIN.directory.refresh(force=True)
oscore_layer.secrets.token_bytes = lambda n: b"E" * n  # (an Echo value both sides choose alike)
#: the Drogue channels the lane is told the door serves (as the door's first request tells it)
CHANNELS = ("telemetry", "state")


def mount_drogue(router, ingest, sink, lane, session=None) -> None:
    """Drogue's door on a side's router (as `corem serve` mounts it), its channels the lane's."""
    downlink = Downlink(Management(TWIN.registry), sink, clock=lambda: TWIN.clock[0])
    Drogue(TWIN.directory, ingest, downlink, lambda: TWIN.clock[0]).install(router, session)
    for channel in CHANNELS:
        if lane is not None:
            lane.lane.drogue(channel)


def reset_twin() -> None:
    TWIN.reset()
    for side in (TWIN.lane, TWIN.python):
        mount_drogue(side.router, side.ingest, side.sink, side.lane)


def post(token: bytes, cf: int, payload: bytes) -> bytes:
    """A CON POST api/v1/{token}/telemetry of `payload` in Content-Format `cf`: a template."""
    return encode(Message(Type.CON, Code.POST, 0x1234, b"\x01\x02",
                          [(O.URI_PATH, b"api"), (O.URI_PATH, b"v1"), (O.URI_PATH, token), (O.URI_PATH, b"telemetry"),
                           (O.CONTENT_FORMAT, bytes([cf]))], payload))


#: a tests/lane_twin.py PROTO_ALL message: a double, int32 -7, uint64 max, sint32 -3, a bool, text, an
#: enum, an optional, nested messages two deep and a ts
PBA = ("09000000000080364018f9ffffffffffffffff0130ffffffffffffffffff013805680172026f6e78018101000000000000f83f"
       "8a010b0a016110021a0408011001900180d095ffbc31")

#: the templates the fuzzer mutates, one a shape the lane decodes in C (a NON of each when the
#: type bits flip), each for a device of tests/lane_twin.py on the profile that reads it
TEMPLATES = (
    # the default profile's flat map, CBOR and JSON
    post(b"T1", 60, b"\xa3\x61a\xf9\x3e\x00\x61b\x18\x2a\x62ts\x1b\x00\x00\x01\x8b\xcf\xe5\x68\x00"),
    post(b"T1", 50, b'{"a": 1.5, "b": -42, "s": "on", "d": true, "ts": 1700000000000}'),
    # ThingsBoard's {ts, values}, and an array of entries with nested values (flattened)
    post(b"TB", 50, b'{"ts": 1700000000000, "values": {"a": 1.5, "s": "on", "ts": 2}}'),
    post(b"TB", 50, b'[{"ts": 1, "values": {"m": {"fw": "1.2", "hw": [3, {"r": true}]}}}, {"a": 1}]'),
    post(b"TBJ", 50, b'{"m": {"fw": "1.2", "hw": [3, 4.50, -0, {"r": true}], "n": null}, "t": 1}'),  # nested: json
    post(b"TBJ", 60, bytes.fromhex("a2616da362667763312e32626877853b7ffffffffffffffff93c00fa3fc00000a16172f5fb80"
                                   "00000000000000616ef6617401")),  # nested: json, CBOR (cbor_text)
    # Cayenne LPP: temperature, humidity, GPS (lpp.h)
    post(b"LPP", 42, bytes.fromhex("03670110" "0268" "50" "0188" "06765ff2960a0003e8")),
    # a profile with every kind of field rule (RULED: rules.h)
    post(b"RU", 50, b'{"t_raw": 652, "hum": 40, "state": "idle", "x": 1, "label": "a", "same": 2}'),
    # a positional array and a binary layout (ARRAY, BINARY: layouts.h)
    post(b"AR", 60, bytes.fromhex("85f93e00006131" "1b0000018bcfe56800" "6469646c65" "1841")),
    post(b"BIN", 42, bytes(range(85))),
    # SenML, JSON and CBOR (senml.h)
    post(b"SML", 110, b'[{"bn":"d:","bt":1700000000,"bu":"V","n":"v","v":1.5,"s":2},{"n":"m","vs":"on"}]'),
    post(b"SML", 112, bytes.fromhex("82a52162643a221a6553f1000061740219015e016343656c" "a200616d04f5")),
    # readings a Python decoder gives the lane from its batch (pycodec.h): a JS codec
    post(b"JS", 42, bytes.fromhex("CBF60B0D0376010ADD0102")),
    # protobuf read in C (proto.h): {ts, values}; every kind, nested flattened (PBA), refused (PBR), as JSON (PBJ)
    post(b"PB", 42, bytes.fromhex("0880d095ffbc311214090000000000803640" "10411a0772756e6e696e67")),
    post(b"PBA", 42, bytes.fromhex(PBA)),
    post(b"PBR", 42, bytes.fromhex(PBA)),
    post(b"PBJ", 42, bytes.fromhex(PBA)),  # (nested: json -- the profile's decoder, from the lane's batch)
)


def with_mid(datagram: bytes, mid: int) -> bytes:
    return datagram[:2] + mid.to_bytes(2, "big") + datagram[4:]


def drogue(channel: bytes, query: list[bytes], auth: bytes | None, cf: int, payload: bytes, *, code: int = Code.POST,
           mtype: int = Type.CON) -> bytes:
    """Drogue's `POST|PUT /v1/{channel}?query` with option 4209 `auth`: a template."""
    options = [(O.URI_PATH, b"v1"), (O.URI_PATH, channel), (O.CONTENT_FORMAT, bytes([cf]))]
    options += [(O.URI_QUERY, q) for q in query] + ([(O.DROGUE_AUTH, auth)] if auth is not None else [])
    return encode(Message(mtype, code, 0x2345, b"\x03", options, payload))


TEMPLATES += (
    # Drogue's door: 4209 as Basic device@application:password, bare base64 with ?application=, a PUT,
    # a NON, the query's data_schema, application and device (drogue.h)
    drogue(b"telemetry", [b"data_schema=urn:s"], b"Basic ZDFAYWNtZTpUMQ==", 60, b"\xa2\x61a\xf9\x3e\x00\x61s\x62on"),
    drogue(b"state", [b"application=acme"], b"dGItMTpUQg==", 50, b'{"ts": 1700000000000, "values": {"a": 1.5}}',
           code=Code.PUT),
    drogue(b"telemetry", [b"application=acme", b"device=lpp-1", b"x=1"], b"Basic bHBwLTFAYWNtZTpMUFA=", 42,
           bytes.fromhex("03670110"), mtype=Type.NON),
)
PEERS = [("127.0.0.1", 40000), ("127.0.0.1", 40001), ("::1", 40000, 0, 0)]


class OscoreDevice:
    """The device's side of a context: seals the requests the fuzzer describes."""

    def __init__(self, keys: OscoreKeys) -> None:
        _, corem_recv, iv = derive(keys.secret, keys.salt, keys.sender_id, keys.recipient_id, keys.id_context)
        self.send, self.iv, self.kid, self.ctx = AESCCM(corem_recv, 8), int.from_bytes(iv, "big"), keys.recipient_id, keys.id_context

    def seal(self, seq: int, inner: list, payload: bytes, *, code: int = Code.POST, mtype: int = Type.CON,
             mid: int = 0x3456) -> bytes:
        piv = seq.to_bytes(5, "big").lstrip(b"\x00") or b"\x00"
        nonce = ((len(self.kid) << 96 | int.from_bytes(self.kid, "big") << 40 | seq) ^ self.iv).to_bytes(13, "big")
        sealed = self.send.encrypt(nonce, plaintext(code, inner, payload), aad(self.kid, piv))
        flags = len(piv) | 0x08 | (0x10 if self.ctx is not None else 0)
        option = bytes((flags,)) + piv + (b"" if self.ctx is None else bytes((len(self.ctx),)) + self.ctx) + self.kid
        return encode(Message(mtype, Code.POST, mid, b"\x0a\x0b", [(O.OSCORE, option)], sealed))


OSCORE_DEVICES = [OscoreDevice(k) for k in OSCORE_KEYS]
#: the inner requests' options: /telemetry (CBOR, JSON), ThingsBoard's x509 path, a token path, no
#: Content-Format, another path, Drogue's, Observe, Echo, an unknown critical option
OSCORE_INNER = (
    [(O.URI_PATH, b"telemetry"), (O.CONTENT_FORMAT, b"\x3c")],
    [(O.URI_PATH, b"telemetry"), (O.CONTENT_FORMAT, b"\x32")],
    [(O.URI_PATH, b"api"), (O.URI_PATH, b"v1"), (O.URI_PATH, b"telemetry"), (O.CONTENT_FORMAT, b"\x32")],
    [(O.URI_PATH, b"api"), (O.URI_PATH, b"v1"), (O.URI_PATH, b"T1"), (O.URI_PATH, b"telemetry"),
     (O.CONTENT_FORMAT, b"\x3c")],
    [(O.URI_PATH, b"telemetry")],
    [(O.URI_PATH, b"other"), (O.CONTENT_FORMAT, b"\x3c")],
    [(O.URI_PATH, b"v1"), (O.URI_PATH, b"telemetry"), (O.CONTENT_FORMAT, b"\x3c")],
    [(O.OBSERVE, b""), (O.URI_PATH, b"telemetry"), (O.CONTENT_FORMAT, b"\x3c")],
    [(O.URI_PATH, b"telemetry"), (O.CONTENT_FORMAT, b"\x3c"), (O.ECHO, b"EEEEEEEE")],
    [(O.URI_PATH, b"telemetry"), (O.CONTENT_FORMAT, b"\x3c"), (2049, b"")],
)


class DtlsTwin:
    """CoAPS on corem's engine, twice, from one saved session (so both seal and open alike): the
    lane opening records in front (`FastLane.receive_record`, what `drain_records` does per
    datagram) and the Python path alone.  The same datagrams must give the same answers, the same
    stored readings and the same engine counters."""

    def __init__(self) -> None:
        import tempfile

        from corem.coap import Endpoint, Params, Router
        from corem.dtls import DtlsParams
        from corem.dtls.engine import Client
        from corem.dtls.layer import EngineServer
        from corem.ingest.diagnostics import Diagnostics
        from corem.ingest.telemetry import TelemetryIngest
        from corem.registry import Directory, Registry
        from tests.lane_twin import RecordingSink

        self._parts = (Endpoint, Params, Router, DtlsParams, EngineServer, Diagnostics, TelemetryIngest,
                       RecordingSink)
        self.tmp = tempfile.TemporaryDirectory(prefix="corem-fuzz-dtls-")
        registry = Registry(Path(self.tmp.name) / "registry.db")
        registry.add_device("acme", "d1", token="T1", psk_identity="fuzz-psk", psk=b"fuzz-psk-key-0001")
        self.directory = Directory(registry)
        self.directory.refresh()
        # one handshake, its session saved; each input restores it on both sides
        server = self._layer()
        client = Client(b"fuzz-psk", b"fuzz-psk-key-0001", cid=b"")
        client.start(0.0)
        for _ in range(10):
            for d in client.datagrams_to_send():
                server.receive(d, PEERS[0], 0.0)
            for d, _ in server.datagrams_to_send():
                client.receive(d, 0.0)
        assert client.established, "no handshake"
        self.saved = server.engine.export(PEERS[0])
        self.cid_length = len(server.engine.sessions[PEERS[0]].cid_in)
        #: records the device sends: readings (lane), a NON, a GET, CBOR the lane leaves, a token path
        messages = [TEMPLATES[0][:2] + bytes((0, mid)) + TEMPLATES[0][4:] for mid in range(1, 9)] + [
            bytes((0x50,)) + TEMPLATES[0][1:], encode(Message(Type.CON, Code.GET, 77, b"\x07", [(O.URI_PATH, b"x")])),
            encode(Message(Type.CON, Code.POST, 78, b"\x08", [(O.URI_PATH, b"telemetry"), (O.CONTENT_FORMAT, b"\x3c")],
                           b"\xa1\x61a\x82\x01\x02")),
            encode(Message(Type.CON, Code.POST, 79, b"\x09", [(O.URI_PATH, b"telemetry"), (O.CONTENT_FORMAT, b"\x3c")],
                           b"\xa1\x61t\xf9\x3e\x00")),
            # Drogue's door: the session's device, and 4209's over it
            with_mid(TEMPLATES[-3], 80),
            with_mid(drogue(b"telemetry", [b"device=d1"], None, 60, b"\xa1\x61t\xf9\x3e\x00"), 81),
        ]
        self.records = [client.wrap(m) for m in messages]
        self.alert = client.conn._record(1, 21, b"\x01\x00")  # a close_notify, sealed
        self.now = [10.0]
        self.reset()

    def _layer(self):
        _, _, _, DtlsParams, EngineServer, *_ = self._parts
        return EngineServer(self.directory.psk_device, DtlsParams(), state_key=bytes(32),
                            device_lookup=self.directory.named)

    def _side(self, lane: bool):
        Endpoint, Params, Router, _, _, Diagnostics, TelemetryIngest, RecordingSink = self._parts
        from corem.dtls.layer import Session
        from corem.fastlane import FastLane

        sink = RecordingSink()
        ingest = TelemetryIngest(self.directory, sink, Diagnostics(16), clock_ms=lambda: 1_700_000_000_000,
                                 now=lambda: self.now[0])
        endpoint = Endpoint(Params(), rng=lambda: 0.5)
        endpoint.transport = "dtls"
        router = Router()
        layer = self._layer()
        ingest.install(router, session_device=lambda req: req.identity or layer.device(req.peer))
        fast = FastLane(ingest, sink, endpoint) if lane else None
        mount_drogue(router, ingest, sink, fast, lambda req: req.identity or layer.device(req.peer))
        layer.engine.restore(self.saved, PEERS[0], self.now[0])
        conn = layer.engine.sessions[PEERS[0]]
        conn.layer = Session(self.directory.psk_device("fuzz-psk"), b"fuzz")
        if fast is not None:
            assert layer.attach_lane(fast)
        return dict(sink=sink, endpoint=endpoint, router=router, layer=layer, lane=fast)

    def reset(self) -> None:
        self.sides = [self._side(True), self._side(False)]

    def receive(self, datagram: bytes, peer: tuple) -> None:
        from corem.net.udp import deliver

        now = self.now[0] = self.now[0] + 0.001
        for s in self.sides:
            layer, lane, endpoint, router = s["layer"], s["lane"], s["endpoint"], s["router"]
            if lane is not None:
                raw, messages = lane.receive_record(datagram, peer, now, layer.lane_touched)
            else:
                raw, messages = [(datagram, peer)], []
            decrypted = [(m, p) for d, p in raw for m in layer.receive(d, p, now)]
            layer.settle(now)
            for m, p in decrypted:
                if lane is not None:
                    lane.offer(m, p, layer.device(p), now)
                else:
                    messages.append((m, p))
            if lane is not None:
                messages += lane.collect()
            for m, p in messages:
                deliver(endpoint, router, m, p, now)

    def commit(self) -> None:
        for s in self.sides:
            s["sink"].commit()
            if s["lane"] is not None:
                s["lane"].settle()

    def check(self) -> None:
        outs, stored, counts = [], [], []
        for s in self.sides:
            out = s["endpoint"].datagrams_to_send() + (s["lane"].take_outbox() if s["lane"] is not None else [])
            outs.append(sorted(out))
            # (sorted: of two records in one datagram, the lane submits the one it takes first)
            stored.append(sorted((r.topic, r.key, r.value, sorted(r.headers.items())) for r in s["sink"].stored))
            s["sink"].stored = []
            st = s["layer"].engine.stats
            counts.append((st.datagrams_in, st.bytes_in, dict(st.records_dropped), st.address_changes,
                           sorted(s["layer"].sessions)))
        assert outs[0] == outs[1], f"answers differ:\n lane   {outs[0]}\n python {outs[1]}"
        assert stored[0] == stored[1], f"stored differ:\n lane   {stored[0]}\n python {stored[1]}"
        assert counts[0] == counts[1], f"counters differ:\n lane   {counts[0]}\n python {counts[1]}"


DTLS = DtlsTwin()


def dtls_input(fdp: atheris.FuzzedDataProvider) -> None:
    """CoAPS records: the device's (in any order: replays), mutated, cut, two in a datagram, its
    close_notify, from its address or another (a Connection ID move)."""
    DTLS.reset()
    records = DTLS.records
    for _ in range(fdp.ConsumeIntInRange(1, 5)):
        kind = fdp.ConsumeIntInRange(0, 5)
        datagram = bytearray(records[fdp.ConsumeIntInRange(0, len(records) - 1)])
        if kind == 1:  # bytes overwritten (header, CID, ciphertext, tag)
            for _ in range(fdp.ConsumeIntInRange(1, 3)):
                datagram[fdp.ConsumeIntInRange(0, len(datagram) - 1)] = fdp.ConsumeInt(1) & 0xFF
        elif kind == 2:  # cut, or bytes appended
            datagram = datagram[: fdp.ConsumeIntInRange(0, len(datagram))] + fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 8))
        elif kind == 3:  # two records in one datagram
            datagram += records[fdp.ConsumeIntInRange(0, len(records) - 1)]
        elif kind == 4:
            datagram = bytearray(DTLS.alert)
        elif kind == 5:  # raw bytes
            datagram = bytearray(fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 60)))
        DTLS.receive(bytes(datagram), PEERS[fdp.ConsumeIntInRange(0, 1)])
        if fdp.ConsumeBool():
            DTLS.commit()
        DTLS.check()
    DTLS.commit()
    DTLS.check()


def mount_oscore() -> None:
    """OSCORE on both sides' routers (each its own layer and state, as two processes), /telemetry
    mounted as `corem serve` mounts it, and each device's first request served (by Python: from then
    on its context is the lane's)."""
    for side in (TWIN.lane, TWIN.python):
        side.ingest.install(side.router, session_identity(None))
        side.oscore = Oscore(TWIN.directory.oscore_device, OscoreState(Db(":memory:")),
                             UNDERSTOOD_CRITICAL - {O.OSCORE})
        side.router.unwrap = side.oscore.unwrap
    for i, dev in enumerate(OSCORE_DEVICES):
        TWIN.receive(dev.seal(0, OSCORE_INNER[1], b'{"a": 1}', mid=0xFF00 + i))
        TWIN.commit()
    TWIN.check()


def then(fdp: atheris.FuzzedDataProvider, most: int) -> int:
    """What follows a datagram, chosen in 0..most: 0 the bus commits, 1 it fails, 2 time passes
    (the piggyback timeout, retransmissions); a higher choice is the caller's to act on."""
    choice = fdp.ConsumeIntInRange(0, most)
    if choice == 0:
        TWIN.commit()
    elif choice == 1:
        TWIN.commit(RuntimeError("bus down"))
    elif choice == 2:
        TWIN.advance(fdp.ConsumeIntInRange(0, 3000) / 1000)
    return choice


def oscore_input(fdp: atheris.FuzzedDataProvider) -> None:
    """OSCORE requests sealed from the fuzzer's choices (and then maybe mutated: the option, the
    ciphertext, the tag), committed, failed, late, or sent again."""
    for _ in range(fdp.ConsumeIntInRange(1, 5)):
        dev = OSCORE_DEVICES[fdp.ConsumeIntInRange(0, 1)]
        kind = fdp.ConsumeIntInRange(0, 3)
        # the inner request: most often /telemetry (CBOR or JSON), with a payload of a template's
        inner = OSCORE_INNER[fdp.ConsumeIntInRange(0, len(OSCORE_INNER) + 5) % len(OSCORE_INNER)]
        if kind == 2:
            payload = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 40))
        else:
            json = (O.CONTENT_FORMAT, b"\x32") in inner
            template = TEMPLATES[1 + fdp.ConsumeIntInRange(0, 1) if json else 0]  # (flat; ThingsBoard's {ts, values})
            payload = template[template.index(b"\xff") + 1:]
        datagram = bytearray(dev.seal(fdp.ConsumeIntInRange(0, 40), inner, payload,
                                      code=Code.POST if fdp.ConsumeIntInRange(0, 5) else Code.PUT,
                                      mtype=Type.NON if fdp.ConsumeBool() else Type.CON,
                                      mid=fdp.ConsumeIntInRange(0, 0xFFFF)))
        if kind == 3:  # bytes overwritten
            for _ in range(fdp.ConsumeIntInRange(1, 3)):
                datagram[fdp.ConsumeIntInRange(0, len(datagram) - 1)] = fdp.ConsumeInt(1) & 0xFF
        peer = PEERS[fdp.ConsumeIntInRange(0, 2)]
        TWIN.receive(bytes(datagram), peer)
        if then(fdp, 3) == 3:  # its retransmission
            TWIN.receive(bytes(datagram), peer)
        TWIN.check()
    TWIN.commit()
    TWIN.check()
    counters = TWIN.lane.lane.lane.counters()
    assert counters["waiting"] == 0, counters


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    which = fdp.ConsumeIntInRange(0, 3)
    if which == 0:  # a quarter of the inputs: CoAPS records (issue 27)
        dtls_input(fdp)
        return
    reset_twin()  # (a fresh pair per input: what fails replays alone)
    if which == 1:  # another quarter: OSCORE
        mount_oscore()
        oscore_input(fdp)
        return
    recovered = []
    for _ in range(fdp.ConsumeIntInRange(0, 3) // 2 * fdp.ConsumeIntInRange(0, 3)):
        # exchanges recovered from the bus at the start (what a restart does before any traffic),
        # with a template's message id: its token (the next datagram a retransmission), another
        # (a rebooted device's new request) or none named (a four-field header: any token)
        template = TEMPLATES[fdp.ConsumeIntInRange(0, len(TEMPLATES) - 1)]
        choice = fdp.ConsumeIntInRange(0, 2)
        token = (template[4:4 + (template[0] & 0x0F)] if choice == 0
                 else fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 8)) if choice == 1 else None)
        peer, mid = PEERS[fdp.ConsumeIntInRange(0, 2)], int.from_bytes(template[2:4], "big")
        # (recovery reads back EXCHANGE_LIFETIME's, 247 s, and gives them oldest first; the input's
        # later `advance`s take at most 12 s more)
        recovered.append((TWIN.clock[0] - fdp.ConsumeIntInRange(0, 230), peer, mid, token))
    for at, peer, mid, token in sorted(recovered, key=lambda r: r[0]):
        assert TWIN.lane.lane.remember(peer, mid, at, token) == TWIN.python.endpoint.remember(peer, mid, at, token)
    for _ in range(fdp.ConsumeIntInRange(1, 4)):
        kind = fdp.ConsumeIntInRange(0, 3)
        if kind == 0:  # raw bytes
            datagram = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 120))
        else:  # a template (CBOR or JSON) with bytes overwritten, cut or appended
            datagram = bytearray(TEMPLATES[fdp.ConsumeIntInRange(0, len(TEMPLATES) - 1)])
            for _ in range(fdp.ConsumeIntInRange(0, 3)):
                at = fdp.ConsumeIntInRange(0, len(datagram) - 1)
                datagram[at] = fdp.ConsumeInt(1) & 0xFF
            if kind == 2:
                datagram = datagram[: fdp.ConsumeIntInRange(4, len(datagram))]
            elif kind == 3:
                datagram = datagram[:-16] + fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 40))
            datagram = bytes(datagram)
        peer = PEERS[fdp.ConsumeIntInRange(0, 2)]
        TWIN.receive(datagram, peer)
        if then(fdp, 4) == 3:  # the peer handshakes again (CoAPS): its message ids start afresh
            TWIN.clock[0] += 0.001
            TWIN.new_session(PEERS[fdp.ConsumeIntInRange(0, 2)])
        TWIN.check()
    TWIN.commit()
    TWIN.check()
    counters = TWIN.lane.lane.lane.counters()
    assert counters["waiting"] == 0, counters


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
