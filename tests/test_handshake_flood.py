"""Issue 26, item 9: a flood of half-open DTLS handshakes must not lock new devices out.

Through a running `corem serve` (loopback, default `dtls_max_handshakes` 1000 and rate limit): a
flooder process (tests/handshake_flood.py) does the cookie exchange from many source ports on many
loopback addresses and then keeps sending its cookie'd ClientHellos, never finishing a handshake;
meanwhile libcoap's coap-client-openssl (PSK) does what a device does -- cookie exchange,
handshake, a CBOR reading -- one device after another, each timed from process start to exit.

What is asserted, and why so (a shared 2-core machine runs corem, the flooder and the clients):
- every device gets its 2.04 (coap-client gives up after 5 s).  Before slots.py none did: the
  flood holds all 1,000 slots and refills each one as it frees.
- the product's requirement, each handshake and reading within 2 s, is asserted per device.  A
  handshake here takes tens of milliseconds (measured: 7-120 ms during the flood), so 2 s is a
  margin of one lost datagram (OpenSSL's DTLS retransmission timer starts at 1 s) -- not of a
  slow machine.  What slots.py decides is who gets a slot; it cannot help a datagram the kernel
  dropped because corem's socket overflowed.  So only when that happened during the devices'
  phase (corem's socket drop counter in /proc/net/udp moved: the machine could not keep up with
  the flood) or the machine is visibly starved (the test's own 10 ms sleeps overshoot by 100 ms on
  average: other jobs on the two cores) is the per-device bound relaxed to the median; the
  latencies, drops and starvation are printed either way.  The flooder runs at nice 10: on a real
  network the flood comes from other machines, it does not take the server's CPU.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from .conftest import SPEC_IDENTITY, SPEC_KEY, coap_client, needs_libcoap, start_corem, write_cbor

# alone: with other tests beside it under pytest-xdist the machine is starved past what the devices'
# 5 s can take (one device of nine got no answer, with 4 workers on 2 cores)
pytestmark = [needs_libcoap, pytest.mark.slow, pytest.mark.alone]

CLIENT = "coap-client-openssl"
REQUIREMENT = 2.0
RATE = float(os.environ.get("FLOOD_RATE", 150_000))


def flooder(port: int, addresses: list[str], per_address: int, rate: float, seconds: float,
            max_datagrams: int) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.handshake_flood", str(port), ",".join(addresses), str(per_address),
         str(rate), str(seconds), str(max_datagrams)],
        stdout=subprocess.PIPE, text=True, preexec_fn=lambda: os.nice(10),
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert proc.stdout is not None
    ready = json.loads(proc.stdout.readline())
    assert ready["ready"] >= 0.9 * len(addresses) * per_address, ready  # cookies in hand
    return proc


def finish(proc: subprocess.Popen) -> dict:
    proc.send_signal(signal.SIGINT)  # the flooder prints what it sent
    out, _ = proc.communicate(timeout=30)
    lines = [json.loads(line) for line in out.splitlines() if line.strip()]
    return lines[-1] if lines else {}


def refused(m: dict[str, float]) -> float:
    return sum(v for k, v in m.items() if k.startswith("corem_dtls_handshakes_refused_total"))


def handshaking(m: dict[str, float]) -> float:
    return sum(v for k, v in m.items() if k.startswith("corem_dtls_sessions{") and 'state="handshaking"' in k)


def wait_until_full(corem, *, handshakes: float, timeout: float = 30.0) -> dict[str, float]:
    """Until the flooder holds `handshakes` slots and has been refused more."""
    deadline = time.monotonic() + timeout
    while True:
        m = corem.metrics()
        if handshaking(m) >= handshakes and refused(m) > 100:
            return m
        assert time.monotonic() < deadline, f"the flood did not fill the slots: {handshaking(m)} {refused(m)}"
        time.sleep(0.2)


def socket_drops(port: int) -> int:
    """Datagrams the kernel dropped at the UDP socket bound to 127.0.0.1:port (Linux; else 0)."""
    try:
        with open("/proc/net/udp") as f:
            for line in f:
                fields = line.split()
                if fields[1] == f"0100007F:{port:04X}":
                    return int(fields[-1])
    except OSError:
        pass
    return 0


def starved() -> bool:
    """Other work on the machine is taking the CPU from this test's processes."""
    over = 0.0
    for _ in range(10):
        t = time.monotonic()
        time.sleep(0.01)
        over += time.monotonic() - t - 0.01
    return over / 10 > 0.1


