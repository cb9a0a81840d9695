"""corem/errors.py: one hierarchy of refusals, each kind carrying the answer it becomes -- its CoAP
code (coap.response.refusal) and its HTTP status (the admin HTTP server) -- and the registry's
conflicts told apart by what collides, never by an error's text."""

from __future__ import annotations

import ast
import datetime
import importlib
from pathlib import Path

import pytest
import trio
import trio.testing
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from corem import errors
from corem.admin.http import HttpError, HttpServer, Route
from corem.coap.response import refusal
from corem.codec import Code, MessageFormatError, OptionNumber, decode_uint
from corem.coap.stream import FrameError
from corem.errors import (BadInput, ClaimRefused, Conflict, CoremError, NewerFormat, NotFound, QueueFull, Refused,
                          StorageUnavailable, Unauthorized)
from corem.registry import Registry

from .conftest import start_corem
from .postgres_server import Postgres, binaries, empty

#: each kind, the CoAP code and the HTTP status it is answered with, and whether it says "retry"
KINDS = [
    (BadInput, Code.BAD_REQUEST, 400, False),
    (Conflict, Code.CONFLICT, 409, False),
    (NotFound, Code.NOT_FOUND, 404, False),
    (Unauthorized, Code.UNAUTHORIZED, 401, False),
    (ClaimRefused, Code.BAD_REQUEST, 400, False),
    (QueueFull, Code.TOO_MANY_REQUESTS, 429, False),
    (StorageUnavailable, Code.SERVICE_UNAVAILABLE, 503, True),
    (NewerFormat, Code.INTERNAL_SERVER_ERROR, 500, False),
]


@pytest.mark.parametrize("kind, code, status, retry", KINDS, ids=[k[0].__name__ for k in KINDS])
def test_each_kind_becomes_its_coap_answer(kind, code, status, retry):
    answer = refusal(kind("field: why"))
    assert answer.code == code
    options = dict(answer.options or [])
    if retry:
        assert decode_uint(options[OptionNumber.MAX_AGE]) == errors.RETRY_AFTER
        assert answer.payload == b"storage unavailable; retry later"  # (the disk's error is the log's)
    else:
        assert OptionNumber.MAX_AGE not in options and answer.payload == b"field: why"


@pytest.mark.parametrize("raised, code, counted", [
    (BadInput("field: why"), Code.BAD_REQUEST, 0),  # the request's fault: answered, not a bug
    (StorageUnavailable("disk full"), Code.SERVICE_UNAVAILABLE, 0),
    (NewerFormat("data dir: format 9"), Code.INTERNAL_SERVER_ERROR, 1),  # the server's: counted and logged
    (KeyError("a bug"), Code.INTERNAL_SERVER_ERROR, 1),
])
def test_the_router_answers_each_kind_and_counts_the_servers_faults_as_handler_errors(raised, code, counted, caplog):
    from corem.coap import Endpoint, Params, Router
    from corem.codec import Message, Type
    from corem.codec import OptionNumber as O

    from .conftest import exchange

    def handler(req, params):
        raise raised

    router = Router()
    router.add("x", {Code.POST: handler})
    answer = exchange(Endpoint(Params(), rng=lambda: 0.0), router,
                      Message(Type.CON, Code.POST, 1, b"k", [(O.URI_PATH, b"x")]), ("127.0.0.1", 5683))
    assert answer.code == code and router.handler_errors == counted
    assert ("handler for /x failed" in caplog.text) == bool(counted)


async def _answer(route_raises: BaseException) -> tuple[int, dict[str, str], bytes]:
    def handler(req):
        raise route_raises

    http = HttpServer([Route("GET", "/api/x", handler)], admin_token="t0ken")
    client, server_side = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(http.handle, server_side)
        await client.send_all(b"GET /api/x HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t0ken\r\n\r\n")
        data = b""
        while part := await client.receive_some(65536):
            data += part
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split(" ")[1]), headers, body


@pytest.mark.parametrize("kind, code, status, retry", KINDS, ids=[k[0].__name__ for k in KINDS])
async def test_each_kind_becomes_its_http_answer(kind, code, status, retry):
    got, headers, body = await _answer(kind("field: why"))
    assert got == status and b'"error":"field: why"' in body
    assert headers.get("retry-after") == (str(errors.RETRY_AFTER) if retry else None)


async def test_an_http_only_refusal_keeps_its_status_and_a_bug_stays_a_500():
    assert (await _answer(HttpError(413, "body: too large")))[0] == 413
    assert (await _answer(KeyError("x")))[0] == 500


def test_the_kinds_are_one_tree_and_keep_the_builtin_bases_callers_caught():
    for kind, *_ in KINDS:
        assert issubclass(kind, CoremError)
    for kind in (BadInput, Conflict, NotFound, Unauthorized, ClaimRefused, QueueFull):
        assert issubclass(kind, Refused)
    assert not issubclass(StorageUnavailable, Refused) and not issubclass(NewerFormat, Refused)
    assert issubclass(Conflict, BadInput)  # (a caller refusing bad input refuses a conflict too)
    assert issubclass(BadInput, ValueError) and issubclass(Unauthorized, PermissionError)
    assert issubclass(NotFound, LookupError) and issubclass(StorageUnavailable, RuntimeError)
    assert issubclass(MessageFormatError, BadInput) and issubclass(FrameError, BadInput)
    assert issubclass(HttpError, CoremError)
    e = MessageFormatError("version 2, expected 1", 7, 0)  # (the C decoder builds it with these)
    assert str(e) == "version 2, expected 1" and e.mid == 7 and refusal(e).code == Code.BAD_REQUEST


