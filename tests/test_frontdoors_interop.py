"""The peers' front doors against a real `corem serve`, with real clients: libcoap's coap-client
(observe `-s`, block size `-b`, custom options `-O 4209,…`, PSK over DTLS) and aiocoap's client
(Observe, Block1, Block2).  Downlink goes through the admin REST API."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from .conftest import (
    COAP_CLIENT, DTLS_CLIENTS, SPEC_IDENTITY, SPEC_KEY, coap_client, needs_libcoap, read_until, start_corem,
    wait_for,
)

pytestmark = [needs_libcoap, pytest.mark.interop]
AIOCOAP_CLIENT = [sys.executable, str(Path(__file__).with_name("aiocoap_client.py"))]


def background(*args: str) -> subprocess.Popen:
    """A client left running (an observer, a device waiting for a command)."""
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def observers(server) -> float:
    return sum(v for k, v in server.metrics().items() if k.startswith("corem_coap_observers{"))


def finish(proc: subprocess.Popen, timeout: float = 60) -> str:
    out, _ = proc.communicate(timeout=timeout)
    return out


def test_shared_attributes_and_rpc_reach_observing_libcoap_devices(corem):
    base = f"{corem.coap}/api/v1/T0KEN-1"
    assert coap_client(f"{base}/attributes", "-m", "post", "-t", "50", "-e", '{"fw_state":"idle"}').code == "2.04"
    attrs = background(COAP_CLIENT, "-s", "90", "-m", "get", f"{base}/attributes")  # (until read_until ends them)
    rpc = background(COAP_CLIENT, "-s", "90", "-m", "get", f"{base}/rpc")
    wait_for(lambda: observers(corem) >= 2, what="two observe registrations")
    status, body = corem.api("PUT", "/api/devices/acme/sensor-1/attributes", {"interval": 30})
    assert status == 200 and body == {"delivery": "delivered"}

    result = {}
    caller = threading.Thread(target=lambda: result.update(r=corem.api(
        "POST", "/api/devices/acme/sensor-1/rpc", {"method": "reboot", "params": {"delay": 2}, "timeout": 60},
        timeout=120)))
    caller.start()
    rpc_out = read_until(rpc, '"method":"reboot"')  # the request reaches the observer; the API call waits
    # a fresh server numbers RPC requests from 1
    reply = coap_client(f"{base}/rpc/1", "-m", "post", "-t", "50", "-e", '{"rebooting":true}')
    assert reply.code == "2.04"
    caller.join(120)
    assert result["r"] == (200, {"id": 1, "status": "replied", "response": {"rebooting": True}})
    assert '{"interval":30}' in read_until(attrs, '{"interval":30}')
    assert '{"id":1,"method":"reboot","params":{"delay":2}}' in rpc_out
    status, body = corem.api("GET", "/api/devices/acme/sensor-1/attributes")
    assert body == {"client": {"fw_state": "idle"}, "shared": {"interval": 30}}


def test_rpc_without_an_answer_times_out_with_504(corem):
    status, body = corem.api("POST", "/api/devices/acme/sensor-1/rpc", {"method": "ping", "timeout": 0.5})
    assert status == 504 and body["status"] == "expired"


def test_shared_attributes_changed_while_a_psm_device_sleeps_arrive_merged_when_it_wakes(data_dir):
    server = start_corem(data_dir, "--psm-activity-timer", "1")
    try:
        status, dev = server.api("POST", "/api/devices", {"tenant": "acme", "device": "sleeper", "power_mode": "psm"})
        assert status == 201
        base = f"{server.coap}/api/v1/{dev['token']}"
        watcher = background(COAP_CLIENT, "-s", "90", "-m", "get", f"{base}/attributes")  # (until read_until ends it)
        wait_for(lambda: observers(server) >= 1, what="the sleeper's observation")
        time.sleep(1.5)  # past the PSM activity timer: asleep
        assert server.api("PUT", "/api/devices/acme/sleeper/attributes", {"a": 1, "c": "x"})[1] == {"delivery": "queued"}
        assert server.api("PUT", "/api/devices/acme/sleeper/attributes", {"a": 2, "b": 3})[1] == {"delivery": "queued"}
        assert server.api("GET", "/api/devices/acme/sleeper")[1]["queued"]["attributes"] == 3
        time.sleep(0.5)
        # it wakes and sends a reading; what waited arrives as one notification
        assert coap_client(f"{base}/telemetry", "-m", "post", "-t", "50", "-e", '{"t":1}').code == "2.04"
        out = read_until(watcher, '{"a":2,"c":"x","b":3}')  # (one notification: "a":1 would have come first)
        assert '{"a":2,"c":"x","b":3}' in out and '"a":1' not in out
    finally:
        server.stop()


def test_drogue_device_waiting_with_ct_receives_a_command(corem):
    auth = base64.b64encode(b"sensor-1@acme:T0KEN-1").decode()
    waiting = background(COAP_CLIENT, "-v", "6", "-B", "20", "-m", "post", "-t", "50", "-e", '{"t":20.5}',
                         "-O", f"4209,Basic {auth}", f"{corem.coap}/v1/telemetry?ct=15")
    wait_for(lambda: corem.api("GET", "/api/devices/acme/sensor-1")[1]["queued"]["waiting"], what="the ct wait")
    status, body = corem.api("POST", "/api/devices/acme/sensor-1/commands", {"command": "set-led", "payload": "on"})
    assert status == 202 and body == {"delivery": "delivered"}
    out = finish(waiting)
    assert "c:2.05" in out and "4210:\\x73\\x65\\x74\\x2D\\x6C\\x65\\x64" in out and "'on'" in out
    [point] = corem.points("acme")
    assert point["numeric_values"] == {"t": 20.5}
    wrong = coap_client(f"{corem.coap}/v1/telemetry", "-m", "post", "-t", "50", "-e", '{"t":1}',
                        "-O", "4209,Basic " + base64.b64encode(b"sensor-1@acme:nope").decode())
    assert wrong.code == "4.01" and "wrong password" in wrong.output


def test_emqx_pubsub_retains_publishes_and_notifies_subscribers(corem):
    q = "?c=client-1&u=sensor-1&p=T0KEN-1"
    assert coap_client(f"{corem.coap}/ps/room/temp{q}", "-m", "put", "-e", "t=21.5").code == "2.01"  # created
    got = coap_client(f"{corem.coap}/ps/room/temp{q}", "-m", "get")
    assert got.code == "2.05" and "t=21.5" in got.output  # (text no log time contains)
    sub = background(COAP_CLIENT, "-s", "90", "-m", "get", f"{corem.coap}/mqtt/room/temp{q}")
    wait_for(lambda: observers(corem) >= 1, what="the subscription")
    assert coap_client(f"{corem.coap}/mqtt/room/temp{q}", "-m", "post", "-e", "t=22.25").code == "2.04"
    assert "t=22.25" in read_until(sub, "t=22.25")
    bad = coap_client(f"{corem.coap}/ps/room/temp?c=x&u=sensor-1&p=wrong", "-m", "get")
    assert bad.code == "4.01"


def test_a_device_holds_one_subscription_a_topic_so_a_publish_is_no_reflector(corem):
    """Found by an adversarial run: one device credential held 64 subscriptions to one
    topic from addresses plain UDP cannot verify, and each publish went to all of them (63x). A
    device's new subscription to a topic replaces its one before (here two libcoap observers of
    one device): a publish goes out once, to the latest; another device's subscription stays."""
    from corem.cli import main

    assert main(["devices", "add", "--data-dir", str(corem.data_dir), "--tenant", "acme", "--device", "other",
                 "--token", "OTHER-1"]) == 0
    q, other = "?c=a&u=sensor-1&p=T0KEN-1", "?c=b&u=other&p=OTHER-1"
    wait_for(lambda: coap_client(f"{corem.coap}/ps/x{other}", "-m", "get").code == "4.04", what="the new device")
    first = background(COAP_CLIENT, "-s", "90", "-m", "get", f"{corem.coap}/mqtt/alerts{q}")
    wait_for(lambda: observers(corem) >= 1, what="the first subscription")
    third = background(COAP_CLIENT, "-s", "90", "-m", "get", f"{corem.coap}/mqtt/alerts{other}")
    wait_for(lambda: observers(corem) >= 2, what="the other device's subscription")
    second = background(COAP_CLIENT, "-s", "90", "-m", "get", f"{corem.coap}/mqtt/alerts{q}")
    try:
        wait_for(lambda: corem.metrics()["corem_pubsub_subscribed_total"] >= 3, what="the second subscription")
        assert observers(corem) == 2  # the device's first was replaced
        def sent() -> float:
            return sum(v for k, v in corem.metrics().items() if k.startswith("corem_coap_observe_notifications_total"))

        before = sent()
        assert coap_client(f"{corem.coap}/mqtt/alerts{q}", "-m", "post", "-e", "door-open").code == "2.04"
        assert "door-open" in read_until(second, "door-open") and "door-open" in read_until(third, "door-open")
        assert sent() == before + 2  # (counted as they are sent, all at the publish)
    finally:
        for p in (first, second, third):
            p.kill()
            p.communicate()


