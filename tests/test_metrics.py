"""Metrics rendering alone (corem/metrics.py): components' samples in, Prometheus text out."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from corem.coap import Endpoint
from corem.codec import Code, Message, Type, encode
from corem.codec import OptionNumber as O
from corem.metrics import FAMILIES, render
from corem.stats import Histogram, counter, gauge


class Part:
    def __init__(self, *samples):
        self.samples = samples

    def metrics(self):
        return self.samples


def parse(text: bytes) -> dict[str, dict[tuple, float]]:
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def test_samples_of_one_name_and_labels_are_summed_and_mounts_label_them():
    lane = Part(counter("corem_coap_requests", 5), counter("corem_coap_responses", 4, code="2.04"))
    python_path = Part(counter("corem_coap_requests", 2), counter("corem_coap_responses", 1, code="2.04"),
                       counter("corem_coap_responses", 1, code="4.04"))
    other = Part(counter("corem_coap_requests", 7))
    got = parse(render(lambda: [(lane, {"transport": "udp"}), (python_path, {"transport": "udp"}),
                                (other, {"transport": "dtls"})]))
    assert got["corem_coap_requests_total"] == {(("transport", "udp"),): 7, (("transport", "dtls"),): 7}
    assert got["corem_coap_responses_total"] == {
        (("code", "2.04"), ("transport", "udp")): 5, (("code", "4.04"), ("transport", "udp")): 1}


def test_every_family_is_listed_with_its_help_even_before_anything_counted():
    listed = {f.name: (f.type, f.documentation) for f in text_string_to_metric_families(render(lambda: []).decode())}
    assert listed == FAMILIES


def test_gauges_and_histograms_are_written_as_such():
    part = Part(gauge("corem_coap_outstanding", 3),
                Histogram("corem_sink_batch_size", (1.0, 10.0), [2, 3, 1], 40.0, (("sink", "embedded"),)))
    got = parse(render(lambda: [(part, {})]))
    assert got["corem_coap_outstanding"] == {(): 3}
    assert got["corem_sink_batch_size_bucket"] == {
        (("le", "1.0"), ("sink", "embedded")): 2, (("le", "10.0"), ("sink", "embedded")): 5,
        (("le", "+Inf"), ("sink", "embedded")): 6}
    assert got["corem_sink_batch_size_sum"] == {(("sink", "embedded"),): 40.0}


def test_a_name_missing_from_the_table_is_a_bug_said_at_once():
    with pytest.raises(KeyError, match="corem_made_up"):
        render(lambda: [(Part(counter("corem_made_up", 1)), {})])


def test_an_endpoint_shows_what_it_counted():
    ep = Endpoint()
    req = ep.receive(encode(Message(Type.CON, Code.GET, 1, b"", [(O.URI_PATH, b"x")])), ("127.0.0.1", 1), 0.0)
    req.respond(Code.NOT_FOUND)
    ep.receive(b"\x40", ("127.0.0.1", 1), 0.0)  # malformed
    got = parse(render(lambda: [(ep, {"transport": "udp"})]))
    udp = (("transport", "udp"),)
    assert got["corem_coap_requests_total"][udp] == 1 and got["corem_coap_format_errors_total"][udp] == 1
    assert got["corem_coap_responses_total"][(("code", "4.04"), ("transport", "udp"))] == 1
    assert got["corem_coap_datagrams_received_total"][udp] == 2


def test_every_metric_is_in_the_docs():
    """docs/operating.md's Metrics table lists every family /metrics writes (`{a,b}` spells several)."""
    text = (Path(__file__).resolve().parent.parent / "docs" / "operating.md").read_text()
    start = text.index("\n## Metrics\n")
    section = text[start:text.index("\n## ", start + 1)]
    listed = set()
    for cell in re.findall(r"`((?:corem|process|python)_[a-z_{},]+)`", section):
        m = re.fullmatch(r"([a-z_]*)\{([a-z_,]+)\}([a-z_]*)", cell)
        names = [m[1] + part + m[3] for part in m[2].split(",")] if m else [cell]
        listed.update(n.removesuffix("_total") for n in names)
    assert set(FAMILIES) - listed == set()
    assert listed - set(FAMILIES) == set()  # and nothing that no longer exists
