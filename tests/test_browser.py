"""The browser harness (tests/browser.py) itself, against a tiny site served by this test.

The page tests trust the harness to click, post and upload as a browser does; these tests
show it does, on a page small enough that a failure can only be the harness's. One Chromium
serves the session (conftest's `browser`); the tests that end a browser start their own.
"""
import email.parser
import email.policy
import html
import os
import signal
import struct
import subprocess
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from browser import TIMEOUT, Browser, BrowserError, JavaScriptError, find_chromium
from conftest import free_port, wait_until

if find_chromium() is None:
    pytest.skip("no chromium on PATH, so no real browser to test with "
                "(install it: apt-get install chromium)", allow_module_level=True)

PAGE = """<!doctype html>
<title>harness</title>
<p id="count">0 clicks</p>
<button id="more" value="0" onclick="this.value++;
  document.getElementById('count').textContent = this.value + ' clicks'">More</button>
<form method="post" action="/greet">
  <input name="name" oninput="document.getElementById('echo').textContent = this.value">
  <button id="greet">Greet</button>
</form>
<p id="echo"></p>
<form method="post" action="/upload" enctype="multipart/form-data">
  <input type="file" name="file"> <button id="send">Send</button>
</form>
<div style="height: 2000px">Tall, so that the whole page is taller than the window.</div>
"""


@dataclass
class Site:
    url: str
    uploads: list = field(default_factory=list)  # (filename, bytes) of each file received


class TinySite(BaseHTTPRequestHandler):
    """The page above; a form post answered by a redirect, as the app does; an upload."""

    def do_GET(self):
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
        if "name" in query:
            self.answer(f"<p id='greeting'>Hello, {html.escape(query['name'][0])}</p>")
        else:
            self.answer(PAGE)

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.path == "/greet":
            name = urllib.parse.parse_qs(body.decode())["name"][0]
            self.send_response(303)
            self.send_header("Location", "/greeting?" + urllib.parse.urlencode({"name": name}))
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            part = first_part(body, self.headers["Content-Type"])
            self.server.site.uploads.append((part.get_filename(), part.get_payload(decode=True)))
            self.answer(f"<p id='received'>{html.escape(part.get_filename())}</p>")

    def answer(self, page: str) -> None:
        body = page.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass  # the test's output is for the test


def first_part(body: bytes, content_type: str):
    """The first part of a multipart/form-data body (the email parser reads MIME)."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    return next(message.iter_parts())


@pytest.fixture(scope="module")
def site():
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), TinySite)
    server.site = Site(f"http://127.0.0.1:{server.server_port}")
    # shutdown() waits for serve_forever to notice, which it does once per poll_interval
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    yield server.site
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture(scope="module")
def tab(browser):
    return browser.new_page()


@pytest.fixture
def page(tab, site):
    """The module's one tab (a new one takes a second on a busy machine), freshly loaded."""
    tab.goto(site.url + "/")
    return tab


def chromium_processes(browser: Browser) -> list[str]:
    """The live processes of this browser: each names its profile in its command line."""
    listing = subprocess.run(["ps", "-A", "-ww", "-o", "stat=,args="], capture_output=True,
                             text=True, check=True).stdout
    return [line for line in listing.splitlines()
            if str(browser.directory) in line and not line.startswith("Z")]


def wait_until_all_ended(browser: Browser) -> None:
    # A SIGKILL takes a moment to land, and the crash reporter ends after the browser.
    wait_until(lambda: not chromium_processes(browser), timeout=5,
               what=f"every process of the browser to end: {chromium_processes(browser)}")


def test_goto_loads_the_page_and_evaluate_reads_it(page, site):
    assert page.evaluate("document.title") == "harness"
    assert page.evaluate("location.href") == site.url + "/"
    promise = "new Promise(done => setTimeout(() => done([1, 'two']), 50))"
    assert page.evaluate(promise) == [1, "two"]


def test_evaluate_raises_what_the_page_threw(page):
    with pytest.raises(JavaScriptError, match="TypeError: Cannot read properties of null"):
        page.evaluate("document.querySelector('#missing').textContent")


