"""The server's PSK flights in C (_flights.c); connection.py's state machine is their twin."""

from typing import Any, Callable

def server_hello(fragment: bytes, record_seq: int, addr: bytes, secrets: list[bytes], prefs: bytes,
                 require_ems: bool, server_random: bytes, cid: bytes, mtu: int, /) -> tuple[Any, ...] | bytes | None: ...
def psk_finish(datagram: bytes, psk_for: Callable[[bytes], bytes | None], recv_seq: int,
               transcript: bytes | bytearray, client_random: bytes, server_random: bytes, cipher: int, ems: bool,
               cid_in: bytes, cid_out: bytes, send_seq: int, seq0: int, mtu: int, /) -> tuple[Any, ...] | None: ...
