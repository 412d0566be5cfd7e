"""What clients send, read and bounded: the web process's input (Factor VII).

Factor VII makes the app its own web server, so whatever a client sends reaches the app's
own code first: a request line, headers, a cookie, a form, a 10 MiB upload. The terrible
day this module prevents: one odd request (a header of a megabyte, a cookie Python's parser
chokes on, an upload held whole in memory by two dozen requests at once) costs a copy its
CPU or its memory, and every user of that copy waits. Each parser here reads a bounded
amount, refuses what is malformed with a `ClientError` (a 4xx and one line, never a
traceback), and leaves what is large where it lies.

In the order a request is read:

* the head: `parse_head` (`request_line`, `read_headers`: RFC 9112's grammar and no
  more), `declared_length` (Content-Length: one number, or a 411 or 400), and the session
  cookie (`session_id_from`);
* the body: a `Body`, received whole before any route runs, in memory when it is small
  and in a scratch file when not. `parse_form` reads a form; `parse_multipart` finds an
  upload's parts in place, and a `FilePart` says where its bytes lie and hands them out a
  piece at a time (`PIECE_BYTES`), so that no part is ever whole in memory.

It reads; it does not receive. Sockets, deadlines, and how many requests may be arriving
at once are `web_server.py`'s; routes are `webapp.py`'s.
"""
from __future__ import annotations

import io
import re
import tempfile
import unicodedata
import urllib.parse
from dataclasses import dataclass
from email.message import Message
from email.parser import HeaderParser
from http.client import HTTPMessage
from pathlib import PurePosixPath, PureWindowsPath
from typing import Iterator

MAX_HEAD_BYTES = 64 << 10  # the request line and every header, together
MAX_HEADERS = 100          # as http.client; more get a 431
MAX_FORM_BYTES = 1 << 20   # a form is a few fields; refuse anything bigger unread
MAX_FIELD_CHARS = 200
MAX_FORM_FIELDS = 100
MAX_PART_HEAD_BYTES = 8 << 10  # a multipart part's delimiter line and headers
MAX_TEXT_PART_BYTES = 8 << 10  # a multipart field that is text (`next`), read whole
PIECE_BYTES = 1 << 20      # what a body hands out at once: an upload reaches the store so
# RFC 9112's request line (`POST /cart HTTP/1.1`) and header line (`Name: value`). A line
# that begins with a space would continue the header before it (obs-fold): refused.
REQUEST_LINE = re.compile(r"(\S+) +(\S+) +(HTTP/([0-9])\.[0-9])")
HEADER_LINE = re.compile(r"([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*(.*?)[ \t]*")
# A media type as RFC 6838 spells one (type/subtype, plain parameters), nothing more.
MEDIA_TYPE = re.compile(r"[\w!#$&^.+-]+/[\w!#$&^.+-]+( ?; ?[\w!#$&^.+-]+=[\w!#$&^.+-]+)*",
                        re.ASCII)
COOKIE_NAME = "sid"
SESSION_ID = re.compile(r"[A-Za-z0-9_-]{1,100}")  # what `new_session_id` makes, and a margin


class ClientError(Exception):
    """Bad input: answered with `status` and a one-line message, never a traceback
    (`web_server.error_response`), with `headers` such as Allow or Retry-After."""

    def __init__(self, status: int, message: str, headers: tuple = ()):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


# --- The head -----------------------------------------------------------------------

@dataclass(frozen=True)
class RequestHead:
    method: str
    target: str   # the path and query, as sent
    version: str  # HTTP/1.0 or HTTP/1.1
    headers: HTTPMessage

    @property
    def expects_continue(self) -> bool:
        """The client waits for a `100 Continue` before it sends the body (RFC 9110)."""
        return (self.headers.get("Expect", "").lower() == "100-continue"
                and self.version >= "HTTP/1.1")


