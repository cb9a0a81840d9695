"""Exactly once across a crash: the exchanges of committed readings, read back from the bus at start.

Deduplication by (peer, message id) (RFC 7252 §4.5) lives in memory, in the endpoint and in the
fast lane.  When corem dies between committing a reading and sending its 2.04, the device
retransmits the same CON; without the dedup state the restarted corem would take it as a new
reading and store it twice.  So every telemetry record carries its exchange in a header
(`HEADER`, written by the fast lane in C and by the ingest on the Python path), and at start,
before the UDP edges serve, `recover_embedded` / `recover_kafka` read the exchanges of the records
committed recently back from the bus; the server seeds the endpoint's and the lane's dedup maps
with them (`Endpoint.remember`, `Lane.remember`), and a retransmission of one of them is answered
2.04 (an ACK with its token, the original's) without a second point.

Only a request with the exchange's token is its retransmission: a retransmission is the same
message again, token unchanged (RFC 7252 §4.2, §5.3.1).  A device that rebooted within
EXCHANGE_LIFETIME of the restart and reuses its port and a message id (many start their ids at
the same value) sends a new request under another token; answering it 2.04 from the recovered
exchange would acknowledge a reading never stored -- the device's client accepts the 2.04, as
its token is the one it sent -- so it is served as a new request.  Hence the token in the header.

How far back: EXCHANGE_LIFETIME (the endpoint's `exchange_lifetime`, 247 s by default), not
MAX_TRANSMIT_SPAN (45 s).  The in-memory map remembers an exchange that long, because a
retransmission sent within MAX_TRANSMIT_SPAN may still be MAX_LATENCY on its way (§4.8.2); a crash
should not make corem forget sooner than it would have otherwise.  The count is bounded by the map's
capacity (`dedup_max_entries` per transport), newest first -- what the map itself would hold -- and
the reading by time (`deadline`): a start never waits long on a bus it cannot read.

The header's value: `{transport} {host} {port} {message id} {token}`, transport `udp` (plain
CoAP) or `dtls` (CoAPS: the DTLS session's peer address; message ids are scoped to the session,
and a new handshake makes the recovered ones void, as it does for live ones); the token in
lowercase hex, two digits a byte, and an empty token (a request may have none) written `-`, so
that every field is non-empty and the value splits on single spaces.  corem before the token
wrote the first four fields only: such a header is read with the token unknown (None), and its
exchange answers a request of any token, as it did then.  Over TCP there are no
retransmissions (RFC 8323), so no header; an OSCORE request's transport is written `udp+oscore` /
`dtls+oscore` and not recovered: its answer must be sealed with the request's context, which a
bare 2.04 is not (the OSCORE replay window is what guards those).
"""

from __future__ import annotations

import ipaddress
import logging
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import msgspec

from ..datafiles import read_only_uri
from ..stats import Sample, counter
from . import topics
from .sqlite import like_prefix

log = logging.getLogger("corem.bus.recovery")

#: The record header naming a reading's CoAP exchange.
HEADER = "coap-exchange"
#: Transports whose exchanges are recovered (a bare 2.04 answers their retransmissions).
RECOVERABLE = ("udp", "dtls")
#: A batch row's time is taken before its commit; rows of several writers (`--workers`) may
#: commit slightly out of time order: read this much further back than the window.
SLACK_MS = 5_000
#: At most this many times the dedup capacity of records are read (measured: ~4 us a record from
#: bus.db, so 100k entries -> at most ~4 s)
SCAN_FACTOR = 10

#: How an empty token is written in the header (a field of its own: never empty)
NO_TOKEN = "-"
#: The longest token (RFC 7252 §3: TKL 0-8)
TOKEN_MAX = 8
_HEX = frozenset("0123456789abcdef")

Peer = tuple
#: (peer, message id, record time in ms since the epoch, token or None when the header had none)
Key = tuple[Peer, int, int, bytes | None]


def exchange_header(transport: str, peer: Any, mid: int, token: bytes) -> str:
    """The header value of an exchange (the C lane writes the same, byte for byte)."""
    host, port = peer[0], peer[1]
    if len(peer) >= 4 and peer[3]:  # (Python's socket names a scope, `fe80::1%eth0`; the C lane numbers it)
        host = f"{host.partition('%')[0]}%{peer[3]}"
    return f"{transport} {host} {port} {mid} {token.hex() or NO_TOKEN}"


