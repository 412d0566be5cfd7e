"""Drive a real headless Chromium from a test, with nothing but the standard library.

The page tests click through the app the way a learner does: open the page, fill a form,
press its button, watch a job's state change. Only a real browser runs the page's
JavaScript, follows its redirects and posts its forms as they are, so these tests start
Debian's `chromium` and steer it. pytest stays the only test dependency: this module is
the whole driver, and it is small on purpose. It is not a general automation library; it
does what the tests need and says clearly what went wrong.

How it talks to the browser
---------------------------
Started with `--remote-debugging-pipe`, Chromium speaks the DevTools protocol over two
pipes: it reads commands on its file descriptor 3 and writes replies and events to its
descriptor 4. Each message is one JSON object followed by a NUL byte. A command is
`{"id": 7, "method": "Page.navigate", "params": {...}, "sessionId": "..."}`; its reply
carries the same id and a "result" (or an "error"). Events carry a "method" and no id, and
they arrive whenever they happen, also while we wait for a reply, even before the reply
to the command that caused them: `Browser` keeps them until a page asks for one. Every
read and write has a deadline, and a closed pipe means Chromium is gone: the caller gets
an error with Chromium's exit code and the last lines of its log, never a hang.

Getting the pipes to descriptors 3 and 4
----------------------------------------
`os.pipe()` returns whatever descriptors are free, marked close-on-exec, so the child's
ends must be moved to 3 and 4 in the child, between fork and exec. `preexec_fn` could call
`os.dup2` there, but it runs Python in a forked copy of a process that has threads (the
test's web server), which the `subprocess` docs call unsafe; `pass_fds` keeps descriptors
open but cannot renumber them. Instead the child's ends go in as its stdin and stdout,
which `subprocess` places safely itself, and a one-line shell moves them:
`exec chromium ... 3<&0 4>&1 </dev/null >/dev/null`. `exec` replaces the shell, so the
process we started is Chromium itself (Debian's `chromium` is a script that ends in `exec`
too). Our own ends stay close-on-exec, so
Chromium holds no copy of them: when this process dies, even by SIGKILL, Chromium reads
end-of-file on descriptor 3 and exits by itself.

Sessions
--------
The browser is one connection; each tab is a target. `new_page()` creates a target and
attaches to it with `flatten: true`, which makes the tab's commands and events travel on
the same pipe, tagged with a `sessionId`. `Page` adds that id to everything it sends.

Ending
------
`Browser` is a context manager. `close()` sends SIGTERM, waits a few seconds, then
SIGKILLs the whole process group (the renderers and the GPU process are Chromium's
children, started in the group it leads), and removes the temporary directory that held
the profile, the log, and the HOME and TMPDIR Chromium was given, so nothing of it is left
in the real ones. Only the crash reporter starts a session of its own; it watches the
browser and ends with it. (Its switch, `--disable-crashpad-for-testing`, makes the network
service crash here.)
"""
from __future__ import annotations

import base64
import itertools
import json
import os
import select
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

TIMEOUT = 10.0  # seconds for any one answer from the browser
START_TIMEOUT = 30.0  # the first answer: a cold start on a busy two-core machine is slow
STOP_GRACE = 5.0  # seconds between SIGTERM and SIGKILL
POLL_INTERVAL = 0.01  # seconds between two evaluations in wait_for: each is one message
EVENTS_KEPT = 1000  # events nobody asked for are dropped beyond this, oldest first
WINDOW_SIZE = (1000, 1400)


class BrowserError(Exception):
    """Chromium died, did not answer in time, or could not do what was asked."""


class CommandError(BrowserError):
    """Chromium answered a command with an error (e.g. no page is loaded at this instant)."""


class JavaScriptError(BrowserError):
    """The page's JavaScript threw an exception (or a promise it returned was rejected)."""


