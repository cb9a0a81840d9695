"""CoAP Content-Format numbers (RFC 7252 §12.3 and IANA's "CoAP Content-Formats" registry): the
one home of every number corem reads or writes (model: aiocoap's `numbers/contentformat.py`), and
the media type each is on the bus and over HTTP.  The C lane has its own copies (`fastlane/_lane.c`:
50 and 60; Cayenne LPP's 42), which its differential tests hold to the Python path's.
"""

from __future__ import annotations

TEXT = 0  # text/plain; charset=utf-8
LINK_FORMAT = 40  # application/link-format (RFC 6690: /.well-known/core)
XML = 41
OCTETS = 42  # application/octet-stream (binary layouts, Cayenne LPP, protobuf, OTA packages)
EXI = 47
JSON = 50
CBOR = 60
SENML_JSON = 110  # RFC 8428
SENSML_JSON = 111
SENML_CBOR = 112
SENSML_CBOR = 113

#: Content-Format -> media type (bus records' content-type header, the admin API)
MEDIA_TYPES = {
    TEXT: "text/plain; charset=utf-8", LINK_FORMAT: "application/link-format", XML: "application/xml",
    OCTETS: "application/octet-stream", EXI: "application/exi", JSON: "application/json", CBOR: "application/cbor",
    SENML_JSON: "application/senml+json", SENSML_JSON: "application/sensml+json",
    SENML_CBOR: "application/senml+cbor", SENSML_CBOR: "application/sensml+cbor",
}


def media_type(content_format: int | None) -> str:
    """The media type of a Content-Format (unknown or none: application/octet-stream)."""
    return MEDIA_TYPES[OCTETS] if content_format is None else MEDIA_TYPES.get(content_format, MEDIA_TYPES[OCTETS])


def name(content_format: int) -> str:
    """How a message names it: `application/cbor (60)`."""
    return f"{MEDIA_TYPES.get(content_format, 'unknown')} ({content_format})"