def parse_head(head: bytes) -> RequestHead:
    """The request line and the headers of a head received whole (its blank line, if any,
    ends it); a ClientError for anything RFC 9112 would not parse."""
    lines = io.BytesIO(head)
    method, target, version = request_line(
        lines.readline(MAX_HEAD_BYTES + 1).decode("iso-8859-1").rstrip("\r\n"))
    return RequestHead(method, target, version, read_headers(lines))


def request_line(line: str) -> tuple[str, str, str]:
    """The method, target and version of a request line: `POST /cart HTTP/1.1`."""
    match = REQUEST_LINE.fullmatch(line)
    if not match:
        raise ClientError(400, "the request line is not METHOD TARGET HTTP/1.x")
    if int(match[4]) >= 2:
        raise ClientError(505, "HTTP/2 and later are not spoken here; use HTTP/1.1")
    return match[1], match[2], match[3]


def read_headers(stream: io.BufferedIOBase) -> HTTPMessage:
    """The header lines, up to the blank one, in the HTTPMessage that http.server makes:
    `get` and `get_all` work as ever. At most MAX_HEADERS lines of MAX_HEAD_BYTES each.

    Not email.parser, which BaseHTTPRequestHandler uses: it reads whole mail messages
    (MIME parts, folded lines, their defects), and cProfile ranked it first in a copy's
    CPU; /healthz costs a quarter less without it."""
    headers = HTTPMessage()
    while (line := stream.readline(MAX_HEAD_BYTES + 1)) not in (b"\r\n", b"\n", b""):
        if len(line) > MAX_HEAD_BYTES or len(headers) == MAX_HEADERS:
            raise ClientError(431, f"over {MAX_HEADERS} headers, or a header over "
                                   f"{MAX_HEAD_BYTES >> 10} KiB")
        header = HEADER_LINE.fullmatch(line.decode("iso-8859-1").rstrip("\r\n"))
        if not header:
            raise ClientError(400, "a header line is not `Name: value`, or is folded")
        headers[header[1]] = header[2]
    return headers


def declared_length(headers: HTTPMessage) -> int:
    """How long the client says its body is: 0 when it does not say. A 411 for a body in
    chunks (any Transfer-Encoding, in any spelling: none is decoded here), a 400 for a
    Content-Length that is not one number (two that differ are a smuggling attempt)."""
    if headers.get("Transfer-Encoding"):
        raise ClientError(411, "send a Content-Length; chunked bodies are not accepted")
    lengths = {value.strip() for value in headers.get_all("Content-Length", ["0"])}
    declared = whole_number(lengths.pop()) if len(lengths) == 1 else None
    if declared is None:
        raise ClientError(400, "Content-Length is not one number")
    return declared


def whole_number(text: str) -> int | None:
    """The value of `text` if it is 1 to 18 ASCII digits, else None.

    Not `str.isdigit()`: it also accepts '²', which `int()` then rejects. And at most 18
    digits: they fit SQLite's 64-bit INTEGER, and `int()` refuses more than 4300.
    """
    return int(text) if re.fullmatch(r"[0-9]{1,18}", text) else None


def session_id_from(cookie_header: str) -> str | None:
    """The session id the browser sent, or None for no cookie or a malformed one.

    The header is `name=value` pairs joined by `; `, split here by hand as Django and
    werkzeug do. Not `http.cookies.SimpleCookie`: it follows RFC 2109, which browsers
    don't, so one neighbour it dislikes (`foo`, `a=b c`, `prefs={"a":1}`; any site on
    this host can set one) hides every cookie; and before Python 3.13 a long quoted value
    costs it seconds of CPU (CVE-2024-7592). Here the work is one split of a header the
    server has already bounded (MAX_HEAD_BYTES). When two `sid` come, the first wins:
    browsers send the most specific cookie (the longest path) first.
    """
    for pair in cookie_header.split(";"):
        name, _, value = pair.partition("=")
        if name.strip() == COOKIE_NAME:
            value = value.strip()
            return value if SESSION_ID.fullmatch(value) else None
    return None


