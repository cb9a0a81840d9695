"""Conditional requests (RFC 7252 §5.10.8, issue 26 item 5): If-Match and If-None-Match.

The evaluator (corem/coap/conditional.py) on its own; the router's default for resources without
ETags (telemetry, discovery) with the fast lane on and off; users' resources (corem/coap/site.py)
and EMQX `/ps` retained messages through real clients -- libcoap's coap-client (`-O 1,0x<etag>`,
`-O 5,`) over UDP and TCP, aiocoap's client library -- against a running corem: the ETSI plugtest's
TD_COAP_CORE_22 and TD_COAP_CORE_23, a stale ETag, and clients racing one update.
"""

from __future__ import annotations

import base64
import os
import re
import subprocess
import sys
import textwrap

import cbor2
import pytest
import trio

from corem.codec import Code, Message, Type, decode, encode
from corem.codec import OptionNumber as O
from corem.codec.options import UNDERSTOOD_CRITICAL
from corem.coap import Endpoint, Params, Response, Router
from corem.coap.conditional import conditional, etag_for, evaluate
from corem.coap.observe import Observers
from corem.coap.site import Resource, Site
from corem.coap.stream import StreamEndpoint
from corem.fastlane import Lane

from .conftest import COAP_CLIENT, coap_client, exchange, needs_libcoap, start_corem
from .lane_twin import Twin

E1, E2 = b"\x01\x02\x03\x04", b"\xaa\xbb"


def request(*options: tuple[int, bytes], code: int = Code.PUT, payload: bytes = b"", mid: int = 1) -> Message:
    return Message(Type.CON, code, mid, b"t", sorted([*options, (O.URI_PATH, b"x")], key=lambda o: o[0]), payload)


def code(answer: Response | None) -> int | None:
    return None if answer is None else answer.code


# -- the evaluator -------------------------------------------------------------------------------
def test_if_match_holds_only_for_a_current_etag_it_names():
    assert evaluate(request((O.IF_MATCH, E1)), True, E1) is None
    assert evaluate(request((O.IF_MATCH, E2), (O.IF_MATCH, E1)), True, E1) is None  # any of them (OR)
    stale = evaluate(request((O.IF_MATCH, E2)), True, E1)
    assert code(stale) == Code.PRECONDITION_FAILED and stale.payload == b"if-match: not the current ETag"
    assert code(evaluate(request((O.IF_MATCH, E1)), True, None)) == Code.PRECONDITION_FAILED  # no ETag: never
    assert code(evaluate(request((O.IF_MATCH, E1)), False)) == Code.PRECONDITION_FAILED


def test_an_empty_if_match_asks_only_that_the_resource_exists():
    assert evaluate(request((O.IF_MATCH, b"")), True, E1) is None
    assert evaluate(request((O.IF_MATCH, b"")), True, None) is None
    assert code(evaluate(request((O.IF_MATCH, b"")), False)) == Code.PRECONDITION_FAILED


def test_if_none_match_holds_only_where_nothing_exists():
    assert evaluate(request((O.IF_NONE_MATCH, b"")), False) is None
    refused = evaluate(request((O.IF_NONE_MATCH, b"")), True, E1)
    assert code(refused) == Code.PRECONDITION_FAILED and refused.payload == b"if-none-match: the resource exists"


@pytest.mark.parametrize("exists", [True, False])
def test_both_options_in_one_request_never_hold(exists):
    """§5.10.8.2: If-Match needs a representation, If-None-Match needs none."""
    msg = request((O.IF_MATCH, b""), (O.IF_NONE_MATCH, b""))
    assert code(evaluate(msg, exists, E1 if exists else None)) == Code.PRECONDITION_FAILED


@pytest.mark.parametrize("options, reason", [
    ([(O.IF_MATCH, b"123456789")], b"if-match: longer than 8 bytes"),
    ([(O.IF_NONE_MATCH, b"\x00")], b"if-none-match: carries no value"),
    ([(O.IF_NONE_MATCH, b""), (O.IF_NONE_MATCH, b"")], b"if-none-match: not repeatable"),
])
def test_a_malformed_conditional_option_is_a_critical_option_not_understood(options, reason):
    """§5.4.3 (length out of range), §5.4.5 (repeated, not repeatable): like an unknown critical
    option, 4.02."""
    assert evaluate(request(*options), False) == Response(Code.BAD_OPTION, reason)


