"""Prometheus exposition of corem's counters.

The hot paths count with plain integers on their own objects (no locks, no label lookups); this
collector reads them when /metrics is scraped.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import generate_latest

from .bus.base import LATENCY_BUCKETS, SIZE_BUCKETS
from .codec import code_str

if TYPE_CHECKING:
    from .server import Server


class ServerCollector:
    def __init__(self, server: Server) -> None:
        self.server = server

    def collect(self) -> Iterable[Metric]:
        s = self.server

        def family(name: str, doc: str, pairs: list[tuple[dict[str, str], float]], gauge: bool = False) -> Metric:
            labels = list(pairs[0][0]) if pairs else []
            m = (GaugeMetricFamily if gauge else CounterMetricFamily)(name, doc, labels=labels)
            for lbl, value in pairs:
                m.add_metric(list(lbl.values()), value)
            return m

        def per_transport(name: str, doc: str, value, gauge: bool = False) -> Metric:
            return family(name, doc, [({"transport": t.name}, value(t)) for t in s.transports], gauge)

        yield per_transport("corem_coap_datagrams_received", "Datagrams received (after DTLS: CoAP messages).",
                            lambda t: t.endpoint.stats.datagrams_in)
        yield per_transport("corem_coap_bytes_received", "Bytes received.", lambda t: t.endpoint.stats.bytes_in)
        yield per_transport("corem_coap_datagrams_sent", "Datagrams sent.", lambda t: t.edge.stats.datagrams_out)
        yield per_transport("corem_coap_bytes_sent", "Bytes sent.", lambda t: t.edge.stats.bytes_out)
        yield per_transport("corem_coap_datagrams_oversized", "Datagrams dropped for exceeding max_datagram.",
                            lambda t: t.edge.stats.oversized)
        yield per_transport("corem_coap_send_errors", "sendto() failures.", lambda t: t.edge.stats.send_errors)
        limited = [t for t in s.transports if t.edge is not None and t.edge.limiter is not None]
        yield family("corem_rate_limited_datagrams", "Datagrams dropped: their source was over rate_limit_per_source.",
                     [({"transport": t.name}, t.edge.limiter.dropped) for t in limited])
        yield family("corem_rate_limit_exempted",
                     "Datagrams over their source's rate let through: an established DTLS session, a known token.",
                     [({"transport": t.name}, t.edge.limiter.exempted) for t in limited])
        yield family("corem_rate_limit_sources", "Source addresses the rate limit tracks.",
                     [({"transport": t.name}, len(t.edge.limiter)) for t in limited], gauge=True)
        yield per_transport("corem_coap_send_blocked", "Flushes cut short by a full socket send buffer.",
                            lambda t: t.edge.stats.send_blocked)
        for attr, name, doc in (
            ("requests", "corem_coap_requests", "New requests (duplicates excluded)."),
            ("duplicates", "corem_coap_duplicates", "Duplicate requests answered from the cache or dropped."),
            ("format_errors", "corem_coap_format_errors", "Malformed datagrams (RST for CON, else dropped)."),
            ("pings", "corem_coap_pings", "CoAP pings (empty CON) answered with RST."),
            ("bad_options", "corem_coap_bad_options",
             "Requests refused 4.02 for a critical option corem does not know or implement."),
            ("proxy_refused", "corem_coap_proxy_refused", "Requests refused 5.05: Proxy-Uri or Proxy-Scheme."),
            ("retransmissions", "corem_coap_retransmissions", "Confirmable messages of ours sent again."),
            ("gave_up", "corem_coap_gave_up", "Confirmable messages of ours never acknowledged."),
            ("resets", "corem_coap_resets_received", "RSTs matching a message of ours."),
            ("dedup_evictions", "corem_coap_dedup_evictions", "Exchanges forgotten before EXCHANGE_LIFETIME."),
            ("outstanding_refused", "corem_coap_outstanding_refused",
             "Separate responses not sent because max_outstanding were awaiting their ACK."),
        ):
            yield per_transport(name, doc, lambda t, a=attr: getattr(t.endpoint.stats, a))
        yield per_transport("corem_coap_handler_errors", "Handlers that raised (answered 5.00).",
                            lambda t: t.router.handler_errors)
        yield per_transport("corem_coap_invalid_text_options", "Requests refused 4.00: a text option not UTF-8.",
                            lambda t: t.router.invalid_text)
        yield per_transport("corem_coap_storage_errors", "Requests refused 5.03: the disk refused a handler's write.",
                            lambda t: t.router.storage_errors)
        yield per_transport("corem_coap_uploads", "Block1 uploads in progress.", lambda t: len(t.router.uploads),
                            gauge=True)
        yield per_transport("corem_coap_uploads_refused", "Block1 uploads refused (too large or too many).",
                            lambda t: t.router.uploads.refused)
        yield per_transport("corem_coap_uploads_expired", "Block1 uploads abandoned mid-way and forgotten.",
                            lambda t: t.router.uploads.expired)
        observed = [t for t in s.transports if t.observers is not None]
        yield family("corem_coap_observers", "Observe registrations (RFC 7641) now.",
                     [({"transport": t.name}, len(t.observers)) for t in observed], gauge=True)
        for attr, name, doc in (
            ("registered", "corem_coap_observe_registrations", "Observe registrations accepted."),
            ("refused", "corem_coap_observe_refused", "Observe registrations refused by the bounds."),
            ("notifications", "corem_coap_observe_notifications", "Notifications sent."),
            ("lost", "corem_coap_observe_lost", "Observations ended by RST or an unacknowledged notification."),
        ):
            yield family(name, doc, [({"transport": t.name}, getattr(t.observers.stats, attr)) for t in observed])
        yield family(
            "corem_coap_responses", "Messages sent by code (0.00 = empty ACK/RST).",
            [({"transport": t.name, "code": code_str(code)}, n)
             for t in s.transports for code, n in enumerate(t.endpoint.stats.responses) if n],
        )
        yield per_transport("corem_coap_dedup_entries", "Exchanges remembered for deduplication.",
                            lambda t: t.edge.dedup_entries, gauge=True)
        yield per_transport("corem_coap_outstanding", "Confirmable messages of ours awaiting ACK.",
                            lambda t: t.endpoint.outstanding, gauge=True)

        for t in s.transports:
            if t.dtls is None:
                continue
            d = t.dtls.stats
            yield family("corem_dtls_handshakes_started", "Handshakes past the cookie exchange.", [({}, d.handshakes_started)])
            yield family("corem_dtls_handshakes_completed", "Handshakes completed.", [({}, d.handshakes_completed)])
            yield family("corem_dtls_handshakes_failed", "Handshakes failed, by reason.",
                         [({"reason": r}, n) for r, n in sorted(d.handshakes_failed.items())])
            yield family("corem_dtls_handshakes_refused", "ClientHellos refused by the handshake or session bound.",
                         [({}, d.handshakes_refused)])
            yield family("corem_dtls_hello_verify_sent", "Stateless HelloVerifyRequests sent.", [({}, d.hello_verify_sent)])
            yield family("corem_dtls_records_dropped", "Records with no session or that did not decrypt.",
                         [({}, d.records_dropped)])
            yield family("corem_dtls_bytes_received", "Bytes received on the DTLS socket.", [({}, d.bytes_in)])
            yield family("corem_dtls_bytes_sent_unauthenticated", "Bytes sent to peers before their handshake completed.",
                         [({}, d.bytes_out_unauthenticated)])
            yield family("corem_dtls_sessions_closed", "Sessions ended by close_notify.", [({}, d.sessions_closed)])
            yield family("corem_dtls_sessions_expired", "Sessions forgotten after the inactivity timeout.",
                         [({}, d.sessions_expired)])
            yield family("corem_dtls_sessions", "Sessions by state.", [
                ({"state": "live"}, len(t.dtls.sessions)), ({"state": "offloaded"}, len(t.dtls.offloaded)),
                ({"state": "handshaking"}, len(t.dtls.handshakes)),
            ], gauge=True)
            yield family("corem_dtls_sessions_offloaded", "Idle sessions serialized and freed.", [({}, d.offloaded)])
            yield family("corem_dtls_sessions_restored", "Offloaded sessions brought back by a datagram.",
                         [({}, d.restored)])
            yield family("corem_dtls_sessions_lost", "Sessions that failed to serialize or restore.",
                         [({}, d.sessions_lost)])
            yield family("corem_dtls_sessions_offload_failed", "Idle sessions the session store refused "
                         "(a full or failing disk): kept in memory, offloaded at a later sweep.",
                         [({}, d.offload_failed)])
            yield family("corem_dtls_session_store_errors", "Writes the DTLS session store could not make.",
                         [({}, t.dtls.store.errors)])

        ing = s.ingest.stats
        rej = CounterMetricFamily(
            "corem_protocol_payload_rejections", "Payloads rejected, nothing published.", labels=["protocol", "reason"]
        )
        for (protocol, reason), n in sorted(ing.rejections.items()):
            rej.add_metric([protocol, reason], n)
        if not ing.rejections:
            rej.add_metric(["coap", "decode_error"], 0)
        yield rej
        auth = CounterMetricFamily("corem_auth_failures", "Requests refused 4.01.", labels=["protocol", "reason"])
        for (protocol, reason), n in sorted(ing.auth_failures.items()):
            auth.add_metric([protocol, reason], n)
        yield auth
        acc = CounterMetricFamily("corem_telemetry_points", "Points acknowledged by the bus.", labels=["tenant"])
        for tenant, n in sorted(ing.accepted.items()):
            acc.add_metric([tenant], n)
        yield acc
        yield family("corem_telemetry_bus_refusals", "Readings answered 5.03 because the bus could not take them.",
                     [({}, ing.bus_refusals)])

        sk = s.sink.stats
        sink = {"sink": s.sink.name}
        for value, name, doc in (
            (sk.submitted, "corem_sink_records_submitted", "Records handed to the sink."),
            (sk.acked, "corem_sink_records_acked", "Records durable on the bus."),
            (sk.failed, "corem_sink_records_failed", "Records whose batch failed."),
            (sk.refused, "corem_sink_records_refused", "Records refused (sink full or closing)."),
            (sk.batches, "corem_sink_batches", "Batches written."),
            (sk.batch_records, "corem_sink_batch_records", "Records in all batches (divide by batches for the mean size)."),
            (sk.ack_seconds, "corem_sink_ack_seconds", "Time spent writing acknowledged batches."),
        ):
            yield family(name, doc, [(sink, value)])
        for name, doc, bounds, counts, total in (
            ("corem_sink_batch_seconds", "Time from handing a batch to the bus to its acknowledgement.",
             LATENCY_BUCKETS, sk.latency_buckets, sk.ack_seconds),
            ("corem_sink_batch_size", "Records per batch.", SIZE_BUCKETS, sk.size_buckets, sk.batch_records),
        ):
            yield histogram(name, doc, bounds, counts, total, {"sink": s.sink.name})
        yield GaugeMetricFamily("corem_sink_pending", "Records taken by the sink and not answered yet.", s.sink.pending)
        yield from s.sink.metrics()
        if s.command_reader is not None:
            yield family("corem_kafka_commands_errors", "Failures reading commands.{tenant} (then retried).",
                         [({}, s.command_reader.errors)])
        pr = s.presence
        yield family("corem_devices_online", "Devices online (an accepted reading within presence_offline_after).",
                     [({"tenant": t}, n) for t, n in sorted(pr.online_by_tenant.items()) if n], gauge=True)
        yield family("corem_presence_transitions", "Presence transitions published.",
                     [({"state": st}, n) for st, n in sorted(pr.transitions.items())])
        yield family("corem_presence_publish_failures", "Presence transitions the bus did not take.",
                     [({}, pr.publish_failures)])
        dl, em = s.downlink.stats, s.emqx.stats
        for value, name, doc in (
            (dl.attribute_updates, "corem_downlink_attribute_updates", "Shared attribute updates sent or stored."),
            (dl.attributes_queued, "corem_downlink_attributes_queued", "Updates queued (merged) for sleeping devices."),
            (dl.rpc_sent, "corem_downlink_rpc_delivered", "RPC requests delivered to devices."),
            (dl.rpc_replied, "corem_downlink_rpc_replied", "RPC requests the device answered."),
            (dl.rpc_expired, "corem_downlink_rpc_expired", "RPC requests that timed out."),
            (dl.commands_sent, "corem_downlink_commands_delivered", "Commands delivered on a ct response."),
            (dl.commands_expired, "corem_downlink_commands_expired", "Commands dropped after their ttl."),
            (dl.queue_full, "corem_downlink_queue_full", "Downlink refused: max_queued_commands for the device."),
            (em.published, "corem_pubsub_published", "Messages published on /ps and /mqtt."),
            (em.subscribed, "corem_pubsub_subscribed", "Subscriptions (Observe) accepted on /ps and /mqtt."),
            (em.denied, "corem_pubsub_denied", "Publishes or subscriptions outside the device's topics (4.03)."),
            (em.retained_dropped, "corem_pubsub_retained_dropped", "Retained messages dropped by the bounds."),
        ):
            yield family(name, doc, [({}, value)])
        yield GaugeMetricFamily("corem_downlink_devices_queued", "Devices with something waiting for them.",
                                s.downlink.devices_queued)
        yield GaugeMetricFamily("corem_pubsub_retained", "Retained /ps messages now.", len(s.emqx))
        tb = s.thingsboard
        yield family("corem_provisioning", "Provisioning requests by result.",
                     [({"result": "success"}, tb.provisioned), ({"result": "refused"}, tb.provision_refused)])
        if s.http is not None:
            yield family("corem_admin_requests", "Admin HTTP requests routed.", [({}, s.http.requests)])
            yield family("corem_admin_unauthorized", "Admin API requests refused 401.", [({}, s.http.unauthorized)])
        yield GaugeMetricFamily("corem_registry_devices", "Devices registered.", len(s.directory.by_name))
        yield GaugeMetricFamily("corem_rejected_samples", "Rejected samples kept for diagnostics.", len(s.diagnostics.samples))
        yield GaugeMetricFamily("corem_registry_devices_with_token", "Devices with an access token.", len(s.directory.by_token))


def histogram(name: str, doc: str, bounds: tuple[float, ...], counts: list[int], total: float,
              labels: dict[str, str] | None = None) -> Metric:
    """A histogram from non-cumulative bucket counts (the last one +Inf), as the hot paths keep them."""
    labels = labels or {}
    h = HistogramMetricFamily(name, doc, labels=list(labels))
    running, buckets = 0, []
    for bound, n in zip((*bounds, float("inf")), counts):
        running += n
        buckets.append(("+Inf" if bound == float("inf") else str(bound), running))
    h.add_metric(list(labels.values()), buckets, total)
    return h


def render(server: Server) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServerCollector(server))  # type: ignore[arg-type]
    return generate_latest(registry)