def _token(text: str) -> bytes:
    """The token field as corem writes it (lowercase hex, `-` for none), else ValueError."""
    if text == NO_TOKEN:
        return b""
    if not 0 < len(text) <= 2 * TOKEN_MAX or len(text) % 2 or not _HEX.issuperset(text):
        raise ValueError(f"not a token: {text!r}")
    return bytes.fromhex(text)


def parse_exchange(value: str | bytes) -> tuple[str, Peer, int, bytes | None] | None:
    """(transport, peer as the edge gives it, message id, token -- None for a header of the older
    four-field form, which did not name it), or None if `value` is not one."""
    try:
        if isinstance(value, bytes):
            value = value.decode()
        fields = value.split(" ")
        token = _token(fields.pop()) if len(fields) == 5 else None
        transport, host, port, mid = fields
        scope = 0
        if "%" in host:
            host, _, s = host.partition("%")
            scope = int(s)
        address = ipaddress.ip_address(host)
        p, m = int(port), int(mid)
    except (ValueError, UnicodeDecodeError):
        return None
    if not (0 <= p < 65536 and 0 <= m < 65536 and 0 <= scope < 1 << 32) or (scope and address.version == 4):
        return None  # (a scope id is a uint32, and IPv6's only: what the edges give)
    peer: Peer = (host, p) if address.version == 4 else (host, p, 0, scope)
    return transport, peer, m, token


@dataclass
class Recovered:
    """What a start read back: the exchanges per transport, oldest first."""

    keys: dict[str, list[Key]] = field(default_factory=dict)
    records: int = 0
    seconds: float = 0.0
    error: str | None = None

    def total(self) -> int:
        return sum(len(v) for v in self.keys.values())


class Collector:
    """Exchanges found walking records newest first; full per transport at `limit`."""

    def __init__(self, limit: int, keep: Callable[[Peer], bool] | None) -> None:
        self.limit = limit
        self.keep = keep
        self.found: dict[str, list[Key]] = {t: [] for t in RECOVERABLE}
        self.seen: set[tuple[str, Peer, int]] = set()
        self.records = 0

    def add(self, header: str | bytes | None, at_ms: int) -> None:
        self.records += 1
        if header is None:
            return
        parsed = parse_exchange(header)
        if parsed is None:
            return
        transport, peer, mid, token = parsed
        keys = self.found.get(transport)
        if keys is None or len(keys) >= self.limit or (self.keep is not None and not self.keep(peer)):
            return
        # an older record of the same (peer, message id): the newest counts, token and all (a later
        # request reused the id; only it can still be retransmitted)
        if (transport, peer, mid) in self.seen:
            return
        self.seen.add((transport, peer, mid))
        keys.append((peer, mid, at_ms, token))

    @property
    def full(self) -> bool:
        """Every transport has its `limit`, or SCAN_FACTOR x `limit` records were read (a transport
        with few exchanges among so many does not make a start read the whole window)."""
        if self.records >= SCAN_FACTOR * self.limit:
            return True
        return all(len(v) >= self.limit for v in self.found.values())

    def result(self, started: float) -> Recovered:
        # found newest first: oldest first now (the order the dedup maps take them in)
        keys = {t: sorted(reversed(v), key=lambda k: k[2]) for t, v in self.found.items() if v}
        return Recovered(keys, self.records, time.monotonic() - started)


_rows = msgspec.msgpack.Decoder(list[tuple[msgspec.Raw, msgspec.Raw, dict[str, str]]]).decode


def recover_embedded(path: Path, since_ms: int, limit: int, *, keep: Callable[[Peer], bool] | None = None,
                     deadline: float = 10.0) -> Recovered:
    """The exchanges of the telemetry records the embedded log committed since `since_ms` (by the
    batch's time), newest first up to `limit` per transport (read-only: safe beside writers)."""
    started = time.monotonic()
    found = Collector(limit, keep)
    if not Path(path).exists():
        return found.result(started)
    conn = sqlite3.connect(read_only_uri(path), uri=True, timeout=30)
    try:
        rows = conn.execute(
            "SELECT records, appended_at FROM batches WHERE topic LIKE ? ESCAPE '\\' "
            "ORDER BY base_offset DESC", (like_prefix(topics.telemetry_all()),))
        late = False
        for blob, appended_at in rows:
            if appended_at < since_ms - SLACK_MS or found.full:
                break
            if time.monotonic() - started > deadline:
                late = True
                break
            if appended_at < since_ms:
                continue
            try:  # (another process writes the log: a batch that does not decode is skipped, not fatal)
                batch = _rows(blob)
            except (msgspec.DecodeError, TypeError) as e:
                log.warning("recovery: skipped a telemetry batch of %s that does not decode (%s)", path, e)
                continue
            for _key, _value, headers in reversed(batch):
                found.add(headers.get(HEADER), appended_at)
    finally:
        conn.close()
    result = found.result(started)
    if late:
        result.error = f"read {found.records} records in {deadline:.0f} s, not the whole window"
    return result


