"""Which worker a peer's datagrams go to: a classic BPF program on a SO_REUSEPORT group.

N sockets bound to one port with SO_REUSEPORT form a group; the kernel hands each datagram to one
of them.  Its own choice is a hash of the 4-tuple with a secret picked at boot, and the index it
picks shifts whenever a socket leaves or joins the group.  corem's rule instead:

    worker = mix(source address, source port) % N        (`worker_for`, byte for byte the program)

- a peer stays on one worker while N is unchanged, across restarts of workers and of corem (no
  secret): the supervisor holds all N sockets for the life of `corem serve`, so a restarted worker
  inherits the very socket -- and the datagrams queued on it while it was down -- and gets its own
  peers back;
- anyone can compute where a peer lands (tests do; an operator's tooling can).

The program reads the IP and UDP headers at SKF_NET_OFF (the kernel has pulled the UDP header off
by the time a reuseport program runs).  IPv6 assumes UDP right after the fixed header, as it is
for CoAP; an index past the group makes the kernel fall back to its own hash.  Kernels that refuse
the program (before 4.5, or a policy) leave the kernel's hash, which is still stable while the
supervisor holds the sockets; `attach` says which.
"""

from __future__ import annotations

import ctypes
import ipaddress
import socket

SO_ATTACH_REUSEPORT_CBPF = 51
SKF_NET_OFF = (-0x100000) & 0xFFFFFFFF
M32 = 0xFFFFFFFF
GOLDEN = 0x9E3779B1
MIX = 0x85EBCA6B

# classic BPF opcodes (linux/filter.h)
LD, LDX, ST, ALU, JMP, RET, MISC = 0x00, 0x01, 0x02, 0x04, 0x05, 0x06, 0x07
W, H, B = 0x00, 0x08, 0x10
ABS, IND, MEM, MSH = 0x20, 0x40, 0x60, 0xA0
MUL, RSH, MOD, XOR = 0x20, 0x70, 0x90, 0xA0
K, X = 0x00, 0x08
JEQ, JGE = 0x10, 0x30
RET_A = 0x10
TAX = 0x00


def worker_for(peer: tuple, n: int) -> int:
    """The worker (0..n-1) that the steering program gives datagrams from `peer`."""
    host, port = peer[0], peer[1]
    packed = ipaddress.ip_address(host.split("%")[0]).packed
    if len(packed) == 16 and packed[:12] == b"\0" * 10 + b"\xff\xff":  # v4-mapped arrives as IPv4
        packed = packed[12:]
    words = [int.from_bytes(packed[i:i + 4], "big") for i in range(0, len(packed), 4)]
    addr = 0
    for w in words:
        addr ^= w
    h = (addr ^ ((port * GOLDEN) & M32)) * MIX & M32
    return (h ^ (h >> 16)) % n


#: a DTLS 1.2 record with a Connection ID (RFC 9146 content type tls12_cid) and where its CID
#: starts (after type, version, epoch and sequence number)
TLS12_CID = 25
CID_AT = 11


#: CIDs name a worker in one byte: with more workers than this, CID records are steered by address
MAX_CID_WORKERS = 255


def cid_prefix(index: int, n: int) -> bytes:
    """The first byte of every Connection ID that worker `index` of `n` hands out
    (`program(n, cid=True)`); none when one byte cannot name them all."""
    return bytes((index,)) if n <= MAX_CID_WORKERS else b""


def program(n: int, *, cid: bool = False) -> list[tuple[int, int, int, int]]:
    """The classic BPF program of `worker_for` for a group of `n` sockets: (code, jt, jf, k).

    `cid` (the CoAPS group): a record with a Connection ID goes to the worker its CID's first byte
    names (`cid_prefix`: each worker's engine starts its CIDs with its index), wherever it comes
    from, so that a device whose NAT gave it a new address stays with its session (RFC 9146); a
    first byte of n or more, and everything else, is steered by address.  The payload starts at
    offset 0 (the kernel has pulled the UDP header); a load past a datagram's end ends the program
    with 0 (worker 0): such a datagram is no record anyway."""
    net = SKF_NET_OFF
    cid = cid and n <= MAX_CID_WORKERS
    by_cid = [
        (LD | B | ABS, 0, 0, 0),  # A = the record's content type
        (JMP | JEQ | K, 0, 3, TLS12_CID),  # not tls12_cid: on to the address
        (LD | B | ABS, 0, 0, CID_AT),  # A = the CID's first byte
        (JMP | JGE | K, 1, 0, n),  # n or more: no worker's, on to the address
        (RET | RET_A, 0, 0, 0),
    ] if cid else []
    v4 = [
        (LD | W | ABS, 0, 0, net + 12),  # A = source address
        (ST, 0, 0, 0),  # M[0] = A
        (LDX | B | MSH, 0, 0, net),  # X = IHL * 4
        (LD | H | IND, 0, 0, net),  # A = source port (the UDP header after the IP header)
    ]
    v6 = [(LD | W | ABS, 0, 0, net + 8), (ST, 0, 0, 0)]
    for off in (12, 16, 20):
        v6 += [(LD | W | ABS, 0, 0, net + off), (LDX | W | MEM, 0, 0, 0), (ALU | XOR | X, 0, 0, 0), (ST, 0, 0, 0)]
    v6.append((LD | H | ABS, 0, 0, net + 40))  # A = source port (UDP right after the fixed header)
    mix = [
        (LDX | W | MEM, 0, 0, 0),  # X = the address, folded
        (ALU | MUL | K, 0, 0, GOLDEN),
        (ALU | XOR | X, 0, 0, 0),
        (ALU | MUL | K, 0, 0, MIX),
        (MISC | TAX, 0, 0, 0),
        (ALU | RSH | K, 0, 0, 16),
        (ALU | XOR | X, 0, 0, 0),
        (ALU | MOD | K, 0, 0, n),
        (RET | RET_A, 0, 0, 0),
    ]
    head = [
        (LD | B | ABS, 0, 0, net),  # A = version << 4 | IHL
        (ALU | RSH | K, 0, 0, 4),
        (JMP | JEQ | K, 0, len(v4) + 1, 4),  # IPv4: on; else jump over it and its jump
    ]
    return by_cid + head + v4 + [(JMP | 0x00, 0, 0, len(v6))] + v6 + mix


class _Filter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class _Prog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_Filter))]


def attach(sock: socket.socket, n: int, *, cid: bool = False) -> bool:
    """Give the reuseport group of `sock` the steering program; False if the kernel refused it
    (then its own hash steers)."""
    insns = program(n, cid=cid)
    array = (_Filter * len(insns))(*(_Filter(*i) for i in insns))
    prog = _Prog(len(insns), ctypes.cast(array, ctypes.POINTER(_Filter)))
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, bytes(prog))
    except OSError:
        return False
    return True
