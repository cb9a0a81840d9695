"""Fuzz Efento's door (corem/frontdoors/efento) behind the real message layer and router: the
measurements, device info and configuration a sensor posts, and the time it asks for.  Half the
inputs are messages built field by field from the fuzzer's bytes with Efento's own schema (any
channel type, start point, offsets -- error codes among them --, timestamps, period base and
factor, token), so the fuzzer starts inside the protocol; the other half splice fuzzed bytes into
one of those messages' encodings, or are bytes alone.  Nothing may escape (no 5.00), error answers
stay no larger than the datagram that caused them, an accepted message's points are bounded, in
time and finite, and a refused one publishes nothing."""

import logging
import math
import sys
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports():
    from corem.codec import Code, Message, OptionNumber as O, Type, encode, encode_uint
    from corem.coap import Endpoint, Params, Router
    from corem.frontdoors.efento import Efento
    from corem.frontdoors.efento import decode as efento
    from corem.ingest.diagnostics import Diagnostics
    from corem.profiles.payload import MAX_TS_MS
    from corem.ingest.point import decode_point
    from corem.ingest.telemetry import TelemetryIngest
    from corem.registry import Directory, Registry
    from corem.registry.management import Management

logging.getLogger("corem.coap").setLevel(logging.ERROR if "-v" in sys.argv else logging.CRITICAL)


class Sink:
    def __init__(self) -> None:
        self.waiting: list = []
        self.records: list = []

    def submit(self, record, done, ctx=None) -> bool:
        self.records.append(record)
        self.waiting.append((done, ctx))
        return len(self.waiting) < 4096

    def submit_many(self, records, done, ctxs) -> int:
        for r, c in zip(records, ctxs):
            self.submit(r, done, c)
        return len(records)

    def commit(self) -> None:
        waiting, self.waiting = self.waiting, []
        for done, ctx in waiting:
            done(ctx, None)


MID = [0]
REG = Registry(Path(tempfile.mkdtemp()) / "registry.db")
REG.add_device("acme", "e1", token="EF1")
REG.add_device("acme", "e2", token="EF2")
DIRECTORY = Directory(REG)
DIRECTORY.refresh()
SINK = Sink()
INGEST = TelemetryIngest(DIRECTORY, SINK, Diagnostics(16), clock_ms=lambda: 1_700_000_000_000)
ENDPOINT = Endpoint(Params(dedup_max_entries=64, max_outstanding=16), rng=lambda: 0.5)
ROUTER = Router()
SESSIONS = {("192.0.2.2", 5684): DIRECTORY.named("acme", "e2")}  # a peer with a DTLS session
Efento(DIRECTORY, INGEST, Management(REG), wall=lambda: 1_765_000_000.0).install(ROUTER, lambda r: SESSIONS.get(r.peer))

PATHS = ["m", "api/v1/efento/m", "coap/measurements", "i", "coap/device-info", "c", "api/v1/efento/c", "t",
         "api/v1/efento/t"]
TOKENS = ["EF1", "EF2", "", "nope", "862061049999999"]
#: channel types: every one Efento has, and some it does not
TYPES = list(range(0, 45)) + [99, 1 << 20]
OFFSETS = [8_355_840, 8_388_607, -32768, 0, 1, -1, 2**31 - 1, -(2**31)]
MEASUREMENTS = efento.message_class("measurements")
DEVICE_INFO = efento.message_class("device_info")
CONFIGURATION = efento.message_class("configuration")


def measurements(fdp: atheris.FuzzedDataProvider) -> bytes:
    m = MEASUREMENTS(cloud_token=fdp.PickValueInList(TOKENS), serial_number=fdp.ConsumeBytes(6),
                     battery_status=fdp.ConsumeBool(), measurement_period_base=fdp.ConsumeIntInRange(0, 2**32 - 1)
                     if fdp.ConsumeIntInRange(0, 7) == 0 else fdp.ConsumeIntInRange(0, 3600),
                     measurement_period_factor=fdp.ConsumeIntInRange(0, 20), signal=fdp.ConsumeIntInRange(0, 99),
                     battery_level=fdp.ConsumeIntInRange(0, 65535), next_transmission_at=fdp.ConsumeIntInRange(0, 2**32 - 1))
    for _ in range(fdp.ConsumeIntInRange(0, 6)):
        ch = m.channels.add(type=fdp.PickValueInList(TYPES), start_point=fdp.ConsumeIntInRange(-(2**31), 2**31 - 1),
                            timestamp=fdp.ConsumeIntInRange(-(2**31), 2**31 - 1) if fdp.ConsumeIntInRange(0, 7) == 0
                            else 1_606_391_700 + fdp.ConsumeIntInRange(0, 100_000))
        for _ in range(fdp.ConsumeIntInRange(0, 12)):
            ch.sample_offsets.append(fdp.PickValueInList(OFFSETS) if fdp.ConsumeIntInRange(0, 3) == 0
                                     else fdp.ConsumeIntInRange(-3000, 3000))
    return m.SerializeToString()


