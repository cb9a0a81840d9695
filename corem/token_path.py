"""The path that names a device by its access token: ThingsBoard's `api/v1/{token}/<resource>`.

One definition, from which the doors' routes (ingest/telemetry.py, frontdoors/), the rate-limit
exemption (`corem.identity.Identity.names_a_known_token`, and the C lane's twin in
fastlane/_lane.c) and the latency `door` label (latency.py) are built.  Over a DTLS/TLS session
or OSCORE the same resources are served without the token, `api/v1/<resource>`: the session
names the device.  A leaf: it imports nothing of corem, so the lowest layers can read it.
"""

from __future__ import annotations

from typing import Sequence

#: the Uri-Path segments before the token
PREFIX: tuple[str, ...] = ("api", "v1")
#: ThingsBoard's device API: `api/v1/<resource>` (the session's device, provisioning, Efento's paths)
API_PATH = "/".join(PREFIX)
#: the routes' pattern that names the device by its token; a resource follows it
TOKEN_PATH = f"{API_PATH}/{{token}}"
#: the resource readings are posted to (`api/v1/{token}/telemetry`, the fast lane's route)
TELEMETRY = "telemetry"


def token_route(resource: str) -> str:
    """The route of `resource` for a device named by its token: `api/v1/{token}/<resource>`."""
    return f"{TOKEN_PATH}/{resource}"


def api_route(resource: str) -> str:
    """The route of `resource` without a token (the session names the device): `api/v1/<resource>`."""
    return f"{API_PATH}/{resource}"


def token_of(path: Sequence[bytes]) -> bytes | None:
    """The token a Uri-Path names (`api/v1/{token}/...`, as the segments' bytes), or None: what the
    rate limit's exemption looks up (the C lane's `names_known_token` reads the same segments)."""
    n = len(PREFIX)
    if len(path) <= n:
        return None
    for want, got in zip(PREFIX, path):
        if got != want.encode():
            return None
    return bytes(path[n])
