"""Front doors, auth, profiles and decoders, TelemetryPoint."""

from ..profiles.payload import PayloadError, Readings, decode_readings
from .point import TelemetryPoint, decode_point, encode_point, telemetry_topic

__all__ = [
    "PayloadError",
    "Readings",
    "TelemetryPoint",
    "decode_point",
    "decode_readings",
    "encode_point",
    "telemetry_topic",
]