def test_no_conditional_option_means_no_condition():
    msg = request((O.ETAG, E1), (O.CONTENT_FORMAT, b""))
    assert not conditional(msg) and evaluate(msg, False) is None and evaluate(msg, True, E2) is None
    assert conditional(request((O.IF_MATCH, b""))) and conditional(request((O.IF_NONE_MATCH, b"")))


def test_if_match_and_if_none_match_are_understood_critical_options():
    assert {O.IF_MATCH, O.IF_NONE_MATCH} <= UNDERSTOOD_CRITICAL
    ep = Endpoint(Params(limit_error_size=False))
    for mid, opt in enumerate(((O.IF_MATCH, E1), (O.IF_NONE_MATCH, b""))):
        assert ep.receive(encode(request(opt, code=Code.GET, mid=mid)), ("192.0.2.1", 5683), 0.0) is not None
        assert StreamEndpoint().request(request(opt), "conn", 0.0, 20) is not None  # the TCP message layer
    assert ep.stats.bad_options == 0 and ep.datagrams_to_send() == []


def test_etags_name_payload_and_content_format():
    assert etag_for(b"21", 0) == etag_for(b"21", 0)
    assert len({etag_for(b"21", 0), etag_for(b"22", 0), etag_for(b"21", 50), etag_for(b"21", None)}) == 4


# -- resources without ETags: the router's default ---------------------------------------------------
def sansio_router() -> tuple[Endpoint, Router]:
    from corem.coap import discovery

    ep = Endpoint(Params(limit_error_size=False), rng=lambda: 0.0)
    router = Router()
    discovery.install(router)
    router.add("action", {Code.POST: lambda req, p: Response(Code.CHANGED)})
    return ep, router


def test_a_resource_without_etags_exists_if_it_can_be_read():
    ep, router = sansio_router()
    wk = [(O.URI_PATH, b".well-known"), (O.URI_PATH, b"core")]

    def ask(path, *extra, method=Code.GET, mid=1):
        msg = Message(Type.CON, method, mid, b"t", sorted([*path, *extra], key=lambda o: o[0]))
        return exchange(ep, router, msg).code

    assert ask(wk, (O.IF_MATCH, b""), mid=1) == Code.CONTENT  # it exists
    assert ask(wk, (O.IF_MATCH, E1), mid=2) == Code.PRECONDITION_FAILED  # it has no ETag to match
    assert ask(wk, (O.IF_NONE_MATCH, b""), mid=3) == Code.PRECONDITION_FAILED
    action = [(O.URI_PATH, b"action")]  # POST only: no current representation
    assert ask(action, (O.IF_MATCH, b""), method=Code.POST, mid=4) == Code.PRECONDITION_FAILED
    assert ask(action, (O.IF_NONE_MATCH, b""), method=Code.POST, mid=5) == Code.CHANGED
    assert ask(action, (O.IF_MATCH, b"123456789"), method=Code.POST, mid=6) == Code.BAD_OPTION


# -- telemetry, with the fast lane on and off -------------------------------------------------------
READING = cbor2.dumps({"t": 21.5})


def telemetry(mid: int, *extra: tuple[int, bytes]) -> bytes:
    options = [(O.URI_PATH, s) for s in (b"api", b"v1", b"T1", b"telemetry")] + [(O.CONTENT_FORMAT, b"\x3c"), *extra]
    return encode(Message(Type.CON, Code.POST, mid, b"\x01", sorted(options, key=lambda o: o[0]), READING))


@pytest.mark.skipif(Lane is None, reason="the C lane is not built")
@pytest.mark.parametrize("extra, answer, stored", [
    ([(O.IF_MATCH, E1)], Code.PRECONDITION_FAILED, 0),
    ([(O.IF_MATCH, b"")], Code.PRECONDITION_FAILED, 0),
    ([(O.IF_NONE_MATCH, b"")], Code.CHANGED, 1),
    ([(O.IF_MATCH, b""), (O.IF_NONE_MATCH, b"")], Code.PRECONDITION_FAILED, 0),
])
def test_a_conditional_reading_is_answered_the_same_with_the_lane_on_and_off(extra, answer, stored):
    """The telemetry resource has no current representation: If-Match never holds, If-None-Match
    always does.  The lane leaves every conditional request to the Python path."""
    twin = Twin()
    try:
        twin.receive(telemetry(0x4000, *extra))
        twin.commit()
        answers, records = twin.check()  # the same answers and records on both sides
        assert [decode(a[0]).code for a in answers] == [answer]
        assert len(records) == stored
        assert twin.lane.lane.lane.counters()["requests"] == 0  # not the lane's
        twin.receive(telemetry(0x4001))  # and the plain reading after it is
        twin.commit()
        twin.check()
        assert twin.lane.lane.lane.counters()["requests"] == 1
    finally:
        twin.close()