def test_one_tenants_retained_topics_do_not_push_out_anothers(data_dir):
    """One tenant's device retaining more topics than its share drops its own oldest;
    acme's retained configuration stays, with libcoap's client against `corem serve`."""
    from corem.cli import main

    assert main(["devices", "add", "--data-dir", str(data_dir), "--tenant", "globex", "--device", "noisy",
                 "--token", "GLOBEX-N"]) == 0
    server = start_corem(data_dir, "--pubsub-max-retained", "6", "--pubsub-max-retained-per-tenant", "4")
    try:
        acme, globex = "?c=a&u=sensor-1&p=T0KEN-1", "?c=g&u=noisy&p=GLOBEX-N"
        assert coap_client(f"{server.coap}/ps/config/setpoint{acme}", "-m", "put", "-e", "21.5",
                           "-O", "14,0x015180").code == "2.01"  # (Max-Age a day)
        for i in range(8):
            assert coap_client(f"{server.coap}/ps/t/{i}{globex}", "-m", "put", "-e", f"v{i}",
                               "-O", "14,0x015180").code == "2.01"
        got = coap_client(f"{server.coap}/ps/config/setpoint{acme}", "-m", "get")
        assert got.code == "2.05" and "21.5" in got.output
        assert [coap_client(f"{server.coap}/ps/t/{i}{globex}", "-m", "get").code for i in (3, 4, 7)] == [
            "4.04", "2.05", "2.05"]
        assert server.metrics()["corem_pubsub_retained"] == 5
        assert server.metrics()["corem_pubsub_retained_dropped_total"] == 4
    finally:
        server.stop()


