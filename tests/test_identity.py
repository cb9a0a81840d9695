"""corem/identity.py: who a request speaks for, for every door, each way and each refusal --
with a real registry (SQLite in a temp dir) and real requests from the message layer."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import msgspec
import pytest

from corem.coap import Endpoint, Params
from corem.codec import Code, Message, OptionNumber as O, Type, encode
from corem.identity import TEXTS, Door, Identity, Reason, Refusal, session_identity
from corem.metrics import FAMILIES
from corem.registry import Device, Directory, Registry
from corem.token_path import API_PATH, PREFIX, TOKEN_PATH, api_route, token_of, token_route

PEER = ("192.0.2.7", 40000)


class World:
    def __init__(self, tmp_path: Path) -> None:
        self.registry = Registry(tmp_path / "registry.db")
        self.registry.add_device("acme", "awake", token="TA")
        self.registry.add_device("acme", "sleepy", token="TS", gateways="awake")
        self.registry.add_device("acme", "roomy", token="TR")
        self.registry.add_device("other", "far", token="TF")
        self.directory = Directory(self.registry)
        self.directory.refresh()
        self.identity = Identity(self.directory)
        self.endpoint = Endpoint(Params(), rng=lambda: 0.0)
        self.mid = 0
        #: peer -> the device its (pretend) DTLS session was made with
        self.sessions: dict[object, Device | None] = {}
        self.session = session_identity(self.sessions.get)

    def device(self, tenant: str, name: str) -> Device:
        found = self.directory.named(tenant, name)
        assert found is not None
        return found

    def request(self, path: str = "x", *, query=(), opts=(), peer=PEER, oscore: Device | None = None):
        self.mid += 1
        options = [(O.URI_PATH, p.encode()) for p in path.split("/")]
        options += [(O.URI_QUERY, q.encode()) for q in query]
        options += list(opts)
        msg = Message(Type.CON, Code.POST, self.mid, b"tk", sorted(options, key=lambda o: o[0]), b"")
        req = self.endpoint.receive(encode(msg), peer, 0.0)
        assert req is not None
        req.identity = oscore
        return req

    def remove(self, tenant: str, name: str) -> None:
        assert self.registry.remove_device(tenant, name)
        self.directory.refresh(force=True)

    def failures(self) -> dict[str, int]:
        return {reason: n for (protocol, reason), n in self.identity.failures.items() if protocol == "coap"}


@pytest.fixture
def world(tmp_path):
    return World(tmp_path)


def refused(found, reason: Reason, payload: bytes, code: int = Code.UNAUTHORIZED) -> None:
    """`found` is a Refusal for `reason` that answers `code` with exactly `payload`."""
    assert isinstance(found, Refusal), found
    assert found.reason is reason and (found.code, found.response().payload) == (code, payload)
    assert found.response().code == code


def basic(text: str) -> tuple[int, bytes]:
    return (O.DROGUE_AUTH, b"Basic " + base64.b64encode(text.encode()))


# -- by the token in the path --------------------------------------------------------------------
@pytest.mark.parametrize("door", [Door.TELEMETRY, Door.THINGSBOARD])
def test_a_known_token_names_its_device_and_an_unknown_one_is_refused_and_counted(world, door):
    found = world.identity.identify(world.request(), door, token="TA")
    assert found == world.device("acme", "awake")
    refused(world.identity.identify(world.request(), door, token="nope"), Reason.UNKNOWN_TOKEN, b"unknown access token")
    assert world.failures() == {"unknown_token": 1}


# -- by the session: OSCORE, else the DTLS/TLS session of the peer -------------------------------
def test_session_identity_takes_oscore_first_then_the_peers_session(world):
    awake, roomy = world.device("acme", "awake"), world.device("acme", "roomy")
    world.sessions[PEER] = roomy
    assert world.session(world.request()) == roomy
    assert world.session(world.request(oscore=awake)) == awake  # the sealed request's own context
    assert world.session(world.request(peer=("192.0.2.8", 1))) is None
    no_sessions = session_identity(None)  # plain UDP: OSCORE only
    assert no_sessions(world.request(oscore=awake)) == awake and no_sessions(world.request()) is None


@pytest.mark.parametrize("door, none, gone", [
    (Door.TELEMETRY, b"no device identity in this session; use /api/v1/{token}/telemetry",
     b"device no longer registered"),
    (Door.THINGSBOARD, b"no registered device in this session; use /api/v1/{token}/...",
     b"no registered device in this session; use /api/v1/{token}/..."),
])
def test_a_session_names_its_device_as_registered_now(world, door, none, gone):
    world.sessions[PEER] = world.device("acme", "roomy")
    assert world.identity.identify(world.request(), door, session=world.session) == world.device("acme", "roomy")
    # a one-way certificate session (or a transport without sessions) names nobody
    refused(world.identity.identify(world.request(peer=("192.0.2.8", 1)), door, session=world.session),
            Reason.NO_SESSION_IDENTITY, none)
    refused(world.identity.identify(world.request(), door, session=None), Reason.NO_SESSION_IDENTITY, none)
    # the device was removed after its handshake: the session's snapshot no longer counts
    world.remove("acme", "roomy")
    refused(world.identity.identify(world.request(), door, session=world.session), Reason.REVOKED, gone)
    assert world.failures() == {"no_session_identity": 2, "revoked": 1}


def test_owner_is_the_sessions_current_device_and_counts_nothing(world):
    world.sessions[PEER] = world.device("acme", "roomy")
    assert world.identity.owner(world.request(), world.session) == world.device("acme", "roomy")
    assert world.identity.owner(world.request(), None) is None
    world.remove("acme", "roomy")
    assert world.identity.owner(world.request(), world.session) is None
    assert world.failures() == {}


# -- Efento: the message's cloud token, else the session -----------------------------------------
def test_efento_takes_the_cloud_token_then_the_session(world):
    ident = world.identity
    assert ident.identify(world.request(), Door.EFENTO, token="TA") == world.device("acme", "awake")
    world.sessions[PEER] = world.device("acme", "roomy")
    # a token corem does not know (a sensor's may be its IMEI), or none: the session's device
    assert ident.identify(world.request(), Door.EFENTO, session=world.session, token="IMEI") == world.device("acme", "roomy")
    assert ident.identify(world.request(), Door.EFENTO, session=world.session, token="") == world.device("acme", "roomy")
    refused(ident.identify(world.request(), Door.EFENTO, token="IMEI"), Reason.UNKNOWN_TOKEN,
            b"cloudToken: unknown access token")
    refused(ident.identify(world.request(), Door.EFENTO, token=""), Reason.NO_SESSION_IDENTITY,
            b"cloudToken: empty, and no registered device in this session")
    world.remove("acme", "roomy")
    refused(ident.identify(world.request(), Door.EFENTO, session=world.session, token=""), Reason.REVOKED,
            b"cloudToken: empty, and no registered device in this session")
    assert world.failures() == {"unknown_token": 1, "no_session_identity": 1, "revoked": 1}


# -- Drogue: option 4209, else the session; the query; the gateway rule --------------------------
@pytest.mark.parametrize("auth, query", [
    (basic("awake@acme:TA"), ()),
    (basic("awake:TA"), ("application=acme",)),
    ((O.DROGUE_AUTH, base64.b64encode(b"awake@acme:TA")), ()),  # the bare base64 form
    ((O.DROGUE_AUTH, b"basic " + base64.b64encode(b"awake@acme:TA")), ("device=awake",)),
])
def test_drogue_credentials_name_the_device(world, auth, query):
    q = dict(item.split("=") for item in query)
    found = world.identity.identify(world.request(opts=[auth], query=query), Door.DROGUE, query=q)
    assert found == world.device("acme", "awake") and world.failures() == {}


@pytest.mark.parametrize("auth, query, reason, payload", [
    (None, {}, Reason.NO_CREDENTIALS,
     b"credentials: send option 4209 (Basic device@application:password) or use DTLS"),
    ((O.DROGUE_AUTH, b"Basic !!!"), {}, Reason.MALFORMED_CREDENTIALS,
     b"option 4209: not 'Basic ' followed by base64 of user:password"),
    ((O.DROGUE_AUTH, "Basic \u00e9".encode()), {}, Reason.MALFORMED_CREDENTIALS,
     b"option 4209: not 'Basic ' followed by base64 of user:password"),
    (basic("awake@acme"), {}, Reason.MALFORMED_CREDENTIALS, b"option 4209: no ':' between user and password"),
    (basic("awake@acme:wrong"), {}, Reason.BAD_PASSWORD, b"option 4209: unknown device or wrong password"),
    (basic("awake@other:TA"), {}, Reason.BAD_PASSWORD, b"option 4209: unknown device or wrong password"),
    (basic("awake:TA"), {}, Reason.BAD_PASSWORD, b"option 4209: unknown device or wrong password"),  # no tenant
    (basic("awake@acme:TA"), {"application": "other"}, Reason.DEVICE_MISMATCH,
     b"application: 'other' is not the authenticated application ('acme')"),
    (basic("awake@acme:TA"), {"device": "roomy"}, Reason.DEVICE_MISMATCH,
     b"device: 'roomy' is not the authenticated device ('awake')"),
])
def test_drogue_refusals_name_the_reason(world, auth, query, reason, payload):
    opts = [] if auth is None else [auth]
    refused(world.identity.identify(world.request(opts=opts), Door.DROGUE, query=query), reason, payload)
    assert world.failures() == {reason.value: 1}


def test_drogue_takes_the_session_without_option_4209(world):
    world.sessions[PEER] = world.device("acme", "awake")
    found = world.identity.identify(world.request(), Door.DROGUE, session=world.session, query={"as": "sleepy"})
    assert found == world.device("acme", "awake")
    # `device` may name another with `as` (the gateway rule decides), never without
    found = world.identity.identify(world.request(), Door.DROGUE, session=world.session,
                                    query={"device": "sleepy", "as": "sleepy"})
    assert found == world.device("acme", "awake")
    world.remove("acme", "awake")
    refused(world.identity.identify(world.request(), Door.DROGUE, session=world.session, query={}), Reason.REVOKED,
            b"credentials: send option 4209 (Basic device@application:password) or use DTLS")


def test_a_gateway_speaks_only_for_the_devices_that_name_it(world):
    awake = world.device("acme", "awake")
    assert world.identity.gateway(awake, "sleepy") == world.device("acme", "sleepy")
    refused(world.identity.gateway(awake, "roomy"), Reason.NOT_A_GATEWAY,
            b"as: 'awake' is not a gateway of 'roomy'", Code.FORBIDDEN)
    refused(world.identity.gateway(awake, "far"), Reason.NOT_A_GATEWAY,  # another tenant's: not there
            b"as: 'awake' is not a gateway of 'far'", Code.FORBIDDEN)
    assert world.failures() == {"not_a_gateway": 2}


# -- EMQX: ?c=&u=&p=, else the session -----------------------------------------------------------
def test_emqx_credentials_or_the_session(world):
    ident = world.identity
    assert ident.identify(world.request(), Door.EMQX, query={"c": "x", "u": "awake", "p": "TA"}) == world.device("acme", "awake")
    world.sessions[PEER] = world.device("acme", "roomy")
    assert ident.identify(world.request(), Door.EMQX, session=world.session, query={}) == world.device("acme", "roomy")
    # a password in the query is checked even in a session
    refused(ident.identify(world.request(), Door.EMQX, session=world.session, query={"c": "x", "u": "roomy", "p": "TA"}),
            Reason.BAD_PASSWORD, b"u/p: unknown username or wrong password")
    refused(ident.identify(world.request(), Door.EMQX, query={"c": "x", "u": "awake", "p": "nope"}),
            Reason.BAD_PASSWORD, b"u/p: unknown username or wrong password")
    refused(ident.identify(world.request(), Door.EMQX, query={"u": "awake"}), Reason.NO_CREDENTIALS,
            b"c, p: required (?c=ClientId&u=Username&p=Password)")
    world.remove("acme", "roomy")  # the session's device is gone: the query must name one
    refused(ident.identify(world.request(), Door.EMQX, session=world.session, query={"c": "x"}), Reason.NO_CREDENTIALS,
            b"u, p: required (?c=ClientId&u=Username&p=Password)")
    assert world.failures() == {"bad_password": 2, "no_credentials": 2}


# -- the counters, the labels, the token path ----------------------------------------------------
def test_refusals_are_shown_as_corem_auth_failures(world):
    from collections import Counter

    shared: Counter[tuple[str, str]] = Counter()
    ident = Identity(world.directory, shared)  # (the ingest's stats.auth_failures)
    ident.identify(world.request(), Door.THINGSBOARD, token="nope")
    ident.identify(world.request(), Door.TELEMETRY, token="nope")
    assert shared == {("coap", "unknown_token"): 2}
    [sample] = ident.metrics()
    assert sample.name == "corem_auth_failures" and sample.value == 2
    assert dict(sample.labels) == {"protocol": "coap", "reason": "unknown_token"}


def test_every_door_has_a_text_for_the_reasons_it_answers_with_a_fixed_text():
    for door, texts in TEXTS.items():
        for reason, text in texts.items():
            assert text and len(text.encode()) <= 512, (door, reason)


def test_every_reason_is_a_label_the_metric_family_documents():
    kind, help_text = FAMILIES["corem_auth_failures"]
    documented = set(re.findall(r"\b[a-z_]+\b", help_text))  # (each label as a word of the help)
    assert kind == "counter" and {r.value for r in Reason} <= documented
    assert {r.value for r in Reason} == {r.name.lower() for r in Reason}  # labels are the names
    assert {r for r in Reason if r.code == Code.FORBIDDEN} == {Reason.NOT_A_GATEWAY}


def test_the_token_path_builds_the_routes_and_finds_the_token():
    assert TOKEN_PATH == "api/v1/{token}" and API_PATH == "api/v1"
    assert token_route("telemetry") == "api/v1/{token}/telemetry" and api_route("provision") == "api/v1/provision"
    assert token_of([b"api", b"v1", b"T0KEN", b"telemetry"]) == b"T0KEN"
    assert token_of([b"api", b"v1", b"T0KEN"]) == b"T0KEN"
    assert token_of([b"api", b"v1"]) is None and token_of([b"api", b"v2", b"T"]) is None
    assert token_of([b"v1", b"telemetry"]) is None and token_of([]) is None


def test_only_a_datagram_naming_a_known_token_is_exempt_from_the_rate_limit(world):
    def datagram(path: str) -> bytes:
        return encode(Message(Type.CON, Code.POST, 1, b"", [(O.URI_PATH, p.encode()) for p in path.split("/")], b"{}"))

    knows = world.identity.names_a_known_token
    assert knows(datagram("api/v1/TA/telemetry"), PEER) and knows(datagram("api/v1/TA"), PEER)
    assert not knows(datagram("api/v1/nope/telemetry"), PEER)
    assert not knows(datagram("api/v2/TA/telemetry"), PEER) and not knows(datagram("telemetry"), PEER)
    assert not knows(b"\x40", PEER)  # not a CoAP message


def test_each_reason_is_reached_by_one_request(world):
    """One request per reason: no Reason that nothing can produce."""
    ident, req = world.identity, world.request
    world.sessions[PEER] = world.device("acme", "roomy")
    world.remove("acme", "roomy")
    got = [
        ident.identify(req(), Door.TELEMETRY, token="nope"),
        ident.identify(req(), Door.TELEMETRY, session=None),
        ident.identify(req(), Door.TELEMETRY, session=world.session),
        ident.identify(req(opts=[basic("awake@acme:no")]), Door.DROGUE, query={}),
        ident.identify(req(), Door.EMQX, query={}),
        ident.identify(req(opts=[(O.DROGUE_AUTH, b"Basic !!!")]), Door.DROGUE, query={}),
        ident.identify(req(opts=[basic("awake@acme:TA")]), Door.DROGUE, query={"device": "x"}),
        ident.gateway(world.device("acme", "awake"), "far"),
    ]
    assert all(isinstance(r, Refusal) for r in got)
    assert [r.reason for r in got if isinstance(r, Refusal)] == list(Reason)
    assert sum(world.failures().values()) == len(Reason)


def test_the_ingest_doors_share_one_identity_and_show_its_counts(world):
    """Every door reaches identity through the ingest: one counter, `stats.auth_failures`."""
    from corem.ingest.diagnostics import Diagnostics
    from corem.ingest.telemetry import TelemetryIngest

    ingest = TelemetryIngest(world.directory, sink=None, diagnostics=Diagnostics())  # (no sink: nothing is ingested)
    answer = ingest.post_with_token(world.request("api/v1/nope/telemetry"), ["nope"])
    assert answer is not None and (answer.code, answer.payload) == (Code.UNAUTHORIZED, b"unknown access token")
    refused(ingest.identity.identify(world.request(), Door.EMQX, query={}), Reason.NO_CREDENTIALS,
            b"c, u, p: required (?c=ClientId&u=Username&p=Password)")
    assert ingest.stats.auth_failures == {("coap", "unknown_token"): 1, ("coap", "no_credentials"): 1}
    shown = {dict(s.labels)["reason"]: s.value for s in ingest.metrics() if s.name == "corem_auth_failures"}
    assert shown == {"unknown_token": 1, "no_credentials": 1}


@pytest.mark.parametrize("change", [
    {"profile": "other"}, {"topics": "a/#"}, {"power_mode": "psm"},  # (not credentials: the session stays)
    {"token": "T2"}, {"psk": b"k" * 16}, {"psk_identity": "id-2"}, {"cert_sha256": "ab" * 32}, {"created_at": 5},
])
def test_a_requests_credential_check_is_the_digests_without_them(change):
    """identity.py and the DTLS layer compare credentials field by field (`same_credentials`): the
    same answer as the digests (`credentials`) that seals and grants keep, with no hashing a request."""
    from corem.registry import Device, credentials, same_credentials

    a = Device(tenant="t", device="d", token="T", psk_identity="id", psk=b"p" * 16, created_at=1)
    b = msgspec.structs.replace(a, **change)
    assert same_credentials(a, b) == (credentials(a) == credentials(b)) == ("profile" in change or
                                                                             "topics" in change or "power_mode" in change)
