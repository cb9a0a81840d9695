"""corem/dtls/slots.py: who gets a half-open handshake slot (fairness, eviction order, pressure)."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corem.dtls.slots import ADDRESS, FULL, PREFIX, HandshakeSlots, Tally, Verdict, prefix_of


def take(slots: HandshakeSlots, peer, now: float = 0.0) -> Verdict:
    return slots.admit(peer, now)


def test_shares_derive_from_the_capacity():
    s = HandshakeSlots(1000)
    assert (s.per_address, s.per_prefix) == (20, 100)
    assert (HandshakeSlots(100).per_address, HandshakeSlots(100).per_prefix) == (2, 10)
    assert (HandshakeSlots(1).per_address, HandshakeSlots(1).per_prefix) == (1, 1)


def test_prefixes():
    assert prefix_of("192.0.2.7") == prefix_of("192.0.2.200") != prefix_of("192.0.3.7")
    assert prefix_of("2001:db8:0:1::5") == prefix_of("2001:db8:0:1:ffff::9") != prefix_of("2001:db8:0:2::5")
    assert prefix_of("::ffff:192.0.2.9") == prefix_of("192.0.2.1")
    assert prefix_of("fe80::1%eth0") == prefix_of("fe80::2")


def test_one_address_holds_only_its_share_and_a_newcomer_still_gets_in():
    """The pacing attacker of issue 26: one address, many ports, fills its share, no more."""
    s = HandshakeSlots(1000)
    verdicts = Counter(take(s, ("198.51.100.1", port)).reason for port in range(1500))
    assert verdicts == {None: 20, ADDRESS: 1480} and len(s) == 20
    assert take(s, ("203.0.113.5", 1)).reason is None


def test_a_prefix_at_its_share_makes_room_inside_itself():
    s = HandshakeSlots(1000)
    for host in range(1, 6):  # five addresses of one /24, 20 each: the prefix's 100
        for port in range(20):
            assert take(s, (f"198.51.100.{host}", port), now=port).reason is None
    assert s.held_by_prefix("198.51.100.9") == 100
    v = s.consider(("198.51.100.9", 1), 50.0)
    assert v.evict == ("198.51.100.1", 0)  # the heaviest address's oldest
    take(s, ("198.51.100.9", 1), 50.0)
    assert s.held_by_prefix("198.51.100.9") == 100 and s.held("198.51.100.9") == 1
    # the evicted address, now one short of the others, cannot take it back: that would be churn
    assert s.consider(("198.51.100.1", 99), 51.0).reason == PREFIX
    # other prefixes do not pay for it
    assert take(s, ("192.0.2.1", 1)).reason is None and s.evicted == 1


def test_full_table_evicts_from_the_heaviest_prefix_and_never_churns_between_equals():
    s = HandshakeSlots(100, per_address=10, per_prefix=50)
    for net in range(2):
        for host in range(5):
            for port in range(10):
                take(s, (f"10.0.{net}.{host}", port), now=1.0)
    assert len(s) == 100
    # a newcomer from a third prefix: evicts the oldest of the heaviest address of the heaviest prefix
    v = s.consider(("10.9.9.9", 1), 2.0)
    assert v.reason is None and v.evict is not None and v.evict[0].startswith("10.0.0.")
    take(s, ("10.9.9.9", 1), 2.0)
    # a second and third one from that prefix still hold far less than 10.0.1.0/24
    take(s, ("10.9.9.9", 2), 2.0)
    assert s.held("10.9.9.9") == 2 and len(s) == 100
    # the evicted flooder comes back: its prefix holds 48 or 49, the heaviest 50: no churn
    assert s.consider(("10.0.0.0", 99), 2.0).reason == FULL


def test_only_a_source_holding_less_than_half_evicts():
    s = HandshakeSlots(10, per_address=10, per_prefix=10)
    for port in range(7):
        take(s, ("10.0.0.1", port))
    for port in range(3):
        take(s, ("10.1.0.1", port))
    assert s.consider(("10.1.0.1", 99), 0.0).reason == FULL  # 3 against 7: about the same
    s.release(("10.1.0.1", 0))
    take(s, ("10.0.0.1", 7))  # 8 against 2: less than half
    assert s.consider(("10.1.0.1", 99), 0.0).evict == ("10.0.0.1", 0)


def test_full_table_with_equal_holders_refuses_and_turns_over_at_the_floor():
    s = HandshakeSlots(10, timeout=30.0, floor=5.0, per_address=1, per_prefix=1)
    for i in range(10):
        take(s, (f"10.0.{i}.1", 1), now=0.0)
    assert s.consider(("10.0.99.1", 1), 4.0).reason == FULL
    assert s.expire(4.0) == []
    assert s.expire(5.5) == [("10.0.0.1", 1)]  # the oldest first, one at once (a small table)
    assert take(s, ("10.0.99.1", 1), 5.5).reason is None


def test_expiry_is_smoothed_so_a_flood_cannot_take_a_whole_cohort_back_at_once():
    s = HandshakeSlots(1000, timeout=30.0, floor=5.0)
    for net in range(50):
        for port in range(20):
            take(s, (f"10.{net}.0.1", port), now=0.0)
    assert len(s) == 1000 and s.current_timeout() == 5.0
    fresh = iter((f"10.{100 + k // 20}.0.1", k % 20) for k in range(10_000))
    released = []
    for tick in range(52):  # the flood takes back every slot as soon as it is free
        now = 5.1 + 0.1 * tick
        released.append(len(s.expire(now)))
        for _ in range(released[-1]):
            assert take(s, next(fresh), now).reason is None
    assert released[0] == 20  # at once: a fiftieth of the table
    assert all(19 <= n <= 21 for n in released[1:50])  # then 200 a second (20 a tick, give or
    # take the float rounding of the ticks): the whole table once per floor
    # the cohort that came at 0 s (due at 5 s) is gone by 10.2 s: one more floor
    assert len(s) == 1000 and not any(int(peer[0].split(".")[1]) < 100 for peer in s)


def test_the_timeout_shrinks_as_the_table_fills():
    s = HandshakeSlots(100, timeout=30.0, floor=5.0, per_address=100, per_prefix=100)
    assert s.current_timeout() == 30.0
    for port in range(50):
        take(s, ("10.0.0.1", port), now=0.0)
    assert s.current_timeout() == 30.0  # half full: the whole timeout
    for port in range(50, 75):
        take(s, ("10.0.0.1", port), now=0.0)
    assert s.current_timeout() == pytest.approx(17.5)
    for port in range(75, 100):
        take(s, ("10.0.0.1", port), now=0.0)
    assert s.current_timeout() == 5.0
    assert s.expire(4.0) == [] and len(s.expire(5.5)) == 2  # (smoothed: a fiftieth at once)
    assert HandshakeSlots(10, timeout=2.0).floor == 2.0  # never longer than the timeout itself


def test_expire_is_oldest_first_and_release_frees():
    s = HandshakeSlots(1000)
    take(s, ("10.0.0.1", 1), now=0.0)
    take(s, ("10.0.0.2", 1), now=10.0)
    assert s.expire(31.0) == [("10.0.0.1", 1)]
    assert s.release(("10.0.0.2", 1)) and not s.release(("10.0.0.2", 1))
    assert len(s) == 0 and s.held("10.0.0.2") == 0 and s.held_by_prefix("10.0.0.2") == 0


def test_repeats_is_the_very_datagram_that_took_the_slot():
    s = HandshakeSlots(10)
    s.admit(("10.0.0.1", 1), 0.0, hello=b"hello-with-cookie")
    assert s.repeats(("10.0.0.1", 1), b"hello-with-cookie")
    assert not s.repeats(("10.0.0.1", 1), b"hello-with-cookie, record number 2")  # a retransmission
    assert not s.repeats(("10.0.0.1", 2), b"hello-with-cookie")


def test_non_tuple_peers_are_their_own_address():
    s = HandshakeSlots(4, per_address=1, per_prefix=4)
    assert take(s, "peer-a").reason is None
    assert take(s, "peer-b").reason is None
    assert s.consider("peer-a", 0.0).reason is None  # (already holds one: a no-op)


def test_tally_tracks_the_heaviest():
    t: Tally[str] = Tally()
    assert t.heaviest() is None
    for k in "aabbbc":
        t.add(k)
    assert t.heaviest() == ("b", 3)
    t.remove("b")
    t.remove("b")
    assert t.heaviest() == ("a", 2)
    for k in "aabc":
        t.remove(k)
    assert t.heaviest() is None and len(t) == 0


peers = st.tuples(st.sampled_from(["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.1.1", "10.0.2.1", "10.1.0.1",
                                   "2001:db8::1", "2001:db8::2", "2001:db8:0:1::1"]),
                  st.integers(0, 40))
ops = st.lists(st.tuples(st.sampled_from(["hello", "release", "tick"]), peers, st.floats(0, 3)), max_size=300)


@settings(max_examples=200, deadline=None)
@given(ops, st.integers(1, 40))
def test_invariants_under_any_sequence(ops, capacity):
    """Bounded; quotas held; counts consistent; an admission by eviction never leaves the
    newcomer's source holding more than its victim's did."""
    s = HandshakeSlots(capacity, timeout=10.0, floor=2.0)
    now = 0.0
    for op, peer, dt in ops:
        now += dt
        if op == "hello":
            v = s.consider(peer, now)
            if v.evict is not None and peer not in s:
                ev, mine = v.evict[0], peer[0]
                if prefix_of(ev) == prefix_of(mine):
                    fair = s.held(ev) > 2 * s.held(mine) + 1
                else:
                    fair = s.held_by_prefix(ev) > 2 * s.held_by_prefix(mine) + 1
                assert fair
            s.admit(peer, now, v)
        elif op == "release":
            s.release(peer)
        else:
            expired = s.expire(now)
            assert all(p not in s for p in expired)
        assert len(s) <= capacity
        by_address = Counter(p[0] for p in s)
        by_prefix = Counter(prefix_of(p[0]) for p in s)
        assert all(n <= s.per_address for n in by_address.values())
        assert all(n <= s.per_prefix for n in by_prefix.values())
        assert all(s.held(a) == n for a, n in by_address.items())
        assert all(s.held_by_prefix(a) == by_prefix[prefix_of(a)] for a in by_address)


# -- through DtlsServer (sans-IO, real Mbed TLS clients in memory) -----------------------------------

def _half_open(srv, peer, now: float = 0.0) -> bytes:
    """A flooder's handshake: the cookie exchange, the hello with the cookie, then silence."""
    from .test_dtls import Client

    c = Client(peer=peer)
    c.step()
    for d in c.outgoing():
        srv.receive(d, peer, now)
    for d, _ in srv.datagrams_to_send():
        c.buf.receive_from_network(d)
    c.step()
    hello = b"".join(c.outgoing())  # (nothing if the server did not answer the first hello)
    if hello:
        srv.receive(hello, peer, now)
    srv.datagrams_to_send()
    return hello