def test_provisioned_device_sends_with_its_new_token(corem):
    assert corem.api("POST", "/api/provisioning-keys", {"key": "pk-1", "secret": "ps-1", "tenant": "acme"})[0] == 201
    ask = json.dumps({"deviceName": "prov-1", "provisionDeviceKey": "pk-1", "provisionDeviceSecret": "ps-1"})
    got = coap_client(f"{corem.coap}/api/v1/provision", "-m", "post", "-t", "50", "-e", ask)
    assert got.code == "2.01"
    token, _ = json.JSONDecoder().raw_decode(got.output[got.output.index('{"status"'):])
    token = token["credentialsValue"]
    assert coap_client(f"{corem.coap}/api/v1/{token}/telemetry", "-m", "post", "-t", "50", "-e", '{"t":1}').code == "2.04"
    assert [p["device"] for p in corem.points("acme")] == ["prov-1"]


def test_provisioning_is_bounded_and_a_replay_registers_nothing(data_dir):
    """libcoap's client against `corem serve`: a key with max_devices 3 registers 3, a
    replayed named request none; a source provisions 0.1 device a second here (one at once):
    its next requests are 5.03 (each request from its own loopback address where that is not
    the point)."""
    server = start_corem(data_dir, "--provisioning-rate-per-source", "0.1")
    try:
        assert server.api("POST", "/api/provisioning-keys", {"key": "fleet", "secret": "fs", "tenant": "acme",
                                                             "max_devices": 3}) == (
            201, {"key": "fleet", "tenant": "acme", "max_devices": 3})

        def provision(name: str | None, source: int, key: str = "fleet", secret: str = "fs") -> str | None:
            ask = {"provisionDeviceKey": key, "provisionDeviceSecret": secret, **({"deviceName": name} if name else {})}
            return coap_client(f"{server.coap}/api/v1/provision", "-a", f"127.0.0.{source}", "-m", "post",
                               "-t", "50", "-e", json.dumps(ask)).code

        codes = [provision("named-1", 2), provision("named-1", 3), provision(None, 4), provision(None, 5),
                 provision(None, 6)]
        assert codes == ["2.01", "4.00", "2.01", "2.01", "4.00"]  # a replay: nothing; then max_devices
        names = [d["device"] for d in server.api("GET", "/api/devices?tenant=acme")[1]]
        assert len(names) == 2 + 3 and names.count("named-1") == 1
        assert server.api("POST", "/api/provisioning-keys", {"key": "open", "secret": "os", "tenant": "acme"})[0] == 201
        codes = [provision(None, 7, "open", "os") for _ in range(4)]
        assert codes[0] == "2.01" and "5.03" in codes, codes  # (one token at once, one every 10 s)
        assert server.metrics()['corem_provisioning_total{result="refused"}'] >= 2 + codes.count("5.03")
    finally:
        server.stop()


