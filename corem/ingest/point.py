"""TelemetryPoint: the normalized reading every front door produces and every sink carries."""

from __future__ import annotations

from typing import Annotated

import msgspec

from ..bus import topics


class TelemetryPoint(msgspec.Struct, frozen=True, kw_only=True):
    """One accepted reading, the value of a `telemetry.raw.{tenant}` record (JSON; its published
    schema: docs/schemas/telemetry-point.schema.json, made from this class by corem/contracts.py)."""

    tenant: Annotated[str, msgspec.Meta(description="the device's tenant (the topic's last part too)")]
    device: Annotated[str, msgspec.Meta(description="the device id within its tenant (the record's key too)")]
    ts: Annotated[int, msgspec.Meta(
        description="when the reading was taken, ms since the Unix epoch: the payload's own time when it gives "
                    "one, else received_at")]
    numeric_values: Annotated[dict[str, float], msgspec.Meta(description="field -> number")]
    string_values: Annotated[dict[str, str], msgspec.Meta(description="field -> text")]
    protocol: Annotated[str, msgspec.Meta(description="the protocol the reading came in: coap")]
    received_at: Annotated[int, msgspec.Meta(
        description="when corem accepted it, ms since the Unix epoch (the record's creation-time header)")]
    profile: Annotated[str, msgspec.Meta(description="the device profile that decoded it")] = "default"
    #: field -> unit, when the payload (SenML) or the device's profile gives units; absent otherwise
    units: Annotated[dict[str, str], msgspec.Meta(
        description="field -> unit, when the payload (SenML) or the profile gives units; absent otherwise")] \
        | msgspec.UnsetType = msgspec.UNSET


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(TelemetryPoint)


def encode_point(point: TelemetryPoint) -> bytes:
    """The wire form on the bus (JSON; docs/bus.md, and its JSON Schema in docs/schemas/)."""
    return _encoder.encode(point)


def decode_point(data: bytes) -> TelemetryPoint:
    return _decoder.decode(data)


def telemetry_topic(tenant: str) -> str:
    return topics.telemetry(tenant)
