"""The per-source rate limit, with an explicit clock."""

from __future__ import annotations

import pytest

from corem.net.limits import SourceLimiter



def test_burst_then_rate():
    lim = SourceLimiter(rate=10, burst=5)
    assert [lim.allow("a", 0.0) for _ in range(7)] == [True] * 5 + [False] * 2
    assert lim.allow("b", 0.0)  # another source has its own bucket
    assert not lim.allow("a", 0.05)  # 0.5 token back: not enough
    assert lim.allow("a", 0.1)  # one token back
    assert not lim.allow("a", 0.1)
    assert [lim.allow("a", 100.0) for _ in range(6)] == [True] * 5 + [False]  # refills to the burst, no more
    assert lim.dropped == 5


def test_table_is_bounded():
    lim = SourceLimiter(rate=1, burst=1, max_sources=3)
    for i in range(10):
        lim.allow(f"10.0.0.{i}", 0.0)
    assert len(lim) == 3 and lim.evicted == 7


def test_bad_parameters():
    with pytest.raises(ValueError, match="rate"):
        SourceLimiter(rate=0)
    with pytest.raises(ValueError, match="burst"):
        SourceLimiter(rate=1, burst=0.5)


def test_configured_bounds_hold_on_a_running_server(data_dir, tmp_path):
    """`max_upload_size` and `max_observers_per_source` as flags: a Block1 upload past the size is
    4.13, an observer past the per-source bound is answered without Observe; both counted."""
    import json

    from .conftest import COAP_CLIENT, coap_client, start_corem

    if COAP_CLIENT is None:
        pytest.skip("libcoap3-bin is not installed")
    server = start_corem(data_dir, "--max-upload-size", "256", "--max-observers-per-source", "1")
    try:
        url = f"{server.coap}/api/v1/T0KEN-1/telemetry"
        big = tmp_path / "big.json"
        big.write_text(json.dumps({f"r{i}": i for i in range(60)}))  # ~600 bytes
        assert coap_client(url, "-m", "post", "-t", "50", "-b", "64", "-f", str(big)).code == "4.13"
        assert server.metrics()['corem_coap_uploads_refused_total{transport="udp"}'] == 1
        small = tmp_path / "small.json"
        small.write_text('{"t": 1}')
        assert coap_client(url, "-m", "post", "-t", "50", "-b", "64", "-f", str(small)).code == "2.04"
        import subprocess

        # (observing for longer than a busy machine takes to the second's refusal; ended then)
        first = subprocess.Popen([COAP_CLIENT, "-s", "60", "-m", "get", f"{server.coap}/api/v1/T0KEN-1/rpc"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        from .conftest import wait_for

        wait_for(lambda: server.metrics().get('corem_coap_observers{transport="udp"}'), what="the first observer")
        second = coap_client(f"{server.coap}/api/v1/T0KEN-1/attributes", "-m", "get", "-s", "1")
        assert second.code == "2.05" and "Observe" not in second.output.split("c:2.05")[-1].split("\n")[0]
        assert server.metrics()['corem_coap_observe_refused_total{transport="udp"}'] == 1
        first.terminate()
        first.wait(60)
    finally:
        server.stop()


def test_an_excused_datagram_counts_as_exempted_not_dropped():
    lim = SourceLimiter(rate=1, burst=1)
    assert lim.allow("nat", 0.0) and not lim.allow("nat", 0.0)
    lim.excuse()
    assert (lim.dropped, lim.exempted) == (0, 1)


@pytest.mark.parametrize("lane", ["on", "off"])
def test_a_fleet_behind_one_address_is_not_throttled_but_junk_from_it_is(tmp_path, lane):
    """rate_limit_per_source 5/s on one loopback address that many devices share (a carrier NAT):
    readings that name a known token, and a DTLS session's records, all go through; datagrams
    without a credential from the same address are dropped past the rate."""
    import socket as _socket

    import cbor2

    from corem.codec import Code

    from .conftest import corem_cli, start_corem
    from .dtls_udp_client import DtlsUdpClient
    from .conftest import post

    data = tmp_path / "data"
    corem_cli("devices", "add", "--tenant", "acme", "--device", "d1", "--token", "T1", data_dir=data)
    corem_cli("devices", "add", "--tenant", "acme", "--device", "d7", "--psk-identity", "id7",
              "--psk", "a-key-of-16-bytes", data_dir=data)
    server = start_corem(data, "--rate-limit-per-source", "5", "--fast-lane", lane)
    device = DtlsUdpClient(server.coaps_port, "id7", b"a-key-of-16-bytes")
    try:
        junk = _socket.socket(_socket.AF_INET, _socket.SOCK_DGRAM)
        for i in range(40):  # no credential: the address's bucket (burst 10) runs dry
            junk.sendto(bytes((0x40, 0x01, 0, i)) + b"\xb4junk", ("127.0.0.1", server.coap_port))
        junk.close()
        reading = cbor2.dumps({"t": 1.0})
        answers = [post(server.coap_port, "T1", reading, 1000 + i, timeout=30) for i in range(30)]
        assert all(a is not None and a[1] == 0x44 for a in answers)  # every reading 2.04, none waited
        device.handshake()  # (the handshake itself is over the rate too: a ClientHello has no session yet,
        for _ in range(20):  # so it is retried until the bucket refills; its records then always pass)
            assert device.post(["telemetry"], reading).code == Code.CHANGED
        m = server.metrics()
        assert m['corem_rate_limited_datagrams_total{transport="udp"}'] >= 20
        assert m['corem_rate_limit_exempted_total{transport="udp"}'] >= 20
        assert m['corem_rate_limit_exempted_total{transport="dtls"}'] >= 10
    finally:
        device.close()
        server.stop()


def test_exempt_networks_are_never_limited():
    from corem.net.limits import parse_networks

    lim = SourceLimiter(rate=1, burst=1, exempt_networks=parse_networks("192.0.2.0/24, 2001:db8::/32"))
    assert all(lim.allow("192.0.2.7", 0.0) for _ in range(5))
    assert all(lim.allow("2001:db8::1", 0.0) for _ in range(5))
    assert [lim.allow("198.51.100.1", 0.0) for _ in range(3)] == [True, False, False]
    assert (lim.exempted, lim.dropped) == (8, 2)
    with pytest.raises(ValueError, match="rate_limit_exempt: '10.0.0.0/33' is not"):
        parse_networks("10.0.0.0/33")


def test_a_smaller_bound_keeps_the_newest_sources_with_their_buckets():
    """retune (SIGHUP's rate_limit_sources) drops the oldest at once (one by one from a dict's front
    was quadratic: 8.6 s for 200,000 sources, the event loop stalled) and keeps what the newest spent."""
    from corem.net.limits import SourceLimiter
    limiter = SourceLimiter(1.0, max_sources=1000)
    for i in range(10):
        assert limiter.allow(f"10.0.0.{i}", 0.0) and limiter.allow(f"10.0.0.{i}", 0.0)  # a burst of 2 each
    limiter.retune(1.0, 3, [])
    assert len(limiter) == 3 and limiter.evicted == 7
    assert not limiter.allow("10.0.0.9", 0.0)  # the newest kept: still spent
    assert limiter.allow("10.0.0.0", 0.0)  # the oldest dropped: a fresh bucket
