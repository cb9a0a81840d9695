"""What a person gives to register a device, a provisioning key or a claim: one msgspec Struct
each, from which corem/inputs.py makes the admin API's check and OpenAPI schema
(corem/admin/api.py), the CLI's `devices add` flags (corem/cli.py) and the import's columns
(bulk.py).  The values' own rules (a tenant's characters, a PSK's length, OSCORE's IDs) are the
registry's (`new_device`, `parse_psk`, `parse_oscore` in store.py), which name the field.

The three ways in differ only in the certificate: the API takes the PEM (`cert_pem`), the import
its fingerprint (`cert_sha256`), the CLI a file (`--cert`, its own flag, with `--psk-file` and
`--oscore-secret-file`).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import msgspec

from ..inputs import defaults
from .store import (DEVICE_RE, PSK_IDENTITY_RE, TENANT_RE, TOKEN_RE, OscoreKeys, parse_oscore, parse_psk)


def _like(pattern: re.Pattern, **extra: Any) -> msgspec.Meta:
    """A string with the registry's own rule (store.py), so that clients can check first."""
    return msgspec.Meta(pattern=f"^{pattern.pattern}$", **extra)


def _hex(count: str) -> str:
    return f"^([0-9a-fA-F]{{2}}){{{count}}}$"


Tenant = Annotated[str, _like(TENANT_RE)]
DeviceName = Annotated[str, _like(DEVICE_RE)]


class DeviceFields(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A device's settings as a person gives them (the API's body, the CLI's flags, an import's
    line), its certificate aside.  An empty profile, power mode, topics or gateways is the
    default (`settings`)."""

    tenant: Tenant
    device: DeviceName
    profile: Annotated[str, msgspec.Meta(min_length=1, extra={"cli": "payload decoder profile (default: default)"})] = "default"
    token: Annotated[str, _like(TOKEN_RE, extra={
        "cli": "access token for POST /api/v1/{token}/telemetry (without any credential, one is generated and "
               "printed, as the API does)"})] | None = None
    psk_identity: Annotated[str, _like(PSK_IDENTITY_RE, extra={"cli": "DTLS-PSK identity (CoAPS)"})] | None = None
    psk: Annotated[str, msgspec.Meta(description="key as text, 8-64 bytes", min_length=8, max_length=64,
                                     extra={"cli": "DTLS pre-shared key as text"})] | None = None
    psk_hex: Annotated[str, msgspec.Meta(description="key as hex, 8-64 bytes", pattern=_hex("8,64"),
                                         extra={"cli": "DTLS pre-shared key as hex"})] | None = None
    power_mode: Annotated[Literal["drx", "psm"], msgspec.Meta(extra={
        "cli": "psm: reachable only psm_activity_timer after it talks; downlink queues meanwhile"})] = "drx"
    topics: Annotated[str, msgspec.Meta(description="space-separated MQTT filters for /ps and /mqtt", extra={
        "cli": "MQTT filters the device may use on /ps and /mqtt (default: #)"})] = "#"
    gateways: Annotated[str, msgspec.Meta(
        description="space-separated devices that may publish for this one (as=)",
        extra={"cli": "devices (same tenant) that may publish for this one (Drogue as=)"})] = ""
    oscore_sender_id: Annotated[str, msgspec.Meta(
        description="OSCORE: corem's Sender ID, hex (0-7 bytes)", pattern=_hex("0,7"), extra={
            "cli": "OSCORE: corem's Sender ID (the device's Recipient ID), hex; may be empty ('')",
            "metavar": "HEX"})] | None = None
    oscore_recipient_id: Annotated[str, msgspec.Meta(
        description="OSCORE: the device's Sender ID (its kid), hex", pattern=_hex("0,7"), extra={
            "cli": "OSCORE: the device's Sender ID (the kid of its requests), hex", "metavar": "HEX"})] | None = None
    oscore_secret: Annotated[str, msgspec.Meta(
        description="OSCORE master secret as text, 16-64 bytes", min_length=16, max_length=64,
        extra={"cli": "OSCORE master secret as text (16-64 bytes)"})] | None = None
    oscore_secret_hex: Annotated[str, msgspec.Meta(
        description="OSCORE master secret as hex, 16-64 bytes", pattern=_hex("16,64"),
        extra={"cli": "OSCORE master secret as hex"})] | None = None
    oscore_salt: Annotated[str, msgspec.Meta(
        description="OSCORE master salt, hex", pattern=_hex("0,64"),
        extra={"cli": "OSCORE master salt, hex (default: empty)", "metavar": "HEX"})] | None = None
    oscore_id_context: Annotated[str, msgspec.Meta(
        description="OSCORE ID context, hex", pattern=_hex("0,255"),
        extra={"cli": "OSCORE ID context, hex (default: none)", "metavar": "HEX"})] | None = None

    def oscore(self) -> OscoreKeys | None:
        """The OSCORE context these fields give (None without any); BadInput names the field."""
        return parse_oscore(*(getattr(self, k) for k in OSCORE_FIELDS))

    def credentials_given(self, cert_sha256: str | None) -> bool:
        """Has the device some credential (else the API and the CLI generate it a token)?"""
        return (self.token is not None or self.psk_identity is not None or cert_sha256 is not None
                or any(getattr(self, k) is not None for k in OSCORE_FIELDS))

    def settings(self, *, cert_sha256: str | None = None, token: str | None = None) -> dict[str, Any]:
        """The keyword arguments of `Registry.add_device` / `new_device` (after `tenant, device`):
        the keys parsed (BadInput names the field), an empty setting its default; `token`
        instead of the given one (a generated one)."""
        return {
            "token": self.token if token is None else token, "profile": self.profile or DEFAULTS["profile"],
            "psk_identity": self.psk_identity, "psk": parse_psk(self.psk, self.psk_hex), "cert_sha256": cert_sha256,
            "power_mode": self.power_mode or DEFAULTS["power_mode"], "topics": self.topics or DEFAULTS["topics"],
            "gateways": self.gateways or DEFAULTS["gateways"], "oscore": self.oscore(),
        }


class DeviceNew(DeviceFields, kw_only=True, forbid_unknown_fields=True):
    """POST /api/devices: the settings and the device's certificate as PEM."""

    cert_pem: Annotated[str, msgspec.Meta(description="device certificate (PEM); registers its SHA-256")] | None = None


