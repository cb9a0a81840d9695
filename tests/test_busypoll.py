"""Busy-polling the CoAPS socket after a handshake flight (corem/net/busypoll.py): the policy alone,
the C poll on real sockets, the edge's loop with it, and the setting.  End to end with libcoap's
DTLS clients: test_interop_dtls.py."""

from __future__ import annotations

import fcntl
import select
import socket
import time

import pytest
import trio

from corem.config import ConfigError, Settings
from corem.coap import Endpoint
from corem.metrics import gather
from corem.net.busypoll import BUDGET, BURST, MAX_SKIP, BusyPoll, busy_poll
from corem.net.udp import UdpEdge

readable_within = pytest.importorskip("corem.net._sockets").readable_within  # (without C: no busy poll)

from .test_edge import Rot, exchange, request, rot, router, udp_pair  # noqa: F401 - udp_pair: a fixture


class Scripted:
    """`readable_within` for the policy's unit tests: answers from a script, records the calls."""

    def __init__(self, answers: list[bool]) -> None:
        self.answers = answers
        self.calls: list[tuple[int, int]] = []

    def __call__(self, fd: int, ns: int) -> bool:
        self.calls.append((fd, ns))
        return self.answers.pop(0)


def test_a_poll_that_sees_nothing_skips_the_next_flights_doubling_and_an_answer_ends_the_backoff():
    wait = Scripted([False, False, True, False, True])
    busy = BusyPoll(150, lambda: 0, wait)
    outcomes = [busy.poll(7) for _ in range(1 + 1 + 1 + 3 + 1 + 1 + 1)]
    # miss; skip 1; miss; skip 3; hit (the backoff ends); miss; skip 1 (from 0 again, not 7)
    assert outcomes == [False, False, False, False, False, False, True, False, False]
    assert wait.calls == [(7, 150_000)] * 4 and wait.answers == [True]
    assert (busy.answered, busy.missed) == (1, 3) and busy.seconds >= 0.0
    assert busy.poll(7) is True and busy.answered == 2


def test_the_backoff_stops_at_max_skip():
    busy = BusyPoll(10, lambda: 0, Scripted([False] * 20))
    skips = []
    for _ in range(10):
        assert busy.poll(3) is False
        n = 0
        while busy._skip:
            busy.poll(3)
            n += 1
        skips.append(n)
    assert skips == [min(2 ** k - 1, MAX_SKIP) for k in range(1, 11)]  # (doubling, then held at MAX_SKIP)


class Clock:
    """A clock the test moves; `wait` moves it by the poll's time."""

    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_polling_never_takes_more_than_its_share_of_the_time_whatever_comes():
    """Polls that keep seeing a datagram (anyone's: other devices, spoofed hellos) never back off;
    the budget bounds them: BUDGET of the time, BURST at once."""
    clock = Clock()

    def busy_answering(fd: int, ns: int) -> bool:
        clock.t += ns / 1e9  # (each poll waits its whole window, then something comes)
        return True

    busy = BusyPoll(150, lambda: 0, busy_answering, clock)
    polled = 0.0
    for _ in range(10_000):  # (a poll after each flight, a flight every 150 µs: polling would be all of it)
        before = clock.t
        busy.poll(3)
        polled += clock.t - before
        clock.t += 0.000_001  # (the batch's own work)
    elapsed = clock.t - 100.0
    assert polled <= BUDGET * elapsed + BURST + 0.000_150
    assert polled >= 0.9 * BUDGET * elapsed  # (and it does take its share: the bucket refills)
    assert busy.answered == round(busy.seconds / 0.000_150)


def test_a_poll_that_fails_is_a_miss_not_an_error():
    def failing(fd: int, ns: int) -> bool:
        raise OSError(12, "Cannot allocate memory")

    busy = BusyPoll(150, lambda: 0, failing)
    assert busy.poll(3) is False and busy.missed == 1


def test_windows_out_of_range_are_refused_naming_the_setting():
    assert busy_poll(0, lambda: 0) is None and busy_poll(150, lambda: 0).window_ns == 150_000
    with pytest.raises(ConfigError, match=r"dtls_busy_poll_us: 5000 must be within 0-2000 \(µs; 0 is off\)"):
        Settings.load({"dtls_busy_poll_us": 5000}, env={})
    assert Settings.load({}, env={}).dtls_busy_poll_us == 150


def _closed(fd: int) -> bool:
    try:
        fcntl.fcntl(fd, fcntl.F_GETFD)
    except OSError:
        return True
    return False


def test_readable_within_polls_a_real_socket(udp_pair):
    a, b = udp_pair
    assert readable_within(b.fileno(), 2_000_000) is False  # nothing came: the whole window, then False
    a.sendto(b"x", b.getsockname())
    assert select.select([b], [], [], 30)[0]  # (delivered: on a busy machine loopback may take longer than a window)
    assert readable_within(b.fileno(), 0) is True  # (waiting: True at the first look)
    assert b.recv(10) == b"x"
    # (a number no file has: one just closed could be reused by another thread meanwhile; the kernel
    # hands out the lowest free number, so one this high stays free)
    fd = next(n for n in range(4096, 8192) if _closed(n))
    with pytest.raises(OSError):  # (a closed fd is an error, not "readable")
        readable_within(fd, 1000)
    with pytest.raises(ValueError, match="0-10,000,000 ns"):
        readable_within(b.fileno(), 10_000_001)
    with pytest.raises(ValueError, match="fd >= 0"):  # (poll() passes a negative fd over: a whole window)
        readable_within(-1, 1000)


