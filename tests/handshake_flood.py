"""A DTLS handshake flood for tests: ClientHellos with valid cookies that never go on.

    python -m tests.handshake_flood PORT ADDRESSES PORTS_PER_ADDRESS RATE SECONDS MAX_DATAGRAMS

ADDRESSES is a comma-separated list of local addresses (loopback: any of 127.0.0.0/8).  For each
address, PORTS_PER_ADDRESS sockets each do the cookie exchange once (a real Mbed TLS ClientHello,
the server's HelloVerifyRequest, the hello again with the cookie) and then keep sending that
cookie'd hello, round robin over all sockets, RATE datagrams a second in total, for SECONDS or
MAX_DATAGRAMS, whichever comes first.  The server's cookie is an HMAC of the source address and
port and a time (Mbed TLS: valid 60 s), not of the hello, so the same datagram keeps proving its
source: every time the server has no handshake for that peer it must decide whether to start one.
Nothing is ever read past the cookie, so every handshake it starts stays half-open.

Prints one JSON line once the cookies are in ({"ready": sockets}) and one at the end (datagrams
sent, cookies got, seconds).
"""

from __future__ import annotations

import json
import select
import socket
import sys
import time

from mbedtls import tls

from .dtls_udp_client import psk_client_buffer


def _hello(buf: tls.TLSWrappedBuffer) -> bytes:
    """Step the client until it waits for the server; the flight it wrote (one ClientHello)."""
    for _ in range(10):
        try:
            buf.do_handshake()
        except tls.WantWriteError:
            continue
        except tls.WantReadError:
            break
    out = bytes(buf.peek_outgoing(4096))
    buf.consume_outgoing(len(out))
    # the last record: a client whose retransmission timer ran out while its HelloVerifyRequest
    # waited writes the old hello again before the one with the cookie
    start = 0
    while start + 13 + (out[start + 11] << 8 | out[start + 12]) < len(out):
        start += 13 + (out[start + 11] << 8 | out[start + 12])
    return out[start:]


def cookied_hellos(port: int, addresses: list[str], per_address: int,
                   timeout: float = 10.0) -> list[tuple[socket.socket, bytes]]:
    """One socket per (address, port) with the ClientHello that carries its cookie."""
    pending: dict[socket.socket, tuple[tls.TLSWrappedBuffer, bytes]] = {}
    for address in addresses:
        for _ in range(per_address):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # what comes back is never read
            s.bind((address, 0))
            s.connect(("127.0.0.1", port))
            s.setblocking(False)
            buf = psk_client_buffer("flood", b"flood-key-never-used")
            pending[s] = (buf, _hello(buf))
    done: list[tuple[socket.socket, bytes]] = []
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for s, (_, hello) in list(pending.items())[:500]:  # paced: the rate limit is per address
            try:
                s.send(hello)
            except BlockingIOError:
                pass
        poll = select.poll()  # (not select(): more than 1,024 descriptors)
        by_fd = {s.fileno(): s for s in pending}
        for fd in by_fd:
            poll.register(fd, select.POLLIN)
        end = time.monotonic() + 0.3
        while pending and time.monotonic() < end:
            for fd, _ in poll.poll(50):
                s = by_fd[fd]
                poll.unregister(fd)
                if s not in pending:
                    continue
                try:
                    hvr = s.recv(4096)
                except OSError:
                    continue
                buf, _ = pending.pop(s)
                buf.receive_from_network(hvr)
                hello = _hello(buf)
                if hello[59 + 1 + hello[59]]:  # the cookie's length: the hello carries one
                    done.append((s, hello))
                else:  # the client's timer ran out first and it started over: again
                    pending[s] = (buf, hello)
    for s in pending:
        s.close()
    if not done:
        raise SystemExit("no HelloVerifyRequest came back")
    return done


def flood(hellos: list[tuple[socket.socket, bytes]], rate: float, seconds: float, max_datagrams: int,
          count: list[int]) -> None:
    """Send, paced; `count[0]` says how many so far."""
    sent = 0
    start = time.monotonic()
    end = start + seconds
    i = 0
    n = len(hellos)
    while sent < max_datagrams:
        now = time.monotonic()
        if now >= end:
            break
        due = min(max_datagrams, int((now - start) * rate) + 1)
        while sent < due:
            s, hello = hellos[i]
            i = (i + 1) % n
            try:
                s.send(hello)
            except OSError:  # a full send buffer, or the ICMP of a closed server
                pass
            sent += 1
            count[0] = sent
        time.sleep(0.002)


def main(argv: list[str]) -> None:
    port, addresses, per_address, rate, seconds, max_datagrams = argv
    start = time.monotonic()
    hellos = cookied_hellos(int(port), addresses.split(","), int(per_address))
    print(json.dumps({"ready": len(hellos), "seconds": round(time.monotonic() - start, 2)}), flush=True)
    sent = [0]
    try:
        flood(hellos, float(rate), float(seconds), int(max_datagrams), sent)
    except KeyboardInterrupt:  # the test is done with us
        pass
    print(json.dumps({"sent": sent[0], "cookies": len(hellos)}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
