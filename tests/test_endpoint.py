"""The sans-IO message layer, driven with an explicit clock: no sockets, no sleeping."""

from __future__ import annotations

import pytest

from corem.codec import Code, Message, OptionNumber as O, Type, decode, encode
from corem.coap import Acked, Endpoint, GaveUp, Params, Request, Reset, Response, Router

PEER = ("192.0.2.1", 5683)
OTHER = ("192.0.2.2", 5683)


def endpoint(**params) -> Endpoint:
    # rng() == 0: the first retransmission timeout is exactly ACK_TIMEOUT
    return Endpoint(Params(**params), rng=lambda: 0.0)


def post(mid=0x100, token=b"tk", mtype=Type.CON, options=None, payload=b"x") -> bytes:
    opts = options if options is not None else [(O.URI_PATH, b"telemetry")]
    return encode(Message(mtype, Code.POST, mid, token, opts, payload))


def sent(ep: Endpoint) -> list[Message]:
    return [decode(d) for d, _ in ep.datagrams_to_send()]


def test_piggybacked_response():
    ep = endpoint()
    req = ep.receive(post(), PEER, 0.0)
    assert isinstance(req, Request) and req.message.uri_path == ["telemetry"]
    assert ep.datagrams_to_send() == []
    req.respond(Code.CHANGED)
    [ack] = sent(ep)
    assert (ack.type, ack.code, ack.mid, ack.token) == (Type.ACK, Code.CHANGED, 0x100, b"tk")


def test_piggybacked_response_with_options_and_payload():
    ep = endpoint()
    req = ep.receive(post(), PEER, 0.0)
    req.respond(Code.CONTENT, [(O.CONTENT_FORMAT, b"")], b"hello")
    [ack] = sent(ep)
    assert ack.type == Type.ACK and ack.content_format == 0 and bytes(ack.payload) == b"hello"


def test_separate_response_and_retransmission_schedule():
    ep = endpoint()
    req = ep.receive(post(), PEER, 0.0)
    assert ep.get_timer() == 0.5
    ep.tick(0.49)
    assert ep.datagrams_to_send() == []
    ep.tick(0.5)
    [empty_ack] = sent(ep)
    assert (empty_ack.type, empty_ack.code, empty_ack.mid, empty_ack.token) == (Type.ACK, 0, 0x100, b"")
    req.respond(Code.CHANGED, now=1.0)
    [rsp] = sent(ep)
    assert (rsp.type, rsp.code, rsp.token) == (Type.CON, Code.CHANGED, b"tk") and rsp.mid != 0x100
    # ACK_TIMEOUT 2 s doubling: retransmissions at 3, 7, 15, 31; give up at 63
    times = []
    t = 1.0
    while t < 100:
        t += 0.25
        ep.tick(t)
        for m in sent(ep):
            assert m.mid == rsp.mid
            times.append(t)
        event = ep.next_event()
        if event is not None:
            assert isinstance(event, GaveUp) and event.mid == rsp.mid and ep.next_event() is None
            gave_up_at = t
            break
    assert times == [3.0, 7.0, 15.0, 31.0]
    assert gave_up_at == 63.0
    assert ep.stats.retransmissions == 4 and ep.stats.gave_up == 1 and ep.outstanding == 0


def test_ack_stops_retransmission():
    ep = endpoint()
    req = ep.receive(post(), PEER, 0.0)
    ep.tick(0.6)
    sent(ep)
    req.respond(Code.CHANGED, now=0.6)
    [rsp] = sent(ep)
    assert ep.receive(encode(Message(Type.ACK, 0, rsp.mid)), PEER, 1.0) is None
    event = ep.next_event()
    assert isinstance(event, Acked) and event.token == b"tk" and event.peer == PEER
    assert ep.next_event() is None
    ep.tick(100.0)
    assert ep.datagrams_to_send() == [] and ep.stats.retransmissions == 0 and ep.outstanding == 0


def test_ack_from_another_peer_is_ignored():
    ep = endpoint()
    req = ep.receive(post(), PEER, 0.0)
    ep.tick(0.6)
    req.respond(Code.CHANGED, now=0.6)
    rsp = sent(ep)[-1]
    assert ep.receive(encode(Message(Type.ACK, 0, rsp.mid)), OTHER, 1.0) is None
    assert ep.outstanding == 1