class DeviceLine(DeviceFields, kw_only=True, forbid_unknown_fields=True):
    """A line of a fleet import (CSV or JSON Lines): the settings and the certificate's SHA-256."""

    cert_sha256: Annotated[str, msgspec.Meta(description="the certificate's SHA-256, lowercase hex")] | None = None

    def settings(self, *, cert_sha256: str | None = None, token: str | None = None) -> dict[str, Any]:
        return super().settings(cert_sha256=self.cert_sha256 if cert_sha256 is None else cert_sha256, token=token)


#: the OSCORE context's fields, in `parse_oscore`'s order (one list: the API's, the CLI's, the import's)
OSCORE_FIELDS = tuple(name for name in DeviceFields.__struct_fields__ if name.startswith("oscore_"))
#: a new device's settings when not given (POST /api/devices, `corem devices add`, an import)
DEFAULTS: dict[str, Any] = {k: v for k, v in defaults(DeviceFields).items()
                            if k in ("profile", "power_mode", "topics", "gateways")}


class ProvisioningKeyNew(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """POST /api/provisioning-keys: a key and secret devices trade for credentials in `tenant`."""

    key: str
    secret: str
    tenant: str
    profile: str = "default"
    max_devices: Annotated[int, msgspec.Meta(
        ge=1, le=2**31 - 1, description="devices this key may have registered (still registered) at most; "
        "none: no bound of its own")] | None = None


class ClaimRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """POST /api/devices/{tenant}/{device}/claim: the owner, with the secret the device published."""

    owner: str
    secret_key: str
