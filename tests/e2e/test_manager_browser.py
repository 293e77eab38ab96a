"""The balancer-manager in a real browser: Debian's Chromium, headless, driven by
Selenium through Debian's chromedriver, does what an operator does with the mouse.

It opens the manager, reads Apache's tables, follows a member's link to its edit
form, types a load factor, ticks Drain, clicks Submit, and reads the page it gets
back; the test then checks the change where it matters: the manager's JSON and the
next proxied requests (the echo backends name themselves). A form on a page of
another origin, submitted by the same browser, changes nothing.

Needs /usr/bin/chromium and /usr/bin/chromedriver (Debian's `chromium` and
`chromium-driver`; `.ci/run` installs them) and selenium (the `test` extra); skipped
with the reason when either binary is missing. Selenium Manager never runs: the
driver's path is given and its statistics are off.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from collections import Counter
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from clients import fetch
from harness import Lab

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")

MISSING = [f"{path} (Debian's {package})" for path, package in
           ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")) if not path.is_file()]
pytestmark = pytest.mark.skipif(bool(MISSING), reason="the browser test needs "
                                + " and ".join(MISSING) + ": apt-get install chromium "
                                "chromium-driver")

if not MISSING:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

WAIT = 20            # seconds an explicit wait may take before the test fails
PAGE_LOAD = 30       # seconds a page load may take


# -- what the test starts ----------------------------------------------------------------


@pytest.fixture
def lab(tmp_path):
    lab = Lab(tmp_path)
    yield lab
    lab.close()


@pytest.fixture
def browser(tmp_path, monkeypatch):
    """Headless Chromium under chromedriver, on a new empty profile; quit at teardown."""
    monkeypatch.setenv("SE_AVOID_STATS", "true")
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-proxy-server",
                 "--window-size=1280,1024", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    service = Service(str(CHROMEDRIVER), log_output=str(tmp_path / "chromedriver.log"))
    try:
        driver = webdriver.Chrome(service=service, options=options)
        try:
            driver.set_page_load_timeout(PAGE_LOAD)
            yield driver
        finally:
            driver.quit()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


class ForeignSite:
    """Static files served on another loopback port: another origin than the manager's."""

    def __init__(self, folder: Path):
        handler = partial(Quiet, directory=str(folder))
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def config(ports, members) -> str:
    out = [f"""
[server]
access_log = "-"

[[listen]]
address = "127.0.0.1"
port = {ports[0]}

[admin]
port = {ports['admin']}

[[vhost]]
server_name = "proxy.test"
  [[vhost.route]]
  path = "/"
  url = "balancer://farm/"

[balancer.farm]
stickysession = "ROUTEID"
"""]
    for name, url in members:
        out.append(f'  [[balancer.farm.member]]\n  url = "{url}"\n  route = "{name}"\n')
    return "".join(out)


@pytest.fixture
def farm(lab):
    """The proxy on a balancer of two echo members, a and b, and its admin listener."""
    a, b = lab.echos("a", "b")
    proxy = lab.proxy(lambda ports: config(ports, [("a", a.url), ("b", b.url)]))
    return proxy, a, b


# -- reading what the browser shows --------------------------------------------------------


def wait(driver):
    return WebDriverWait(driver, WAIT)


def open_page(driver, url: str, heading: str):
    """Load `url` and wait until an h3 starting with `heading` is on it."""
    driver.get(url)
    return wait_heading(driver, heading)


def wait_heading(driver, heading: str):
    return wait(driver).until(EC.presence_of_element_located(
        (By.XPATH, f"//h3[starts-with(normalize-space(.), '{heading}')]")))


def table_rows(table) -> list[list[str]]:
    return [[cell.text.strip() for cell in row.find_elements(By.XPATH, "./th|./td")]
            for row in table.find_elements(By.XPATH, "./tbody/tr|./tr")]


def balancer_tables(driver, name: str) -> tuple[list[list[str]], list[list[str]]]:
    """The header table and the member table under "LoadBalancer Status for NAME"."""
    h3 = driver.find_element(
        By.XPATH, f"//h3[normalize-space(.)='LoadBalancer Status for {name}']")
    head, members = h3.find_elements(By.XPATH, "following-sibling::table")[:2]
    return table_rows(head), table_rows(members)


