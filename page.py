"""The page: what the web process shows a browser, and the lesson on it (Factor VI).

Factor VI is easiest to believe when you watch it fail. The terrible day this module
prevents is a quieter one: a copy that has never heard of you starts a new session,
sets a new cookie, and shows an empty cart without a word, so a learner sees the app
"forget" and cannot tell why. Here every action's page says which copy did what, and
when a copy had never heard of the session your browser sent, it says that too.

What just happened rides in the address, not in the session: the copy that did it
redirects to `/?did=cart&by=web.3&item=tea` (`news_address`), and whichever copy serves
the page reads it back (`news_line`). So the news survives a copy that does not know
you (the memory store), a session that is gone (a logout), and the page's GET never
writes a session. Anyone can write an address, so the news is a fixed sentence around
values that are checked and escaped: it can say "web.3 added 'x' to your cart", never
anything else. A login under the memory store also leaves `login_on=web.1`, which the
page's forms carry on, so that a later page can say where your login lives.

`render_page` fills `page.html` (a string.Template) and escapes every value itself; the
routes that use it are in `webapp.py`.
"""
from __future__ import annotations

import html
import json
import os
import re
import urllib.parse
from pathlib import Path
from string import Template

from session_store import UploadInfo
from tasks import TASKS
from web_input import MAX_FIELD_CHARS, printable

PAGE = Template(Path(__file__).with_name("page.html").read_text(encoding="utf-8"))
COPY_NAME = re.compile(r"[A-Za-z0-9_.-]{1,40}")  # web.3, a.web.3
NUMBER = re.compile(r"[0-9]{1,18}")

# What a copy did (`did=`), as the page says it: {by} is a copy's name, the others are
# values from the address, checked against CHECKS and escaped before they are put in.
NEWS = {
    "login": "{by} logged you in as '{name}', in the {store} store",
    "cart": "{by} added '{item}' to your cart, in the {store} store",
    "upload": "{by} stored '{file}' ({size} bytes), in the {store} store",
    "job": "{by} put job {job} ({task}) in the queue; a worker will take it",
}


def words(value: str) -> bool:
    """A name, an item, a file's name or a task, as a copy could have stored it: printable
    (no right-to-left override), at most 200 characters."""
    return 0 < len(value) <= MAX_FIELD_CHARS and printable(value) == value


CHECKS = {"by": COPY_NAME.fullmatch, "login_on": COPY_NAME.fullmatch, "name": words,
          "item": words, "file": words, "task": words, "size": NUMBER.fullmatch,
          "job": NUMBER.fullmatch}
STARTED_FOR = {"cart": "'{item}'", "upload": "'{file}'", "job": "job {job}"}


def with_query(path: str, **params: str) -> str:
    """`path` with `params` added to its query string, escaped."""
    parts = urllib.parse.urlsplit(path)
    query = urllib.parse.parse_qsl(parts.query) + list(params.items())
    return urllib.parse.urlunsplit(("", "", parts.path, urllib.parse.urlencode(query),
                                    parts.fragment))


def news_address(back: str, did: str, by: str, unknown: bool, **values: object) -> str:
    """Where a form from the page returns: `back`, with what `by` did. `unknown`: the
    session the browser sent was news to `by`, so it started a new one."""
    news = {"did": did, "by": by, **{name: str(value) for name, value in values.items()}}
    if unknown:
        news["new"] = "1"
    return with_query(back, **news)


def forms_return_to(query: dict) -> str:
    """The `next` of the page's forms: the page again, keeping where the login lives."""
    login_on = query.get("login_on", "")
    return with_query("/", login_on=login_on) if COPY_NAME.fullmatch(login_on) else "/"


def news_line(query: dict, dyno: str, store_kind: str, stranger: bool) -> str:
    """The one line saying what just happened, or "", from the address. `stranger`: this
    copy has never heard of the session the browser sent."""
    values = {name: html.escape(value) for name, value in query.items()
              if name in CHECKS and CHECKS[name](value)}
    if "size" in values:
        values["size"] = f"{int(values['size']):,}"
    did, login_on = query.get("did"), values.get("login_on")
    if did == "logout" and "by" in values:
        line = f"{values['by']} logged you out: your session is gone."
    elif did in (None, "login") and stranger and login_on not in (None, html.escape(dyno)):
        line = (f"You logged in on <b>{login_on}</b>. This page came from "
                f"<b>{html.escape(dyno)}</b>, which has never heard of that login.")
    elif did in NEWS:
        line = news_sentence(did, values, store_kind, unknown=query.get("new") == "1")
    else:
        line = ""
    return f'<p class="notice" id="notice">{line}</p>\n' if line else ""


