"""What the admin API answers, as msgspec Structs: the OpenAPI document's response schemas are made
from them (`msgspec.json.schema_components`), the device views are built with them (the API's and
the CLI's `devices list --json` alike), and the tests hold every other answer to them.

Light on purpose (msgspec and the inputs' Structs): the CLI imports it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal

import msgspec

from ..profiles.spec import Profile
from ..registry.inputs import DEFAULTS, DeviceFields

if TYPE_CHECKING:
    from ..registry import Device


class Error(msgspec.Struct):
    """Any answer that is not a success: the field at fault first (`tenant: required`), then why."""

    error: str


class Oscore(msgspec.Struct, kw_only=True):
    """A device's OSCORE context, without its secret: the IDs as hex."""

    sender_id: str
    recipient_id: str
    id_context: str | None


class DeviceRecord(msgspec.Struct, kw_only=True):
    """A registered device as the registry holds it, its secrets left out: that a token exists, the
    PSK identity (not the key), the certificate's SHA-256, the OSCORE IDs (not the secret)."""

    tenant: str
    device: str
    profile: str
    created_at: int
    has_token: bool
    psk_identity: str | None
    cert_sha256: str | None
    power_mode: Literal["drx", "psm"]
    topics: str
    gateways: str
    oscore: Oscore | None

    @staticmethod
    def fields_of(d: Device) -> dict[str, Any]:
        return {
            "tenant": d.tenant, "device": d.device, "profile": d.profile, "created_at": d.created_at,
            "has_token": d.token is not None, "psk_identity": d.psk_identity, "cert_sha256": d.cert_sha256,
            "power_mode": d.power_mode, "topics": d.topics, "gateways": d.gateways,
            "oscore": d.oscore and Oscore(sender_id=d.oscore.sender_id.hex(), recipient_id=d.oscore.recipient_id.hex(),
                                          id_context=None if d.oscore.id_context is None else d.oscore.id_context.hex()),
        }

    @classmethod
    def of(cls, d: Device) -> DeviceRecord:
        return cls(**cls.fields_of(d))


class DeviceSecrets(DeviceRecord, kw_only=True):
    """`corem devices list --json --secrets`: the record and its secrets (hex for keys)."""

    token: str | None
    psk_hex: str | None
    oscore_secret_hex: str | None
    oscore_salt_hex: str | None

    @classmethod
    def of(cls, d: Device) -> DeviceSecrets:
        return cls(**cls.fields_of(d), token=d.token, psk_hex=None if d.psk is None else d.psk.hex(),
                   oscore_secret_hex=None if d.oscore is None else d.oscore.secret.hex(),
                   oscore_salt_hex=None if d.oscore is None else d.oscore.salt.hex())


class Queued(msgspec.Struct, kw_only=True):
    """What waits for the device: shared attribute updates, RPC requests, commands; `waiting`: a
    request of the device (Drogue's ct=) is held open for a command."""

    attributes: int
    rpc: int
    commands: int
    waiting: bool


class DeviceView(DeviceRecord, kw_only=True):
    """A device in the API: its record, its presence (`last_seen`: ms since the epoch, while online)
    and counts since the start, its downlink queues, and (one device only) its owner once claimed."""

    online: bool
    last_seen: int | None
    points: int
    rejections: int
    queued: Queued
    owner: str | None | msgspec.UnsetType = msgspec.UNSET


class DeviceCreated(DeviceView, kw_only=True):
    """A device just registered: its view and its access token (generated when no credential was
    given; null when it has other credentials)."""

    token: str | None


class Attributes(msgspec.Struct):
    """Client attributes (the device published them) and shared ones (set for it)."""

    client: dict[str, Any]
    shared: dict[str, Any]


class Delivery(msgspec.Struct):
    """What became of a downlink request at once: delivered to the device, queued until it can be
    reached (PSM, asleep), or stored (attributes nobody observes)."""

    delivery: Literal["delivered", "queued", "stored"]


class RpcResult(msgspec.Struct, kw_only=True):
    """An RPC's outcome: `replied` (with the device's response), `delivered` (one-way), `expired`
    (504: no reply within the timeout)."""

    id: int
    status: Literal["queued", "delivered", "replied", "expired"]
    response: Any = msgspec.UNSET


class Package(msgspec.Struct, kw_only=True):
    """An OTA package."""

    id: int
    kind: Literal["firmware", "software"]
    title: str
    version: str
    sha256: str
    size: int