def test_rst_cancels_separate_response():
    ep = endpoint()
    req = ep.receive(post(), PEER, 0.0)
    ep.tick(0.6)
    req.respond(Code.CHANGED, now=0.6)
    rsp = sent(ep)[-1]
    assert ep.receive(encode(Message(Type.RST, 0, rsp.mid)), PEER, 1.0) is None
    event = ep.next_event()
    assert isinstance(event, Reset) and not isinstance(event, Acked)  # a reset is not a kind of ack
    ep.tick(100.0)
    assert ep.datagrams_to_send() == [] and ep.stats.resets == 1


def test_duplicate_con_gets_cached_response_and_is_not_processed_again():
    ep = endpoint()
    req = ep.receive(post(), PEER, 0.0)
    req.respond(Code.CHANGED)
    first = ep.datagrams_to_send()
    assert ep.receive(post(), PEER, 1.0) is None  # not a new request
    assert ep.datagrams_to_send() == first  # the very same bytes
    assert ep.stats.duplicates == 1 and ep.stats.requests == 1


def test_duplicate_con_while_pending_is_silent_then_gets_empty_ack_after_separation():
    ep = endpoint()
    req = ep.receive(post(), PEER, 0.0)
    assert ep.receive(post(), PEER, 0.1) is None
    assert ep.datagrams_to_send() == []
    ep.tick(0.5)
    [empty] = sent(ep)
    assert ep.receive(post(), PEER, 0.7) is None
    [again] = sent(ep)
    assert again == empty
    req.respond(Code.CHANGED, now=0.8)
    assert ep.receive(post(), PEER, 0.9) is None  # still the empty ACK, never a second response
    msgs = sent(ep)
    assert [m.type for m in msgs] == [Type.CON, Type.ACK] and msgs[1].code == 0


def test_same_mid_from_another_peer_is_a_new_request():
    ep = endpoint()
    assert isinstance(ep.receive(post(), PEER, 0.0), Request)
    assert isinstance(ep.receive(post(), OTHER, 0.0), Request)


def test_duplicate_non_is_dropped_and_non_gets_non_response():
    ep = endpoint()
    req = ep.receive(post(mtype=Type.NON), PEER, 0.0)
    assert isinstance(req, Request)
    req.respond(Code.CHANGED)
    [rsp] = sent(ep)
    assert (rsp.type, rsp.code, rsp.token) == (Type.NON, Code.CHANGED, b"tk")
    assert ep.receive(post(mtype=Type.NON), PEER, 1.0) is None
    assert ep.datagrams_to_send() == [] and ep.stats.duplicates == 1
    ep.tick(10.0)
    assert ep.datagrams_to_send() == []  # NON requests never get an empty ACK


def test_ping_gets_rst():
    ep = endpoint()
    assert ep.receive(bytes.fromhex("40001234"), PEER, 0.0) is None
    [rst] = sent(ep)
    assert (rst.type, rst.code, rst.mid) == (Type.RST, 0, 0x1234)
    assert ep.stats.pings == 1


def test_empty_non_is_ignored():
    ep = endpoint()
    assert ep.receive(bytes.fromhex("50001234"), PEER, 0.0) is None
    assert ep.datagrams_to_send() == []


def test_malformed_con_gets_rst_malformed_non_is_dropped():
    ep = endpoint()
    assert ep.receive(b"\x40\x01\x00\x07\xff", PEER, 0.0) is None
    [rst] = sent(ep)
    assert (rst.type, rst.mid) == (Type.RST, 7)
    assert ep.receive(b"\x50\x01\x00\x08\xff", PEER, 0.0) is None
    assert ep.receive(b"\x01", PEER, 0.0) is None
    assert ep.datagrams_to_send() == [] and ep.stats.format_errors == 3


def test_unsolicited_con_response_is_rejected():
    ep = endpoint()
    assert ep.receive(encode(Message(Type.CON, Code.CONTENT, 9, b"t")), PEER, 0.0) is None
    [rst] = sent(ep)
    assert (rst.type, rst.mid) == (Type.RST, 9)


def test_unknown_critical_option_gets_4_02_elective_is_ignored():
    ep = endpoint()
    assert ep.receive(post(options=[(O.URI_PATH, b"t"), (2049, b"x")]), PEER, 0.0) is None
    [rsp] = sent(ep)
    assert (rsp.type, rsp.code, rsp.mid) == (Type.ACK, Code.BAD_OPTION, 0x100)
    assert bytes(rsp.payload).startswith(b"2049")  # the number first: it survives the size cap
    req = ep.receive(post(mid=0x101, options=[(O.URI_PATH, b"t"), (2048, b"x")]), PEER, 0.0)
    assert isinstance(req, Request)


