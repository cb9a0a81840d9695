"""Prometheus exposition of corem's counters.

Each component counts on its own objects and shows them through `metrics()` (corem/stats.py);
this module knows no component.  It is given `(component, labels)` pairs -- the labels of where
each is mounted, e.g. `transport="udp"` -- sums the samples of one name and label set (the fast
lane and the Python path count the same things) and writes every family of `FAMILIES`, the one
table of metric names, kinds and help texts (a family nobody counted yet is still listed).

The process's own families (`process_*`, `python_*`: prometheus_client's process, platform and GC
collectors) come in as a component too, `ProcessMetrics`.  With `--workers N` the front sums the
workers' samples by name and labels; summing would make nonsense of these (a start time, a file
descriptor limit, a Python version counted N times) and hide the one process that grows, so each
process labels its own with `worker` ("0".."N-1", and "supervisor" for the front's process):
one series per process, which a query adds up when it wants the service's total
(`sum(rate(process_cpu_seconds_total[1m]))`, `sum(process_resident_memory_bytes)`).  python_info
is the same in every process: it comes from the first worker only (`SHARED`).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable, Iterable, Iterator

from prometheus_client import PlatformCollector, ProcessCollector
from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import generate_latest

from prometheus_client.gc_collector import GCCollector

from .coap.message_ids import RANDOM_MAX
from .stats import Histogram, Labels, Measured, Sample

C, G, H = "counter", "gauge", "histogram"

#: name -> (kind, help): every metric corem exposes (the names are a contract: docs/operating.md, DESIGN).
FAMILIES: dict[str, tuple[str, str]] = {
    # what this corem is (corem/build.py)
    "corem_build_info": (
        G, "1, labelled with corem's version, the Python version and whether the C fast lane is built "
           "(c_lane: built or missing)."),
    # the message layer and the edge, per transport (the endpoint, the edge, the fast lane)
    "corem_coap_datagrams_received": (C, "Datagrams received (after DTLS: CoAP messages)."),
    "corem_coap_bytes_received": (C, "Bytes received."),
    "corem_coap_datagrams_sent": (C, "Datagrams sent."),
    "corem_coap_bytes_sent": (C, "Bytes sent."),
    "corem_coap_datagrams_oversized": (C, "Datagrams dropped for exceeding max_datagram."),
    "corem_coap_send_errors": (C, "sendto() failures."),
    "corem_rate_limited_datagrams": (C, "Datagrams dropped: their source was over rate_limit_per_source."),
    "corem_rate_limit_exempted": (
        C, "Datagrams over their source's rate let through: an established DTLS session, a known token."),
    "corem_rate_limit_sources": (G, "Source addresses the rate limit tracks."),
    "corem_coap_send_blocked": (C, "Flushes cut short by a full socket send buffer."),
    "corem_coap_requests": (C, "New requests (duplicates excluded)."),
    "corem_coap_duplicates": (C, "Duplicate requests answered from the cache or dropped."),
    "corem_coap_format_errors": (C, "Malformed datagrams (RST for CON, else dropped)."),
    "corem_coap_pings": (C, "CoAP pings (empty CON) answered with RST."),
    "corem_coap_bad_options": (C, "Requests refused 4.02 for a critical option corem does not know or implement."),
    "corem_coap_proxy_refused": (C, "Requests refused 5.05: Proxy-Uri or Proxy-Scheme."),
    "corem_coap_retransmissions": (C, "Confirmable messages of ours sent again."),
    "corem_coap_gave_up": (C, "Confirmable messages of ours never acknowledged."),
    "corem_coap_resets_received": (C, "RSTs matching a message of ours."),
    "corem_coap_dedup_evictions": (C, "Exchanges forgotten before EXCHANGE_LIFETIME."),
    "corem_coap_dedup_recovered": (
        C, "Exchanges of committed readings read back from the bus at start (deduplication across a crash)."),
    "corem_coap_recovered_answers": (
        C, "Retransmissions of readings committed before the start, answered 2.04 without a second point."),
    "corem_coap_outstanding_refused": (
        C, "Separate responses not sent because max_outstanding were awaiting their ACK."),
    "corem_coap_handler_errors": (C, "Handlers that raised (answered 5.00)."),
    "corem_coap_invalid_text_options": (C, "Requests refused 4.00: a text option not UTF-8."),
    "corem_coap_storage_errors": (C, "Requests refused 5.03: the disk refused a handler's write."),
    "corem_coap_uploads": (G, "Block1 uploads in progress."),
    "corem_coap_uploads_refused": (C, "Block1 uploads refused (too large or too many)."),
    "corem_coap_uploads_expired": (C, "Block1 uploads abandoned mid-way and forgotten."),
    "corem_coap_observers": (G, "Observe registrations (RFC 7641) now."),
    "corem_coap_observe_registrations": (C, "Observe registrations accepted."),
    "corem_coap_observe_refused": (C, "Observe registrations refused by the bounds."),
    "corem_coap_observe_notifications": (C, "Notifications sent."),
    "corem_coap_observe_lost": (C, "Observations ended by RST or an unacknowledged notification."),
    "corem_coap_observe_held": (
        C, "Notifications that waited for an observer at an unverified address (plain UDP) to "
           "acknowledge its previous one."),
    "corem_coap_observe_held_dropped": (
        C, "Of those, notifications a newer state replaced before they went (more than 8 waiting)."),
    "corem_coap_observe_revoked": (
        C, "Observations ended because their device was removed, or its credentials or topics changed."),
    "corem_coap_responses": (C, "Messages sent by code (0.00 = empty ACK/RST)."),
    "corem_coap_dedup_entries": (G, "Exchanges remembered for deduplication."),
    "corem_coap_outstanding": (G, "Confirmable messages of ours awaiting ACK."),
    "corem_coap_random_ids_forgotten": (
        C, f"Random message IDs let go of before EXCHANGE_LIFETIME: more than {RANDOM_MAX:,} drawn within it."),
    "corem_request_duration_seconds": (
        H, "From a request's receipt (the read of its datagram's batch, or its frame) to its answer queued for the "
           "socket -- for a reading, the bus's commit included -- by transport and front door (door: thingsboard "
           "/api/v1/..., corem /telemetry, emqx /ps and /mqtt, drogue /v1/..., efento /m /i /c /t and their aliases, "
           "discovery, site; none: no route); "
           "the fast lane's readings included."),
    # DTLS
    "corem_dtls_handshakes_started": (C, "Handshakes past the cookie exchange."),
    "corem_dtls_handshakes_completed": (C, "Handshakes completed."),
    "corem_dtls_handshakes_failed": (C, "Handshakes failed, by reason."),
    "corem_dtls_handshakes_refused": (
        C, "ClientHellos with a cookie refused, by reason: the source's address or prefix holds its share of the "
        "handshake slots, the slots are full, or the session bound."),
    "corem_dtls_handshakes_evicted": (
        C, "Half-open handshakes dropped for a newcomer from a source holding less than half as many."),
    "corem_dtls_hello_verify_sent": (C, "Stateless HelloVerifyRequests sent."),
    "corem_dtls_records_dropped": (C, "Records with no session or that did not decrypt."),
    "corem_dtls_busy_polls": (
        C, "Polls of the CoAPS socket on the CPU after a handshake flight (dtls_busy_poll_us), by outcome: "
           "answered (a datagram, anyone's, came within the window) or missed."),
    "corem_dtls_busy_poll_seconds": (C, "Seconds (wall time) spent polling the CoAPS socket on the CPU (dtls_busy_poll_us)."),
    "corem_dtls_cid_moves": (C, "Sessions moved to a new address by an authenticated record with their Connection ID (RFC 9146 §6; dtls_engine = corem)."),
    "corem_dtls_cid_moves_refused": (C, "Authenticated Connection ID records from an address another device's live session holds: not moved there, their data dropped (a forged source address)."),
    "corem_dtls_records_unknown_cid": (C, "Records with a Connection ID no session has (unknown or forged), dropped (dtls_engine = corem)."),
    "corem_dtls_records_replayed": (C, "Records at or below what a restored session took before (replays after a crash), dropped."),
    "corem_dtls_record_marks_failed": (C, "Batches whose record numbers the session store refused (those records could be replayed after a crash)."),
    "corem_dtls_bytes_received": (C, "Bytes received on the DTLS socket."),
    "corem_dtls_bytes_sent_unauthenticated": (C, "Bytes sent to peers before their handshake completed."),
    "corem_dtls_sessions_closed": (C, "Sessions ended by close_notify."),
    "corem_dtls_sessions_expired": (C, "Sessions forgotten after the inactivity timeout."),
    "corem_dtls_sessions": (G, "Sessions by state."),
    # CoAP over TCP and TLS (RFC 8323; corem/net/tcp.py), per listener (transport tcp or tls)
    "corem_tcp_connections": (G, "Open connections."),
    "corem_tcp_connections_accepted": (C, "Connections accepted."),
    "corem_tcp_connections_refused": (
        C, "Connections closed at once: tcp_max_connections were open, or tcp_max_connections_per_source "
           "from its address."),
    "corem_tcp_connections_refused_no_fds": (
        C, "Connections refused at accept: the process was out of file descriptors (EMFILE/ENFILE)."),
    "corem_tcp_connections_aborted": (
        C, "Connections ended by corem, by reason (frame, too_large, bad_message, idle, slow_reader, write_stall: "
           "no byte taken by the peer in 30 s, handshake, "
           "tls: a fault after the handshake, unregistered_certificate) or by the peer's Abort (peer_abort)."),
    "corem_tcp_pings": (C, "Pings (7.02) answered with Pong."),
    "corem_tcp_truncated_frames": (C, "Connections that ended inside a frame (its bytes were not served)."),
    "corem_tcp_internal_errors": (C, "Connections ended by an error in corem (logged)."),
    "corem_tcp_bytes_received": (C, "Bytes received on connections (TLS records included)."),
    "corem_tcp_bytes_sent": (C, "Bytes sent on connections (TLS records included)."),
    # OSCORE (corem/oscore)
    "corem_oscore_requests": (C, "Requests with the OSCORE option (RFC 8613)."),
    "corem_oscore_sealed": (C, "Answers and notifications sealed with a device's OSCORE context."),
    "corem_oscore_windows_forgotten": (C, "Shared replay windows made unknown at start because the boot (SQLite) or the PostgreSQL start that wrote them ended: Echo starts each again."),
    "corem_oscore_seal_failures": (C, "Answers that could not be sealed (no sequence number of corem's own could be stored): sent as an unprotected 5.03."),
    "corem_oscore_lane_requests": (
        C, "Of corem_oscore_requests, those the C fast lane opened, took and answered itself (no Python path)."),
    "corem_oscore_echo_challenges": (
        C, "4.01 answers with Echo (RFC 9175): a context's first request after a start, before its replay window opens."),
    "corem_oscore_refused": (C, "OSCORE requests refused, by reason (RFC 8613 §8.2: bad_option, unknown_context, "
                                "decrypt, replay; method, storage)."),
    "corem_oscore_contexts": (G, "OSCORE security contexts in memory."),
    "corem_dtls_sessions_offloaded": (C, "Idle sessions serialized and freed."),
    "corem_dtls_sessions_restored": (C, "Offloaded sessions brought back by a datagram."),
    "corem_dtls_sessions_lost": (C, "Sessions that failed to serialize or restore."),
    "corem_dtls_sessions_superseded": (
        C, "Sessions ended because their device made more than dtls_max_sessions_per_device (its oldest first)."),
    "corem_dtls_sessions_revoked": (
        C, "Sessions ended because their device was removed or its credentials changed (rotated, re-added)."),
    "corem_dtls_sessions_taken_elsewhere": (
        C, "Sessions ended because another node took them from the shared session store (its restore): one "
           "session is never live on two nodes."),
    "corem_dtls_sessions_checkpointed": (
        C, "Live DTLS sessions saved to the session store (dtls_checkpoint): a crash costs them no handshake."),
    "corem_dtls_sessions_offload_failed": (
        C, "Idle sessions the session store refused (a full or failing disk): kept in memory, offloaded at a "
           "later sweep."),
    "corem_dtls_session_store_errors": (C, "Writes the DTLS session store could not make."),
    # the ingest
    "corem_protocol_payload_rejections": (C, "Payloads rejected, nothing published."),
    "corem_auth_failures": (
        C, "Requests refused for who they speak for (corem/identity.py): 4.01 by reason (unknown_token, "
           "no_session_identity, revoked, bad_password, no_credentials, malformed_credentials, device_mismatch), "
           "4.03 not_a_gateway."),
    "corem_telemetry_points": (C, "Points acknowledged by the bus."),
    "corem_telemetry_bus_refusals": (C, "Readings answered 5.03 because the bus could not take them."),
    "corem_js_watchdog_stops": (
        C, "JS codec calls and loads stopped by the watchdog: one operation ran past 5x their limit (1 s at least)."),
    # the sink
    "corem_sink_records_submitted": (C, "Records handed to the sink."),
    "corem_sink_records_acked": (C, "Records durable on the bus."),
    "corem_sink_records_failed": (C, "Records whose batch failed."),
    "corem_sink_records_refused": (C, "Records refused (sink full or closing; a request's records whole)."),
    "corem_sink_answer_errors": (C, "Answers to records taken by the bus that raised (a bug: logged; the rest answered)."),
    "corem_sink_batches": (C, "Batches written."),
    "corem_sink_batch_records": (C, "Records in all batches (divide by batches for the mean size)."),
    "corem_sink_ack_seconds": (C, "Time spent writing acknowledged batches."),
    "corem_sink_batch_seconds": (H, "Time from handing a batch to the bus to its acknowledgement."),
    "corem_sink_batch_size": (H, "Records per batch."),
    "corem_sink_pending": (G, "Records taken by the sink and not answered yet."),
    "corem_bus_not_ready": (
        G, "1 while this process cannot reach its bus, as /readyz judges it (failing, stalled, no Kafka broker up), "
           "else 0; with --workers, how many workers cannot."),
    "corem_bus_recovery_failures": (
        C, "Starts at which the bus could not be read back for deduplication (served anyway)."),
    "corem_bus_recovery_records": (C, "Records read back from the bus at start for deduplication."),
    "corem_bus_pruned_records": (
        C, "Embedded bus: records pruned by retention, by reason (age: bus_retention_age, size: bus_retention_size)."),
    "corem_bus_prune_errors": (C, "Embedded bus: retention passes that failed (tried again a second later)."),
    "corem_bus_prune_held": (C, "Embedded bus: looks that found the log over bus_retention_size with only records younger than exchange_lifetime to prune (kept: a restart reads them back)."),
    "corem_bus_size_bytes": (G, "Embedded bus: bytes of bus.db's pages in use (what bus_retention_size bounds)."),
    "corem_kafka_in_flight": (G, "Records handed to librdkafka without a delivery report yet."),
    "corem_kafka_queue_messages": (G, "Messages and requests in librdkafka's queues (len(producer))."),
    "corem_kafka_delivery_seconds": (H, "Per record: from produce() to its delivery report."),
    "corem_kafka_delivery_errors": (C, "Records librdkafka failed, by error."),
    "corem_kafka_client_errors": (C, "librdkafka's error callback (broker down, transport, auth), by error."),
    "corem_kafka_brokers": (G, "Brokers by librdkafka's connection state."),
    "corem_kafka_producers_started": (C, "Producers started (a fresh one after a fatal error)."),
    "corem_kafka_commands_errors": (C, "Failures reading commands.{tenant} (then retried)."),
    # devices
    "corem_devices_online": (G, "Devices online (an accepted reading within presence_offline_after)."),
    "corem_presence_transitions": (C, "Presence transitions published."),
    "corem_presence_publish_failures": (C, "Presence transitions the bus did not take."),
    "corem_presence_store_errors": (C, "Presence flushes the shared presence table refused (tried again)."),
    "corem_downlink_attribute_updates": (C, "Shared attribute updates sent or stored."),
    "corem_downlink_attributes_queued": (C, "Updates queued (merged) for sleeping devices."),
    "corem_downlink_rpc_delivered": (C, "RPC requests delivered to devices."),
    "corem_downlink_rpc_replied": (C, "RPC requests the device answered."),
    "corem_downlink_rpc_expired": (C, "RPC requests that timed out."),
    "corem_downlink_commands_delivered": (C, "Commands delivered on a ct response."),
    "corem_downlink_commands_expired": (C, "Commands dropped after their ttl."),
    "corem_downlink_queue_full": (C, "Downlink refused: max_queued_commands for the device."),
    "corem_downlink_devices_queued": (G, "Devices with something waiting for them."),
    "corem_pubsub_published": (C, "Messages published on /ps and /mqtt."),
    "corem_pubsub_subscribed": (C, "Subscriptions (Observe) accepted on /ps and /mqtt."),
    "corem_pubsub_denied": (C, "Publishes or subscriptions outside the device's topics (4.03)."),
    "corem_pubsub_retained_dropped": (C, "Retained messages dropped by the bounds."),
    "corem_pubsub_retained": (G, "Retained /ps messages now."),
    "corem_provisioning": (C, "Provisioning requests by result."),
    "corem_ota_package_reads": (C, "OTA packages read whole from the registry for block-wise download (once a "
                                   "package while it stays in memory: PACKAGE_CACHE)."),
    # Efento's NB-IoT sensors (corem/frontdoors/efento)
    "corem_efento_messages": (
        C, "Efento messages by kind (measurements, device_info, configuration, time) and result (accepted, refused)."),
    "corem_efento_samples_skipped": (
        C, "Samples of accepted Efento measurements that became no value, by reason (sensor_error: the sensor's "
           "error code; unknown_type; unpaired: an accumulated counter's minor channel without its major; "
           "invalid: a binary sample without a sign)."),
    # the admin side and the registry
    "corem_admin_requests": (C, "Admin HTTP requests routed."),
    "corem_admin_unauthorized": (C, "Admin API requests refused 401."),
    "corem_admin_bad_requests": (C, "Admin HTTP requests refused 400 or 431: not HTTP/1.1 as h11 reads it."),
    "corem_admin_connections": (G, "Admin HTTP connections open."),
    "corem_admin_connections_evicted": (
        C, "Admin HTTP connections closed before their request head, to make room for a new one (at the cap)."),
    "corem_admin_connections_refused": (
        C, "Admin HTTP connections refused: busy (every slot serving a request: 503), no_fds (out of file descriptors)."),
    "corem_admin_timeouts": (
        C, "Admin HTTP connections dropped by a timeout: head (not sent in time), body or answer (no progress), "
           "handler (504)."),
    "corem_registry_devices": (G, "Devices registered."),
    "corem_registry_devices_with_token": (G, "Devices with an access token."),
    "corem_registry_reads": (C, "Times the whole registry was read (at start, or when its change log could not say "
                                "what changed)."),
    "corem_registry_changes": (C, "Devices the server applied from the registry's change log (added, changed, "
                                  "removed)."),
    "corem_rejected_samples": (G, "Rejected samples kept for diagnostics."),
    # `corem serve --workers N` (corem/workers): the supervisor's own
    "corem_workers": (G, "Worker processes serving now."),
    "corem_worker_up": (G, "1 while the worker serves, 0 while it starts again or does not answer the front in time."),
    "corem_worker_restarts": (C, "Workers started again after they exited."),
    "corem_worker_requests": (G, "CoAP requests the worker has served since it started (how the peers spread)."),
    # the process (prometheus_client's collectors: ProcessMetrics); with --workers one series per
    # process, labelled worker ("0".., "supervisor"), python_info once
    "process_cpu_seconds": (C, "Total user and system CPU time spent in seconds."),
    "process_resident_memory_bytes": (G, "Resident memory size in bytes."),
    "process_virtual_memory_bytes": (G, "Virtual memory size in bytes."),
    "process_start_time_seconds": (G, "Start time of the process since unix epoch in seconds."),
    "process_open_fds": (G, "Number of open file descriptors."),
    "process_max_fds": (G, "Maximum number of open file descriptors."),
    "python_info": (G, "Python platform information"),
    "python_gc_objects_collected": (C, "Objects collected during gc"),
    "python_gc_objects_uncollectable": (C, "Uncollectable objects found during GC"),
    "python_gc_collections": (C, "Number of times this generation was collected"),
}

#: families every worker reports alike (the shared registry): with --workers, counted once, not summed
SHARED = frozenset({"corem_registry_devices", "corem_registry_devices_with_token", "corem_registry_reads",
                    "corem_registry_changes", "corem_build_info", "python_info"})

#: what the collector is given at each scrape: each component with the labels of its mount
Components = Callable[[], Iterable[tuple[Measured, dict[str, str]]]]


#: name -> label set -> value: a number (the sum of its samples), or a histogram
Gathered = dict[str, dict[Labels, "float | Histogram"]]


class ProcessMetrics:
    """This process's CPU, memory, file descriptors and start time (/proc/self), its garbage
    collections, and the Python it runs (`platform`: python_info), from prometheus_client's
    collectors, as samples (`worker` labels the process's own families; see the module's docstring)."""

    def __init__(self, worker: str | None = None, *, platform: bool = True) -> None:
        self.labels: Labels = (("worker", worker),) if worker is not None else ()
        # (a registry of their own: the collectors register themselves, and not in the global one)
        self.collectors = [ProcessCollector(registry=None), GCCollector(registry=CollectorRegistry())]
        self.platform = PlatformCollector(registry=None) if platform else None

    def metrics(self) -> Iterator[Sample]:
        for collector in self.collectors:
            for family in collector.collect():
                for s in family.samples:
                    if not s.name.endswith("_created"):
                        yield Sample(family.name, s.value, self.labels + tuple(s.labels.items()))
        if self.platform is not None:
            for family in self.platform.collect():
                for s in family.samples:
                    yield Sample(family.name, s.value, tuple(s.labels.items()))


def gather(components: Iterable[tuple[Measured, dict[str, str]]]) -> Gathered:
    """Every sample, by name and label set, summed; histograms by name and labels as they are."""
    values: Gathered = defaultdict(dict)
    for component, mount in components:
        extra = tuple(mount.items())
        for m in component.metrics():
            family = values[m.name]
            key = extra + m.labels
            if isinstance(m, Histogram):
                had = family.get(key)
                if isinstance(had, Histogram) and had.bounds == m.bounds:  # the same histogram, elsewhere
                    m = m._replace(counts=[a + b for a, b in zip(had.counts, m.counts)], total=had.total + m.total)
                family[key] = m
            else:
                family[key] = family.get(key, 0.0) + m.value  # type: ignore[operator]
    return values


def total(values: Gathered, name: str) -> float:
    """One family's samples added up (e.g. requests over every transport)."""
    return sum(v for v in values.get(name, {}).values() if not isinstance(v, Histogram))


