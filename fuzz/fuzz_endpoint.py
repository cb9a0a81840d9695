"""Fuzz the message layer and router with datagrams from many peers: nothing escapes, state stays
bounded, and no error answer is larger than the datagram that caused it.  The router serves what
a running corem serves besides readings -- discovery, a site's resources (empty, large: Block2;
observable: Observe; an action answering 2.04 with a payload) and Block1 uploads -- so the
block-wise, Observe and Accept paths see the fuzzer's options too (a review found a Block2 on an
empty 2.05 ending the server, which this target did not reach)."""

import sys

import atheris

with atheris.instrument_imports():
    from corem.codec import Code
    from corem.coap import Endpoint, Event, Params, Response, Router, discovery
    from corem.coap.observe import Observers
    from corem.coap.site import Resource, Site


class Empty(Resource):
    def get(self, req):
        return Response(Code.CONTENT, b"")


class Large(Resource):
    rt = "large"

    def get(self, req):
        return Response(Code.CONTENT, bytes(range(256)) * 12)

    def post(self, req):
        return Response(Code.CHANGED, b"done: " + bytes(req.message.payload)[:600])


ENDPOINT = Endpoint(Params(dedup_max_entries=64, max_outstanding=16), rng=lambda: 0.5)
ROUTER = Router()
ROUTER.add("api/v1/{token}/telemetry", {Code.POST: lambda req, p: None if p[0] == "later" else Response(Code.CHANGED)})
ROUTER.add("boom", {Code.GET: lambda req, p: 1 / 0})
SITE = Site()
SITE.mount(ROUTER, Observers(ENDPOINT))
SITE.add("empty", Empty())
SITE.add("large", Large())
discovery.install(ROUTER)
PENDING: list = []
CLOCK = [0.0]


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    peer = ("192.0.2.1", fdp.ConsumeIntInRange(1, 4))
    CLOCK[0] += fdp.ConsumeIntInRange(0, 3000) / 1000
    datagram = fdp.ConsumeBytes(fdp.remaining_bytes())
    ENDPOINT.datagrams_to_send()
    req = ENDPOINT.receive(datagram, peer, CLOCK[0])
    if req is not None:
        r = ROUTER.dispatch(req)
        if r is None:
            PENDING.append(req)
        else:
            req.respond(r.code, r.options, r.payload)
    for out, _ in ENDPOINT.datagrams_to_send():
        if len(out) > 4 and out[1] >= 0x80:
            assert len(out) <= len(datagram), (out, datagram)
    if len(PENDING) > 8:  # answer the deferred ones late: separate responses, retransmissions
        for req in PENDING:
            req.respond(Code.CHANGED)
        PENDING.clear()
    ENDPOINT.tick(CLOCK[0])
    while (event := ENDPOINT.next_event()) is not None:  # what the edge does after each batch
        assert isinstance(event, Event), event
    assert ENDPOINT.dedup_entries <= 64 and ENDPOINT.outstanding <= 16


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