def news_sentence(did: str, values: dict, store_kind: str, unknown: bool) -> str:
    """NEWS[did] filled in; "" when the address lacks a value it needs, or holds one that
    failed its check. `unknown`: the copy that did it had never heard of you."""
    try:
        if not (unknown and did in STARTED_FOR):
            return NEWS[did].format(**values, store=store_kind)
        line = (f"{values['by']} had never heard of you, so it started a new session for "
                f"{STARTED_FOR[did].format(**values)}")
    except KeyError:
        return ""
    if values.get("login_on", values["by"]) != values["by"]:
        line += f"; your login lives on {values['login_on']}"
    return line


def stranger_notice(store_kind: str, dyno: str) -> str:
    """The lesson, said plainly, when the browser's session is unknown to this copy."""
    dyno = html.escape(dyno)
    if store_kind == "memory":
        why = (f"With <code>SESSION_STORE=memory</code> each process keeps its own sessions "
               f"in its own memory: the copy that knows you is another one, and {dyno} "
               f"cannot see into it. This is the failure Factor VI prevents.")
    else:
        why = "It has expired or was ended by a logout."
    return (f'<p class="warn">Your browser sent a session cookie, but this process '
            f'({dyno}) has never heard of that session. {why}</p>\n')


def render_page(*, session: dict, dyno: str, store_kind: str, query: dict, stranger: bool,
                uploads: list[UploadInfo], own_jobs: list[dict], queue: list[dict]) -> str:
    """The page, every value escaped here. Keyword-only: eight arguments, three of them
    lists, are easy to pass in the wrong order and hard to see passed so."""
    esc = html.escape
    user = session["user"]
    if user:
        who = f"Logged in as <b>{esc(user)}</b>."
    else:
        who = f"Not logged in, as far as {esc(dyno)} knows." if stranger else "Not logged in."
    back = esc(forms_return_to(query))
    return PAGE.substitute(
        dyno=esc(dyno), pid=os.getpid(), store=esc(store_kind), next=back,
        notice=news_line(query, dyno, store_kind, stranger),
        stranger=stranger_notice(store_kind, dyno) if stranger else "",
        who=who, login_hidden="hidden" if user else "", logout_hidden="" if user else "hidden",
        cart="".join(f"<li>{esc(item)}</li>" for item in session["cart"]) or "<li>empty</li>",
        uploads="".join(upload_row(upload, back) for upload in uploads),
        own_jobs="".join(job_row(job, own=True) for job in own_jobs),
        queue="".join(job_row(job, own=False) for job in queue),
        tasks=esc(", ".join(sorted(TASKS))))


def upload_row(upload: UploadInfo, back: str) -> str:
    """An upload by name, size and type, with a link and a button to count its words."""
    esc = html.escape
    args = esc(json.dumps({"upload": upload.id}))
    return (f'<tr><td><a href="/uploads/{esc(upload.id)}">{esc(upload.filename)}</a></td>'
            f'<td>{upload.size:,} bytes</td><td>{esc(upload.content_type)}</td>'
            f'<td><form method="post" action="/jobs"><input type="hidden" name="next" '
            f'value="{back}"><input type="hidden" name="task" value="wordcount">'
            f'<input type="hidden" name="args" value="{args}">'
            f'<button>count its words</button></form></td></tr>\n')


def job_row(job: dict, own: bool) -> str:
    """A job, in "Your jobs" (with its outcome) or "The queue" (with its worker). The
    page's script keeps both up to date while the job runs, found by `data-job`."""
    esc = html.escape
    last = (f'<td class="result">{esc(job_outcome(job))}</td>' if own
            else f'<td class="worker">{esc(job["worker"] or "")}</td>')
    return (f'<tr data-job="{job["id"]}" data-state="{esc(job["state"])}">'
            f'<td><a href="/jobs/{job["id"]}">{job["id"]}</a></td><td>{esc(job["task"])}</td>'
            f'<td class="state">{esc(job["state"])}</td>'
            f'<td class="attempts">{job["attempts"]}</td>{last}</tr>\n')


def job_outcome(job: dict) -> str:
    """A done job's result, any other's error: as the page's script shows them."""
    if job["state"] == "done":
        return json.dumps(job["result"], ensure_ascii=False, separators=(",", ":"))
    return job["error"] or ""
