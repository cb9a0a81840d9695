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

        first = subprocess.Popen([COAP_CLIENT, "-s", "3", "-m", "get", f"{server.coap}/api/v1/T0KEN-1/rpc"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import time

        deadline = time.monotonic() + 10
        while not server.metrics().get('corem_coap_observers{transport="udp"}') and time.monotonic() < deadline:
            time.sleep(0.05)
        second = coap_client(f"{server.coap}/api/v1/T0KEN-1/attributes", "-m", "get", "-s", "1")
        assert second.code == "2.05" and "Observe" not in second.output.split("c:2.05")[-1].split("\n")[0]
        assert server.metrics()['corem_coap_observe_refused_total{transport="udp"}'] == 1
        first.wait(20)
    finally:
        server.stop()