def test_respond_twice_is_an_error():
    ep = endpoint()
    req = ep.receive(post(), PEER, 0.0)
    req.respond(Code.CHANGED)
    with pytest.raises(RuntimeError, match="already answered"):
        req.respond(Code.CHANGED)


def test_dedup_cache_is_bounded_and_expires():
    ep = endpoint(dedup_max_entries=3, exchange_lifetime=10.0)
    for mid in range(5):
        req = ep.receive(post(mid=mid), PEER, float(mid))
        req.respond(Code.CHANGED)
    assert ep.dedup_entries == 3 and ep.stats.dedup_evictions == 2
    ep.datagrams_to_send()
    # mid 4 is remembered: its duplicate is answered from the cache
    assert ep.receive(post(mid=4), PEER, 5.0) is None
    # mid 0 was evicted: a late duplicate of it is taken as new (the price of the bound; counted)
    late = ep.receive(post(mid=0), PEER, 5.0)
    assert isinstance(late, Request)
    late.respond(Code.CHANGED)
    ep.tick(14.5)  # mids 2, 3, 4 (received at 2, 3, 4) expired at 12, 13, 14
    assert ep.dedup_entries == 1  # mid 0, received again at 5.0
    ep.tick(15.0)
    assert ep.dedup_entries == 0


def test_outstanding_bound():
    ep = endpoint(max_outstanding=1)
    a = ep.receive(post(mid=1), PEER, 0.0)
    b = ep.receive(post(mid=2), PEER, 0.0)
    ep.tick(1.0)
    a.respond(Code.CHANGED, now=1.0)
    b.respond(Code.CHANGED, now=1.0)
    assert ep.outstanding == 1 and ep.stats.outstanding_refused == 1


def test_no_timer_when_idle():
    assert endpoint().get_timer() is None


# -- routing -------------------------------------------------------------------------------
def make_router(calls):
    r = Router()
    r.add("api/v1/{token}/telemetry", {Code.POST: lambda req, p: calls.append(p) or Response(Code.CHANGED)})
    r.add("api/v1/fixed/telemetry", {Code.GET: lambda req, p: Response(Code.CONTENT, b"literal")})
    r.add("boom", {Code.GET: lambda req, p: 1 / 0})
    return r


def route(router, code, path):
    ep = endpoint()
    opts = [(O.URI_PATH, s) for s in path]
    req = ep.receive(encode(Message(Type.CON, code, 1, b"", opts)), PEER, 0.0)
    return router.dispatch(req)


def test_router_params_literal_precedence_and_errors():
    calls = []
    r = make_router(calls)
    assert route(r, Code.POST, [b"api", b"v1", b"abc", b"telemetry"]).code == Code.CHANGED
    assert calls == [["abc"]]
    assert route(r, Code.GET, [b"api", b"v1", b"fixed", b"telemetry"]).payload == b"literal"
    assert route(r, Code.GET, [b"api", b"v1", b"abc", b"telemetry"]).code == Code.METHOD_NOT_ALLOWED
    assert route(r, Code.FETCH, [b"api", b"v1", b"abc", b"telemetry"]).code == Code.METHOD_NOT_ALLOWED
    assert route(r, Code.POST, [b"api", b"v2"]).code == Code.NOT_FOUND
    assert route(r, Code.POST, []).code == Code.NOT_FOUND
    bad = route(r, Code.POST, [b"api", b"v1", b"\xff", b"telemetry"])
    assert bad.code == Code.BAD_REQUEST and b"UTF-8" in bad.payload
    assert route(r, Code.GET, [b"boom"]).code == Code.INTERNAL_SERVER_ERROR
    assert r.handler_errors == 1


def test_a_request_is_answered_by_the_endpoint_that_received_it():
    """CoAP and CoAPS each have an endpoint; a response through the other one would leave in
    clear text on the wrong socket.  A handler answers through the request, which knows its own."""
    plain, secure = endpoint(), endpoint()
    req = secure.receive(post(), PEER, 0.0)
    assert not req.answered
    req.respond(Code.CHANGED)
    assert req.answered
    assert plain.datagrams_to_send() == [] and len(secure.datagrams_to_send()) == 1