class PackageAssigned(Package, kw_only=True):
    delivery: Literal["delivered", "queued", "stored"]


class ProvisioningKey(msgspec.Struct):
    key: str
    tenant: str
    max_devices: int | None = None


class Claimed(msgspec.Struct):
    tenant: str
    device: str
    owner: str


class Imported(msgspec.Struct):
    """A bulk import's outcome: devices added, the same already, replaced (?replace=true)."""

    added: int
    unchanged: int
    replaced: int


class Sample(msgspec.Struct, kw_only=True):
    """A rejected reading kept for diagnosis: why, and its payload (hex, and as CBOR diagnostic
    notation or text)."""

    at: int
    protocol: str
    reason: str
    detail: str
    field: str | None
    tenant: str | None
    device: str | None
    peer: str
    content_format: int | None
    payload_hex: str
    payload_diagnostic: str


class BusStatus(msgspec.Struct, kw_only=True):
    name: str
    pending: int
    error: str | None


class StatusDevice(msgspec.Struct, kw_only=True):
    tenant: str
    device: str
    online: bool
    last_seen: int | None
    points: int
    rejections: int
    power_mode: str | None


class DtlsStatus(msgspec.Struct, kw_only=True):
    live: int
    offloaded: int
    handshaking: int
    completed: int
    failed: dict[str, int]


class Status(msgspec.Struct, kw_only=True):
    """The diagnostics page's data: totals since the start, the bus, the devices heard lately."""

    now: int
    uptime: float
    points: int
    rejections: int
    auth_failures: int
    bus_refusals: int
    requests: float
    bus: BusStatus
    online: int
    registered: int
    devices: list[StatusDevice]
    dtls: DtlsStatus | None
    samples: int


class DecodedPoint(msgspec.Struct, kw_only=True):
    ts: int
    numeric_values: dict[str, float]
    string_values: dict[str, str]
    units: dict[str, str] | msgspec.UnsetType = msgspec.UNSET


class Decoded(msgspec.Struct):
    """A sample the profile takes: the points it would put on the bus."""

    points: list[DecodedPoint]


class DecodeRefused(msgspec.Struct, kw_only=True):
    """A sample the profile refuses: the error and the CoAP code the device would get."""

    error: str
    reason: str
    field: str | None
    kind: Literal["rule_violation", "unsupported_format", "codec_limit", "decode_error"]
    code: str


class ProfileEntry(msgspec.Struct, kw_only=True):
    """A profile: built in (`default`) or stored; `devices`: how many use it (in lists)."""

    name: str
    builtin: bool
    devices: int | msgspec.UnsetType = msgspec.UNSET
    profile: Profile | msgspec.UnsetType = msgspec.UNSET


def encode(value: Any) -> bytes:
    return _encoder.encode(value) + b"\n"


_encoder = msgspec.json.Encoder()


class HistorySample(msgspec.Struct, kw_only=True):
    """What was counted in one interval (`t`: its end, seconds since the epoch; `backlog`: the bus's
    then)."""

    t: float
    seconds: float
    readings: float
    rejections: dict[str, float]
    handshakes: float
    handshake_failures: dict[str, float]
    backlog: float


class History(msgspec.Struct, kw_only=True):
    """The last hour, oldest first, and the interval under way (`current`, null before the first
    sample)."""

    interval: float
    now: float
    samples: list[HistorySample]
    current: HistorySample | None


# -- what the API and the CLI agree on ------------------------------------------------------------------
#: a new device's settings when not given (POST /api/devices and `corem devices add`): the Struct's
DEVICE_DEFAULTS = DEFAULTS


class SampleRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """POST /api/profiles/{name}/decode: a sample payload (hex or base64) and its Content-Format."""

    content_format: Annotated[int, msgspec.Meta(ge=0, le=65535)] | None = None
    hex: Annotated[str, msgspec.Meta(description="the payload as hex")] | None = None
    base64: Annotated[str, msgspec.Meta(description="the payload as base64")] | None = None


def generated_token(given: DeviceFields, cert_sha256: str | None) -> str | None:
    """A device needs some credential: given none, it gets an access token (random, 24 characters
    of base64url), as the API and the CLI both do; else the token as given."""
    if not given.credentials_given(cert_sha256):
        import secrets

        return secrets.token_urlsafe(18)
    return given.token