@pytest.mark.parametrize("client", DTLS_CLIENTS[:1])
def test_firmware_image_downloads_intact_blockwise_over_coaps(corem, tmp_path, client):
    image = os.urandom(300 * 1024)
    status, package = corem.api("POST", "/api/packages?kind=firmware&title=sensor-fw&version=1.4.2", raw=image)
    assert status == 201 and package["sha256"] == hashlib.sha256(image).hexdigest()
    status, assigned = corem.api("PUT", "/api/devices/acme/sensor-7/firmware", {"package": package["id"]})
    assert status == 200
    out = tmp_path / "fw.bin"
    url = f"coaps://127.0.0.1:{corem.coaps_port}/api/v1/firmware"
    got = coap_client(url, "-u", SPEC_IDENTITY, "-k", SPEC_KEY, "-b", "1024", "-o", str(out), binary=client, timeout=120)
    assert got.code == "2.05"
    assert hashlib.sha256(out.read_bytes()).hexdigest() == package["sha256"]
    # the device learns of the assignment the ThingsBoard way: shared attributes
    shared = corem.api("GET", "/api/devices/acme/sensor-7/attributes")[1]["shared"]
    assert shared["fw_version"] == "1.4.2" and shared["fw_checksum"] == package["sha256"]


def test_aiocoap_client_observes_downloads_block2_and_uploads_block1(corem, tmp_path):
    base = f"coap://127.0.0.1:{corem.coap_port}/api/v1/T0KEN-1"
    watcher = background(*AIOCOAP_CLIENT, "observe", f"{base}/attributes", "2")
    wait_for(lambda: observers(corem) >= 1, what="aiocoap's observation")
    assert corem.api("PUT", "/api/devices/acme/sensor-1/attributes", {"mode": "eco"})[1] == {"delivery": "delivered"}
    out = finish(watcher)
    assert "2.05 Content {}" in out and '2.05 Content {"mode":"eco"}' in out

    image = os.urandom(40_000)
    _, package = corem.api("POST", "/api/packages?kind=software&title=app&version=7", raw=image)
    corem.api("PUT", "/api/devices/acme/sensor-1/software", {"package": package["id"]})
    got = subprocess.run([*AIOCOAP_CLIENT, "get", f"{base}/software", str(tmp_path / "sw.bin")],
                         capture_output=True, text=True, timeout=120)
    assert "2.05" in got.stdout and (tmp_path / "sw.bin").read_bytes() == image

    big = {f"reading_{i}": i * 0.5 for i in range(150)}  # ~3 KB of JSON: Block1
    (tmp_path / "big.json").write_text(json.dumps(big))
    sent = subprocess.run([*AIOCOAP_CLIENT, "post", f"{base}/telemetry", str(tmp_path / "big.json"), "50"],
                          capture_output=True, text=True, timeout=60)
    assert sent.stdout.startswith("2.04"), sent.stdout + sent.stderr
    [point] = corem.points("acme")
    assert point["numeric_values"] == big
