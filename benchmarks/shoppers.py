"""The drill's simulated users: they shop, and afterwards look at what they find (VI).

Factor VI is a promise to users, so the drill checks it as they would. Each `User` is a
browser in a thread (`browse`): it logs in, keeps whatever cookie it is given, and adds
unique items to its cart, now and then uploading a file or enqueueing a short job. It
remembers what the app promised it, that is, what was answered with a redirect (303): the
items, the uploads' bytes, the jobs' ids and the host that took each. A request that got
no answer, or an error, is a `Failure`, with when it was in flight, for the drill to
explain or not. Afterwards `check_user` asks, as the user would, whether the session and
its cart are intact and every upload comes back byte for byte.

It knows nothing of the chaos, which is `drill.py`'s.
"""
from __future__ import annotations

import http.client
import json
import random
import secrets
import threading
import time
import urllib.parse
from dataclasses import dataclass, field

from bench import FORM, HOST, exchange, session_cookie

THINK = (0.01, 0.05)     # a user's pause between two requests, in seconds
UPLOAD_SHARE, JOB_SHARE = 0.03, 0.02  # of a user's requests; the others add to the cart
BOUNDARY = "drill-boundary"

Address = tuple[str, int]


@dataclass(frozen=True)
class Failure:
    """A request with no answer, or an error status, and when it was in flight."""
    what: str      # "POST /cart"
    began: float   # time.monotonic()
    ended: float
    error: str     # "ConnectionResetError", "HTTP 503"


@dataclass
class User:
    """One simulated browser: its cookie, and what the app promised it (answered 303)."""
    name: str
    cookie: str | None = None
    sent: int = 0
    failures: list[Failure] = field(default_factory=list)
    items: list[str] = field(default_factory=list)  # every item it tried to add, in order
    added: set[str] = field(default_factory=set)    # ... and those whose POST was answered
    uploads: dict[str, bytes] = field(default_factory=dict)  # answered: upload id -> bytes
    jobs: list[tuple[str, int]] = field(default_factory=list)  # answered: (host, job id)

    def post(self, port: int, path: str, body: bytes,
             content_type: str = FORM) -> http.client.HTTPResponse | None:
        """POST as a browser would; the 303 response, or None (a recorded failure)."""
        self.sent += 1
        began = time.monotonic()
        try:
            response, _ = exchange(port, path, body, content_type, self.cookie)
            self.cookie = session_cookie(response, self.cookie)
            error = None if response.status == 303 else f"HTTP {response.status}"
        except (OSError, http.client.HTTPException) as exception:
            error = type(exception).__name__
        if error:
            self.failures.append(Failure(f"POST {path}", began, time.monotonic(), error))
            return None
        return response


# --- Shopping ---------------------------------------------------------------------------

def form(**fields: str) -> bytes:
    return urllib.parse.urlencode(fields).encode()


def browse(user: User, port: int, deadline: float, stop: threading.Event) -> None:
    """Log in, then shop until the deadline: cart items, now and then an upload or a job."""
    while not stop.wait(random.uniform(*THINK)) and time.monotonic() < deadline:
        roll = random.random()
        if user.cookie is None:  # not logged in yet: a failed login is simply tried again
            user.post(port, "/login", form(name=user.name))
        elif roll < UPLOAD_SHARE:
            upload_file(user, port)
        elif roll < UPLOAD_SHARE + JOB_SHARE:
            enqueue_job(user, port)
        else:
            add_item(user, port)


def add_item(user: User, port: int) -> None:
    item = f"{user.name}-item-{len(user.items) + 1}"
    user.items.append(item)
    if user.post(port, "/cart", form(item=item)) is not None:
        user.added.add(item)


def upload_file(user: User, port: int) -> None:
    data = f"{user.name}'s upload {len(user.uploads) + 1}: {secrets.token_hex(16)}\n".encode()
    body = (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; '
            f'filename="note.txt"\r\nContent-Type: text/plain\r\n\r\n').encode()
    body += data + f"\r\n--{BOUNDARY}--\r\n".encode()
    response = user.post(port, "/uploads", body, f"multipart/form-data; boundary={BOUNDARY}")
    if response is not None:
        user.uploads[response.getheader("Location").rsplit("/", 1)[1]] = data


def enqueue_job(user: User, port: int) -> None:
    args = json.dumps({"seconds": round(random.uniform(0.2, 0.5), 2)})
    response = user.post(port, "/jobs", form(task="sleep", args=args))
    if response is not None:
        job_id = int(response.getheader("Location").rsplit("/", 1)[1])
        user.jobs.append((host_of(response.getheader("X-Served-By")), job_id))


def host_of(copy: str) -> str:
    """The host a copy runs on: "a" for a.web.1, "" for web.1 (one launcher, no name)."""
    return copy.split(".")[0] if copy.count(".") == 2 else ""


# --- What they find afterwards ----------------------------------------------------------

def fetch_json(address: Address, path: str, cookie: str | None = None) -> object:
    """GET a JSON answer. After the chaos, anything but a 200 is a fault: it ends the drill."""
    response, body = exchange(address[1], path, cookie=cookie, host=address[0])
    if response.status != 200:
        raise RuntimeError(f"GET {path} answered {response.status} after the chaos: {body!r}")
    return json.loads(body)


def cart_intact(cart: list[str], user: User) -> bool:
    """Every answered item, in the order sent, each once; an item whose POST failed may
    be there or not."""
    sent_at = {item: number for number, item in enumerate(user.items)}
    places = [sent_at.get(item, -1) for item in cart]
    # Strictly increasing places: nothing unknown (-1), no item twice, the order sent.
    return -1 not in places and places == sorted(set(places)) and user.added <= set(cart)


def check_user(user: User, port: int) -> tuple[bool, int]:
    """(is the session lost?, how many uploads are lost), as the user would find them."""
    session = fetch_json((HOST, port), "/session", user.cookie)
    session_lost = session["user"] != user.name or not cart_intact(session["cart"], user)
    uploads_lost = sum(1 for upload_id, data in user.uploads.items()
                       if upload_id not in session["uploads"]
                       or exchange(port, f"/uploads/{upload_id}", cookie=user.cookie)[1] != data)
    return session_lost, uploads_lost