#: exception classes of corem not rooted in CoremError yet, each with its owner's module: the
#: list may only shrink (a new error class is rooted, or named here with why)
NOT_ROOTED = {
    "corem.bus.kafka.DeliveryFailed",  # a ConnectionError librdkafka's report becomes (the sink's)
    "corem.admin.http._Gone",  # control flow: the client left, nothing is answered
    "corem.dtls.engine.errors.DtlsDecodeError", "corem.dtls.engine.errors.HandshakeFailed",  # the engine's alerts
    "corem.oscore.protect.OscoreError",
}


def test_every_exception_class_of_corem_is_rooted_or_named():
    root = Path(errors.__file__).parent
    found = set()
    for path in root.rglob("*.py"):
        module = ".".join(path.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__")
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef) and node.bases:
                cls = getattr(importlib.import_module(module), node.name, None)
                if isinstance(cls, type) and issubclass(cls, BaseException) and not issubclass(cls, CoremError):
                    found.add(f"{module}.{node.name}")
    assert found <= NOT_ROOTED, sorted(found - NOT_ROOTED)


def _certificate_pem() -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "errors-test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM).decode()


@pytest.fixture(params=["sqlite", "postgresql"])
def registry_at(request, tmp_path):
    if request.param == "sqlite":
        yield tmp_path / "registry.db"
        return
    if binaries() is None:
        pytest.skip("no PostgreSQL here (make sysdeps installs it)")
    pg = Postgres()
    try:
        yield empty(pg.url)
    finally:
        pg.stop()


def test_the_registry_names_what_collides_as_a_conflict(registry_at):
    """Told by a SELECT of the colliding row, not by the driver's words (which differ between
    SQLite and PostgreSQL): a device named like a column is no trouble."""
    reg = Registry(registry_at)
    try:
        reg.add_device("acme", "token", token="T1", psk_identity="id-1", psk=b"0123456789",
                       cert_sha256="ab" * 32)
        cases = [
            (("acme", "token"), {}, "device: acme/token already exists"),
            (("acme", "d2"), {"token": "T1"}, "token: already used by another device"),
            (("acme", "d2"), {"psk_identity": "id-1", "psk": b"0123456789"}, "psk_identity: already used"),
            (("acme", "d2"), {"cert_sha256": "ab" * 32}, "cert: this certificate is already registered"),
            (("acme", "token-2"), {"token": "T1", "psk_identity": "id-1", "psk": b"0123456789"}, "token: already used"),
        ]
        for (tenant, device), settings, said in cases:
            with pytest.raises(Conflict) as e:
                reg.add_device(tenant, device, **settings)
            assert str(e.value).startswith(said), e.value
        with pytest.raises(BadInput) as bad:
            reg.add_device("acme", "d3", token="has space")
        assert not isinstance(bad.value, Conflict)
    finally:
        reg.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = start_corem(tmp_path_factory.mktemp("errors") / "data")
    yield s
    s.stop()


def test_the_admin_api_answers_409_for_each_credential_another_device_holds(server):
    pem = _certificate_pem()
    oscore = {"oscore_sender_id": "", "oscore_recipient_id": "0b", "oscore_secret": "0123456789abcdef"}
    first = [{"device": "e1", "token": "TOKEN-E1"}, {"device": "e2", "psk_identity": "id-e2", "psk": "0123456789"},
             {"device": "e3", "cert_pem": pem}, {"device": "e4", **oscore}]
    for body in first:
        assert server.api("POST", "/api/devices", {"tenant": "acme", **body})[0] == 201
    again = [({"token": "TOKEN-E1"}, "token: already used"),
             ({"psk_identity": "id-e2", "psk": "0123456789"}, "psk_identity: already used"),
             ({"cert_pem": pem}, "cert: this certificate is already registered"),
             (oscore, "oscore_recipient_id: already used"),
             ({}, None)]
    for body, said in again:
        name = "e1" if said is None else "other"  # (the last: the device itself exists)
        status, answer = server.api("POST", "/api/devices", {"tenant": "acme", "device": name, **body})
        assert status == 409, (body, answer)
        assert answer["error"].startswith(said or "device: acme/e1 already exists"), answer
    # the same refusals for a bulk import: a conflict, 409; a bad field, 400
    status, answer = server.api("POST", "/api/devices/import?format=jsonl",
                                raw=b'{"tenant": "acme", "device": "e9", "token": "TOKEN-E1"}\n')
    assert status == 409 and answer["error"].startswith("line 1: token: already used by acme/e1"), answer
    status, answer = server.api("POST", "/api/devices/import?format=jsonl",
                                raw=b'{"tenant": "acme", "device": "e9", "token": 5}\n')
    assert status == 400 and answer["error"] == "line 1: token: expected text", answer


def test_a_session_that_cannot_be_saved_yet_stays_live(tmp_path):
    """dtls/store.freeze tells NOT_YET from LOST by the context's state, not by the text of
    python-mbedtls's TypeError (which carries Mbed TLS's code in its words only)."""
    pytest.importorskip("mbedtls")
    from corem.dtls.store import Unsaved, freeze

    from .test_dtls import PEER, Client, server as dtls_server

    srv = dtls_server(checkpoint=False)
    c = Client()
    assert c.handshake(srv)
    assert freeze(srv.sessions[PEER].buf) is Unsaved.NOT_YET  # no record since the handshake
    assert c.send(srv, b"\x40\x02\x00\x01a")  # the session still works
    assert isinstance(freeze(srv.sessions[PEER].buf), bytes)
