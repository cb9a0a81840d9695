"""Fuzz every device-facing front door (ThingsBoard, Drogue, EMQX, telemetry, /.well-known/core)
behind the real message layer: query strings (link-format filters among them), option 4209,
JSON/CBOR bodies, RPC ids, topics, Observe and Block options all come from the fuzzer.  Nothing may escape, error answers stay no larger than the
datagram that caused them, and the downlink and pub/sub state stays bounded."""

import logging
import sys
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports():
    from corem.codec import Code, Message, OptionNumber as O, Type, encode, encode_uint
    from corem.coap import Endpoint, Params, Router, discovery
    from corem.coap.observe import Observers
    from corem.devices.downlink import Downlink
    from corem.frontdoors.drogue import Drogue
    from corem.frontdoors.emqx import Emqx
    from corem.frontdoors.thingsboard import ThingsBoard
    from corem.ingest.diagnostics import Diagnostics
    from corem.ingest.telemetry import TelemetryIngest
    from corem.registry import Directory, Registry
    from corem.registry.management import Management


logging.getLogger("corem.coap").setLevel(logging.ERROR if "-v" in sys.argv else logging.CRITICAL)  # the assert below reports handler errors


class Sink:
    def __init__(self) -> None:
        self.waiting: list = []

    def submit(self, record, done, ctx=None) -> bool:
        self.waiting.append((done, ctx))
        return len(self.waiting) < 64

    def commit(self) -> None:
        waiting, self.waiting = self.waiting, []
        for done, ctx in waiting:
            done(ctx, None)


CLOCK = [0.0]
MID = [0]
clock = lambda: CLOCK[0]  # noqa: E731
REG = Registry(Path(tempfile.mkdtemp()) / "registry.db")
REG.add_device("acme", "d1", token="T1")
REG.add_device("acme", "d2", token="T2", power_mode="psm", topics="room/#")
DIRECTORY = Directory(REG)
DIRECTORY.refresh()
MANAGEMENT = Management(REG)
MANAGEMENT.add_provision_key("pk", "ps", "acme")
SINK = Sink()
INGEST = TelemetryIngest(DIRECTORY, SINK, Diagnostics(16), now=clock)
DOWNLINK = Downlink(MANAGEMENT, SINK, clock=clock, max_queued=8, max_devices=8)
ENDPOINT = Endpoint(Params(dedup_max_entries=64, max_outstanding=16), rng=lambda: 0.5)
ROUTER = Router()
OBSERVERS = Observers(ENDPOINT, max_total=32)
DOWNLINK.observers.append(OBSERVERS)
INGEST.install(ROUTER)
ThingsBoard(DIRECTORY, INGEST, MANAGEMENT, DOWNLINK, clock).install(ROUTER, OBSERVERS)
Drogue(DIRECTORY, INGEST, DOWNLINK, clock).install(ROUTER)
EMQX = Emqx(DIRECTORY, INGEST, DOWNLINK, clock, max_retained=16, max_retained_bytes=4096)
EMQX.install(ROUTER, OBSERVERS)
discovery.install(ROUTER)

PATHS = [
    "api/v1/T1/telemetry", "api/v1/T2/attributes", "api/v1/T1/attributes", "api/v1/T1/rpc", "api/v1/T1/rpc/{n}",
    "api/v1/T1/claim", "api/v1/provision", "api/v1/T1/firmware", "v1/{s}", "ps/{s}", "ps/room/{s}", "mqtt/{s}",
    "api/v1/{s}/attributes", ".well-known/core",
]
AUTH = [b"Basic YXdha2VAYWNtZTpUQQ==", b"Basic ZDFAYWNtZTpUMQ==", b"Basic ZDE6VDE="]
QUERIES = ["c=c&u=d1&p=T1", "c=c&u=d2&p=T2", "ct=", "application=acme", "as=d2", "clientKeys=", "sharedKeys=",
           "version=", "title=", "rt=", "href=", "if=", "ct=", "obs", "title="]


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    CLOCK[0] += fdp.ConsumeIntInRange(0, 2000) / 1000
    code = fdp.PickValueInList([Code.GET, Code.POST, Code.PUT, Code.DELETE])
    path = fdp.PickValueInList(PATHS).replace("{n}", str(fdp.ConsumeIntInRange(0, 5))).replace(
        "{s}", fdp.ConsumeUnicodeNoSurrogates(12).replace("/", "") or "x")
    opts = [(O.URI_PATH, p.encode()) for p in path.split("/")]
    for _ in range(fdp.ConsumeIntInRange(0, 3)):
        q = fdp.PickValueInList(QUERIES).encode()
        if q.endswith(b"="):  # text, or any bytes a device may send (not UTF-8: 4.00, never 5.00)
            q += fdp.ConsumeUnicodeNoSurrogates(8).encode() if fdp.ConsumeBool() else fdp.ConsumeBytes(4)
        opts += [(O.URI_QUERY, part[:255]) for part in q.split(b"&")]  # one option per parameter
    if fdp.ConsumeIntInRange(0, 7) == 0:  # another text option, any bytes
        opts.append((fdp.PickValueInList([O.URI_HOST, O.URI_PATH, O.LOCATION_PATH, O.LOCATION_QUERY]),
                     fdp.ConsumeBytes(6) or b"\xff"))
    if fdp.ConsumeBool():
        opts.append((O.DROGUE_AUTH, fdp.PickValueInList(AUTH) if fdp.ConsumeBool() else fdp.ConsumeBytes(20) or b"x"))
    if fdp.ConsumeBool():
        opts.append((O.OBSERVE, encode_uint(fdp.ConsumeIntInRange(0, 2))))
    if fdp.ConsumeBool():
        opts.append((O.CONTENT_FORMAT, encode_uint(fdp.PickValueInList([0, 42, 50, 60, 11050]))))
    if fdp.ConsumeBool():
        opts.append((O.MAX_AGE, encode_uint(fdp.ConsumeIntInRange(0, 100))))
    if fdp.ConsumeBool():
        opts.append((fdp.PickValueInList([O.BLOCK1, O.BLOCK2]), encode_uint(fdp.ConsumeIntInRange(0, 0xFFFF))))
    token = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 8))
    payload = fdp.ConsumeBytes(fdp.remaining_bytes())
    MID[0] = (MID[0] + 1) & 0xFFFF  # fresh ids: each input is a new request, not a duplicate
    msg = Message(Type.CON, code, MID[0], token, sorted(opts, key=lambda o: o[0]), payload)
    datagram = encode(msg)
    ENDPOINT.datagrams_to_send()
    req = ENDPOINT.receive(datagram, ("192.0.2.1", 1 + len(token)), CLOCK[0])
    if req is not None:
        r = ROUTER.dispatch(req)
        if r is not None:
            req.respond(r.code, r.options, r.payload)
    for out, _ in ENDPOINT.datagrams_to_send():
        if len(out) > 4 and out[1] >= 0x80:
            assert len(out) <= len(datagram), (out, datagram)
            assert out[1] != Code.INTERNAL_SERVER_ERROR, ("5.00 for device input", datagram)
    SINK.commit()
    DOWNLINK.tick(CLOCK[0])
    ENDPOINT.tick(CLOCK[0])
    while ENDPOINT.next_event() is not None:  # what the edge does after each batch
        pass
    assert len(EMQX) <= 16 and DOWNLINK.devices_queued <= 8 and len(OBSERVERS) <= 32
    assert ROUTER.handler_errors == 0, "a handler raised: every bad input must get its own 4.xx"


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