def test_error_answers_are_never_larger_than_the_request():
    """A 7-byte request with an unknown critical option would earn a 30-byte 4.02: the diagnostic
    payload is cut to fit (RFC 7252 §11.3, amplification)."""
    ep = endpoint()
    tiny = encode(Message(Type.CON, Code.GET, 5, b"", [(2049, b"")]))
    assert ep.receive(tiny, PEER, 0.0) is None
    [(data, _)] = ep.datagrams_to_send()
    assert decode(data).code == Code.BAD_OPTION and len(data) <= len(tiny)
    req = ep.receive(post(mid=6, payload=b"x" * 40), PEER, 0.0)
    req.respond(Code.BAD_REQUEST, payload=b"a long diagnostic " * 10)
    [(data, _)] = ep.datagrams_to_send()
    assert len(data) <= req.size and bytes(decode(data).payload).startswith(b"a long")
    ok = ep.receive(post(mid=7, payload=b"x"), PEER, 0.0)
    ok.respond(Code.CONTENT, payload=b"y" * 100)  # successes are not cut: the peer asked for them
    [(data, _)] = ep.datagrams_to_send()
    assert len(decode(data).payload) == 100


def test_a_smaller_forged_duplicate_gets_no_cached_answer():
    """Found by fuzz/fuzz_endpoint.py: a datagram reusing a cached exchange's (peer, mid) but
    smaller than the original request would have pulled the bigger cached reply."""
    ep = endpoint()
    original = post(mid=0x24, payload=b"p" * 30)
    req = ep.receive(original, PEER, 0.0)
    req.respond(Code.CONTENT, payload=b"r" * 40)
    ep.datagrams_to_send()
    forged = encode(Message(Type.CON, Code.GET, 0x24, b""))
    assert ep.receive(forged, PEER, 1.0) is None and ep.datagrams_to_send() == []
    assert ep.receive(original, PEER, 1.0) is None and len(ep.datagrams_to_send()) == 1  # the real one still does


def test_a_new_dtls_session_scopes_message_ids_afresh():
    """RFC 7252 §9.1: under DTLS the endpoint is the session; a message ID from the peer's
    previous session is not a duplicate of the same ID in its new one."""
    ep = endpoint()
    peer = ("192.0.2.1", 5684)
    assert isinstance(ep.receive(post(mid=7), peer, 1.0), Request)
    ep.datagrams_to_send()
    assert ep.receive(post(mid=7), peer, 2.0) is None  # same session: a duplicate
    ep.new_session(peer, 3.0)
    assert isinstance(ep.receive(post(mid=7), peer, 4.0), Request)  # new session: new request
    assert ep.receive(post(mid=7), peer, 5.0) is None  # and its own duplicates are still caught
    assert ep.receive(post(mid=8), ("192.0.2.2", 5684), 5.0) is not None  # other peers unaffected
    ep.tick(300.0)
    assert not ep._sessions  # forgotten after EXCHANGE_LIFETIME


def test_the_piggyback_timer_acks_only_the_request_it_was_set_for():
    """Found by fuzz/fuzz_lane.py: the timer looked its request up by (peer, mid) only, so after
    a new DTLS session re-used the id, a NON request of the new session got an empty ACK."""
    ep = endpoint()
    peer = ("192.0.2.1", 5684)
    old = ep.receive(post(mid=7), peer, 1.0)  # CON, waiting for its handler's answer
    ep.new_session(peer, 1.1)
    new = ep.receive(post(mid=7, mtype=Type.NON), peer, 1.2)
    assert isinstance(old, Request) and isinstance(new, Request)
    ep.tick(5.0)
    assert ep.datagrams_to_send() == []  # no empty ACK: the CON's exchange is gone, the NON needs none


def test_nothing_is_sent_for_a_request_of_the_peers_previous_session():
    ep = endpoint()
    peer = ("192.0.2.1", 5684)
    old = ep.receive(post(mid=7), peer, 1.0)
    ep.new_session(peer, 1.1)
    ep.tick(2.0)  # past the piggyback timeout: no empty ACK into the new session
    old.respond(Code.CHANGED)  # committed, but its session is gone: no answer either
    assert ep.datagrams_to_send() == [] and old.answered
    assert ep.receive(post(mid=7), peer, 2.5) is not None  # the new session's own id 7 is new


