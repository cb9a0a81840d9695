"""The fast lane in C (`_lane.c`); `corem.fastlane.FastLane` drives it."""

from typing import Any, Callable

class Lane:
    #: on_late(peer, token, code, request_size): a reading whose commit outlasted the piggyback timeout
    on_late: Callable[[Any, bytes, int, int], Any] | None
    #: next_mid(): the message id of a NON answer (the endpoint's; without it NON goes to Python)
    next_mid: Callable[[], int] | None
    #: known(token): a token not among the lane's names a registered device (exempt from the rate limit)
    known: Callable[[bytes], bool] | None
    #: readings one point may have: a point of more is the Python path's (max_readings_per_point)
    max_readings: int
    def __init__(
        self, record_type: type, *, max_datagram: int = 1500, piggyback_timeout: float = 0.5,
        exchange_lifetime: float = 247.0, dedup_max_entries: int = 100_000, rate: float = 0.0, burst: float = 0.0,
        max_sources: int = 100_000, limit_error_size: bool = True, exempt: list[tuple[bytes, int]] = ...,
        scope: str = "udp", path: tuple[bytes, ...] = (b"api", b"v1", b"telemetry"),
        packed_type: type | None = None,
    ) -> None: ...
    def remember(self, peer: Any, mid: int, at: float, token: bytes | None = None, /) -> bool:
        """An exchange committed before a restart: its CON retransmission (a request with `token`,
        any when None) is answered 2.04; another token is a new request."""
    def drain(self, fd: int, now: float, now_ms: int, budget: int, /) -> int:
        """Read up to `budget` datagrams from the socket `fd`."""
    def receive(self, data: bytes, peer: Any, now: float, now_ms: int, /) -> None:
        """One datagram given by the caller (sans-IO)."""
    def receive_plain(self, message: bytes, peer: Any, target: int, now: float, now_ms: int, /) -> None:
        """One message a security layer decrypted, from a session bound to `target` (-1: none)."""
    def new_session(self, peer: Any, now: float, /) -> None: ...
    def moved(self, old: Any, new: Any, now: float, /) -> None:
        """A DTLS session with a Connection ID moved from `old` to `new` (RFC 9146 §6)."""
    def take(self) -> tuple[list[tuple[bytes, Any]], list[Any], list[Any], list[Any]]:
        """(for the Python path, records, their contexts, devices heard)"""
    def committed(self, ctx: Any, error: BaseException | None, /) -> None: ...
    def tick(self, now: float, /) -> None: ...
    def flush(self, fd: int, /) -> int:
        """Send the lane's answers on `fd`; how many still wait."""
    def take_outbox(self) -> list[tuple[bytes, Any]]: ...
    def take_committed(self) -> dict[Any, int]: ...
    def set_targets(self, tokens: dict[bytes, int], targets: list[tuple | None],
                    positions: dict[tuple[str, str], int] = ..., /) -> None: ...
    def set_target(self, index: int, entry: tuple | None, /) -> None:
        """One target added, replaced or removed (the tokens and positions dicts stay the caller's):
        (topic, key, headers, head, tail, device[, mode[, profile[, tenant bytes]]])."""
    def drogue(self, channel: str, /) -> bool:
        """Drogue's door serves /v1/{channel} on this endpoint: the lane takes its common requests
        too (False: it holds as many channels as it can already, or the name is too long)."""
    # CoAPS on corem's DTLS engine: the lane opens and seals the records of registered sessions
    def drain_records(self, fd: int, now: float, now_ms: int, budget: int, /) -> int: ...
    def receive_record(self, data: bytes, peer: Any, now: float, now_ms: int, /) -> None: ...
    def take_records(self) -> tuple[list[tuple[bytes, Any]], list[Any], int, int, int, int, int]:
        """(decrypted messages not taken, owners of the sessions whose records were taken -- each
        once a second at most --, how many saved sessions' marks are due, datagrams, bytes,
        HelloVerifyRequests sent, their bytes)"""
    def take_marks(self) -> list[tuple[int, bytes]]:
        """The saved sessions' marks due [(window top, row key)], taken."""
    def take_marks_packed(self) -> bytes:
        """`take_marks` as one pack: per mark its key's length (1 byte), the key, the top (8 bytes)."""
    def add_session(self, owner: Any, peer: Any, cid_in: bytes, cid_out: bytes, read: Any, window: Any,
                    write: Any, name: tuple[str, str] | None, floor: int, mark_key: bytes | None, /) -> None: ...
    def drop_session(self, owner: Any, peer: Any, cid_in: bytes, /) -> bool: ...
    def send_records(self, fd: int, /) -> int:
        """Seal and send the answers to registered sessions; how many answers are left for Python."""
    def cookie_secret(self, secret: bytes, /) -> None:
        """The DTLS engine's cookie secret: new peers' cookie-less hellos answered by the lane."""
    def limit(self, rate: float, burst: float, max_sources: int, /) -> None: ...
    def exempt(self, networks: list[tuple[bytes, int]], /) -> None:
        """The rate limit's exempt networks, replaced whole (16 address bytes, prefix length)."""
    # OSCORE (oscore.h): the contexts corem/oscore has ready and unshared, by their key
    def oscore_add(self, key: bytes, context: OscoreContext, /) -> None:
        """The lane takes this context's common requests (key: len(kid context), kid context, kid)."""
    def oscore_drop(self, key: bytes | None, context: OscoreContext | None = None, /) -> bool:
        """The context at `key` (only if it is `context`, when given), or every one (None), is Python's again."""
    def counters(self) -> dict[str, Any]: ...

