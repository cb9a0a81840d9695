"""Fuzz OSCORE's unwrap (corem/oscore): random OSCORE options and payloads, and requests sealed
with the right key around random plaintext (so the inner message's decoding is reached too).
Nothing escapes but an answer; a request only reaches the router decrypted, with its device."""

import sys
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports():
    from corem.codec import Code, Message, OptionNumber, Type, encode
    from corem.coap import Endpoint, Response, Router
    from corem.codec.options import UNDERSTOOD_CRITICAL
    from corem.oscore import Oscore
    from corem.oscore.context import Context
    from corem.oscore.protect import aad
    from corem.registry.db import Db
    from corem.registry.oscore import OscoreState
    from corem.registry.store import Device, OscoreKeys

KEYS = OscoreKeys(sender_id=b"\x01", recipient_id=b"\x02", secret=b"0123456789abcdef", salt=b"")
DEVICE = Device(tenant="t", device="d", oscore=KEYS)
STATE = OscoreState(Db(Path(tempfile.mkdtemp()) / "r.db"))
OSCORE = Oscore(lambda ctx, kid: DEVICE if (ctx or b"", kid) == KEYS.kid else None, STATE,
                UNDERSTOOD_CRITICAL - {OptionNumber.OSCORE})
# the device's side of the context: it seals with what corem opens
CLIENT = Context(KEYS.secret, KEYS.salt, KEYS.recipient_id, KEYS.sender_id, None, reserve=lambda n: 0, window_ready=True)
ENDPOINT = Endpoint()
ROUTER = Router()
ROUTER.unwrap = OSCORE.unwrap
SEEN = []


def handler(req, params):
    assert req.identity is DEVICE  # only a request that decrypted gets here
    SEEN.append(1)
    return Response(Code.CHANGED, b"ok")


ROUTER.add("t", {Code.POST: handler, Code.GET: handler})
MID = [0, 0]


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    MID[0] = (MID[0] + 1) & 0xFFFF
    code = Code.POST
    if fdp.ConsumeBool():
        MID[1] += 1  # a fresh sequence number, or an older one (a replay, or late within the window)
        seq = MID[1] - fdp.ConsumeIntInRange(0, 40)
        piv = max(seq, 0).to_bytes(5, "big").lstrip(b"\0") or b"\x00"
        if fdp.ConsumeBool():  # a well-formed inner request to /t, then the fuzzer's options and payload
            inner = fdp.PickValueInList([Code.POST, Code.GET, Code.PUT])
            plain = bytes((inner,)) + encode(Message(Type.NON, inner, 0, b"", [(OptionNumber.URI_PATH, b"t")]))[4:]
        else:
            plain = b""
        plain += fdp.ConsumeBytes(fdp.remaining_bytes())
        sealed = CLIENT.encrypt(CLIENT.nonce(KEYS.recipient_id, piv), plain, aad(KEYS.recipient_id, piv))
        option = bytes((0x08 | len(piv),)) + piv + KEYS.recipient_id
        payload = sealed
    else:
        code = fdp.PickValueInList([Code.POST, Code.FETCH, Code.GET])
        option = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 20))
        payload = fdp.ConsumeBytes(fdp.remaining_bytes())
    datagram = encode(Message(Type.CON, code, MID[0], b"t", [(OptionNumber.OSCORE, option)], payload))
    req = ENDPOINT.receive(datagram, ("192.0.2.1", 1), 0.0)
    if req is None:
        return
    r = ROUTER.dispatch(req)
    if r is not None:
        req.respond(r.code, r.options, r.payload)
    for out, _ in ENDPOINT.datagrams_to_send():
        assert out[1] in (Code.CHANGED, Code.CONTENT, Code.BAD_REQUEST, Code.UNAUTHORIZED, Code.BAD_OPTION,
                          Code.METHOD_NOT_ALLOWED, Code.NOT_FOUND), out


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
