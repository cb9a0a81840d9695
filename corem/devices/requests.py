"""What an operator or another system asks of a device -- an RPC, a command, shared attributes, an
OTA package -- one msgspec Struct each, parsed once (`corem.inputs.check`) whether it comes as an
admin API body (corem/admin/api.py) or as a record on `commands.{tenant}` (commands.py); the API's
OpenAPI schemas and the CLI's defaults are made from them too.  What the values mean (a wait's
range, a command name's length) is the downlink's check (downlink.py), which names the field.

Light on purpose (msgspec only): the CLI imports it.
"""

from __future__ import annotations

import base64
from typing import Annotated, Any

import msgspec

from ..errors import BadInput, utf8

#: seconds an RPC waits for its reply, a command for its device, when not given
RPC_TIMEOUT = 10.0
COMMAND_TTL = 300.0


class RpcRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Call `method` on the device with `params`; wait `timeout` seconds for its reply."""

    method: str
    params: Any = None
    timeout: Annotated[float, msgspec.Meta(description="seconds")] = RPC_TIMEOUT
    oneway: Annotated[bool, msgspec.Meta(description="wait for the delivery only, not a reply")] = False


class CommandRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A Drogue-style command: its name and payload (text, or bytes as base64), kept `ttl`
    seconds for the device."""

    command: str
    payload: str | None = None
    payload_base64: str | None = None
    ttl: Annotated[float, msgspec.Meta(description="seconds the command waits for the device")] = COMMAND_TTL

    def payload_bytes(self) -> bytes:
        """The payload's bytes (BadInput names the field)."""
        if self.payload is not None and self.payload_base64 is not None:
            raise BadInput("payload: give payload or payload_base64, not both")
        if self.payload_base64 is None:
            return utf8(self.payload or "", "payload")
        try:
            return base64.b64decode(self.payload_base64, validate=True)
        except ValueError:  # binascii.Error, or text that is not even ASCII
            raise BadInput("payload_base64: not base64") from None


class AttributesUpdate(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Shared attributes to set: name -> JSON value (null deletes it).  The API's body is the
    object itself; a bus record carries it as `values`."""

    values: Any


class PackageAssignment(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Assign an OTA package (firmware or software, as the route or the record's type says)."""

    package: Annotated[int, msgspec.Meta(description="the package's id (GET /api/packages)")]