# -- users' resources ----------------------------------------------------------------------------
class Store(Resource):
    """What the plugtest's /validate and /create1 are: a value that PUT replaces or creates."""

    def __init__(self, value: bytes | None = None) -> None:
        super().__init__()
        self.value = value
        self.puts = 0

    def get(self, req):
        if self.value is None:
            return Response(Code.NOT_FOUND, b"")
        return Response(Code.CONTENT, self.value, [(O.CONTENT_FORMAT, b"")])

    def put(self, req):
        created = self.value is None
        self.value = bytes(req.message.payload)
        self.puts += 1
        return Response(Code.CREATED if created else Code.CHANGED)

    def delete(self, req):
        self.value = None
        return Response(Code.DELETED)


def sansio_site(**resources: Resource) -> tuple[Endpoint, Router]:
    ep = Endpoint(Params(limit_error_size=False), rng=lambda: 0.0)
    router = Router()
    site = Site(clock=lambda: 0.0)
    site.mount(router, Observers(ep))
    for path, resource in resources.items():
        site.add(path, resource)
    return ep, router


def test_a_users_resource_tags_its_answers_and_refuses_a_stale_update():
    store = Store(b"v0")
    ep, router = sansio_site(validate=store)
    mids = iter(range(1, 100))

    def ask(method, *extra, payload=b""):
        msg = Message(Type.CON, method, next(mids), b"t", sorted([(O.URI_PATH, b"validate"), *extra]), payload)
        return exchange(ep, router, msg)

    got = ask(Code.GET)
    e1 = got.etag
    assert got.code == Code.CONTENT and e1 == etag_for(b"v0", 0)
    changed = ask(Code.PUT, (O.IF_MATCH, e1), payload=b"v1")
    assert changed.code == Code.CHANGED and changed.etag == etag_for(b"v1", 0)  # the new state's ETag
    stale = ask(Code.PUT, (O.IF_MATCH, e1), payload=b"v2")
    assert stale.code == Code.PRECONDITION_FAILED and store.value == b"v1" and store.puts == 1
    assert ask(Code.DELETE, (O.IF_MATCH, e1)).code == Code.PRECONDITION_FAILED and store.value == b"v1"
    assert ask(Code.DELETE, (O.IF_MATCH, changed.etag)).code == Code.DELETED and store.value is None
    assert ask(Code.PUT, (O.IF_MATCH, b""), payload=b"v3").code == Code.PRECONDITION_FAILED  # none exists
    assert ask(Code.PUT, (O.IF_NONE_MATCH, b""), payload=b"v3").code == Code.CREATED and store.value == b"v3"


def test_a_large_representation_keeps_one_etag_through_block2():
    """Block-wise GET (RFC 7959) gives the resource's ETag, the one If-Match is compared with."""
    store = Store(bytes(range(256)) * 12)
    ep, router = sansio_site(big=store)
    first = exchange(ep, router, Message(Type.CON, Code.GET, 1, b"t", [(O.URI_PATH, b"big")]))
    assert first.block2 is not None and first.block2.more and first.etag == etag_for(store.value, 0)
    put = Message(Type.CON, Code.PUT, 2, b"t", [(O.IF_MATCH, first.etag), (O.URI_PATH, b"big")], b"small")
    assert exchange(ep, router, put).code == Code.CHANGED and store.value == b"small"


def test_observers_get_the_etag_with_each_notification():
    store = Store(b"v0")
    store.observable = True
    ep = Endpoint(Params(limit_error_size=False), rng=lambda: 0.0)
    router = Router()
    site = Site(clock=lambda: 0.0)
    site.mount(router, Observers(ep))
    site.add("validate", store)
    first = exchange(ep, router, Message(Type.CON, Code.GET, 1, b"o", [(O.OBSERVE, b""), (O.URI_PATH, b"validate")]))
    assert first.observe is not None and first.etag == etag_for(b"v0", 0)
    store.value = b"v1"
    store.changed()
    [(data, _)] = ep.datagrams_to_send()
    assert decode(data).etag == etag_for(b"v1", 0)