class OscoreWindow:
    """An OSCORE context's replay window (RFC 8613 §7.4): one per context, shared by the lane and
    corem/oscore (context.py's ReplayWindow is its Python twin)."""
    def __init__(self, ready: bool) -> None: ...
    @property
    def top(self) -> int: ...
    @property
    def bits(self) -> int: ...
    @property
    def ready(self) -> bool: ...
    def fresh(self, seq: int, /) -> bool: ...
    def accept(self, seq: int, /) -> None: ...
    def start_at(self, seq: int, /) -> None: ...

class OscoreContext:
    """One context as a lane holds it (one per lane): its keys keyed into libcrypto, its window, its device."""
    def __init__(self, recipient_key: bytes, sender_key: bytes, common_iv: bytes, window: OscoreWindow,
                 name: tuple[str, str], /) -> None: ...
    @property
    def window(self) -> OscoreWindow: ...
    @property
    def name(self) -> tuple[str, str]: ...
    def open(self, kid: bytes, piv: bytes, ciphertext: bytes, /) -> bytes | None:
        """The plaintext, or None if it does not authenticate under the recipient key."""
    def seal(self, kid: bytes, piv: bytes, plaintext: bytes, /) -> bytes:
        """The ciphertext and tag under the sender key, with the request's nonce (a first answer)."""

def json_number(x: float, /) -> bytes:
    """x as a point's JSON has it (the tests compare it with msgspec's)."""
def fold_marks(packs: Any, /) -> list[tuple[int, bytes, int]]:
    """Each key's highest top over the packs, as (top, key, top) in the order keys first appear."""

def compile_profile(rules: tuple[tuple[bytes, bytes | None, bytes | None, int, float | None, float | None,
                                       float | None, float | None, bool, tuple[bytes, ...] | None], ...],
                    positions: tuple[bytes | None, ...], layout: tuple[tuple[bytes | None, bytes, int], ...],
                    decode: Callable[[int | None, bytes, int], list[Any]] | None = None, nested: int = 0,
                    proto: tuple[Any, ...] | None = None,
                    handed: Callable[[bytes, int | None, int, Any], None] | None = None, /) -> object:
    """A profile's C form for set_target: its field rules (rules.h: name, rename, unit, type 0 any /
    1 number / 2 string, scale, offset, min, max, required, allowed, in the profile's order), an
    array's positions and a binary layout (layouts.h: name, struct format or b"skip", bytes to skip).
    ValueError for a layout the lane cannot hold.  `decode`: the Python decoder the lane calls
    itself for a target in the Python mode, and in the protobuf mode for a message proto.h does not
    read (pycodec.h); `nested`: a ThingsBoard or protobuf profile's nested values refused (0), read
    into their leaves, `outer.inner` (1), or kept as their JSON text (2); `proto`: a protobuf
    profile's schema (profiles/protobuf.py `lane_proto`, proto.h); `handed(payload, cf, now_ms,
    outcome)`: told what `decode` gave (its list, or the exception it raised) for a reading the lane
    then hands to the Python path (profiles/compile.py `Handover`)."""