class Flights(Rot):
    """Rot, whose answers to "hello" are handshake flights (`flights_sent` grows with each)."""

    def __init__(self) -> None:
        super().__init__()
        self.flights_sent = 0

    def receive(self, datagram, peer, now):
        if datagram == b"hello":
            self.flights_sent += 1
        return super().receive(datagram, peer, now)


async def test_the_edge_polls_once_after_a_batch_that_sent_a_flight_and_never_after_others(udp_pair):
    client, server_sock = udp_pair
    layer = Flights()
    polls = []

    def spy(fd: int, ns: int) -> bool:
        """the real poll, each call recorded; True whatever it saw, so no poll is skipped by a backoff"""
        polls.append(readable_within(fd, ns))
        return True

    busy = BusyPoll(150, lambda: layer.flights_sent, spy)
    edge = UdpEdge(server_sock, Endpoint(), router(), security=layer, busy_poll=busy)
    server = server_sock.getsockname()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(edge.serve)
        got = await exchange(client, server, [rot(request(i)) for i in range(5)], 5)
        assert len(got) == 5 and polls == []  # answers, no flight: no poll
        assert await exchange(client, server, [b"hello"], 1) == [b"welcome"]
        # the flight's batch is followed by one poll (which saw nothing: this client is a task of
        # the loop the poll holds), the requests' batches by none
        assert len(await exchange(client, server, [rot(request(9)), rot(request(10))], 2)) == 2
        nursery.cancel_scope.cancel()
    assert polls == [False] and (busy.answered, busy.missed) == (1, 0)
    samples = gather([(edge, {})])
    assert samples["corem_dtls_busy_polls"][(("outcome", "answered"),)] == busy.answered
    assert samples["corem_dtls_busy_polls"][(("outcome", "missed"),)] == busy.missed


class EveryBatchAFlight(Rot):
    """A layer that reports a flight at every batch (`flights_sent` grows at each look)."""

    def __init__(self) -> None:
        super().__init__()
        self._flights = 0

    @property
    def flights_sent(self) -> int:
        self._flights += 1
        return self._flights


async def test_busy_polled_batches_back_to_back_still_give_the_other_tasks_the_loop(udp_pair):
    """A poll that always finds something keeps the loop from sleeping in epoll, never from
    running the other tasks: a task sleeping 5 ms five times wakes each time (YIELD_AFTER)."""
    client, server_sock = udp_pair
    polls = 0
    give_up = time.monotonic() + 60

    def always(fd: int, ns: int) -> bool:
        nonlocal polls
        polls += 1
        if time.monotonic() > give_up:  # (the loop never yielded: fail, rather than hang the suite)
            raise AssertionError("the edge's loop never gave the other tasks a turn")
        return True

    layer = EveryBatchAFlight()
    busy = BusyPoll(150, lambda: layer.flights_sent, always)
    edge = UdpEdge(server_sock, Endpoint(), router(), security=layer, busy_poll=busy)
    seen = []  # (the polls so far, at each wake of the other task)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(edge.serve)
        client.sendto(rot(request(1)), server_sock.getsockname())  # (the first batch: from then on, polled)
        with trio.fail_after(60):  # (only detects an edge that never polls: a failure, not a hang)
            while not polls:  # (its first poll, however long a busy machine takes to get there)
                await trio.sleep(0.001)
        for _ in range(5):
            await trio.sleep(0.005)
            seen.append(polls)
        nursery.cancel_scope.cancel()
    # the other task woke five times, and between any two wakes the edge went on polling
    assert len(seen) == 5 and all(a < b for a, b in zip(seen, seen[1:])), seen


async def test_without_busy_poll_the_edge_reports_no_poll_metrics(udp_pair):
    _, server_sock = udp_pair
    edge = UdpEdge(server_sock, Endpoint(), router(), security=Flights())
    assert "corem_dtls_busy_polls" not in gather([(edge, {})])


def test_the_engine_counts_its_handshake_flights_and_nothing_else():
    """What the edge polls after, on corem's real engine (not a stand-in): the HelloVerifyRequest,
    the ServerHello flight and the Finished flight are flights; application data, a close_notify and
    the fatal alert that ends a handshake of an unknown identity are not (no answer comes to them)."""
    from corem.dtls.engine import Client

    from .test_dtls import IDENTITY
    from .test_dtls_layer import A, KEY, handshake, layer

    srv, _ = layer()
    flights = []

    def exchange(client, now=0.0):
        before = srv.flights_sent()
        for d in client.datagrams_to_send():
            srv.receive(d, A, now)
        for d, _ in srv.datagrams_to_send():
            client.receive(d, now)
        flights.append(srv.flights_sent() - before)

    c = Client(IDENTITY.encode(), KEY)
    c.start(0.0)
    while not c.established:
        exchange(c)
        assert len(flights) < 10, flights
    assert flights == [1, 1, 1]  # HelloVerifyRequest, ServerHello..Done, ChangeCipherSpec + Finished
    before = srv.flights_sent()
    assert srv.receive(c.wrap(b"\x50\x01\x00\x01"), A, 0.0) is not None  # (a CoAP ping's record)
    c.conn.close()
    for d in c.datagrams_to_send():  # its close_notify
        srv.receive(d, A, 0.0)
    assert srv.flights_sent() == before

    stranger = Client(b"nobody", KEY)
    stranger.start(0.0)
    flights.clear()
    while stranger.state != "failed":
        exchange(stranger)
        assert len(flights) < 10, flights
    assert flights == [1, 1, 0], flights  # (its key exchange is answered by a fatal alert: not a flight)
    assert handshake(srv)  # (and a device it knows still gets its session)