def find_chromium() -> str | None:
    """The path of a Chromium (or Chrome) on PATH, or None."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def chromium_flags(directory: Path) -> list[str]:
    flags = [
        "--headless",
        "--remote-debugging-pipe",
        "--disable-gpu",
        f"--user-data-dir={directory / 'profile'}",
        "--no-first-run",
        f"--window-size={WINDOW_SIZE[0]},{WINDOW_SIZE[1]}",
        "--hide-scrollbars",  # screenshots show the page, not the scrollbar
        # Containers give /dev/shm 64 MB, and Chromium crashes when it fills: use /tmp.
        "--disable-dev-shm-usage",
    ]
    if os.geteuid() == 0:
        # Chromium's sandbox is built for an unprivileged user and refuses to start as root
        # (as in CI containers). The pages we open are our own; as any other user, keep it.
        flags.append("--no-sandbox")
    return flags


class Browser:
    """One headless Chromium, started at once; use it in a `with` block or call close()."""

    def __init__(self, executable: str | None = None):
        self.directory = Path(tempfile.mkdtemp(prefix="browser-"))
        self.process: subprocess.Popen | None = None
        self.to_browser: int | None = None
        self.from_browser: int | None = None
        self.unread = b""
        self.events: list[dict] = []
        self.ids = itertools.count(1)
        try:
            self.start(executable or find_chromium())
            self.send("Browser.getVersion", timeout=START_TIMEOUT)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def start(self, executable: str | None) -> None:
        if executable is None:
            raise BrowserError("no chromium on PATH (install it: apt-get install chromium)")
        commands_end, self.to_browser = os.pipe()
        self.from_browser, answers_end = os.pipe()
        os.set_blocking(self.to_browser, False)  # so that a write, too, can have a deadline
        # Everything Chromium writes goes below our directory, which close() removes. It
        # leaves a folder in TMPDIR behind each time it ends, and it uses HOME for the rest.
        home, scratch = self.directory / "home", self.directory / "tmp"
        scratch.mkdir()
        env = dict(os.environ, HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"),
                   XDG_CACHE_HOME=str(home / ".cache"), TMPDIR=str(scratch))
        move_pipes = 'exec "$0" "$@" 3<&0 4>&1 </dev/null >/dev/null'
        try:
            with open(self.directory / "chromium.log", "wb") as log:
                self.process = subprocess.Popen(
                    ["/bin/sh", "-c", move_pipes, executable, *chromium_flags(self.directory)],
                    stdin=commands_end, stdout=answers_end, stderr=log, env=env,
                    start_new_session=True)
        finally:
            # Chromium has its own copies now. Holding ours would hide its death: the
            # answers pipe would never reach end-of-file while we could still write to it.
            os.close(commands_end)
            os.close(answers_end)

    def new_page(self) -> Page:
        """A new tab showing about:blank, in a browser context of its own: like a private
        window, it has its own cookies and storage, so no test inherits another's login."""
        context = self.send("Target.createBrowserContext")["browserContextId"]
        target = self.send("Target.createTarget",
                           {"url": "about:blank", "browserContextId": context})["targetId"]
        session_id = self.send("Target.attachToTarget",
                               {"targetId": target, "flatten": True})["sessionId"]
        self.send("Page.enable", session_id=session_id)  # without it, no load events
        return Page(self, session_id)

    def send(self, method: str, params: dict | None = None, session_id: str | None = None,
             timeout: float = TIMEOUT) -> dict:
        """Send one command and return its result, keeping the events that arrive meanwhile."""
        command_id = next(self.ids)
        message = {"id": command_id, "method": method, "params": params or {}}
        if session_id:
            message["sessionId"] = session_id
        deadline = time.monotonic() + timeout
        what = f"the answer to {method}"
        self.write(json.dumps(message).encode() + b"\0", deadline, what)
        while True:
            reply = self.read_message(deadline, what)
            if reply.get("id") == command_id:
                break
            self.keep(reply)
        if "error" in reply:
            raise CommandError(f"{method} failed: {reply['error'].get('message')}")
        return reply["result"]

    def wait_for_event(self, method: str, session_id: str, timeout: float = TIMEOUT) -> dict:
        """The parameters of the first `method` event of this session, kept or still to come."""
        for event in self.events:
            if is_event(event, method, session_id):
                self.events.remove(event)
                return event.get("params", {})
        deadline = time.monotonic() + timeout
        while True:
            message = self.read_message(deadline, f"the event {method}")
            if is_event(message, method, session_id):
                return message.get("params", {})
            self.keep(message)

    def forget_events(self, method: str, session_id: str) -> None:
        """Drop kept `method` events, so that the next wait sees only a new one."""
        self.events = [event for event in self.events
                       if not is_event(event, method, session_id)]

    def keep(self, message: dict) -> None:
        if "id" not in message:  # an event; a late reply to a command that timed out is dropped
            self.events.append(message)
            del self.events[:-EVENTS_KEPT]

    def write(self, data: bytes, deadline: float, what: str) -> None:
        while data:
            self.wait_for_pipe(self.to_browser, select.POLLOUT, deadline, what)
            try:
                written = os.write(self.to_browser, data)
            except BrokenPipeError:
                raise self.gone(what) from None
            data = data[written:]

    def read_message(self, deadline: float, what: str) -> dict:
        while b"\0" not in self.unread:
            self.wait_for_pipe(self.from_browser, select.POLLIN, deadline, what)
            chunk = os.read(self.from_browser, 1 << 16)
            if not chunk:
                raise self.gone(what)
            self.unread += chunk
        message, self.unread = self.unread.split(b"\0", 1)
        return json.loads(message)

    def wait_for_pipe(self, fd: int, event: int, deadline: float, what: str) -> None:
        # poll, not select: select fails outright on descriptors numbered 1024 and above.
        pipe = select.poll()
        pipe.register(fd, event)
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not pipe.poll(remaining * 1000):
            raise BrowserError(f"chromium did not send {what} in time "
                               f"(it is still running, pid {self.process.pid})")

    def gone(self, what: str) -> BrowserError:
        """The error for a pipe that closed: Chromium exited (or is exiting)."""
        try:
            code = self.process.wait(STOP_GRACE)
        except subprocess.TimeoutExpired:
            code = "unknown, still exiting"
        log = (self.directory / "chromium.log").read_text(errors="replace")
        last_lines = "\n".join(log.splitlines()[-10:])
        return BrowserError(f"chromium exited (code {code}) while we waited for {what}; "
                            f"the end of its log:\n{last_lines}")

    def close(self) -> None:
        """End Chromium and every process it started, and remove its files. Safe to repeat."""
        if self.process is not None:
            end_process_group(self.process)
        for fd in (self.to_browser, self.from_browser):
            if fd is not None:
                os.close(fd)
        self.to_browser = self.from_browser = None
        shutil.rmtree(self.directory, ignore_errors=True)


