"""The control messages between the supervisor and its workers: one typed message per packet of
their SOCK_SEQPACKET pair, as JSON with its kind in `"kind"` (msgspec tagged structs): `encode`
writes any of them, `to_supervisor` / `to_worker` read what each side may receive and refuse
anything else (`Garbled`, naming the field: a bug, logged by the receiver, which goes on).

  worker -> supervisor   Ready       serving (its private admin port, its pid)
                         Here        devices first heard here (downlink routing: corem/cluster.py)
                         Refreshed   registry reloaded for request n
                         Reloaded    SIGHUP done for request n, with its report (corem/reload.py)
                         Handover    the queues of a device that moved, for worker `to`
                         Command     a commands.{tenant} record (worker 0), with the device it names
                         RpcReply    a reply to another worker's RPC
  supervisor -> worker   Refresh     reload the registry now, answer Refreshed(n)
                         Reload      SIGHUP: reload with these settings, answer Reloaded(n)
                         Moved       the device is heard by worker `to` now
                         Adopt       take these queues over
                         Command     apply a commands record for its device
                         RpcReply    the reply to one of this worker's RPCs
"""

from __future__ import annotations

from typing import Any, Union

import msgspec

from ..cluster import CommandRecord

#: (tenant, device)
Key = tuple[str, str]


class Ready(msgspec.Struct, tag="ready", tag_field="kind"):
    http: int | None
    pid: int


class Here(msgspec.Struct, tag="here", tag_field="kind"):
    devices: list[Key]


class Refreshed(msgspec.Struct, tag="refreshed", tag_field="kind"):
    n: int


class Reloaded(msgspec.Struct, tag="reloaded", tag_field="kind"):
    n: int
    report: dict[str, Any]  # (corem/reload.py `Report`, as its dict)


class Handover(msgspec.Struct, tag="handover", tag_field="kind"):
    device: Key
    to: int
    state: dict[str, Any]


class Command(msgspec.Struct, tag="command", tag_field="kind"):
    topic: str
    partition: int
    offset: int
    value: bytes
    #: the device its value names (corem/cluster.py `command_device`), read once by the sender
    device: Key | None = None

    @classmethod
    def of(cls, record: CommandRecord) -> Command:
        return cls(record.topic, record.partition, record.offset, record.value, record.device())

    def record(self) -> CommandRecord:
        return CommandRecord(self.topic, self.partition, self.offset, self.value)


class RpcReply(msgspec.Struct, tag="rpc_reply", tag_field="kind"):
    device: Key
    id: int
    response: Any
    #: the worker the device answered (None: nobody waits to be told), and its number for the
    #: device's request: the RPC's worker tells it whether the reply was taken (RpcReplied)
    asker: int | None = None
    ask: int = 0


class RpcReplied(msgspec.Struct, tag="rpc_replied", tag_field="kind"):
    """The RPC's worker took a forwarded reply (`ok`: an RPC of that id waited for that device), or
    did not; for worker `to`, which answers its device 2.04 or 4.04 as a single process would."""

    to: int
    ask: int
    ok: bool


class Refresh(msgspec.Struct, tag="refresh", tag_field="kind"):
    n: int


class Reload(msgspec.Struct, tag="reload", tag_field="kind"):
    n: int
    settings: dict[str, Any]


class Moved(msgspec.Struct, tag="moved", tag_field="kind"):
    device: Key
    to: int


class Adopt(msgspec.Struct, tag="adopt", tag_field="kind"):
    device: Key
    state: dict[str, Any]


#: a packet that is not one of the messages its receiver takes
Garbled = (msgspec.ValidationError, msgspec.DecodeError)

ToSupervisor = Union[Ready, Here, Refreshed, Reloaded, Handover, Command, RpcReply, RpcReplied]
ToWorker = Union[Refresh, Reload, Moved, Adopt, Command, RpcReply, RpcReplied]

_encoder = msgspec.json.Encoder()
_from_workers = msgspec.json.Decoder(ToSupervisor)
_from_supervisor = msgspec.json.Decoder(ToWorker)


def encode(message: ToSupervisor | ToWorker) -> bytes:
    return _encoder.encode(message)


def to_supervisor(data: bytes) -> ToSupervisor:
    """A worker's packet (msgspec.ValidationError if it is not one of ToSupervisor)."""
    return _from_workers.decode(data)


def to_worker(data: bytes) -> ToWorker:
    """The supervisor's packet (msgspec.ValidationError if it is not one of ToWorker)."""
    return _from_supervisor.decode(data)
