"""Fuzz the DTLS record handling with arbitrary datagrams and mutated real ClientHellos: nothing
escapes, no session or handshake exists without a valid cookie, and no unauthenticated peer is
sent more bytes than it sent; the record walk that guards restored sessions (`newest_record`)
answers a number above the floor, or says replayed or malformed."""

import sys

import atheris

with atheris.instrument_imports():
    from corem.dtls import DtlsServer, PskStore
    from corem.dtls.server import MALFORMED, REPLAYED, newest_record

from mbedtls import tls

SERVER = DtlsServer(PskStore(lambda identity: None))


def client_hello() -> bytes:
    conf = tls.DTLSConfiguration(pre_shared_key=("id", b"0123456789"), ciphers=["TLS-PSK-WITH-AES-128-CCM-8"],
                                 validate_certificates=False)
    buf = tls.ClientContext(conf).wrap_buffers(None)
    try:
        buf.do_handshake()
        buf.do_handshake()
    except (tls.WantReadError, tls.WantWriteError):
        pass
    return buf.peek_outgoing(4096)


HELLO = client_hello()


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    peer = ("198.51.100.7", fdp.ConsumeIntInRange(1, 1000))
    if fdp.ConsumeBool() and HELLO:
        datagram = bytearray(HELLO)
        for _ in range(fdp.ConsumeIntInRange(0, 8)):
            datagram[fdp.ConsumeIntInRange(0, len(datagram) - 1)] = fdp.ConsumeIntInRange(0, 255)
        datagram = bytes(datagram)
    else:
        datagram = fdp.ConsumeBytes(fdp.remaining_bytes())
    floor = fdp.ConsumeIntInRange(-1, (1 << 48) - 1) if fdp.ConsumeBool() else -1
    top = newest_record(datagram, floor)  # the record walk in front of a restored session
    assert top in (REPLAYED, MALFORMED) or floor < top < (1 << 48) or top == -1
    assert SERVER.receive(datagram, peer, 0.0) == []
    SERVER.datagrams_to_send()
    assert not SERVER.sessions and not SERVER.handshakes  # nobody has a cookie
    st = SERVER.stats
    assert st.bytes_out_unauthenticated <= st.bytes_in


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