@pytest.mark.parametrize("number,label", [
    (O.URI_HOST, "uri-host"), (O.URI_PATH, "uri-path"), (O.URI_QUERY, "uri-query"),
    (O.LOCATION_PATH, "location-path"), (O.LOCATION_QUERY, "location-query"),  # (Proxy-*: 5.05 first)
    (O.DROGUE_AUTH, "drogue-auth"),
])
def test_every_text_option_that_is_not_utf8_is_4_00_before_any_handler(number, label):
    """RFC 7252 §3.2: these options are UTF-8 strings.  A value that is not is a bad request,
    refused before a handler could trip over it (4.00, not 4.02: the option is known)."""
    calls = []
    r = make_router(calls)
    ep = endpoint()
    opts = sorted([(O.URI_PATH, s) for s in (b"api", b"v1", b"abc", b"telemetry")] + [(number, b"a\xff")])
    req = ep.receive(encode(Message(Type.CON, Code.POST, 1, b"", opts)), PEER, 0.0)
    reply = r.dispatch(req)
    assert (reply.code, reply.payload) == (Code.BAD_REQUEST, f"{label}: not valid UTF-8".encode())
    assert calls == [] and r.invalid_text == 1 and r.handler_errors == 0


def test_a_handler_that_raises_is_counted_every_time_and_logged_once_a_while(caplog):
    r = make_router([])
    with caplog.at_level("ERROR", logger="corem.coap"):
        for _ in range(5):
            assert route(r, Code.GET, [b"boom"]).code == Code.INTERNAL_SERVER_ERROR
    assert r.handler_errors == 5
    assert len([rec for rec in caplog.records if "handler for /boom failed" in rec.getMessage()]) == 1


@pytest.mark.parametrize("number,label", [
    (O.EDHOC, b"edhoc"), (O.Q_BLOCK1, b"q-block1"), (O.Q_BLOCK2, b"q-block2"),
])  # (If-Match / If-None-Match are implemented: tests/test_conditional.py)
def test_a_critical_option_corem_does_not_implement_is_4_02_not_ignored(number, label):
    """RFC 7252 §5.4.1: known to the codec is not understood by the server."""
    ep = endpoint(limit_error_size=False)
    assert ep.receive(post(options=sorted([(O.URI_PATH, b"t"), (number, b"")])), PEER, 0.0) is None
    [rsp] = sent(ep)
    assert rsp.code == Code.BAD_OPTION and bytes(rsp.payload) == label + b": critical option not supported"
    assert ep.stats.bad_options == 1 and ep.stats.requests == 1


@pytest.mark.parametrize("number", [O.PROXY_URI, O.PROXY_SCHEME])
def test_proxy_options_are_5_05_cut_to_the_request_on_plain_udp(number):
    """RFC 7252 §5.7.2: corem is no forward-proxy.  On plain UDP the answer is no larger than the
    request (no amplifier); behind DTLS the whole reason goes out."""
    for limit in (True, False):
        ep = endpoint(limit_error_size=limit)
        datagram = post(options=[(number, b"coap")])
        assert ep.receive(datagram, PEER, 0.0) is None
        [(data, _)] = ep.datagrams_to_send()
        rsp = decode(data)
        assert rsp.code == Code.PROXYING_NOT_SUPPORTED and ep.stats.proxy_refused == 1
        assert bytes(rsp.payload).startswith(b"proxy-")
        if limit:
            assert len(data) <= len(datagram)
        else:
            assert bytes(rsp.payload).endswith(b": corem is not a proxy")


# -- a DTLS session with a Connection ID that moves (RFC 9146 §6: Endpoint.moved) -------------------

NEW = ("198.51.100.7", 40000)
NEWER = ("198.51.100.7", 40001)


def test_a_moved_session_owes_its_answers_at_the_new_address():
    ep = endpoint()
    req = ep.receive(post(mid=7), PEER, 0.0)
    ep.new_session(NEW, 0.1)  # (as the server does on a move: NEW's earlier message ids are not its)
    ep.moved(PEER, NEW, 0.1)
    # its retransmission from the new address is the same exchange, not a second request
    assert ep.receive(post(mid=7), NEW, 0.2) is None and ep.stats.duplicates == 1
    req.respond(Code.CHANGED, now=0.3)
    [(data, to)] = ep.datagrams_to_send()
    assert to == NEW and decode(data).code == Code.CHANGED
    # and a further retransmission from there gets the cached answer, there
    assert ep.receive(post(mid=7), NEW, 0.4) is None
    [(again, to)] = ep.datagrams_to_send()
    assert to == NEW and again == data
    # a new message id from the new address is a new request
    assert isinstance(ep.receive(post(mid=8), NEW, 0.5), Request)