# -- real clients against a running corem ----------------------------------------------------------
ETAG = re.compile(r"c:2\.0[15] .*?ETag:0x([0-9a-fA-F]+)")


def etag_in(output: str) -> str:
    found = ETAG.findall(output)
    assert found, output
    return found[-1].lower()


def td_coap_core_22(url: str, client=coap_client) -> None:
    """ETSI TD_COAP_CORE_22 on `url` (created first): an update with the current ETag is 2.04;
    after another client's update, one with the ETag read before it is 4.12 and changes nothing."""
    assert client(url, "-m", "put", "-e", "v0").code in ("2.01", "2.04")
    got = client(url, "-m", "get")
    assert got.code == "2.05" and "v0" in got.output
    etag1 = etag_in(got.output)
    assert client(url, "-m", "put", "-e", "v1", "-O", f"1,0x{etag1}").code == "2.04"
    got = client(url, "-m", "get")
    etag2 = etag_in(got.output)
    assert got.code == "2.05" and "v1" in got.output and etag2 != etag1
    assert client(url, "-m", "put", "-e", "v2").code == "2.04"  # another client's update
    stale = client(url, "-m", "put", "-e", "v3", "-O", f"1,0x{etag2}")
    assert stale.code == "4.12", stale.output
    got = client(url, "-m", "get")
    assert "v2" in got.output and "v3" not in got.output  # unchanged


def td_coap_core_23(url: str, client=coap_client) -> None:
    """ETSI TD_COAP_CORE_23 on `url` (not existing): If-None-Match creates (2.01), then is 4.12."""
    created = client(url, "-m", "put", "-e", "first", "-O", "5,")
    assert created.code == "2.01", created.output
    again = client(url, "-m", "put", "-e", "second", "-O", "5,")
    assert again.code == "4.12", again.output
    assert "first" in client(url, "-m", "get").output


