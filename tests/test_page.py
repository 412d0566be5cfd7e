"""The page, clicked through in a real browser, against `launcher.py web=4 worker=1`.

With the SQLite store every form comes back to the page with a line saying which copy did
what, an upload keeps its UTF-8 name, a job's state changes on the page while it runs,
and all twelve tiles of the spread know you. With the memory store the page says where
the login happened and that this copy never heard of it, and most tiles do not know you.
A page of another site that posts forms to ours changes nothing. One Chromium serves the
session (conftest's `browser`, headless, driven by `browser.py`); each test starts its own
launcher (or copy) and opens its own private window.
"""
import http.server
import re
import sys
import threading

import pytest

from browser import find_chromium
from conftest import REPO, Launcher, app_env, free_port

if find_chromium() is None:
    pytest.skip("no chromium on PATH, so the page cannot be tested in a real browser "
                "(install it: apt-get install chromium)", allow_module_level=True)

PROCFILE = f"web: python {REPO / 'webapp.py'}\nworker: python {REPO / 'worker.py'}\n"


@pytest.fixture
def house(spawn, tmp_path):
    """house(store) runs `launcher.py web=4 worker=1` and returns it once all are up."""
    launchers = []

    def start(store: str) -> Launcher:
        (tmp_path / "Procfile").write_text(PROCFILE)
        port = free_port()
        env = app_env(tmp_path, SESSION_STORE=store, POLL_INTERVAL=0.01)
        proc = spawn([sys.executable, str(REPO / "launcher.py"), "--port", str(port),
                      "web=4", "worker=1"], env, cwd=tmp_path)
        launchers.append(Launcher(proc, port))
        launchers[-1].wait_for(" is up on port", 4)
        launchers[-1].wait_for(" ready (pid")
        return launchers[-1]

    yield start
    for launcher in launchers:
        launcher.end()


def submit(page, form: str, **fields: str) -> None:
    """Fill a form of the page and press its button, as a user would; wait for the answer."""
    for name, value in fields.items():
        page.fill(f"{form} input[name='{name}']", value)
    page.click(f"{form} button", navigates=True)


def shown(page, css_selector: str) -> str:
    return page.evaluate(f"document.querySelector({css_selector!r})?.textContent ?? ''")


def jobs_shown(page) -> list[tuple[str, str, str]]:
    """(task, state, result) of each row of "Your jobs", as the page shows them now."""
    return [tuple(row) for row in page.evaluate(
        "[...document.querySelectorAll('#your-jobs tr[data-job]')].map(row => "
        "[row.cells[1].textContent, row.dataset.state, row.cells[4].textContent])")]


def tiles(page) -> list[tuple[str, str]]:
    """(copy, knows) of each tile of the spread, once all twelve are drawn."""
    page.wait_for("document.querySelectorAll('#tiles li').length === 12")
    return [tuple(tile) for tile in page.evaluate(
        "[...document.querySelectorAll('#tiles li')]"
        ".map(tile => [tile.dataset.copy, tile.dataset.knows])")]


def test_with_sqlite_each_form_returns_to_the_page_and_every_copy_knows_you(
        browser, house, tmp_path):
    url = f"http://127.0.0.1:{house('sqlite').port}"
    page = browser.new_page()
    page.goto(url + "/")

    def back_on_the_page_saying(what: str) -> None:
        assert page.evaluate("location.pathname") == "/"  # the news rides in the query
        assert re.fullmatch(rf"web\.\d {what}", shown(page, "#notice")), shown(page, "#notice")

    submit(page, "[action='/login']", name="ada")
    back_on_the_page_saying("logged you in as 'ada', in the sqlite store")
    assert page.evaluate("document.querySelector(\"[action='/login']\").hidden") is True
    submit(page, "[action='/cart']", item="tea")
    back_on_the_page_saying("added 'tea' to your cart, in the sqlite store")
    (tmp_path / "naïve café.txt").write_text("one two three\n")
    page.set_files("input[type=file]", [tmp_path / "naïve café.txt"])
    submit(page, "[action='/uploads']")
    back_on_the_page_saying(r"stored 'naïve café.txt' \(14 bytes\), in the sqlite store")
    assert shown(page, "#uploads a") == "naïve café.txt"
    submit(page, "#uploads form")  # count its words
    back_on_the_page_saying(r"put job \d+ \(wordcount\) in the queue; a worker will take it")
    submit(page, "#enqueue", args='{"seconds": 0.8}')
    back_on_the_page_saying(r"put job \d+ \(sleep\) in the queue; a worker will take it")

    [sleep, _] = jobs_shown(page)  # the newest first; the word count is under it
    assert sleep[:2] in (("sleep", "queued"), ("sleep", "running"))
    page.evaluate("window.notReloaded = true")
    page.wait_for("[...document.querySelectorAll('#your-jobs tr[data-job]')]"
                  ".every(row => row.dataset.state === 'done')")
    assert page.evaluate("window.notReloaded") is True
    assert jobs_shown(page) == [("sleep", "done", '{"slept":0.8}'),
                                ("wordcount", "done", '{"words":3,"lines":1,"bytes":14}')]
    # The same jobs in "The queue" follow along: one page never says done and queued.
    page.wait_for("[...document.querySelectorAll('#queue tr[data-job]')]"
                  ".filter(row => row.cells[1].textContent !== 'heartbeat')"
                  ".every(row => row.dataset.state === 'done')")

    page.evaluate("location.hash = '#spread'")  # typed on the open page: no reload
    drawn = tiles(page)
    assert {knows for _, knows in drawn} == {"yes"}
    assert len({copy for copy, _ in drawn}) == 4