def test_a_moved_session_gets_our_retransmissions_and_its_ack_settles_them():
    ep = endpoint()
    assert ep.send_confirmable(b"\x40\x45\x00\x09", PEER, 9, b"")
    ep.datagrams_to_send()
    ep.moved(PEER, NEW, 1.0)
    ep.moved(NEW, NEWER, 1.5)  # (twice within the exchange: everything goes to the newest)
    ep.tick(2.0)
    [(_, to)] = ep.datagrams_to_send()
    assert to == NEWER
    assert ep.receive(bytes((0x60, 0, 0, 9)), NEWER, 2.1) is None
    assert isinstance(ep.next_event(), Acked) and ep.outstanding == 0


def test_a_new_session_at_an_address_a_session_left_is_its_own():
    ep = endpoint()
    old = ep.receive(post(mid=7), PEER, 0.0)
    ep.moved(PEER, NEW, 0.1)
    ep.new_session(PEER, 0.2)  # another device handshakes at the old address
    old.respond(Code.CHANGED, now=0.3)
    assert ep.datagrams_to_send() == []  # (never to the other device; see Endpoint.moved)
    ep.send(b"\x50\x45\x00\x01", PEER, Code.CONTENT)
    [(_, to)] = ep.datagrams_to_send()
    assert to == PEER  # the new session at the old address is answered there
    # the moved session's message id 7, sent again from the old address by the new device: new
    assert isinstance(ep.receive(post(mid=7), PEER, 0.4), Request)


def test_a_move_is_forgotten_after_the_exchange_lifetime():
    ep = endpoint()
    ep.receive(post(mid=7), PEER, 0.0).respond(Code.CHANGED, now=0.0)
    ep.datagrams_to_send()
    ep.moved(PEER, NEW, 1.0)
    ep.tick(1.0 + ep.params.exchange_lifetime + 1)
    ep.send(b"\x50\x45\x00\x01", PEER, Code.CONTENT)
    [(_, to)] = ep.datagrams_to_send()
    assert to == PEER
    assert isinstance(ep.receive(post(mid=7), NEW, 300.0), Request)


# -- found by a review of the message layer's conformance (RFC 7252 §3, §4.3, §5.4) -----------------

def test_a_block2_number_past_any_payload_is_4_02_and_nothing_on_the_way_can_end_the_server():
    """A GET whose Block2 asks for a block of an empty 2.05 -- or a number a block option cannot
    carry -- was a ValueError out of the router, outside the handler's guard: one datagram ended
    `corem serve`.  Now the block is 4.02, and whatever goes wrong anywhere in dispatch is 5.00."""
    r = Router()
    r.add("empty", {Code.GET: lambda req, p: Response(Code.CONTENT, b"")})
    for value in (bytes([5 << 4 | 2]), ((1 << 19) << 4 | 2).to_bytes(3, "big")):
        ep = endpoint()
        opts = [(O.URI_PATH, b"empty"), (O.BLOCK2, value)]
        req = ep.receive(encode(Message(Type.CON, Code.GET, 1, b"t", opts)), PEER, 0.0)
        assert r.dispatch(req).code == Code.BAD_OPTION
    ep = endpoint()
    req = ep.receive(encode(Message(Type.CON, Code.GET, 1, b"t", [(O.URI_PATH, b"empty")])), PEER, 0.0)
    assert r.dispatch(req).code == Code.CONTENT
    broken = Router()
    broken.add("x", {Code.GET: lambda req, p: Response(Code.CONTENT, b"")})
    broken.unwrap = lambda req: 1 / 0  # (a bug before any handler)
    req = endpoint().receive(encode(Message(Type.CON, Code.GET, 1, b"t", [(O.URI_PATH, b"x")])), PEER, 0.0)
    assert broken.dispatch(req).code == Code.INTERNAL_SERVER_ERROR and broken.handler_errors == 1


