"""Prometheus exposition of corem's counters.

The hot paths count with plain integers on their own objects (no locks, no label lookups); this
collector reads them when /metrics is scraped.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

from prometheus_client.core import CollectorRegistry, CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest

from .codec import code_str

if TYPE_CHECKING:
    from .server import Server


class ServerCollector:
    def __init__(self, server: Server) -> None:
        self.server = server

    def collect(self) -> Iterable[Metric]:
        s = self.server
        transport = "udp"
        ep = s.endpoint.stats
        edge = s.edge.stats if s.edge is not None else None

        def counter(name: str, doc: str, value: float, **labels: str) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc, labels=list(labels))
            c.add_metric(list(labels.values()), value)
            return c

        yield counter("corem_coap_datagrams_received", "Datagrams received.", ep.datagrams_in, transport=transport)
        yield counter("corem_coap_bytes_received", "Bytes received.", ep.bytes_in, transport=transport)
        if edge is not None:
            yield counter("corem_coap_datagrams_sent", "Datagrams sent.", edge.datagrams_out, transport=transport)
            yield counter("corem_coap_bytes_sent", "Bytes sent.", edge.bytes_out, transport=transport)
            yield counter(
                "corem_coap_datagrams_oversized", "Datagrams dropped for exceeding max_datagram.", edge.oversized
            )
            yield counter("corem_coap_send_errors", "sendto() failures.", edge.send_errors)
        yield counter("corem_coap_requests", "New requests (duplicates excluded).", ep.requests, transport=transport)
        yield counter("corem_coap_duplicates", "Duplicate requests answered from the cache or dropped.", ep.duplicates)
        yield counter("corem_coap_format_errors", "Malformed datagrams (RST for CON, else dropped).", ep.format_errors)
        yield counter("corem_coap_pings", "CoAP pings (empty CON) answered with RST.", ep.pings)
        yield counter("corem_coap_bad_options", "Requests refused 4.02 for an unknown critical option.", ep.bad_options)
        yield counter("corem_coap_retransmissions", "Confirmable messages of ours sent again.", ep.retransmissions)
        yield counter("corem_coap_gave_up", "Confirmable messages of ours never acknowledged.", ep.gave_up)
        yield counter("corem_coap_resets_received", "RSTs matching a message of ours.", ep.resets)
        yield counter("corem_coap_dedup_evictions", "Exchanges forgotten before EXCHANGE_LIFETIME.", ep.dedup_evictions)
        yield counter("corem_coap_handler_errors", "Handlers that raised (answered 5.00).", s.router.handler_errors)
        responses = CounterMetricFamily("corem_coap_responses", "Messages sent by code (0.00 = empty ACK/RST).", labels=["code"])
        for code, n in enumerate(ep.responses):
            if n:
                responses.add_metric([code_str(code)], n)
        yield responses
        yield GaugeMetricFamily("corem_coap_dedup_entries", "Exchanges remembered for deduplication.", s.endpoint.dedup_entries)
        yield GaugeMetricFamily("corem_coap_outstanding", "Confirmable messages of ours awaiting ACK.", s.endpoint.outstanding)

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
        yield counter("corem_telemetry_bus_refusals", "Readings answered 5.03 because the bus could not take them.", ing.bus_refusals)

        sk = s.sink.stats
        name = s.sink.name
        yield counter("corem_sink_records_submitted", "Records handed to the sink.", sk.submitted, sink=name)
        yield counter("corem_sink_records_acked", "Records durable on the bus.", sk.acked, sink=name)
        yield counter("corem_sink_records_failed", "Records whose batch failed.", sk.failed, sink=name)
        yield counter("corem_sink_records_refused", "Records refused (sink full or closing).", sk.refused, sink=name)
        yield counter("corem_sink_batches", "Batches written.", sk.batches, sink=name)
        yield counter("corem_sink_batch_records", "Records in all batches (divide by batches for the mean size).", sk.batch_records, sink=name)
        yield counter("corem_sink_ack_seconds", "Time spent writing acknowledged batches.", sk.ack_seconds, sink=name)
        yield GaugeMetricFamily("corem_sink_pending", "Records waiting for the next batch.", s.sink.pending)
        yield GaugeMetricFamily("corem_rejected_samples", "Rejected samples kept for diagnostics.", len(s.diagnostics.samples))
        yield GaugeMetricFamily("corem_registry_devices_with_token", "Devices with an access token.", len(s.directory.by_token))


def render(server: Server) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServerCollector(server))  # type: ignore[arg-type]
    return generate_latest(registry)