def race(url: str, etag: str, n: int = 6) -> list[str]:
    """`n` libcoap clients PUT at once, all with `If-Match: etag`; their answer codes."""
    procs = [subprocess.Popen([COAP_CLIENT, "-v", "6", "-B", "20", "-m", "put", "-e", f"racer-{i}",
                               "-O", f"1,0x{etag}", url], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(n)]
    codes = []
    for p in procs:
        out, _ = p.communicate(timeout=40)
        found = re.findall(r"t:(?:ACK|CON|NON) c:(\d\.\d\d)", out)
        codes.append(found[-1] if found else out)
    return codes


def winner(codes: list[str], got: str) -> None:
    assert sorted(codes) == ["2.04"] + ["4.12"] * (len(codes) - 1), codes
    assert f"racer-{codes.index('2.04')}" in got


PS = "?c=client-1&u=sensor-1&p=T0KEN-1"


@pytest.fixture
def served(data_dir):
    server = start_corem(data_dir, "--coap-tcp", "127.0.0.1:0")
    yield server
    server.stop()


@needs_libcoap
def test_td_coap_core_22_and_23_on_emqx_topics_over_udp(served):
    td_coap_core_22(f"{served.coap}/ps/validate{PS}")
    td_coap_core_23(f"{served.coap}/ps/create1{PS}")
    # a conditional request is still authenticated first: no state is told to a stranger
    assert coap_client(f"{served.coap}/ps/create1?c=x&u=sensor-1&p=wrong", "-m", "put", "-e", "x",
                       "-O", "5,").code == "4.01"
    # DELETE with a stale ETag keeps the retained message; with the current one, removes it
    url = f"{served.coap}/ps/create1{PS}"
    etag = etag_in(coap_client(url, "-m", "get").output)
    assert coap_client(url, "-m", "delete", "-O", "1,0x0102").code == "4.12"
    assert coap_client(url, "-m", "delete", "-O", f"1,0x{etag}").code == "2.02"
    assert coap_client(url, "-m", "get").code == "4.04"


@needs_libcoap
def test_td_coap_core_22_and_23_on_emqx_topics_over_tcp(served):
    base = f"coap+tcp://127.0.0.1:{served.coap_tcp_port}"
    td_coap_core_22(f"{base}/ps/validate{PS}")
    td_coap_core_23(f"{base}/ps/create1{PS}")


@needs_libcoap
def test_clients_racing_an_emqx_topic_update_with_if_match_only_one_wins(served):
    url = f"{served.coap}/ps/race{PS}"
    assert coap_client(url, "-m", "put", "-e", "start").code == "2.01"
    etag = etag_in(coap_client(url, "-m", "get").output)
    codes = race(url, etag)
    winner(codes, coap_client(url, "-m", "get").output)


@needs_libcoap
def test_conditional_readings_through_a_running_corem_with_the_lane(served):
    """If-Match on telemetry (no representation) is 4.12 and stores nothing; If-None-Match holds."""
    url = f"{served.coap}/api/v1/T0KEN-1/telemetry"
    refused = coap_client(url, "-m", "post", "-t", "50", "-e", '{"t":1}', "-O", "1,0x0102")
    assert refused.code == "4.12"
    assert coap_client(url, "-m", "post", "-t", "50", "-e", '{"t":2}', "-O", "5,").code == "2.04"
    assert [p["numeric_values"] for p in served.points("acme")] == [{"t": 2}]


DROGUE_AUTH = "4209,Basic " + base64.b64encode(b"sensor-1@acme:T0KEN-1").decode()
DROGUE_WRONG = "4209,Basic " + base64.b64encode(b"sensor-1@acme:nope").decode()


@needs_libcoap
@pytest.mark.parametrize("path, method, good, wrong", [
    ("api/v1/{t}/telemetry", "post", ("T0KEN-1",), ("NOPE",)),
    ("api/v1/{t}/attributes", "post", ("T0KEN-1",), ("NOPE",)),
    ("v1/telemetry", "post", ("-O", DROGUE_AUTH), ("-O", DROGUE_WRONG)),
    ("mqtt/room/temp?c=client-1&u=sensor-1&p={t}", "post", ("T0KEN-1",), ("nope",)),
])
def test_a_condition_is_judged_only_once_the_device_is_known(served, path, method, good, wrong):
    """On a door's routes (no ETags: If-Match never holds) a request that names no device is
    answered 4.01, not 4.12 -- authentication before preconditions (RFC 9110 §13.2.1) --, and one
    that names a device is 4.12 with nothing done."""
    def ask(creds: tuple[str, ...]):
        token = creds[0] if len(creds) == 1 else ""
        extra = creds if len(creds) == 2 else ()
        return coap_client(f"{served.coap}/{path.format(t=token)}", "-m", method, "-t", "50",
                           "-e", '{"t":1}', "-O", "1,0x0102", *extra)

    refused = ask(wrong)
    assert refused.code == "4.01", refused.output
    unmet = ask(good)
    assert unmet.code == "4.12" and "if-match" in unmet.output, unmet.output
    assert served.points("acme") == []
    _, attributes = served.api("GET", "/api/devices/acme/sensor-1/attributes")
    assert attributes["client"] == {}, attributes


@needs_libcoap
def test_a_firmware_package_is_sent_with_its_etag_and_judged_by_it(served):
    """ThingsBoard's package download: every block carries the package's ETag; If-Match with it
    holds (a device resuming a download checks the image did not change), a stale one is 4.12."""
    image = os.urandom(1500).hex().encode()  # (printable: the client prints what it got)
    status, package = served.api("POST", "/api/packages?kind=firmware&title=fw&version=1", raw=image)
    assert status == 201
    assert served.api("PUT", "/api/devices/acme/sensor-1/firmware", {"package": package["id"]})[0] == 200
    url = f"{served.coap}/api/v1/T0KEN-1/firmware"
    etags = set(re.findall(r"ETag:0x([0-9a-fA-F]+)", coap_client(url, "-b", "512").output))
    assert len(etags) == 1  # one ETag on every block
    [etag] = etags
    assert coap_client(url, "-O", f"1,0x{etag}").code == "2.05"
    assert coap_client(url, "-O", "1,0x0102").code == "4.12"
    assert coap_client(url, "-O", "5,").code == "4.12"
    assert coap_client(f"{served.coap}/api/v1/nobody/firmware", "-O", "5,").code == "4.01"  # credentials first


@needs_libcoap
def test_a_large_package_is_read_and_tagged_once_not_once_a_block(served, tmp_path):
    """Found by an adversarial run: every Block2 request of a package larger than the
    kept representations (64 KiB) read it from the registry again and hashed all of it for the
    ETag, O(package) on the event loop for a 16-byte block. Now the bytes are read once per
    package and the ETag is the stored sha256's first 8 bytes; assigning another package serves
    that one, with its own tag."""
    import hashlib

    def download(version: bytes) -> tuple[str, str]:
        image = version * (100_000 // len(version))  # larger than KEEP_MAX: not kept per requester
        status, package = served.api("POST", f"/api/packages?kind=firmware&title=big&version={version.decode()}",
                                     raw=image)
        assert status == 201 and package["sha256"] == hashlib.sha256(image).hexdigest()
        assert served.api("PUT", "/api/devices/acme/sensor-1/firmware", {"package": package["id"]})[0] == 200
        out = tmp_path / f"{version.decode()}.bin"
        got = coap_client(f"{served.coap}/api/v1/T0KEN-1/firmware", "-b", "1024", "-o", str(out))  # 98 blocks
        assert got.code == "2.05" and out.read_bytes() == image, got.output[-300:]
        return package["sha256"], {e.lower() for e in re.findall(r"ETag:0x([0-9a-fA-F]+)", got.output)}

    before = served.metrics().get("corem_ota_package_reads_total", 0.0)
    sha1, etags1 = download(b"v1")
    assert etags1 == {sha1[:16]}  # every block: the stored sha256's first 8 bytes
    assert served.metrics()["corem_ota_package_reads_total"] == before + 1  # 98 blocks, one read
    sha2, etags2 = download(b"v2")  # another assignment: the other package, its own tag
    assert etags2 == {sha2[:16]} and sha2 != sha1
    assert served.metrics()["corem_ota_package_reads_total"] == before + 2


AIOCOAP_PUT = textwrap.dedent("""
    import asyncio, sys
    import aiocoap

    async def main(url, etag):
        ctx = await aiocoap.Context.create_client_context()
        try:
            got = await ctx.request(aiocoap.Message(code=aiocoap.GET, uri=url)).response
            put = aiocoap.Message(code=aiocoap.PUT, uri=url, payload=b"by-aiocoap", if_match=[bytes.fromhex(etag)])
            stale = await ctx.request(put).response
            put = aiocoap.Message(code=aiocoap.PUT, uri=url, payload=b"by-aiocoap", if_match=[got.opt.etag])
            fresh = await ctx.request(put).response
            print(got.code.dotted, got.opt.etag.hex(), stale.code.dotted, fresh.code.dotted, fresh.opt.etag.hex())
        finally:
            await ctx.shutdown()

    asyncio.run(main(*sys.argv[1:]))
""")


@needs_libcoap
async def test_td_coap_core_22_and_23_on_a_users_resource(tmp_path):
    from corem.config import Settings
    from corem.server import Server

    server = Server(Settings.load({"data_dir": str(tmp_path / "d"), "coap": "127.0.0.1:0", "coaps": "off",
                                   "coap_tcp": "127.0.0.1:0", "http": "off"}, env={}))
    validate, create1, contested = Store(b"v"), Store(), Store(b"start")
    server.site.add("validate", validate)
    server.site.add("create1", create1)
    server.site.add("contested", contested)
    server.site.add("tcp/create1", Store())
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(server.run)
        base = f"coap://127.0.0.1:{bound.coap[1]}"
        run = trio.to_thread.run_sync
        await run(td_coap_core_22, f"{base}/validate")
        await run(td_coap_core_23, f"{base}/create1")
        await run(td_coap_core_23, f"coap+tcp://127.0.0.1:{bound.coap_tcp[1]}/tcp/create1")
        etag = etag_in((await run(coap_client, f"{base}/contested")).output)
        codes = await run(race, f"{base}/contested", etag)
        assert contested.puts == 1
        winner(codes, contested.value.decode())
        # aiocoap's client: a stale ETag is 4.12; the current one (from its GET) updates
        out = await run(lambda: subprocess.run([sys.executable, "-c", AIOCOAP_PUT, f"{base}/validate", "0102"],
                                               capture_output=True, text=True, timeout=60))
        server.stop()
    got_code, got_etag, stale, fresh, new_etag = out.stdout.split()
    assert (got_code, stale, fresh) == ("2.05", "4.12", "2.04"), out.stdout + out.stderr
    assert got_etag == etag_for(b"v2", 0).hex() and new_etag == etag_for(b"by-aiocoap", 0).hex()
    assert validate.value == b"by-aiocoap"