@pytest.mark.parametrize("extra, label", [
    ([(O.ACCEPT, b""), (O.ACCEPT, b"\x32")], b"accept: given more than once"),  # §5.4.5
    ([(O.URI_HOST, b"a"), (O.URI_HOST, b"b")], b"uri-host: given more than once"),
    ([(O.URI_PORT, b"\x01\x02\x03")], b"uri-port: 3 bytes, not 0-2"),  # §5.4.3
    ([(O.BLOCK2, b"\x00\x00\x00\x10")], b"block2: 4 bytes, not 0-3"),
    ([(O.IF_MATCH, b"123456789")], b"if-match: 9 bytes, not 0-8"),
])
def test_a_critical_option_corem_cannot_read_is_4_02_to_a_con_and_ignored_in_a_non(extra, label):
    """RFC 7252 §5.4.3 and §5.4.5: a value whose length is not its option's, or an option that is
    not repeatable given again, is unrecognized -- 4.02 for a critical one in a CON; a NON with one
    is rejected (§5.4.1, §4.3): silently ignored, and its retransmission too."""
    ep = endpoint(limit_error_size=False)
    opts = sorted([(O.URI_PATH, b"t"), *extra], key=lambda o: o[0])
    assert ep.receive(post(options=opts), PEER, 0.0) is None
    [rsp] = sent(ep)
    assert (rsp.type, rsp.code, bytes(rsp.payload)) == (Type.ACK, Code.BAD_OPTION, label)
    for _ in range(2):
        assert ep.receive(post(mid=0x200, mtype=Type.NON, options=opts), PEER, 0.0) is None
        assert sent(ep) == []
    assert ep.stats.bad_options == 2


def test_an_elective_option_corem_cannot_read_is_ignored():
    """§5.4.1: an unrecognized elective option is ignored -- the request is served without it
    (an Observe of 4 bytes: no registration; a second Content-Format: the first one counts)."""
    ep = endpoint()
    opts = [(O.OBSERVE, b"\x00\x00\x00\x00"), (O.URI_PATH, b"t"), (O.CONTENT_FORMAT, b"\x3c"), (O.CONTENT_FORMAT, b"")]
    req = ep.receive(post(options=opts), PEER, 0.0)
    assert isinstance(req, Request) and req.message.opt(O.OBSERVE) is None
    assert req.message.options == [(O.URI_PATH, b"t"), (O.CONTENT_FORMAT, b"\x3c")]


def test_a_message_of_another_version_is_ignored_not_reset():
    """RFC 7252 §3: a message with an unknown version number MUST be silently ignored (an RST in
    version 1 would answer a header it does not share)."""
    ep = endpoint()
    for version in (0, 2, 3):
        assert ep.receive(bytes((version << 6, 0x01, 0x12, 0x34)), PEER, 0.0) is None
        assert sent(ep) == []
    assert ep.stats.format_errors == 3


def test_a_request_carried_in_an_ack_is_not_served():
    """RFC 7252 §4.3, Table 1: requests come as CON or NON; an ACK with a request code is no
    request (a RST with one is malformed already)."""
    ep = endpoint()
    assert ep.receive(encode(Message(Type.ACK, Code.GET, 7, b"t", [(O.URI_PATH, b"x")])), PEER, 0.0) is None
    assert sent(ep) == [] and ep.stats.requests == 0 and ep.stats.format_errors == 1


def test_an_accept_the_resource_cannot_give_is_4_06():
    """RFC 7252 §5.10.4: if the preferred Content-Format cannot be returned, 4.06 MUST be sent.
    An Accept a resource honours (the doors answer CBOR to Accept: 60, else JSON) is served."""
    from corem.coap import discovery

    r = Router()
    discovery.install(r)
    r.add("j", {Code.GET: lambda req, p: Response(Code.CONTENT, b"{}", [(O.CONTENT_FORMAT, b"\x32")])})

    def ask(path: bytes, accept: bytes | None) -> Response:
        opts = sorted([*[(O.URI_PATH, s) for s in path.split(b"/")], *([(O.ACCEPT, accept)] if accept is not None else [])],
                      key=lambda o: o[0])
        req = endpoint().receive(encode(Message(Type.CON, Code.GET, 1, b"t", opts)), PEER, 0.0)
        return r.dispatch(req)

    assert ask(b".well-known/core", b"\x32").code == Code.NOT_ACCEPTABLE
    assert ask(b".well-known/core", b"\x28").code == Code.CONTENT  # (40: link-format)
    assert ask(b".well-known/core", None).code == Code.CONTENT
    assert ask(b"j", b"\x32").code == Code.CONTENT and ask(b"j", b"\x3c").code == Code.NOT_ACCEPTABLE