def test_click_runs_the_pages_own_handler(page):
    page.click("#more")
    page.click("#more")
    assert page.evaluate("document.querySelector('#count').textContent") == "2 clicks"


def test_click_on_nothing_names_the_selector(page):
    with pytest.raises(BrowserError, match="no element matches #nowhere"):
        page.click("#nowhere")


def test_a_filled_form_is_posted_and_the_page_it_redirects_to_is_loaded(page, site):
    page.fill("input[name=name]", "Zoë & co")
    assert page.evaluate("document.querySelector('#echo').textContent") == "Zoë & co"  # heard
    page.click("#greet", navigates=True)
    assert page.evaluate("location.pathname") == "/greeting"
    assert page.evaluate("document.querySelector('#greeting').textContent") == "Hello, Zoë & co"


def test_set_files_uploads_the_files_bytes_and_name(page, site, tmp_path):
    data = bytes(range(256)) * 8  # every byte value, NUL and invalid UTF-8 included
    (tmp_path / "notes.bin").write_bytes(data)
    page.set_files("input[type=file]", [tmp_path / "notes.bin"])
    page.click("#send", navigates=True)
    assert site.uploads[-1] == ("notes.bin", data)
    assert page.evaluate("document.querySelector('#received').textContent") == "notes.bin"


def test_wait_for_sees_a_change_made_later_without_a_reload(page):
    page.evaluate("setTimeout(() => document.body.insertAdjacentHTML("
                  "'beforeend', '<p id=late>done</p>'), 100)")
    # Until then the expression throws (no #late yet): that counts as "not yet".
    assert page.wait_for("document.querySelector('#late').textContent") == "done"
    assert page.evaluate("document.querySelector('#count') !== null")  # the same document


def test_events_that_arrive_before_a_reply_are_kept_for_later(browser, page):
    page.evaluate("history.pushState(null, '', '/pushed')")  # fires its event meanwhile
    event = browser.wait_for_event("Page.navigatedWithinDocument", page.session_id, timeout=1)
    assert event["url"].endswith("/pushed")


def test_wait_for_names_the_expression_when_time_runs_out(page):
    started = time.monotonic()
    with pytest.raises(BrowserError, match=r"waiting for window\.neverSet"):
        page.wait_for("window.neverSet", timeout=0.3)
    assert time.monotonic() - started < 2


def test_each_page_has_cookies_of_its_own(browser, page, site):
    page.evaluate("document.cookie = 'sid=first-page'")
    assert page.evaluate("document.cookie") == "sid=first-page"
    other = browser.new_page()
    other.goto(site.url + "/")
    assert other.evaluate("document.cookie") == ""


def test_screenshot_is_a_png_of_the_whole_page(page, tmp_path):
    png = page.screenshot(tmp_path / "page.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    width, height = struct.unpack(">II", png[16:24])  # the IHDR chunk comes first
    assert width == 1000
    assert height > 2000  # more than the 1400-pixel window: the part below it is there too
    assert len(png) > 5000


def test_close_ends_every_chromium_process_and_leaves_no_file(site, tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # where Chromium would leave a folder
    with Browser() as browser:
        browser.new_page().goto(site.url + "/")
        assert len(chromium_processes(browser)) >= 3  # the browser, a renderer, the GPU process
    wait_until_all_ended(browser)
    assert not browser.directory.exists()
    assert list(tmp_path.iterdir()) == []


def test_a_dead_browser_is_an_error_at_once_not_a_hang():
    with Browser() as browser:
        page = browser.new_page()
        os.kill(browser.process.pid, signal.SIGKILL)
        started = time.monotonic()
        with pytest.raises(BrowserError, match=r"chromium exited \(code -9\)"):
            page.evaluate("1 + 1")
        assert time.monotonic() - started < TIMEOUT / 2  # seen as end-of-file, not a timeout
    wait_until_all_ended(browser)


def test_find_chromium_looks_on_path(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert find_chromium() is None
    chrome = tmp_path / "google-chrome"
    chrome.write_text("#!/bin/sh\n")
    chrome.chmod(0o755)
    assert find_chromium() == str(chrome)
