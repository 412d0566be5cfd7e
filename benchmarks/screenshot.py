"""Regenerate the README's pictures of the page: docs/page-sqlite.png and docs/page-memory.png.

For each store it starts `launcher.py web=4 worker=1` (the repo's Procfile, so a clock too)
on a free port with a SQLite file of its own, and plays a short visit in headless Chromium,
the way a learner would. With SQLite: log in, add to the cart, upload a file, count its
words, enqueue a sleep, wait for both jobs, add to the cart again (a fresh page shows the
queue up to date), then ask the twelve copies who you are. With memory: log in, then ask
the same. It saves the whole page as a PNG after each visit.

    python benchmarks/screenshot.py

Needs Debian's `chromium`. The driver is the tests' (`tests/browser.py`): standard
library only, DevTools over a pipe.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from bench import (REPO, StartError, app_env, end_leftover_copies, free_port, running,
                   wait_until_served)

sys.path.insert(0, str(REPO / "tests"))  # not a package: the browser driver lives there
from browser import Browser, BrowserError, Page  # noqa: E402

DOCS = REPO / "docs"
WEB_COPIES = 4
ALL_JOBS_ENDED = ("[...document.querySelectorAll('#your-jobs tr[data-job]')]"
                  ".every(row => ['done', 'dead'].includes(row.dataset.state))")
TWELVE_TILES = "document.querySelectorAll('#tiles li').length === 12"


def submit(page: Page, form: str, **fields: str) -> None:
    """Fill a form of the page and press its button; wait for the page it comes back to."""
    for name, value in fields.items():
        page.fill(f"{form} input[name='{name}']", value)
    page.click(f"{form} button", navigates=True)


def shop(page: Page, url: str, workdir: Path) -> None:
    page.goto(url + "/")
    submit(page, "[action='/login']", name="ada")
    submit(page, "[action='/cart']", item="tea")
    upload = workdir / "naïve café.txt"
    upload.write_text("The word count of this file is done by a worker process.\n")
    page.set_files("input[type=file]", [upload])
    submit(page, "[action='/uploads']")
    submit(page, "#uploads form")  # count its words
    submit(page, "#enqueue", args='{"seconds": 1}')
    page.wait_for(ALL_JOBS_ENDED, timeout=20)
    submit(page, "[action='/cart']", item="green tea")
    page.click("#spread")
    page.wait_for(TWELVE_TILES)


def log_in(page: Page, url: str, workdir: Path) -> None:
    page.goto(url + "/")
    submit(page, "[action='/login']", name="ada")
    page.click("#spread")
    page.wait_for(TWELVE_TILES)


def picture(browser: Browser, store: str, visit, workdir: Path) -> Path:
    """Start the house with `store`, play `visit` in a private window, save the page."""
    log, front = workdir / "launcher.log", free_port()
    args = [sys.executable, str(REPO / "launcher.py"), f"web={WEB_COPIES}", "worker=1",
            "--port", str(front), "--procfile", str(REPO / "Procfile")]
    try:
        with running(args, app_env(workdir, store, POLL_INTERVAL=0.1), log) as launcher:
            wait_until_served(front, WEB_COPIES, launcher, log)
            page = browser.new_page()
            visit(page, f"http://127.0.0.1:{front}", workdir)
            return page.screenshot(DOCS / f"page-{store}.png")
    finally:
        end_leftover_copies(log, workdir)


def main() -> int:
    DOCS.mkdir(exist_ok=True)
    try:
        with Browser() as browser:
            for store, visit in (("sqlite", shop), ("memory", log_in)):
                with tempfile.TemporaryDirectory(prefix=f"screenshot-{store}-") as workdir:
                    print(picture(browser, store, visit, Path(workdir)).relative_to(REPO))
    except (BrowserError, StartError) as error:
        print(f"screenshot.py: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