def test_a_device_gets_in_while_flooders_from_many_addresses_hold_every_slot():
    from .test_dtls import Client, server

    srv = server(max_handshakes=100)
    for net in range(10):
        for host in range(1, 6):
            for port in range(4):
                _half_open(srv, (f"198.51.{net}.{host}", 20000 + port))
    assert len(srv.handshakes) == 100 and len(srv.slots) == 100
    assert sum(srv.stats.handshakes_refused.values()) > 0
    device = Client(peer=("192.0.2.10", 40000))
    assert device.handshake(srv, now=1.0)  # before slots.py: refused, not even a HelloVerifyRequest
    assert srv.stats.handshakes_evicted == 1 and len(srv.handshakes) == 99
    assert set(srv.handshakes) == set(srv.slots)


def test_a_device_gets_in_while_one_address_paces_hellos_from_many_ports():
    from .test_dtls import Client, server

    srv = server(max_handshakes=100)
    hellos = [_half_open(srv, ("203.0.113.66", 10000 + port)) for port in range(150)]
    assert len(srv.handshakes) == 2  # its share: 2% of 100 (at least 2)
    assert srv.stats.handshakes_refused == {"address": 148}
    dropped = srv.stats.records_dropped
    srv.receive(hellos[0], ("203.0.113.66", 10000), 0.5)  # its hello again: dropped, not stepped
    assert srv.stats.records_dropped == dropped + 1 and not srv.datagrams_to_send()
    assert Client(peer=("192.0.2.10", 40000)).handshake(srv, now=1.0)


def test_half_open_handshakes_expire_faster_under_pressure():
    from .test_dtls import server

    srv = server(max_handshakes=20, handshake_timeout=30.0)
    for i in range(20):
        _half_open(srv, (f"198.51.{i}.1", 20000), now=0.0)
    assert len(srv.handshakes) == 20
    srv.tick(4.0)
    assert len(srv.handshakes) == 20
    srv.tick(5.5)  # full: the floor (5 s), not the 30 s timeout (smoothed: one at once)
    assert len(srv.handshakes) == len(srv.slots) == 19 and srv.stats.handshakes_failed["timeout"] == 1
