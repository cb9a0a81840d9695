"""One corem, every way a reading comes in, in one run: plain CoAP (the C fast lane), CoAPS (DTLS),
OSCORE on plain CoAP, CoAP over TCP and over TLS (RFC 8323; TLS 1.2 PSK, python-mbedtls's client as
the device: readings pipelined on one connection, and handshakes/s, each connection closed once
corem's CSM came).

    python bench/transports_bench.py [--seconds 5] [--json]

corem runs pinned to CPU 0 with all four listeners (embedded bus, store NORMAL); each generator
runs alone on CPU 1, 64 requests in flight (and 16 on TCP against libcoap): the C generators for UDP and DTLS (bench/loadgen.c,
bench/dtls_loadgen.c), Python ones here for OSCORE (sealing with corem's own context code) and
TCP (pipelined frames).  Besides readings/s -- which the Python generators may cap -- each row
shows readings per CPU-second of corem's process (utime + stime from /proc over the run): what a
reading costs corem on that transport, whoever sends it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from bench.dtls_bench import IDENTITY, KEY  # noqa: E402
from bench.dtls_bench import build as build_dtls_loadgen  # noqa: E402
from bench.load_bench import PAYLOAD, TOKEN, build_loadgen, free_port, pin, wait_udp  # noqa: E402
from bench.table import report  # noqa: E402

INFLIGHT = 64
#: libcoap 4.3.1 resets a TCP connection when a burst of frames spans one of its 1472-byte reads
#: (64 pipelined requests do; 20 do not): against it, and in corem's row beside it, 16 are pipelined
INFLIGHT_LIBCOAP_TCP = 16
OSCORE_ARGS = ["--oscore-sender-id", "01", "--oscore-recipient-id", "02", "--oscore-secret", "bench-oscore-secret-16"]


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- the Python generators (run as `--gen KIND PORT SECONDS` on CPU 1) ------------------------------
def gen_oscore(port: int, seconds: float, first_seq: int) -> dict:
    from corem.codec import Code, Message, OptionNumber, Type, decode, encode
    from corem.oscore.context import Context
    from corem.oscore.protect import aad, plaintext

    # the device's side: it seals with the key corem opens with, and opens corem's answers
    ctx = Context(b"bench-oscore-secret-16", b"", b"\x02", b"\x01", None, reserve=lambda n: 0, window_ready=True)
    inner = plaintext(Code.POST, [(OptionNumber.URI_PATH, b"telemetry"), (OptionNumber.CONTENT_FORMAT, b"\x3c")],
                      PAYLOAD)
    seq = [first_seq]  # above the warm-up's: corem's replay window refuses a number twice
    pivs: dict[int, bytes] = {}  # (socket << 16 | message ID) -> the request's partial IV

    def request(key: int, mid: int) -> bytes:
        seq[0] += 1
        piv = pivs[key] = seq[0].to_bytes(5, "big").lstrip(b"\0")
        sealed = ctx.encrypt(ctx.nonce(b"\x02", piv), inner, aad(b"\x02", piv))
        option = bytes((0x08 | len(piv),)) + piv + b"\x02"
        return encode(Message(Type.CON, Code.POST, mid, mid.to_bytes(2, "big"), [(OptionNumber.OSCORE, option)],
                              sealed))

    def changed(data: bytes, key: int) -> bool:
        """The answer opened (the outer 2.04 seals any inner code): is it 2.04 inside?"""
        msg = decode(data)
        piv = pivs.pop(key)
        if msg.code != Code.CHANGED or msg.opt(OptionNumber.OSCORE) != b"":
            return False
        plain = ctx.decrypt(ctx.nonce(b"\x02", piv), bytes(msg.payload), aad(b"\x02", piv))
        return plain[0] == Code.CHANGED

    return _udp_loop(port, seconds, request, changed)


def _udp_loop(port: int, seconds: float, request, changed) -> dict:
    """INFLIGHT sockets, one request in flight on each: like devices, each with its own message
    IDs (one socket at 60k requests/s would reuse an ID within a second, and corem would rightly
    answer it from its deduplication cache as a retransmission)."""
    import selectors

    sel = selectors.DefaultSelector()
    socks = []
    for i in range(INFLIGHT):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.connect(("127.0.0.1", port))
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ, i)
        socks.append(s)
    mids = [0] * INFLIGHT
    sent_at = [0.0] * INFLIGHT
    sent = ok = other = timeouts = 0
    start = time.monotonic()

    def send(i: int, now: float) -> None:
        nonlocal sent
        mids[i] = (mids[i] + 1) & 0xFFFF
        socks[i].send(request(i << 16 | mids[i], mids[i]))
        sent_at[i] = now
        sent += 1

    for i in range(INFLIGHT):
        send(i, start)
    while (now := time.monotonic()) - start < seconds:
        for key, _ in sel.select(0.5):
            i = key.data
            try:
                data = socks[i].recv(2048)
            except BlockingIOError:
                continue
            if len(data) < 4 or (data[2] << 8 | data[3]) != mids[i]:
                continue  # (a late answer to a request given up on)
            if changed(data, i << 16 | mids[i]):
                ok += 1
            else:
                other += 1
            send(i, now)
        for i in range(INFLIGHT):
            if now - sent_at[i] > 2.0:
                timeouts += 1
                send(i, now)
    elapsed = time.monotonic() - start
    return {"sent": sent, "ok_2xx": ok, "other": other, "timeouts": timeouts, "rps": ok / elapsed}


def _tls_context(cipher: str = "TLS-PSK-WITH-AES-128-CCM-8") -> Any:
    from mbedtls import tls

    return tls.ClientContext(tls.TLSConfiguration(
        pre_shared_key=(IDENTITY, KEY.encode()), ciphers=(cipher,), validate_certificates=False,
        lowest_supported_version=tls.TLSVersion.TLSv1_2, highest_supported_version=tls.TLSVersion.TLSv1_2))


class MbedTlsClient:
    """python-mbedtls's TLS client on its buffers over a socket (its own socket wrapper reads the
    socket before its buffer: records that came with the handshake's last flight would wait there)"""

    def __init__(self, ctx: Any, port: int) -> None:
        from mbedtls import tls

        self.tls = tls
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = ctx.wrap_buffers(None)
        while self.buf._handshake_state.name != "HANDSHAKE_OVER":
            try:
                self.buf.do_handshake()
            except tls.WantWriteError:
                pass
            except tls.WantReadError:
                self._flush()
                self._read()
        self._flush()

    def _flush(self) -> None:
        out = self.buf.peek_outgoing(1 << 20)
        self.buf.consume_outgoing(len(out))
        if out:
            self.sock.sendall(out)

    def _read(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("closed")
        self.buf.receive_from_network(data)

    def sendall(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[self.buf.write(view):]
            self._flush()

    def recv(self, n: int) -> bytes:
        """What the buffer holds, else what the socket brings next (b"": the end)"""
        while True:
            try:
                data = self.buf.read(n)  # (b"" or WantReadError: nothing whole in the buffer)
            except self.tls.WantReadError:
                data = b""
            if data:
                return bytes(data)
            try:
                self._read()
            except ConnectionError:
                return b""

    def close(self) -> None:
        self.sock.close()


def _tls_connect(ctx: Any, port: int) -> MbedTlsClient:
    return MbedTlsClient(ctx, port)


def gen_tls_handshakes(port: int, seconds: float) -> dict:
    """A connection, its TLS handshake (PSK), corem's CSM read, closed; again"""
    from corem.coap.stream import CSM, Framer, signal

    ctx = _tls_context()
    n = failed = 0
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        try:
            s = _tls_connect(ctx, port)
            s.sendall(signal(CSM))
            framer, frames = Framer(1 << 16), []
            while not frames:
                data = s.recv(4096)
                if not data:
                    break
                frames = framer.feed(data)
            s.close()
            if frames and frames[0][0] == CSM:
                n += 1
            else:
                failed += 1
        except OSError:
            failed += 1
    elapsed = time.monotonic() - start
    return {"sent": n + failed, "ok_2xx": n, "other": failed, "timeouts": 0, "rps": n / elapsed}


def gen_tcp(port: int, seconds: float, method: int, path: str, pipelined: int, tls: bool = False) -> dict:
    from corem.coap.stream import CSM, Framer, frame, signal
    from corem.codec import Code, Message, OptionNumber, Type, encode

    body = encode(Message(Type.CON, method, 0, b"", [
        *((OptionNumber.URI_PATH, seg.encode()) for seg in path.split("/") if seg),
        (OptionNumber.CONTENT_FORMAT, b"\x3c")], PAYLOAD))[4:]
    if tls:
        s = _tls_connect(_tls_context(), port)
    else:
        s = socket.create_connection(("127.0.0.1", port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.sendall(signal(CSM))
    framer = Framer(1 << 20)
    n, ok, other, inflight = 0, 0, 0, 0
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        batch = []
        while inflight < pipelined:
            n += 1
            batch.append(frame(method, (n & 0xFFFFFFFF).to_bytes(4, "big"), body))
            inflight += 1
        if batch:
            s.sendall(b"".join(batch))
        for code, _, _ in framer.feed(s.recv(65536)):
            if code >= 0xE0:
                continue
            inflight -= 1
            if 64 <= code < 96:  # 2.xx (libcoap's example resource answers a PUT 2.01 or 2.04)
                ok += 1
            else:
                other += 1
    elapsed = time.monotonic() - start
    s.close()
    return {"sent": n, "ok_2xx": ok, "other": other, "timeouts": 0, "rps": ok / elapsed}


# -- the run ----------------------------------------------------------------------------------------
def run(pid: int, name: str, cmd: list[str], args) -> dict:
    """A 1 s warm-up, then the measured run; the server's CPU time over it from /proc."""
    warm = [c.replace("{s}", "1").replace("{q}", "0") for c in cmd]
    subprocess.run([*pin(1), *warm], capture_output=True, check=True, timeout=60)
    before = cpu_seconds(pid)
    out = subprocess.run([*pin(1), *[c.replace("{s}", str(args.seconds)).replace("{q}", "100000000") for c in cmd]],
                         capture_output=True, text=True, check=True, timeout=args.seconds + 60)
    cpu = cpu_seconds(pid) - before
    r = json.loads(out.stdout.strip().splitlines()[-1])
    ok = r["ok_2xx"]
    r.update(target=name, server_cpu_s=round(cpu, 2), readings_per_cpu_s=round(ok / cpu) if cpu else None)
    print(f"  {name}: {r['rps']:.0f} readings/s, {r['readings_per_cpu_s']} per server CPU-s, "
          f"2.xx {ok}, other {r.get('other', 0)}, timeouts {r.get('timeouts', 0)}", file=sys.stderr)
    return r


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--only", default="", help="run only the rows whose name contains this (e.g. 'TLS 1.2')")
    ap.add_argument("--gen", nargs=3, metavar=("KIND", "PORT", "SECONDS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.gen:
        kind, port, seconds = args.gen
        if kind.startswith("oscore:"):
            print(json.dumps(gen_oscore(int(port), float(seconds), int(kind[7:]))))
        elif kind == "tls-handshakes":
            print(json.dumps(gen_tls_handshakes(int(port), float(seconds))))
        else:
            transport, method, pipelined, path = kind.split(":", 3)
            print(json.dumps(gen_tcp(int(port), float(seconds), int(method), path, int(pipelined),
                                     tls=transport == "tls")))
        return
    loadgen, dtls_loadgen = build_loadgen(), build_dtls_loadgen()
    payload = PAYLOAD.hex()
    rows = []
    with tempfile.TemporaryDirectory(prefix="corem-transports-") as tmp:
        data = Path(tmp) / "data"
        for device, creds in (("d-token", ["--token", TOKEN]), ("d-psk", ["--psk-identity", IDENTITY, "--psk", KEY]),
                              ("d-oscore", OSCORE_ARGS)):
            subprocess.run([sys.executable, "-m", "corem", "devices", "add", "--data-dir", str(data), "--tenant",
                            "bench", "--device", device, *creds], check=True, capture_output=True)
        udp, dtls, tcp, tls = free_port(), free_port(), free_port(), free_port()
        proc = subprocess.Popen([*pin(0), sys.executable, "-m", "corem", "serve", "--data-dir", str(data),
                                 "--coap", f"127.0.0.1:{udp}", "--coaps", f"127.0.0.1:{dtls}",
                                 "--coap-tcp", f"127.0.0.1:{tcp}", "--coaps-tcp", f"127.0.0.1:{tls}",
                                 "--http", "off", "--store-synchronous", "NORMAL",
                                 "--rate-limit-per-source", "0", "--log-level", "warning"], stdout=subprocess.DEVNULL)
        try:
            wait_udp(udp)
            runs = [
                ("CoAP, UDP (token, C fast lane)", [str(loadgen), "127.0.0.1", str(udp), "64", "1", "{s}", "2",
                                                    f"api/v1/{TOKEN}/telemetry", payload, "60"]),
                ("CoAPS, DTLS 1.2 PSK", [str(dtls_loadgen), "127.0.0.1", str(dtls), "64", "1", "0.5", "{s}", IDENTITY,
                                        KEY, "2", "telemetry", payload, "60"]),
                ("OSCORE on CoAP, UDP (C fast lane; a Python generator)", [sys.executable, __file__, "--gen", "oscore:{q}", str(udp), "{s}"]),
                *((f"CoAP over TCP (token, Python path; {n} pipelined)",
                   [sys.executable, __file__, "--gen", f"tcp:2:{n}:api/v1/{TOKEN}/telemetry", str(tcp), "{s}"])
                  for n in (INFLIGHT, INFLIGHT_LIBCOAP_TCP)),
                (f"CoAP over TLS 1.2 PSK CCM-8 (identity, Python path; {INFLIGHT} pipelined)",
                 [sys.executable, __file__, "--gen", f"tls:2:{INFLIGHT}:telemetry", str(tls), "{s}"]),
                ("TLS 1.2 PSK handshakes over TCP (connect, handshake, CSM, close; a row of handshakes/s)",
                 [sys.executable, __file__, "--gen", "tls-handshakes", str(tls), "{s}"]),
            ]
            for name, cmd in runs:
                if args.only in name:
                    rows.append(run(proc.pid, name, cmd, args))
        finally:
            proc.terminate()
            proc.wait(20)
        if shutil.which("coap-server-notls") and args.only in "libcoap":  # libcoap serves TCP on its UDP port number too
            lp = free_port()
            lib = subprocess.Popen([*pin(0), "coap-server-notls", "-A", "127.0.0.1", "-p", str(lp)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                wait_udp(lp, timeout=60)  # (it serves UDP on that port number too: up when that answers)
                rows.append(run(lib.pid, f"libcoap 4.3.1 coap-server-notls over TCP (C; PUT, in memory; "
                                         f"{INFLIGHT_LIBCOAP_TCP} pipelined)",
                                [sys.executable, __file__, "--gen", f"tcp:3:{INFLIGHT_LIBCOAP_TCP}:example_data", str(lp),
                                 "{s}"], args))
            finally:
                lib.terminate()
                lib.wait(20)
    def cost(r: dict, base: dict | None) -> str:
        """CPU per reading against `base`'s (readings per CPU-second, inverted)."""
        return f"{base['readings_per_cpu_s'] / r['readings_per_cpu_s']:.2f}x" \
            if base is not None and r["readings_per_cpu_s"] else "-"

    udp_row = next((r for r in rows if r["target"].startswith("CoAP, UDP")), None)
    dtls_row = next((r for r in rows if r["target"].startswith("CoAPS")), None)

    report(rows, [
        ("transport", lambda r: r["target"]), ("readings/s", lambda r: f"{r['rps']:,.0f}"),
        ("readings per server CPU-s", lambda r: f"{r['readings_per_cpu_s']:,}"),
        ("CPU per reading vs UDP fast lane", lambda r: cost(r, udp_row)), ("vs DTLS", lambda r: cost(r, dtls_row)),
    ], as_json=args.json, title="readings through each transport, one corem")


if __name__ == "__main__":
    main()