def devices(corem, reading, n: int, pause: float = 0.0) -> list[tuple[str | None, float]]:
    """n devices one after another, `pause` seconds apart: (response code, seconds from start to exit)."""
    out = []
    for i in range(n):
        time.sleep(pause if i else 0.0)
        t = time.monotonic()
        r = coap_client(
            f"coaps://127.0.0.1:{corem.coaps_port}/telemetry",
            "-m", "post", "-u", SPEC_IDENTITY, "-k", SPEC_KEY, "-t", "application/cbor", "-f", str(reading),
            binary=CLIENT, timeout=5,
        )
        out.append((r.code, time.monotonic() - t))
    return out


def check(results: list[tuple[str | None, float]], was_starved: bool, what: str) -> None:
    latencies = sorted(t for _, t in results)
    print(f"{what}: devices {[c for c, _ in results]}, seconds {[round(t, 3) for t in latencies]}, "
          f"starved {was_starved}")
    assert [c for c, _ in results] == ["2.04"] * len(results), results
    assert latencies[len(latencies) // 2] < REQUIREMENT, latencies
    if not was_starved:
        assert latencies[-1] < REQUIREMENT, latencies


def test_devices_get_in_during_a_flood_of_cookied_hellos_from_200_addresses(data_dir, tmp_path):
    reading = write_cbor(tmp_path / "reading.cbor", {"temperature": 21.5})
    corem = start_corem(data_dir, "--log-level", "warning")
    # 200 addresses x 10 ports: 10 addresses in each of 19 /24s of 127.1.0.0/16, and 10 in the devices'
    # own 127.0.0.0/24 (fairness inside a prefix, not only between prefixes)
    addresses = [f"127.1.{net}.{host}" for net in range(19) for host in range(1, 11)]
    addresses += [f"127.0.0.{host}" for host in range(2, 12)]
    try:
        flood = flooder(corem.coaps_port, addresses, 10, rate=RATE, seconds=60, max_datagrams=6_000_000)
    except BaseException:
        corem.stop()
        raise
    try:
        m = wait_until_full(corem, handshakes=corem_max_handshakes(corem) * 0.98)
        time.sleep(1.0)  # the flood's own first scramble for the slots (evictions among its sources)
        was_starved, drops = starved(), socket_drops(corem.coaps_port)
        results = devices(corem, reading, 9, pause=1.0)  # spread over the flood
        drops = socket_drops(corem.coaps_port) - drops
        print("flood: corem's socket dropped", drops, "datagrams while the devices ran")
        was_starved = was_starved or starved() or drops > 0
        m = corem.metrics()
    finally:
        report = finish(flood)
        corem.stop()
    shown = ("handshake", "hello", "rate_limited")
    print("flood:", report, {k: v for k, v in m.items() if any(w in k for w in shown)})
    check(results, was_starved, "flood")
    assert report.get("sent", 0) > 50_000
    assert m["corem_dtls_handshakes_completed_total"] == 9


def test_one_address_pacing_under_the_rate_limit_holds_only_its_share(data_dir, tmp_path):
    reading = write_cbor(tmp_path / "reading.cbor", {"temperature": 21.5})
    corem = start_corem(data_dir, "--log-level", "warning")
    # 1,500 ports on one address, 500 hellos/s: half the default rate limit (1,000/s per address)
    try:
        flood = flooder(corem.coaps_port, ["127.2.0.1"], 1500, rate=500, seconds=60, max_datagrams=30_000)
    except BaseException:
        corem.stop()
        raise
    try:
        m = wait_until_full(corem, handshakes=1)
        time.sleep(2.5)  # old corem: the 1,000 slots are full after ~2 s at this pace
        held = handshaking(corem.metrics())
        was_starved, drops = starved(), socket_drops(corem.coaps_port)
        results = devices(corem, reading, 15)
        was_starved = was_starved or starved() or socket_drops(corem.coaps_port) > drops
        m = corem.metrics()
    finally:
        report = finish(flood)
        corem.stop()
    print("pacing:", report, held, {k: v for k, v in m.items() if "handshake" in k or "rate_limited" in k})
    check(results, was_starved, "pacing")
    assert held <= 0.05 * corem_max_handshakes(corem), held  # its share (2%), not the table
    assert m.get('corem_dtls_handshakes_refused_total{reason="address"}', 0) > 0, m
    assert m.get("corem_rate_limited_datagrams_total{transport=\"dtls\"}", 0) == 0  # it was under the rate


def corem_max_handshakes(corem) -> int:
    return 1000  # the default (`dtls_max_handshakes`); these tests do not change it