def test_with_memory_the_page_says_where_you_logged_in_and_most_copies_never_heard_of_you(
        browser, house):
    url = f"http://127.0.0.1:{house('memory').port}"
    page = browser.new_page()
    page.goto(url + "/")
    submit(page, "[action='/login']", name="ada")
    login_on = page.evaluate("new URLSearchParams(location.search).get('login_on')")
    served_by = shown(page, ".copy b")
    assert page.evaluate("location.pathname") == "/" and re.fullmatch(r"web\.\d", login_on)
    if served_by == login_on:  # the same copy happened to serve the page after the login
        assert shown(page, "#notice").startswith(f"{login_on} logged you in as 'ada'")
    else:
        assert shown(page, "#notice") == (f"You logged in on {login_on}. This page came from "
                                          f"{served_by}, which has never heard of that login.")

    page.goto(url + "/#spread")  # the panel runs by itself
    drawn = tiles(page)
    knows = [knows for _, knows in drawn]
    assert knows.count("no") >= 6 and knows.count("yes") >= 1
    assert {copy for copy, knows in drawn if knows == "yes"} == {login_on}
    assert len({copy for copy, _ in drawn}) == 4


@pytest.fixture
def other_site():
    """other_site(html) serves `html` at the root of another origin (127.0.0.1 on another
    port: the same site to a browser, but another origin); returns its URL."""
    servers = []

    def serve(page: str) -> str:
        class Page(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.end_headers()
                self.wfile.write(page.encode())

            def log_message(self, *args):
                pass

        servers.append(http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Page))
        threading.Thread(target=servers[-1].serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{servers[-1].server_address[1]}/"

    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()


def auto_submitting(action: str, **fields: str) -> str:
    """A page that posts a form to `action` the moment it loads, as an attacker's would."""
    inputs = "".join(f'<input type="hidden" name="{name}" value="{value}">'
                     for name, value in fields.items())
    return (f'<form method="post" action="{action}">{inputs}</form>'
            f"<script>document.forms[0].submit()</script>")


def test_a_page_of_another_site_can_neither_log_you_out_nor_log_you_in_as_someone_else(
        browser, start_web, other_site):
    web = start_web()
    page = browser.new_page()
    page.goto(web.url + "/")
    submit(page, "[action='/login']", name="ada")

    def session_cookie() -> str:
        [cookie] = page.send("Network.getCookies", {"urls": [web.url + "/"]})["cookies"]
        return cookie["value"]

    sid = session_cookie()
    for attack in (auto_submitting(web.url + "/logout", next="/"),
                   auto_submitting(web.url + "/login", name="mallory", next="/")):
        page.goto(other_site(attack))
        page.wait_for("document.body.textContent.includes('another site')")
        assert page.evaluate("location.origin") == web.url
        assert session_cookie() == sid  # the browser stored no new cookie, nor a deletion
    output = web.proc.output()
    for path in ("/logout", "/login"):
        assert f'"POST {path} HTTP/1.1" 403' in output, output
    page.goto(web.url + "/")
    assert shown(page, "#notice") == "" and "Logged in as ada." in page.evaluate(
        "document.body.textContent")