class Collector:
    def __init__(self, components: Components) -> None:
        self.components = components

    def collect(self) -> Iterable[Metric]:
        values = gather(self.components())
        unknown = set(values) - set(FAMILIES)
        if unknown:  # a component counting under a name the table does not have: a bug here
            raise KeyError(f"metrics: not in FAMILIES: {', '.join(sorted(unknown))}")
        for name, (kind, doc) in FAMILIES.items():
            samples = values.get(name, {})
            names = [k for k, _ in next(iter(samples))] if samples else []
            family: Metric
            if kind == H:
                family = HistogramMetricFamily(name, doc, labels=names)
                for labels, h in samples.items():
                    assert isinstance(h, Histogram), name
                    family.add_metric([v for _, v in labels], _buckets(h), h.total)
            else:
                family = (GaugeMetricFamily if kind == G else CounterMetricFamily)(name, doc, labels=names)
                for labels, value in samples.items():
                    assert not isinstance(value, Histogram), name
                    family.add_metric([v for _, v in labels], value)
            yield family


def _buckets(h: Histogram) -> list[tuple[str, float]]:
    running, buckets = 0.0, []
    for bound, n in zip((*h.bounds, float("inf")), h.counts):
        running += n
        buckets.append(("+Inf" if bound == float("inf") else str(bound), running))
    return buckets


def render(components: Components) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector(components))
    return generate_latest(registry)