def device_info(fdp: atheris.FuzzedDataProvider) -> bytes:
    d = DEVICE_INFO(cloud_token=fdp.PickValueInList(TOKENS), sw_version=fdp.ConsumeIntInRange(0, 0xFFFF),
                    commit_id=fdp.ConsumeUnicodeNoSurrogates(8))
    d.memory_statistics.extend(fdp.ConsumeIntInRange(0, 2**32 - 1) for _ in range(fdp.ConsumeIntInRange(0, 25)))
    d.modem.type = fdp.ConsumeIntInRange(0, 6)
    d.modem.firmware_version = fdp.ConsumeIntInRange(0, 12)
    d.modem.parameters.extend(fdp.ConsumeIntInRange(-1000, 1000) for _ in range(fdp.ConsumeIntInRange(0, 40)))
    d.modem.modem_statistics.extend(fdp.ConsumeIntInRange(0, 9) for _ in range(fdp.ConsumeIntInRange(0, 5)))
    d.runtime_info.message_counters.extend(range(fdp.ConsumeIntInRange(0, 4)))
    d.runtime_info.battery_voltage = fdp.ConsumeIntInRange(0, 0xFFFF)
    d.runtime_info.battery_reset_timestamp = fdp.ConsumeIntInRange(0, 2**32 - 1)
    return d.SerializeToString()


def configuration(fdp: atheris.FuzzedDataProvider) -> bytes:
    c = CONFIGURATION(cloud_token=fdp.PickValueInList(TOKENS), measurement_period_base=fdp.ConsumeIntInRange(0, 99),
                      apn_password=fdp.ConsumeUnicodeNoSurrogates(6), data_endpoint=fdp.ConsumeUnicodeNoSurrogates(10))
    c.channel_types.extend(fdp.PickValueInList(TYPES) for _ in range(fdp.ConsumeIntInRange(0, 6)))
    for _ in range(fdp.ConsumeIntInRange(0, 3)):
        c.rules.add().parameters.extend(range(fdp.ConsumeIntInRange(0, 4)))
    return c.SerializeToString()


BUILD = {"m": measurements, "i": device_info, "c": configuration, "t": lambda fdp: b""}


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    path = fdp.PickValueInList(PATHS)
    kind = path[-1] if path[-1] in BUILD else {"measurements": "m", "device-info": "i"}[path.rsplit("/", 1)[-1]]
    how = fdp.ConsumeIntInRange(0, 3)
    if how <= 1:  # a message of the schema, from the fuzzer's fields
        payload = BUILD[kind](fdp)
    elif how == 2:  # one of those, with fuzzed bytes spliced in
        payload = BUILD[kind](fdp)
        start = fdp.ConsumeIntInRange(0, len(payload))
        end = fdp.ConsumeIntInRange(start, len(payload))
        payload = payload[:start] + fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 16)) + payload[end:]
    else:
        payload = fdp.ConsumeBytes(fdp.remaining_bytes())
    opts = [(O.URI_PATH, p.encode()) for p in path.split("/")]
    if fdp.ConsumeIntInRange(0, 5) == 0:
        opts.append((O.CONTENT_FORMAT, encode_uint(fdp.PickValueInList([0, 42, 50, 60]))))
    code = Code.GET if kind == "t" and fdp.ConsumeBool() else Code.POST
    peer = ("192.0.2.2", 5684) if fdp.ConsumeBool() else ("192.0.2.1", 5683)
    MID[0] = (MID[0] + 1) & 0xFFFF
    msg = Message(Type.CON, code, MID[0], b"f", sorted(opts, key=lambda o: o[0]), payload)
    datagram = encode(msg)
    ENDPOINT.datagrams_to_send()
    SINK.records.clear()
    req = ENDPOINT.receive(datagram, peer, 0.0)
    if req is None:
        return
    r = ROUTER.dispatch(req)
    if r is not None:
        req.respond(r.code, r.options, r.payload)
    points = [decode_point(rec.value) for rec in SINK.records if rec.topic.startswith("telemetry.")]
    SINK.commit()
    [(out, _)] = ENDPOINT.datagrams_to_send()
    answer = out[1]
    assert answer != Code.INTERNAL_SERVER_ERROR, ("5.00 for device input", datagram)
    if answer >= 0x80:
        assert len(out) <= len(datagram), (out, datagram)
        assert not points, "a refused message published points"
    else:
        assert answer in (Code.CREATED, Code.CONTENT), (answer, datagram)
    assert len(points) <= efento.MAX_POINTS
    for p in points:
        assert 0 <= p.ts <= MAX_TS_MS, p
        assert all(math.isfinite(v) for v in p.numeric_values.values()), p
        assert p.numeric_values or p.string_values, p


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
