"""The Trio edge: sockets, drain loops, timers."""

from .udp import UdpEdge, bind_udp

__all__ = ["UdpEdge", "bind_udp"]