def member_row(driver, url: str) -> dict[str, str]:
    _, rows = balancer_tables(driver, "balancer://farm")
    titles = rows[0]
    return next(dict(zip(titles, r)) for r in rows[1:] if r[0] == url)


def click_submit(driver) -> None:
    """A real click on the form's Submit button, then wait for the next page."""
    from selenium.common.exceptions import WebDriverException
    button = driver.find_element(By.CSS_SELECTOR, "form input[type=submit]")
    try:
        button.click()
    except WebDriverException as e:
        # Chromium may answer the click after the form's page has already replaced
        # the document (seen once in a full run): the click was made, go on waiting
        if "does not belong to the document" not in str(e):
            raise
    wait(driver).until(EC.staleness_of(button))


def screenshot(driver, path: Path) -> None:
    assert driver.save_screenshot(str(path)), path
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000, (path, len(data))


# -- what the manager and the proxy say, without the browser ------------------------------


def manager_json(admin_port: int) -> dict:
    r = fetch(admin_port, "/balancer-manager?format=json", host=f"127.0.0.1:{admin_port}")
    assert r.status == 200, r
    (b,) = r.json()["balancers"]
    return b


def members(admin_port: int) -> dict:
    return {m["route"]: (m["status"], m["loadfactor"], m["flags"])
            for m in manager_json(admin_port)["members"]}


def spread(port: int, n: int = 12) -> Counter:
    return Counter(fetch(port, "/").echo["server"] for _ in range(n))


# -- the tests -----------------------------------------------------------------------------


def test_operator_drains_a_member_and_sets_its_load_factor_from_the_browser(
        farm, browser, tmp_path):
    proxy, a, b = farm
    admin_port = proxy.ports["admin"]
    manager = f"http://127.0.0.1:{admin_port}/balancer-manager"
    assert set(spread(proxy.port)) == {"a", "b"}

    # The operator opens the manager: Apache's page, the balancer and both members.
    open_page(browser, manager, "LoadBalancer Status for")
    assert browser.title == "Balancer Manager"
    assert "Server Version: Apache/2.4" in browser.find_element(By.TAG_NAME, "dl").text
    head, rows = balancer_tables(browser, "balancer://farm")
    assert head[0] == ["MaxMembers", "StickySession", "DisableFailover", "Timeout",
                       "FailoverAttempts", "Method", "Path", "Active"]
    assert head[1][0] == "2 [2 Used]" and head[1][1] == "ROUTEID"
    assert rows[0] == ["Worker URL", "Route", "RouteRedir", "Factor", "Set", "Status",
                       "Elected", "Busy", "Load", "To", "From"]
    assert [(r[0], r[1], r[3], r[5]) for r in rows[1:]] == [
        (a.url, "a", "1.00", "Init Ok"), (b.url, "b", "1.00", "Init Ok")]
    screenshot(browser, tmp_path / "manager.png")

    # The first member's URL is the link to its edit page: b, w and the nonce.
    browser.find_element(By.LINK_TEXT, a.url).click()
    wait_heading(browser, f"Edit worker settings for {a.url}")
    query = parse_qs(urlsplit(browser.current_url).query)
    assert query == {"b": ["farm"], "w": [a.url], "nonce": [manager_json(admin_port)["nonce"]]}
    load_factor = browser.find_element(By.NAME, "w_lf")
    assert load_factor.get_attribute("value") == "1.00"
    assert browser.find_element(By.ID, "w_status_N0").is_selected()      # Drain: Off

    # Load factor 3, Drain On, and a click on Submit.
    load_factor.clear()
    load_factor.send_keys("3")
    browser.find_element(By.ID, "w_status_N1").click()
    assert browser.find_element(By.ID, "w_status_N1").is_selected()
    screenshot(browser, tmp_path / "edit.png")
    click_submit(browser)

    # The page after the submit shows the new values, in the table and in the form.
    wait_heading(browser, f"Edit worker settings for {a.url}")
    row = member_row(browser, a.url)
    assert (row["Factor"], row["Status"]) == ("3.00", "Init Drn Ok")
    assert member_row(browser, b.url)["Status"] == "Init Ok"
    assert browser.find_element(By.NAME, "w_lf").get_attribute("value") == "3.00"
    assert browser.find_element(By.ID, "w_status_N1").is_selected()

    # The JSON view agrees, the proxy logged who changed what, and a drained member
    # takes no new requests.
    assert members(admin_port) == {"a": ("Init Drn Ok", 3.0, "N"), "b": ("Init Ok", 1.0, "")}
    proxy.wait_for_line("manager: 127.0.0.1 -", f"member {a.url}", "status.N False -> True")
    proxy.wait_for_line("manager: 127.0.0.1 -", f"member {a.url}", "loadfactor")
    assert spread(proxy.port) == Counter(b=12)

    # Bringing it back from the same page: Drain Off, and the load factor of 3 shows.
    browser.find_element(By.ID, "w_status_N0").click()
    click_submit(browser)
    wait_heading(browser, f"Edit worker settings for {a.url}")
    assert member_row(browser, a.url)["Status"] == "Init Ok"
    assert members(admin_port)["a"] == ("Init Ok", 3.0, "")
    got = spread(proxy.port, 40)
    assert 27 <= got["a"] <= 33 and got["a"] + got["b"] == 40, got


