"""TelemetryPoint: the normalized reading every front door produces and every sink carries."""

from __future__ import annotations

import msgspec


class TelemetryPoint(msgspec.Struct, frozen=True, kw_only=True):
    """One accepted reading.  `ts` and `received_at` are milliseconds since the Unix epoch."""

    tenant: str
    device: str
    ts: int
    numeric_values: dict[str, float]
    string_values: dict[str, str]
    protocol: str
    received_at: int
    profile: str = "default"
    #: field -> unit, when the payload (SenML) or the device's profile gives units; absent otherwise
    units: dict[str, str] | msgspec.UnsetType = msgspec.UNSET


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(TelemetryPoint)


def encode_point(point: TelemetryPoint) -> bytes:
    """The wire form on the bus (JSON; schema in README.md)."""
    return _encoder.encode(point)


def decode_point(data: bytes) -> TelemetryPoint:
    return _decoder.decode(data)


def telemetry_topic(tenant: str) -> str:
    return "telemetry.raw." + tenant