# --- The body -----------------------------------------------------------------------

class Body:
    """A request's body as the server received it: in memory, or in a scratch file.

    Small bodies stay in memory; large ones go to a file, as nginx
    (`client_body_buffer_size`) and Django (`FILE_UPLOAD_MAX_MEMORY_SIZE`) do, so that a
    copy holds a few KiB per upload, not 10 MiB. The file has no name
    (`tempfile.TemporaryFile`: on Linux, O_TMPFILE), so the kernel frees it when it is
    closed, or when the process dies, however: nothing is ever left on disk. Factor VI
    allows exactly this, a process's disk as "a brief, single-transaction cache". It is
    read by offset (`read`, `find`, `pieces`), so that nothing needs it whole in memory.
    One thread uses it at a time: the receiving one, then the answering one.
    """

    def __init__(self, spooled: bool = False):
        self.spooled = spooled  # in a scratch file
        self.file = tempfile.TemporaryFile() if spooled else io.BytesIO()
        self.size = 0

    def write(self, data: bytes) -> None:
        self.file.write(data)
        self.size += len(data)

    def read(self, start: int = 0, size: int | None = None) -> bytes:
        """`size` bytes from `start` (fewer at the end); without `size`, all the rest."""
        self.file.seek(start)
        return self.file.read(self.size - start if size is None else size)

    def find(self, needle: bytes, start: int = 0) -> int:
        """Where `needle` next begins at or after `start`, or -1. A piece is read at a
        time, each overlapping the one before by `len(needle) - 1` bytes: a needle that
        straddles the edge between two pieces is found whole in the second."""
        while start < self.size:
            found = self.read(start, PIECE_BYTES + len(needle) - 1).find(needle)
            if found >= 0:
                return start + found
            start += PIECE_BYTES
        return -1

    def pieces(self, start: int, size: int) -> Iterator[bytes]:
        """The `size` bytes from `start`, PIECE_BYTES at a time."""
        for offset in range(start, start + size, PIECE_BYTES):
            yield self.read(offset, min(PIECE_BYTES, start + size - offset))

    def close(self) -> None:
        self.file.close()


def parse_form(body: bytes) -> dict[str, str]:
    try:
        pairs = urllib.parse.parse_qsl(body.decode("utf-8"), keep_blank_values=True,
                                       max_num_fields=MAX_FORM_FIELDS)
    except UnicodeDecodeError:
        raise ClientError(400, "the form is not valid UTF-8") from None
    except ValueError:  # parse_qsl's "Max number of fields exceeded"
        raise ClientError(400, f"the form has over {MAX_FORM_FIELDS} fields") from None
    return dict(pairs)


def required_field(form: dict, name: str) -> str:
    value = printable(form.get(name, "")).strip()
    if not value:
        raise ClientError(400, f"the field '{name}' is missing or empty")
    if len(value) > MAX_FIELD_CHARS:
        raise ClientError(400, f"the field '{name}' is over {MAX_FIELD_CHARS} characters")
    return value


def header_param(header: str, param: str) -> str | None:
    """A parameter of a structured header, e.g. the boundary of a Content-Type.

    None when it is absent, and also for the RFC 2231 form (`boundary*=utf-8''b`): for
    that `get_param` returns a tuple, and browsers never send it for these parameters.
    """
    message = Message()
    message["content-type"] = header
    value = message.get_param(param)
    return value if isinstance(value, str) else None


@dataclass(frozen=True)
class FilePart:
    """One named part of a multipart body: where its bytes lie in the body, not the bytes."""
    filename: str
    content_type: str
    body: Body
    start: int
    size: int

    def pieces(self) -> Iterator[bytes]:
        return self.body.pieces(self.start, self.size)

    def text(self) -> str | None:
        """A plain field (`next`) as text; None if it is not UTF-8, or is longer than any
        such field a form sends."""
        if self.size > MAX_TEXT_PART_BYTES:
            return None
        try:
            return self.body.read(self.start, self.size).decode("utf-8")
        except UnicodeDecodeError:
            return None


