"""Front doors, auth, profiles and decoders, TelemetryPoint."""

from .payload import PayloadError, Readings, decode_readings
from .point import TelemetryPoint, decode_point, encode_point, telemetry_topic
from .profiles import register_profile

__all__ = [
    "PayloadError",
    "Readings",
    "TelemetryPoint",
    "decode_point",
    "decode_readings",
    "encode_point",
    "register_profile",
    "telemetry_topic",
]
