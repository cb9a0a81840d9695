"""The workers' front (corem/workers/front.py) as one layer: which worker a request goes to, how
long it is given, and what the front keeps of it.  The workers are stand-ins here (the request
the front would send is captured); tests/test_workers.py runs the real processes."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import trio

from corem.admin.http import FORWARD_TIMEOUT, HttpRequest, Reply
from corem.cluster import Workers
from corem.config import Settings
from corem.workers import front as front_module
from corem.workers.front import Front

TOKEN = "t" * 32


class Supervisor(SimpleNamespace):
    async def refresh_all(self) -> None:
        self.refreshed += 1


def worker(index: int) -> SimpleNamespace:
    async def wait_ready() -> None:
        pass

    return SimpleNamespace(index=index, http=8000 + index, ready=True, wait_ready=wait_ready)


@pytest.fixture
def front(tmp_path, monkeypatch):
    sent: list[tuple[str, str, float]] = []

    async def forward(base: str, req: HttpRequest, *, body: bytes, timeout: float) -> Reply:
        sent.append((base, req.method + " " + req.path, timeout))
        return Reply(200, b"{}", "application/json")

    monkeypatch.setattr(front_module, "forward", forward)
    settings = Settings.load({"admin_token": TOKEN, "data_dir": str(tmp_path)}, env={})
    sup = Supervisor(settings=settings, workers=[worker(0), worker(1)], holders=Workers(), refreshed=0)
    f = Front(sup)
    f.sent = sent
    return f


def request(method: str, path: str, body: object = None, token: str | None = TOKEN) -> HttpRequest:
    headers = {} if token is None else {"authorization": f"Bearer {token}"}
    return HttpRequest(method, path, {}, {}, headers, b"" if body is None else json.dumps(body).encode())


def test_a_request_without_the_token_is_passed_on_and_nothing_of_it_is_kept(front):
    """An adversarial run grew the front's parked set by 43 MB with 3,000 unauthenticated DELETEs
    of long names: the worker answers them 401, and the front keeps nothing."""
    names = [f"/api/devices/acme/{'x' * 200}{i}" for i in range(50)]
    for path in names:
        trio.run(front.forward, request("DELETE", path, token=None))
    assert front.sup.holders.parked == set()
    assert front.sup.refreshed == 50  # (the stand-in answered 200; a real worker says 401)
    assert {base for base, _, _ in front.sent} == {"http://127.0.0.1:8000"}
    # with the token, a downlink for a device nobody heard is parked on worker 0 (what the above is not)
    trio.run(front.forward, request("DELETE", names[0]))
    assert front.sup.holders.parked == {("acme", names[0].rsplit("/", 1)[1])}


@pytest.mark.parametrize("timeout, wait", [(5, FORWARD_TIMEOUT), (200, 230.0), (None, FORWARD_TIMEOUT)])
def test_an_rpc_is_given_its_own_timeout_and_more_before_the_front_gives_up(front, timeout, wait):
    """The worker answers an RPC when it ends: the front waits its timeout plus 30 s (at least
    the usual 90 s), or a long RPC is answered 503 'retry' while it stays queued and a retry
    duplicates it."""
    front.sup.holders.arrived(("acme", "d1"), 1)  # worker 1 heard the device
    body = {"method": "reboot"} if timeout is None else {"method": "reboot", "timeout": timeout}
    trio.run(front.forward, request("POST", "/api/devices/acme/d1/rpc", body))
    assert front.sent == [("http://127.0.0.1:8001", "POST /api/devices/acme/d1/rpc", wait)]
