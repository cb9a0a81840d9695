"""Where a device is served (corem/cluster.py) and the typed control messages between the
supervisor and its workers (corem/workers/control.py), without processes."""

from __future__ import annotations

from dataclasses import asdict

import msgspec
import pytest
import trio
import trio.testing

from corem.cluster import CommandRecord, Workers, command_device, is_downlink
from corem.admin.http import Route
from corem.workers import control
from corem.reload import Report
from corem.workers.control import Command, Here, Moved, Ready, Reload, Reloaded, RpcReply


def test_a_commands_record_names_its_device_in_one_place():
    assert command_device("acme", b'{"device": "d1", "type": "rpc"}') == ("acme", "d1")
    for value in (b"not json", b"[1, 2]", b'{"device": 7}', b"{}"):
        assert command_device("acme", value) is None, value
    record = CommandRecord("commands.acme", 0, 5, b'{"device": "d1"}')
    assert record.tenant == "acme" and record.device() == ("acme", "d1")


def test_control_messages_round_trip_typed_and_refuse_what_is_not_one():
    record = CommandRecord("commands.acme", 2, 9, b'{"device": "d1"}')
    sent = Command.of(record)
    got = control.to_worker(control.encode(sent))
    assert isinstance(got, Command) and got.device == ("acme", "d1") and got.record() == record
    assert control.to_supervisor(control.encode(Here([("acme", "d1")]))) == Here([("acme", "d1")])
    assert control.to_supervisor(control.encode(Ready(None, 7))) == Ready(None, 7)
    reply = RpcReply(("acme", "d1"), 3, {"ok": True})
    assert control.to_worker(control.encode(reply)) == reply
    with pytest.raises(msgspec.ValidationError):  # a worker never sends Reload, nor the supervisor Ready
        control.to_supervisor(control.encode(Reload(1, {})))
    with pytest.raises(msgspec.ValidationError):
        control.to_worker(control.encode(Ready(1, 2)))
    with pytest.raises(msgspec.ValidationError, match="kind"):  # the old text-matched form
        control.to_worker(b'{"here": [["acme", "d1"]]}')
    assert control.to_worker(control.encode(Moved(("a", "b"), 1))) == Moved(("a", "b"), 1)
    report = asdict(Report(done=["log_level info -> debug"], restart=["coap"], where="2 of 2 workers"))
    assert control.to_supervisor(control.encode(Reloaded(4, report))) == Reloaded(4, report)


def test_workers_park_a_device_nobody_heard_on_worker_0_and_follow_it():
    w = Workers()
    key = ("acme", "d1")
    assert w.holder(key, park=False) == 0 and key not in w.parked
    assert w.holder(key, park=True) == 0 and key in w.parked
    assert w.arrived(key, 1) == 0  # worker 0 parked it: it hands over to worker 1
    assert w.holder(key, park=True) == 1 and w.holds(key) and key not in w.parked
    assert w.arrived(key, 1) is None  # the same worker again: nothing moves
    assert w.arrived(key, 2) == 1
    assert w.holder(None, park=True) == 0


async def test_an_rpc_waits_until_a_worker_hears_its_device():
    w = Workers()
    key = ("acme", "d1")
    async with trio.open_nursery() as nursery:
        done = trio.Event()

        async def wait() -> None:
            await w.until_heard(key, 60)  # (a failure detector, not a pace)
            done.set()

        nursery.start_soon(wait)
        await trio.testing.wait_all_tasks_blocked()
        assert not done.is_set()
        w.arrived(key, 1)
        await done.wait()


async def test_a_wait_that_times_out_leaves_nothing_behind(autojump_clock):
    """Waiters for devices never heard stayed, one a device (an adversarial run's finding); the
    last one to give up lets its device's waiter go -- one still waiting keeps it"""
    w = Workers()
    key = ("acme", "never")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(w.until_heard, key, 5)
        nursery.start_soon(w.until_heard, key, 50)
        await trio.sleep(10)
        assert key in w._waiters  # (the second still waits)
    assert w._waiters == {} and not w._waiting


def test_the_downlink_routes():
    async def h(req):  # pragma: no cover - never called
        raise AssertionError

    assert is_downlink(Route("POST", "/api/devices/{tenant}/{device}/rpc", h))
    assert is_downlink(Route("PUT", "/api/devices/{tenant}/{device}/attributes", h))
    assert not is_downlink(Route("GET", "/api/devices/{tenant}/{device}/attributes", h))
    assert not is_downlink(Route("DELETE", "/api/devices/{tenant}/{device}", h))


def test_a_node_waits_for_an_rpc_as_long_as_it_may_take_and_never_carries_it_out_twice():
    """Forwarded to the node that holds the device, an RPC is answered there when it ends: the wait
    is its timeout and some, not a fixed 90 s -- and when the other node does not answer in time,
    this node answers 504 rather than carry it out here too (found by a review: a 300 s RPC was
    sent at both nodes, and the device's reply went to the other one)."""
    from corem.admin.http import FORWARD_TIMEOUT, HttpRequest, Reply
    from corem.cluster import Carrier, downlink_wait

    def rpc(body: bytes) -> HttpRequest:
        return HttpRequest("POST", "/api/devices/acme/d1/rpc", {"tenant": "acme", "device": "d1"}, {}, {}, body)

    assert downlink_wait(rpc(b'{"method": "m", "timeout": 300}')) == 330.0
    assert downlink_wait(rpc(b'{"method": "m", "timeout": 5}')) == FORWARD_TIMEOUT
    assert downlink_wait(HttpRequest("GET", "/api/devices/acme/d1/attributes", {}, {}, {})) == FORWARD_TIMEOUT

    ran = []

    class SlowNodes:
        def elsewhere(self, key, headers=None):
            return "http://node-b:8080"

        async def forward(self, home, req):
            raise trio.TooSlowError

    carrier = Carrier.__new__(Carrier)  # (its other parts play no part here)
    carrier.nodes = SlowNodes()  # type: ignore[assignment]
    route = carrier.at_home(Route("POST", "/api/devices/{tenant}/{device}/rpc", lambda req: ran.append(1) or Reply(200)))
    reply = trio.run(route.handler, rpc(b'{"method": "m", "timeout": 300}'))
    assert reply.status == 504 and ran == []
