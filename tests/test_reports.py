"""The Kafka sink's delivery bookkeeping (`corem.bus._reports.Reports` in C, `PyReports` in
Python) against a stand-in for confluent-kafka's produce() that keeps each record's callback the
way confluent-kafka does: one reference, dropped right after the record's delivery report; the
callback is called only for failures when the producer reports only errors (the C tickets), and
for every record otherwise (PyReports).  The real producer is in tests/test_kafka.py."""

from __future__ import annotations


import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corem.bus import Record
from corem.bus.base import LATENCY_BUCKETS
from corem.bus.kafka import PyReports, Reports

KINDS = [k for k in (Reports, PyReports) if k is not None]


class FakeProducer:
    """produce() that takes a record or raises as told, and delivers its reports on request."""

    def __init__(self, only_errors: bool) -> None:
        self.only_errors = only_errors
        self.queued: list[tuple[Record, object]] = []  # (record, callback): librdkafka's queue
        self.refuse: BaseException | None = None

    def produce(self, topic, value, key, partition, callback, on_delivery, timestamp, headers):
        assert (partition, on_delivery, timestamp) == (-1, None, 0)
        if self.refuse is not None:
            raise self.refuse
        self.queued.append((Record(topic, key, value, headers), callback))

    def report(self, i: int, error: object = None) -> None:
        """Record i's delivery report, as confluent-kafka's dr_msg_cb serves it."""
        record, callback = self.queued.pop(i)
        if error is not None or not self.only_errors:
            callback(error, object())
        del callback  # Producer_msgstate_destroy: the only reference goes (freed at once: no cycle)


def records(n: int) -> list[Record]:
    return [Record("telemetry.raw.t", b"d%d" % i, b"{}", {"protocol": "coap"}) for i in range(n)]


@pytest.fixture(params=KINDS, ids=lambda k: k.__name__)
def kind(request):
    return request.param


def test_acknowledged_records_are_answered_in_report_order_and_failures_returned(kind):
    reports = kind(LATENCY_BUCKETS)
    producer = FakeProducer(only_errors=kind is not PyReports)
    answers: list = []
    assert reports.submit(producer.produce, records(4), lambda ctx, err: answers.append((ctx, err)), list("abcd")) == 4
    assert reports.outstanding == 4 and not reports.ready()
    producer.report(2)  # "c" acknowledged
    producer.report(0, error="BOOM")  # "a" failed
    assert reports.ready() and reports.outstanding == 2
    failed = reports.answer()
    assert answers == [("c", None)]
    assert [(ctx, err) for _done, ctx, err in failed] == [("a", "BOOM")]
    producer.report(0)
    producer.report(0)
    assert reports.answer() == [] and answers == [("c", None), ("b", None), ("d", None)]
    stats = reports.stats()
    assert (stats["outstanding"], stats["acked"], stats["failed"]) == (0, 3, 1)
    assert sum(stats["buckets"]) == 4 and stats["latency_sum"] >= 0


def test_a_record_produce_refused_is_never_acknowledged(kind):
    """BufferError (librdkafka's queue full) ends the submit quietly: the rest are refused, and
    the refused record's callback -- dropped by produce() -- acknowledges nothing."""
    reports = kind(LATENCY_BUCKETS)
    producer = FakeProducer(only_errors=kind is not PyReports)
    answers: list = []
    done = lambda ctx, err: answers.append(ctx)  # noqa: E731
    assert reports.submit(producer.produce, records(2), done, [1, 2]) == 2
    producer.refuse = BufferError("Local: Queue full")
    assert reports.submit(producer.produce, records(3), done, [3, 4, 5]) == 0
    assert reports.outstanding == 2 and not reports.ready() and reports.answer() == [] and answers == []
    producer.refuse = RuntimeError("fatal")
    with pytest.raises(RuntimeError):
        reports.submit(producer.produce, records(1), done, [6])
    assert reports.outstanding == 2 and not reports.ready()
    producer.report(0)
    producer.report(0)
    reports.answer()
    assert answers == [1, 2]


def test_a_producer_let_go_of_fails_what_it_did_not_report(kind):
    """fail_all: the records still waiting get the error (their devices a 5.03), and what the
    producer does with their callbacks afterwards -- report, or just free them -- counts for
    nothing: a freed callback is no delivery once its record was failed."""
    reports = kind(LATENCY_BUCKETS)
    producer = FakeProducer(only_errors=kind is not PyReports)
    answers: list = []
    reports.submit(producer.produce, records(3), lambda ctx, err: answers.append((ctx, err)), ["a", "b", "c"])
    producer.report(0)  # "a" delivered before the end
    assert reports.fail_all("GONE") == 2 and reports.outstanding == 0
    failed = reports.answer()
    assert answers == [("a", None)] and sorted(ctx for _d, ctx, err in failed if err == "GONE") == ["b", "c"]
    producer.report(0)  # the old producer frees (or reports) the rest: ignored
    producer.report(0, error="LATE")
    assert not reports.ready() and reports.answer() == [] and answers == [("a", None)]
    assert (reports.stats()["acked"], reports.stats()["failed"]) == (1, 2)


@pytest.mark.skipif(Reports is None, reason="corem.bus._reports is not built")
def test_a_c_ticket_called_with_no_error_counts_once():
    """Should a producer report successes too, a ticket called with None acknowledges once."""
    reports = Reports(LATENCY_BUCKETS)
    producer = FakeProducer(only_errors=False)
    answers: list = []
    reports.submit(producer.produce, records(1), lambda ctx, err: answers.append((ctx, err)), ["x"])
    producer.report(0)
    assert reports.answer() == [] and answers == [("x", None)] and reports.stats()["acked"] == 1


