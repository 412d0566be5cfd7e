"""The log router: every copy's output as one stream of lines (Factor XI, for Factor VIII).

Once a type runs as N copies, its logs come from N processes at once. The terrible day
this module prevents: each copy writes a file of its own on a disk of its own, a request
that failed across three copies is a hunt through three files, and a copy's lines vanish
with it; or the copies' pipes fill because nobody reads them, and every copy blocks on
its next print. Twelve-factor apps write to stdout and leave routing to the platform:
Heroku's Logplex is its second router, beside the one for requests (`class Router` in
router.py). Here `LogPrinter` reads each copy's pipe and prints its lines on the
launcher's stdout, each named by its copy, as honcho and foreman do.
"""
from __future__ import annotations

import os
import sys
import threading
import time

CHUNK = 65536  # bytes read from a pipe at once; a line longer than this is printed in pieces


def split_lines(data: bytes) -> tuple[list[bytes], bytes]:
    """Complete lines, and the start of a line still being written."""
    *lines, rest = data.split(b"\n")
    return lines, rest


class LogPrinter:
    """All output as one stream: `HH:MM:SS web.3   | line`, the launcher's own as `system`.

    It reads a copy's pipe in chunks (no text layer: cheaper, which leaves CPU for the
    router) and keeps each pipe's unfinished line until its end arrives. Colour only on a
    terminal, and never with NO_COLOR set. The lock is for the router's rare error line:
    every other line is printed by the main thread.

    When the reader of our stdout goes away (`launcher.py | head -3`), `reader_gone` says
    so, and what is printed after that goes to /dev/null, quietly: the supervisor then
    stops every copy, as a program in a pipeline ends once its reader has.
    """
    COLOURS = ("36", "33", "32", "35", "34", "31")

    def __init__(self):
        self.colourful = sys.stdout.isatty() and "NO_COLOR" not in os.environ
        self.width = len("system")
        self.colours: dict[str, str] = {"system": "1"}
        self.unfinished: dict[int, bytes] = {}  # pipe -> the start of its next line
        self.lock = threading.Lock()
        self.reader_gone = False

    def make_room(self, name: str) -> None:
        self.width = max(self.width, len(name))

    def lines(self, name: str, texts: list[str]) -> None:
        prefix = f"{time.strftime('%H:%M:%S')} {name:<{self.width}} | "
        if self.colourful:
            next_colour = self.COLOURS[len(self.colours) % len(self.COLOURS)]
            colour = self.colours.setdefault(name, next_colour)
            prefix = f"\033[{colour}m{prefix}\033[0m"
        with self.lock:  # one write for all the lines of a chunk
            try:
                sys.stdout.write("".join(prefix + text + "\n" for text in texts))
                sys.stdout.flush()
            except BrokenPipeError:
                self.reader_gone = True
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())  # the next flush, or Python's at exit
                os.close(devnull)

    def system(self, text: str) -> None:
        self.lines("system", [text])

    def print_output(self, name: str, pipe: int) -> int | None:
        """Print the complete lines of one chunk read from `pipe`.

        Returns the number of bytes read (0 at end of file), None if nothing was waiting.
        """
        try:
            chunk = os.read(pipe, CHUNK)
        except BlockingIOError:
            return None
        lines, rest = split_lines(self.unfinished.get(pipe, b"") + chunk)
        if len(rest) >= CHUNK:
            # A line this long is printed as it stands, in pieces: held until its end, it
            # would grow without bound, and be copied again with every chunk that came.
            lines.append(rest)
            rest = b""
        self.unfinished[pipe] = rest
        if lines:
            self.lines(name, [line.decode(errors="replace").rstrip("\r") for line in lines])
        return len(chunk)

    def finish(self, name: str, pipe: int) -> None:
        """The pipe is closing: print its last line even if it has no newline."""
        rest = self.unfinished.pop(pipe, b"")
        if rest:
            self.lines(name, [rest.decode(errors="replace")])
