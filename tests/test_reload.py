"""SIGHUP applies the rate limit's table size and exempt networks, and the log format, to a running
`corem serve` without a restart (corem/reload.py), in the Python limiter and the C lane alike."""

from __future__ import annotations

import json
import signal

from .conftest import coap_pings, corem_cli, log_line, start_corem, wait_for


def test_sighup_applies_the_sources_the_exempt_networks_and_the_log_format(data_dir, tmp_path):
    """The Python limiter (fast_lane off): after the reload, a source over its rate in a newly
    exempt network goes through, the table holds at most the new number of sources, and the
    lines are JSON from the reload's own line on."""
    cfg = tmp_path / "corem.toml"
    cfg.write_text('fast_lane = "off"\nrate_limit_per_source = 1\n')
    server = start_corem(data_dir, "--config", str(cfg), timeout=60)
    try:
        assert coap_pings(server.coap_port, 20) < 20  # 1/s, a burst of 2: limited
        dropped = server.metrics()['corem_rate_limited_datagrams_total{transport="udp"}']
        assert dropped > 0
        cfg.write_text('fast_lane = "off"\nrate_limit_per_source = 1\nrate_limit_sources = 5\n'
                       'rate_limit_exempt = "127.0.0.0/8"\nlog_format = "json"\n')
        server.proc.send_signal(signal.SIGHUP)
        text = wait_for(lambda: log_line(server.stderr(), "reloaded on SIGHUP"), 60, "the reload's line")
        line = json.loads(text)  # the reload's own line is in the new format
        msg = line["msg"]
        assert "log_format kv -> json" in msg and "rate_limit_sources 100000 -> 5" in msg, msg
        assert 'rate_limit_exempt "" -> 127.0.0.0/8' in msg and "need a restart" not in msg, msg
        assert line["level"] == "info" and line["logger"] == "corem"
        # the exempt network: 20 pings over the rate, all answered, none dropped since
        assert coap_pings(server.coap_port, 20, answers=20) == 20
        metrics = server.metrics()
        assert metrics['corem_rate_limited_datagrams_total{transport="udp"}'] == dropped
        assert metrics['corem_rate_limit_exempted_total{transport="udp"}'] >= 17
        # 8 more sources: the table keeps 5
        for i in range(2, 10):
            assert coap_pings(server.coap_port, 1, source=f"127.0.0.{i}", answers=1) == 1
        assert server.metrics()['corem_rate_limit_sources{transport="udp"}'] == 5
        # a line logged after the reload: JSON too
        corem_cli("devices", "add", "--tenant", "acme", "--device", "sensor-9", "--token", "T0KEN-9",
                  data_dir=data_dir)
        changed = wait_for(lambda: log_line(server.stderr().split(text, 1)[1], "registry changed"), 60,
                           "a line after the reload")
        assert json.loads(changed)["logger"].startswith("corem")
    finally:
        assert server.stop() == 0
    after = server.stderr().split(text, 1)[1]
    for later in filter(None, after.splitlines()):
        json.loads(later)  # every line after the reload's: JSON (the stop's lines included)


def test_with_workers_and_the_lane_the_rate_the_sources_and_the_exempt_networks_apply(data_dir, tmp_path):
    """The C lane applies the limit (the default): it takes the new rate, the new bound of sources
    (its table made again, the newest kept) and the new exempt networks in every worker
    (`FastLane.limit`, `FastLane.exempt`).  The log format too."""
    cfg = tmp_path / "corem.toml"
    cfg.write_text('rate_limit_per_source = 1\n')
    server = start_corem(data_dir, "--config", str(cfg), "--workers", "2", timeout=60)
    try:
        assert coap_pings(server.coap_port, 20) < 20  # 1/s, a burst of 2: limited
        dropped = server.metrics()['corem_rate_limited_datagrams_total{transport="udp"}']
        assert dropped > 0
        cfg.write_text('rate_limit_per_source = 2\nrate_limit_sources = 5\nrate_limit_exempt = "127.0.0.0/8"\n'
                       'log_format = "json"\n')
        server.proc.send_signal(signal.SIGHUP)
        text = wait_for(lambda: log_line(server.stderr(), "reloaded on SIGHUP"), 60, "the reload's line")
        msg = json.loads(text)["msg"]
        assert "(2 of 2 workers)" in msg and "log_format kv -> json" in msg, msg
        assert "rate_limit_per_source 1.0 -> 2.0" in msg and 'rate_limit_exempt "" -> 127.0.0.0/8' in msg, msg
        assert "rate_limit_sources 100000 -> 5" in msg and "need a restart" not in msg, msg
        # the exempt network, in the lane of the worker this socket is steered to: all answered
        assert coap_pings(server.coap_port, 20, answers=20) == 20
        metrics = server.metrics()  # (over the rate, they were exempted, none dropped)
        assert metrics['corem_rate_limited_datagrams_total{transport="udp"}'] == dropped
        assert metrics['corem_rate_limit_exempted_total{transport="udp"}'] >= 10
        # a worker's line after the reload: JSON, with its worker
        corem_cli("devices", "add", "--tenant", "acme", "--device", "sensor-9", "--token", "T0KEN-9",
                  data_dir=data_dir)
        changed = wait_for(lambda: log_line(server.stderr().split(text, 1)[1], "registry changed"), 60,
                           "a worker's line")
        assert json.loads(changed)["worker"] in (0, 1)
    finally:
        assert server.stop() == 0