def is_event(message: dict, method: str, session_id: str) -> bool:
    return message.get("method") == method and message.get("sessionId") == session_id


def end_process_group(process: subprocess.Popen) -> None:
    """SIGTERM, a grace period, then SIGKILL for the whole group: nothing survives."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(STOP_GRACE)
        except subprocess.TimeoutExpired:
            pass
    # A helper can outlive the browser (or the browser itself ignored SIGTERM).
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    process.wait()


class Page:
    """One tab. Every method waits for its answer, with a deadline."""

    def __init__(self, browser: Browser, session_id: str):
        self.browser = browser
        self.session_id = session_id

    def send(self, method: str, params: dict | None = None, timeout: float = TIMEOUT) -> dict:
        return self.browser.send(method, params, self.session_id, timeout)

    def goto(self, url: str, timeout: float = TIMEOUT) -> None:
        """Open `url` and wait for its load event.

        As in a browser, a URL that differs from the current one only after `#` does not
        load a new document, so there is no load event to wait for: the call returns at once.
        """
        self.browser.forget_events("Page.loadEventFired", self.session_id)
        result = self.send("Page.navigate", {"url": url}, timeout)
        if "errorText" in result:
            raise BrowserError(f"could not open {url}: {result['errorText']}")
        if "loaderId" in result:  # absent exactly when the document stays the same
            self.wait_for_load(timeout)

    def wait_for_load(self, timeout: float = TIMEOUT) -> None:
        self.browser.wait_for_event("Page.loadEventFired", self.session_id, timeout)

    def evaluate(self, js: str, timeout: float = TIMEOUT):
        """The value of a JavaScript expression, as JSON turns it into Python.

        A promise is awaited. An exception in the page raises JavaScriptError with its message.
        """
        result = self.send("Runtime.evaluate", {"expression": js, "returnByValue": True,
                                                "awaitPromise": True}, timeout)
        if "exceptionDetails" in result:
            raise JavaScriptError(f"{js} threw {exception_message(result['exceptionDetails'])}")
        return result["result"].get("value")  # undefined has no value: None

    def wait_for(self, js_expr: str, timeout: float = TIMEOUT):
        """Evaluate `js_expr` until its value is truthy and return it.

        Truthy in Python's sense: an empty list or string keeps waiting, as `0` and `null` do.
        An expression that throws counts as "not yet" (the element may not exist yet, or a
        new page may be loading). At the deadline, the error names the expression.
        """
        deadline = time.monotonic() + timeout
        last_error = None
        while True:
            try:
                value = self.evaluate(js_expr)
            except (JavaScriptError, CommandError) as error:
                value, last_error = None, error
            if value:
                return value
            if time.monotonic() > deadline:
                because = f" (last error: {last_error})" if last_error else ""
                raise BrowserError(f"timed out after {timeout}s waiting for {js_expr}{because}")
            time.sleep(POLL_INTERVAL)

    def click(self, css_selector: str, navigates: bool = False, timeout: float = TIMEOUT) -> None:
        """Click the first element matching the selector (`element.click()` in the page).

        The page's handlers run and a form's button submits its form; unlike a mouse, it
        also reaches an element that is hidden or covered.

        navigates=True: the click opens a new page (a form's button, a link); wait until it
        has loaded, so that what the test reads next is the new page, not the old one.
        """
        if navigates:
            self.browser.forget_events("Page.loadEventFired", self.session_id)
        self.on_element(css_selector, "element.click();")
        if navigates:
            self.wait_for_load(timeout)

    def fill(self, css_selector: str, value: str) -> None:
        """Set an input's value and fire the events typing would fire."""
        self.on_element(css_selector, """
            element.value = value;
            element.dispatchEvent(new Event("input", {bubbles: true}));
            element.dispatchEvent(new Event("change", {bubbles: true}));""", value)

    def on_element(self, css_selector: str, action_js: str, value=None) -> None:
        """Run `action_js` with `element` (the first match) and `value` defined."""
        arguments = json.dumps({"selector": css_selector, "value": value})
        found = self.evaluate(f"""(({{selector, value}}) => {{
            const element = document.querySelector(selector);
            if (!element) return false;
            {action_js}
            return true;
        }})({arguments})""")
        if not found:
            raise BrowserError(f"no element matches {css_selector}")

    def set_files(self, css_selector: str, paths: list) -> None:
        """Choose files in an <input type=file>, as the file dialog would."""
        document = self.send("DOM.getDocument", {"depth": 0})["root"]["nodeId"]
        node = self.send("DOM.querySelector",
                         {"nodeId": document, "selector": css_selector})["nodeId"]
        if not node:
            raise BrowserError(f"no element matches {css_selector}")
        files = [str(Path(path).resolve()) for path in paths]
        self.send("DOM.setFileInputFiles", {"nodeId": node, "files": files})

    def screenshot(self, path) -> Path:
        """Save a PNG of the whole page, also the part below the window; returns the path."""
        size = self.send("Page.getLayoutMetrics")["cssContentSize"]
        clip = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
        shot = self.send("Page.captureScreenshot",
                         {"format": "png", "clip": clip, "captureBeyondViewport": True})
        path = Path(path)
        path.write_bytes(base64.b64decode(shot["data"]))
        return path


def exception_message(details: dict) -> str:
    """The first line of what the page threw ("TypeError: ..."), as the console shows it."""
    exception = details.get("exception", {})
    if "description" in exception:  # an Error object, with its stack after the first line
        return exception["description"].splitlines()[0]
    if "value" in exception:  # a plain value: throw "text"
        return json.dumps(exception["value"])
    return details.get("text", "an exception")