def parse_multipart(body: Body, content_type: str) -> dict[str, FilePart]:
    """Find the named parts of a multipart/form-data body (RFC 7578), in place.

    The body is `--B` part `--B` part `--B--`, each delimiter but one at the very start
    preceded by CRLF, each part headers, a blank line, then its bytes, kept exactly as
    sent. The headers are UTF-8: browsers send a file's name as it is (`filename="café"`).
    """
    boundary = header_param(content_type, "boundary")
    if not boundary:
        raise ClientError(400, "malformed multipart body: no boundary")
    dash = b"--" + boundary.encode("latin-1")  # the header was read as latin-1
    starts = delimiters(body, dash)
    if len(starts) > MAX_FORM_FIELDS + 1:
        raise ClientError(400, f"the form has over {MAX_FORM_FIELDS} fields")
    if len(starts) < 2 or body.read(starts[-1] + len(dash), 2) != b"--":
        raise ClientError(400, "malformed multipart body: missing closing boundary")
    parts = {}
    for start, next_start in zip(starts, starts[1:]):
        name, part = read_part(body, start + len(dash), next_start - 2)  # 2: its CRLF
        parts[name] = part
    return parts


def delimiters(body: Body, dash: bytes) -> list[int]:
    """Where each delimiter (`--B`) begins, up to MAX_FORM_FIELDS + 2 of them: enough to
    tell that a form has too many."""
    found = [0] if body.read(0, len(dash)) == dash else []
    at = body.find(b"\r\n" + dash)
    while at >= 0 and len(found) < MAX_FORM_FIELDS + 2:
        found.append(at + 2)
        at = body.find(b"\r\n" + dash, at + 2 + len(dash))
    return found


def read_part(body: Body, start: int, end: int) -> tuple[str, FilePart]:
    """The part between `start` (just after its delimiter) and `end`: its name, and a
    FilePart for what follows its headers. Only the headers are read."""
    window = body.read(start, min(end - start, MAX_PART_HEAD_BYTES))
    line_end = window.find(b"\r\n")  # the rest of the delimiter's line
    head_end = window.find(b"\r\n\r\n", line_end + 2) if line_end >= 0 else -1
    if head_end < 0 and len(window) == MAX_PART_HEAD_BYTES:  # a browser sends two lines
        raise ClientError(400, f"a part's headers are over {MAX_PART_HEAD_BYTES >> 10} KiB")
    head = window[line_end + 2:head_end].decode("utf-8", "replace")
    headers = HeaderParser().parsestr(head + "\r\n\r\n")
    name = headers.get_param("name", header="content-disposition")
    if head_end < 0 or not isinstance(name, str):
        raise ClientError(400, "malformed multipart body: a part without a name")
    data_start = start + head_end + 4
    return name, FilePart(safe_filename(headers.get_filename() or ""),
                          media_type(headers.get("content-type", "")), body, data_start,
                          end - data_start)


def media_type(value: str) -> str:
    """`value` if it is a plain `type/subtype; name=value` (RFC 6838's characters), else
    application/octet-stream. It is sent back as a header when the file is downloaded:
    a folded or odd value would let an uploader write headers of their own."""
    if len(value) <= MAX_FIELD_CHARS and MEDIA_TYPE.fullmatch(value):
        return value
    return "application/octet-stream"


def printable(text: str) -> str:
    """`text` without control or format characters (a terminal escape, a right-to-left
    override that shows 'exe.txt' as 'txt.exe'), as it is stored and shown."""
    return "".join(char for char in text if unicodedata.category(char) not in ("Cc", "Cf"))


def safe_filename(name: str) -> str:
    """Only the last path component (old browsers send C:\\Users\\…), printable, at most
    200 characters."""
    base = PureWindowsPath(PurePosixPath(printable(name)).name).name
    return base[:MAX_FIELD_CHARS] or "upload"