@pytest.mark.skipif(Reports is None, reason="corem.bus._reports is not built")
def test_c_reports_check_their_arguments():
    with pytest.raises(TypeError):
        Reports(LATENCY_BUCKETS).submit(print, (), print, [])
    with pytest.raises(ValueError):
        Reports(range(40))
    r = Reports(LATENCY_BUCKETS)
    with pytest.raises(TypeError, match="already"):
        r.__init__(LATENCY_BUCKETS)


@pytest.mark.skipif(Reports is None, reason="corem.bus._reports is not built")
def test_c_reports_read_the_bounds_given_even_if_the_list_changes_meanwhile():
    """A bound converts through Python (`__float__`), which could empty the list: Reports reads the
    bounds it was given (walking the list itself, it read past the emptied list's end and crashed),
    and a bound that is no number, or whose conversion raises, is refused with that error."""
    bounds: list = []

    class EmptiesTheList:
        def __float__(self) -> float:
            bounds.clear()
            return 0.5

    bounds += [EmptiesTheList(), 1.0, 2.0]
    r = Reports(bounds)
    assert r.stats()["buckets"] == [0, 0, 0, 0]  # (three bounds, and +Inf)

    class Raises:
        def __float__(self) -> float:
            raise ArithmeticError("no")

    with pytest.raises(ArithmeticError):
        Reports([0.5, Raises()])
    with pytest.raises(TypeError):
        Reports([0.5, "1"])
    with pytest.raises(TypeError, match="sequence of seconds"):
        Reports(5)
    assert Reports([-1.0]).stats()["buckets"] == [0, 0]  # (-1.0 is a number, not an error)


@pytest.mark.skipif(Reports is None, reason="corem.bus._reports is not built")
def test_c_reports_submit_the_records_given_even_if_the_lists_change_meanwhile():
    """produce() runs Python, which could empty the records and ctxs lists: each record is still
    produced with its own topic, key, value and headers, and answered with its own ctx (walking the
    lists themselves, submit read past their emptied ends and crashed)."""
    reports = Reports(LATENCY_BUCKETS)
    producer = FakeProducer(only_errors=True)

    def given() -> list[Record]:
        return [Record("telemetry.raw.t", b"d%d" % i, bytes([0x30 + i]) * 4000, {"n": str(i)}) for i in range(3)]

    recs, ctxs = given(), ["a", "b", "c"]

    def produce(*args):
        recs.clear()  # (the records' only other reference)
        ctxs.clear()
        [bytes([0x41 + i]) * 4000 for i in range(64)]  # (memory a freed one would be reused for)
        producer.produce(*args)

    answers: list = []
    assert reports.submit(produce, recs, lambda ctx, err: answers.append(ctx), ctxs) == 3
    assert [r for r, _cb in producer.queued] == given()
    for _ in range(3):
        producer.report(0)
    reports.answer()
    assert answers == ["a", "b", "c"] and reports.outstanding == 0


@pytest.mark.skipif(Reports is None, reason="corem.bus._reports is not built")
def test_c_reports_not_initialised_refuse_every_use():
    """`Reports.__new__(Reports)` has no lists to file reports in: each use raises (it used to read
    them as NULL and crash), and a later __init__ makes it whole."""
    r = Reports.__new__(Reports)
    producer = FakeProducer(only_errors=True)
    uses = [lambda: r.submit(producer.produce, records(1), print, [1]), r.answer, r.ready, r.stats,
            lambda: r.fail_all("GONE"), lambda: r.outstanding, lambda: r.oldest]
    for use in uses:
        with pytest.raises(RuntimeError, match="not initialised"):
            use()
    assert producer.queued == []
    r.__init__(LATENCY_BUCKETS)
    assert r.submit(producer.produce, records(1), print, [1]) == 1 and r.outstanding == 1


steps = st.lists(st.one_of(
    st.tuples(st.just("submit"), st.integers(1, 5), st.sampled_from([None, "full"])),
    st.tuples(st.just("report"), st.integers(0, 50), st.sampled_from([None, None, "ERR"])),
    st.tuples(st.just("answer"), st.just(0), st.just(None)),
    st.tuples(st.just("fail_all"), st.just(0), st.just(None)),
), max_size=40)


@pytest.mark.skipif(Reports is None, reason="corem.bus._reports is not built")
@settings(max_examples=200, deadline=None)
@given(steps)
def test_c_and_python_reports_answer_the_same(script):
    """Any sequence of submits (taken or refused), reports (delivered or failed, in any order),
    answers and producers let go of: both implementations answer the same records the same way."""
    outcomes = {}
    for kind in (Reports, PyReports):
        reports = kind(LATENCY_BUCKETS)
        producer = FakeProducer(only_errors=kind is not PyReports)
        answered: list = []
        done = lambda ctx, err: answered.append((ctx, err))  # noqa: E731
        seq = lost = 0
        for op, n, arg in script:
            if op == "submit":
                producer.refuse = BufferError() if arg == "full" else None
                ctxs = list(range(seq, seq + n))
                seq += n
                reports.submit(producer.produce, records(n), done, ctxs)
            elif op == "report" and producer.queued:
                producer.report(n % len(producer.queued), arg)
            elif op == "answer":
                answered += [(ctx, err) for _done, ctx, err in reports.answer()]
            elif op == "fail_all":
                reports.fail_all("GONE")
                lost += len(producer.queued)
                producer.queued.clear()  # the producer is let go of: its callbacks are freed
        answered += [(ctx, err) for _done, ctx, err in reports.answer()]
        s = reports.stats()
        outcomes[kind] = (sorted(answered, key=repr), s["outstanding"], s["acked"], s["failed"])
        assert s["outstanding"] == len(producer.queued)
        assert sum(1 for _ctx, err in answered if err == "GONE") == lost
    assert outcomes[Reports] == outcomes[PyReports]