def recover_kafka(settings: Any, since_ms: int, limit: int, *, keep: Callable[[Peer], bool] | None = None,
                  deadline: float = 10.0) -> Recovered:
    """The same from Kafka: a consumer of its own (no group, nothing committed) over every
    `telemetry.raw.*` partition, from the first offset at or after `since_ms` (offsets_for_times;
    at most `limit` from the end of each partition) to the end (the partition-EOF event: the
    fetch's high watermark, which Tansu gets right where its ListOffsets answers the last batch's
    base offset).  Past `deadline`, what was read so far, with `error` saying so."""
    from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

    started = time.monotonic()
    found = Collector(limit, keep)
    cfg = {**settings.client_config(), "group.id": f"{settings.client_id}-recovery",
           "enable.auto.commit": False, "enable.auto.offset.store": False, "enable.partition.eof": True}
    consumer = Consumer(cfg)

    def left() -> float:
        return max(0.1, deadline - (time.monotonic() - started))

    todo: set[tuple[str, int]] = set()

    try:
        # (a broker that does not answer within kafka_timeout, what a record is given, is not up:
        # corem serves without the exchanges then, rather than after `deadline`)
        listed = consumer.list_topics(timeout=min(left(), max(0.1, settings.timeout))).topics
        parts = [TopicPartition(name, p) for name, t in sorted(listed.items())
                 if name.startswith(topics.telemetry_all()) and t.error is None for p in sorted(t.partitions)]
        ends: dict[tuple[str, int], int] = {}
        starts: dict[tuple[str, int], int] = {}
        for tp in parts:
            low, high = consumer.get_watermark_offsets(tp, timeout=left(), cached=False)
            if high > low:
                ends[tp.topic, tp.partition] = high
                starts[tp.topic, tp.partition] = max(low, high - limit)
        if ends:
            try:
                wanted = [TopicPartition(t, p, since_ms - SLACK_MS) for t, p in ends]
                for tp in consumer.offsets_for_times(wanted, timeout=left()):
                    at = (tp.topic, tp.partition)
                    if tp.error is None and tp.offset >= 0:
                        starts[at] = max(starts[at], tp.offset)
                    elif tp.error is None:  # nothing at or after the time: nothing to read
                        starts[at] = ends[at]
            except KafkaException as e:  # a broker without timestamp lookups: the last `limit`, by time
                log.info("kafka: offsets_for_times failed (%s); reading the last %d records of each "
                         "partition", e, limit)
        todo = {at for at in ends if starts[at] < ends[at]}
        keys: list[tuple[int, Any]] = []  # (record time, header) of every record read
        if todo:
            consumer.assign([TopicPartition(t, p, starts[t, p]) for t, p in todo])
            while todo and time.monotonic() - started < deadline:
                for m in consumer.consume(num_messages=1000, timeout=min(0.5, left())):
                    part = (m.topic() or "", m.partition() or 0)
                    error = m.error()
                    if error is not None:
                        if error.code() == KafkaError._PARTITION_EOF:
                            todo.discard(part)
                        continue
                    if part in todo:
                        _, ts = m.timestamp()
                        keys.append((ts or 0, _header(m.headers())))
        keys.sort(key=lambda k: k[0], reverse=True)  # newest first, across partitions
        for ts, header in keys:
            if ts >= since_ms:
                found.add(header, ts)
            else:
                found.records += 1
    finally:
        consumer.close()
    result = found.result(started)
    if todo:  # (the newest records of those partitions were not read: their exchanges are missing)
        result.error = f"{len(todo)} partitions not read to their end in {deadline:.0f} s"
    return result


def _header(headers: Any) -> str | bytes | None:
    for name, value in headers or ():
        if name == HEADER:
            return value
    return None


@dataclass
class RecoveryStats:
    """The start's recovery, for /metrics (a component of the server)."""

    records: int = 0
    failures: int = 0

    def metrics(self) -> Iterator[Sample]:
        yield counter("corem_bus_recovery_failures", self.failures)
        yield counter("corem_bus_recovery_records", self.records)
