"""The diagnostics UI in a real headless Chromium (Debian's chromium + chromedriver, via Selenium):
a malformed reading sent with libcoap's client shows up with its offending field; a device goes
online and, with a short per-tenant threshold, offline.  A screenshot is kept for reviewers in
test-artifacts/ui-diagnostics.png."""

from __future__ import annotations

import os
import re
import shutil
import threading
import time
from pathlib import Path

import pytest

from .conftest import ADMIN_TOKEN, coap_client, needs_libcoap, start_corem, write_cbor

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"

pytestmark = [
    needs_libcoap,
    pytest.mark.skipif(
        (CHROMIUM is None or CHROMEDRIVER is None) and os.environ.get("CI") != "true",
        reason="Debian's chromium and chromium-driver are not installed; `make test` installs them as root",
    ),
]


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_AVOID_STATS", "true")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM or "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1400,1000"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER or "/usr/bin/chromedriver"), options=opts)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def wait_until(driver, predicate, timeout: float = 60.0, what: str = "the page"):
    """Poll `predicate` (the page refreshes its tables every 2 s: an element found a moment ago
    may be replaced, so it is looked up again on each try).  The bound only detects what never
    comes: generous, for a busy machine."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.2,
                         ignored_exceptions=(NoSuchElementException, StaleElementReferenceException)).until(
        lambda d: predicate(d), message=what)


def test_rejected_sample_and_presence_in_the_ui(data_dir, tmp_path, browser):
    from selenium.webdriver.common.by import By

    server = start_corem(data_dir, "--presence-tenants", "acme=3")
    try:
        url = f"{server.coap}/api/v1/T0KEN-1/telemetry"
        good = write_cbor(tmp_path / "good.cbor", {"temperature": 21.5})
        bad = write_cbor(tmp_path / "bad.cbor", {"humidity": 40, "temperature": {"c": 21.5}})
        assert coap_client(url, "-m", "post", "-t", "60", "-f", str(good)).code == "2.04"
        assert coap_client(url, "-m", "post", "-t", "60", "-f", str(bad)).code == "4.00"

        start = time.monotonic()
        browser.get(f"http://127.0.0.1:{server.http_port}/ui#token={ADMIN_TOKEN}")
        first = "#samples tbody tr[data-i]"
        row_text = wait_until(browser, lambda d: d.find_element(By.CSS_SELECTOR, first).text, what="a sample row")
        loaded = time.monotonic() - start
        assert browser.find_element(By.CSS_SELECTOR, first).get_attribute("data-field") == "temperature"
        assert "acme/sensor-1" in row_text and "decode_error" in row_text
        wait_until(browser, lambda d: d.find_element(By.CSS_SELECTOR, first).click() or True, what="the click")
        assert browser.find_element(By.ID, "detail-field").text == "temperature"
        diag = browser.find_element(By.ID, "detail-diag")
        assert '"humidity": 40' in diag.text
        assert diag.find_element(By.CSS_SELECTOR, "mark.field").text == '"temperature"'
        assert browser.find_element(By.ID, "detail-hex").text.replace(" ", "") == bad.read_bytes().hex()
        # filters narrow the list
        browser.find_element(By.ID, "f-device").send_keys("someone-else")
        wait_until(browser, lambda d: not d.find_elements(By.CSS_SELECTOR, "#samples tbody tr[data-i]"),
                   what="no row for someone-else")
        browser.find_element(By.ID, "f-device").clear()
        browser.find_element(By.ID, "f-device").send_keys("sensor")  # input event re-renders
        wait_until(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#samples tbody tr[data-i]"), what="filter")

        presence = '#devices tr[data-device="acme/sensor-1"] .presence'
        # The device keeps reporting until the page shows it online: its 3 s online window may have
        # passed while a loaded machine ran the browser's steps above (waiting on the page, not a clock).
        shown = threading.Event()

        def keep_reporting() -> None:
            while not shown.wait(0.5):
                coap_client(url, "-m", "post", "-t", "60", "-f", str(good))

        reporter = threading.Thread(target=keep_reporting, daemon=True)
        reporter.start()
        try:
            wait_until(browser, lambda d: d.find_element(By.CSS_SELECTOR, presence).text == "online", what="online")
        finally:
            shown.set()
            reporter.join(60)
        ARTIFACTS.mkdir(exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / "ui-diagnostics.png"))
        assert (ARTIFACTS / "ui-diagnostics.png").stat().st_size > 10_000
        # acme's threshold is 3 s (presence_tenants): offline soon after, without reloading the page
        wait_until(browser, lambda d: d.find_element(By.CSS_SELECTOR, presence).text == "offline", what="offline")
        assert browser.find_element(By.ID, "c-online").text.startswith("0 /")
        # (a bound for a busy machine: a page that waited for something, not its speed, fails it)
        assert loaded < 20, f"the page took {loaded:.1f} s to show its first data"
    finally:
        server.stop()


def test_ui_asks_for_the_token_when_it_has_none(corem, browser):
    from selenium.webdriver.common.by import By

    browser.get(f"http://127.0.0.1:{corem.http_port}/ui")
    form = browser.find_element(By.ID, "login")
    wait_until(browser, lambda d: form.is_displayed(), what="the token form")
    browser.find_element(By.ID, "token").send_keys(ADMIN_TOKEN)
    browser.find_element(By.CSS_SELECTOR, "#login button").click()
    wait_until(browser, lambda d: d.find_element(By.ID, "c-online").text.endswith("/ 2"), what="status with the token")


def test_a_rejected_sample_decodes_again_against_the_changed_profile(tmp_path, browser):
    """The try panel: a sample the device's profile refused, decoded again in the page after the
    profile changed; and a payload pasted by hand."""
    import base64
    import json

    from selenium.webdriver.common.by import By

    from .conftest import corem_cli

    d = tmp_path / "data"
    corem_cli("profiles", "add", "tb", "--json", json.dumps({"format": "thingsboard", "fields": {
        "temperature": {"max": 50}}}), data_dir=d)
    corem_cli("devices", "add", "--tenant", "acme", "--device", "tb-1", "--token", "TB", "--profile", "tb", data_dir=d)
    server = start_corem(d)
    try:
        hot = coap_client(f"{server.coap}/api/v1/TB/telemetry", "-m", "post", "-t", "50", "-e", '{"temperature": 70}')
        assert hot.code == "4.00"
        assert server.api("PUT", "/api/profiles/tb", {"format": "thingsboard", "fields": {"temperature": {"max": 90}}})[0] == 200
        browser.get(f"http://127.0.0.1:{server.http_port}/ui#token={ADMIN_TOKEN}")
        first = "#samples tbody tr[data-i]"
        wait_until(browser, lambda d: d.find_element(By.CSS_SELECTOR, first).click() or True, what="a sample")
        wait_until(browser, lambda d: d.find_element(By.ID, "detail-try").click() or True, what="the try button")
        result = lambda d: d.find_element(By.ID, "t-result")  # noqa: E731
        wait_until(browser, lambda d: result(d).get_attribute("data-ok") == "yes", what="the decoded points")
        assert '"temperature": 70' in result(browser).text
        assert browser.find_element(By.ID, "t-profile").get_attribute("value") == "tb"
        # a payload pasted by hand, base64, against the built-in default: refused with its field
        browser.find_element(By.ID, "t-profile").send_keys("default")
        browser.find_element(By.ID, "t-enc").send_keys("base64")
        box = browser.find_element(By.ID, "t-payload")
        box.clear()
        box.send_keys(base64.b64encode(b'{"t": {"nested": 1}}').decode())
        cf = browser.find_element(By.ID, "t-cf")
        cf.clear()
        cf.send_keys("50")
        browser.find_element(By.ID, "t-go").click()
        wait_until(browser, lambda d: result(d).get_attribute("data-ok") == "no", what="the refusal")
        assert "field: t" in result(browser).text and "4.00" in result(browser).text
        ARTIFACTS.mkdir(exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / "ui-try-profile.png"))
    finally:
        server.stop()


def test_the_last_hour_as_charts_drawn_in_the_page(data_dir, browser):
    """Readings/s, refusals/s by reason, handshakes and their failures, the bus's backlog: inline
    SVG from the server's ring (/api/diagnostics/history), nothing loaded from elsewhere."""
    from selenium.webdriver.common.by import By

    from .test_observability import traffic

    server = start_corem(data_dir)
    try:
        traffic(server)  # readings (lane and Python path), a rejected one, a good and a failed handshake
        origin = f"http://127.0.0.1:{server.http_port}"
        browser.get(f"{origin}/ui#token={ADMIN_TOKEN}")

        def series(chart: str, css: str = "[data-series]"):
            return browser.find_elements(By.CSS_SELECTOR, f"#chart-{chart} {css}")

        def peak(chart: str, name: str) -> float:
            found = series(chart, f'[data-series="{name}"]')
            return max((float(e.get_attribute("data-max")) for e in found), default=0.0)

        wait_until(browser, lambda d: peak("readings", "readings") > 0, what="readings/s above zero")
        wait_until(browser, lambda d: series("rejections", '[data-series="decode_error"]'), what="the decode_error refusals")
        wait_until(browser, lambda d: peak("handshakes", "completed") > 0, what="a completed handshake")
        wait_until(browser, lambda d: [e for e in series("handshakes") if e.get_attribute("data-series").startswith("failed: ")],
                   what="the failed handshake, by its reason")
        assert series("backlog", '[data-series="backlog"]')
        legend = browser.find_element(By.ID, "legend-rejections").text
        assert "decode_error" in legend
        # an axis and its time labels are drawn: the last hour, "now" at the right
        assert "now" in browser.find_element(By.ID, "chart-readings").text
        # no CDN, no script from elsewhere: every resource the page loaded is the server's own
        loaded = browser.execute_script("return performance.getEntriesByType('resource').map((e) => e.name)")
        assert loaded and all(name.startswith(origin) for name in loaded), loaded
        page = (Path(__file__).resolve().parent.parent / "corem" / "admin" / "ui.html").read_text()
        assert "<script src" not in page and "<link" not in page
        assert set(re.findall(r"https?://[^\s\"'`]+", page)) == {"http://www.w3.org/2000/svg"}  # (a namespace, not fetched)
        browser.execute_script("document.getElementById('history').scrollIntoView()")
        ARTIFACTS.mkdir(exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / "ui-charts.png"))
        assert (ARTIFACTS / "ui-charts.png").stat().st_size > 10_000
    finally:
        server.stop()