FOREIGN_PAGE = """<!DOCTYPE html>
<html><head><title>Win a prize</title></head><body>
<h1>Win a prize</h1>
<form id="no-nonce" method="POST" action="{manager}">
  <input type="hidden" name="b" value="farm">
  <input type="hidden" name="w" value="{member}">
  <input type="hidden" name="w_status_D" value="1">
  <input type="submit" value="Claim without a nonce">
</form>
<form id="stale-nonce" method="POST" action="{manager}">
  <input type="hidden" name="b" value="farm">
  <input type="hidden" name="w" value="{member}">
  <input type="hidden" name="nonce" value="{stale}">
  <input type="hidden" name="w_status_D" value="1">
  <input type="submit" value="Claim with a stale nonce">
</form>
<form id="leaked-nonce" method="POST" action="{manager}">
  <input type="hidden" name="b" value="farm">
  <input type="hidden" name="w" value="{member}">
  <input type="hidden" name="nonce" value="{nonce}">
  <input type="hidden" name="w_status_D" value="1">
  <input type="submit" value="Claim with the real nonce">
</form>
</body></html>
"""


def test_a_form_on_a_foreign_origin_submitted_by_the_browser_changes_nothing(
        farm, browser, tmp_path):
    proxy, a, _ = farm
    admin_port = proxy.ports["admin"]
    manager = f"http://127.0.0.1:{admin_port}/balancer-manager"
    before = members(admin_port)
    # the stale nonce: the look of a real one (what an earlier page showed), not this one
    nonce = manager_json(admin_port)["nonce"]
    stale = nonce[::-1] if nonce[::-1] != nonce else "0" * len(nonce)
    site = tmp_path / "site"
    site.mkdir()
    (site / "prize.html").write_text(FOREIGN_PAGE.format(manager=manager, member=a.url,
                                                         stale=stale, nonce=nonce))
    foreign = ForeignSite(site)
    try:
        for form, refusal in (("no-nonce", "nonce: missing"),
                              ("stale-nonce", "nonce: missing"),
                              ("leaked-nonce", (f"Origin: '{foreign.url}' is not a "
                                                "page of this admin host"))):
            browser.get(f"{foreign.url}/prize.html")
            button = wait(browser).until(EC.element_to_be_clickable(
                (By.CSS_SELECTOR, f"form#{form} input[type=submit]")))
            button.click()
            wait(browser).until(EC.staleness_of(button))
            body = wait(browser).until(
                EC.presence_of_element_located((By.TAG_NAME, "body")))
            wait(browser).until(lambda d, body=body: "nothing was changed" in body.text)
            assert browser.current_url == manager, form
            assert refusal in body.text and "nothing was changed" in body.text, \
                (form, body.text)
            assert members(admin_port) == before, form
        screenshot(browser, tmp_path / "refused.png")
    finally:
        foreign.stop()
    assert before == {"a": ("Init Ok", 1.0, ""), "b": ("Init Ok", 1.0, "")}
    assert spread(proxy.port) == Counter(a=6, b=6)
    assert not proxy.log_lines("manager: 127.0.0.1")
