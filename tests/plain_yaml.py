"""A strict reader for the plain YAML that `k8s/` and `compose.yaml` are written in.

The standard library has no YAML parser, and YAML is large enough that one text can mean
different things to different parsers: `no` is false to Kubernetes' YAML 1.1 reader and
the string "no" to Compose's YAML 1.2 one, `0755` is 493 to one and 755 to the other, and
`22:22` was once the number 1342. So the engines' files keep to a small subset that
every YAML parser reads alike, and this module reads exactly that subset and refuses
everything else with the line and the reason. "The files parse" then means something: a
test reads what `kubectl` and `docker compose` will read.

The subset:
- block mappings: `key: value`, or `key:` with a deeper block under it. Keys are plain
  names (letters, digits, `_ . -`), each once per mapping.
- block sequences: `- value`, or `- key: value` to start a mapping that goes on two
  columns in, at the key's column. A sequence is indented under its key.
- scalars: integers without a leading zero, `true` and `false`, plain words (a letter or
  `/` first, then letters, digits and `_ . / -`, and none of YAML 1.1's other booleans
  and nulls: yes, no, on, off, y, n, null), and double-quoted strings without escapes.
  Flow collections only as one line of JSON: a list of strings and integers, or `{}`.
- comments: whole lines, or after a value and a space; `---` between documents.
- nothing else: no tabs, nulls, anchors, aliases, tags, block scalars, quoted keys or
  single quotes.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

KEY = re.compile(r"([A-Za-z_][A-Za-z0-9_.-]*):(?: +(.*))?")
PLAIN = re.compile(r"[A-Za-z/][A-Za-z0-9_./-]*")
INTEGER = re.compile(r"0|[1-9][0-9]*")
AFTER_VALUE = re.compile(r"( +#.*)?")
NOT_PLAIN = {"y", "n", "yes", "no", "on", "off", "null"}  # YAML 1.1 reads these otherwise
BOOLEANS = {"true": True, "false": False}  # spelled so; True and FALSE are 1.1 only


class NotPlainYaml(ValueError):
    """Text outside the subset; the message says which line and why."""


@dataclass
class Line:
    number: int
    indent: int
    text: str  # without the indentation


def read_documents(path: Path) -> list[dict]:
    """Every document in the file, each a mapping."""
    return [Reader(path.name, lines).document() for lines in split_documents(path.read_text())]


def read_document(path: Path) -> dict:
    """The file's one document."""
    documents = read_documents(path)
    if len(documents) != 1:
        raise NotPlainYaml(f"{path.name}: {len(documents)} documents, expected one")
    return documents[0]


def split_documents(text: str) -> list[list[Line]]:
    documents: list[list[Line]] = [[]]
    for number, raw in enumerate(text.splitlines(), 1):
        if "\t" in raw:
            raise NotPlainYaml(f"line {number}: a tab")
        stripped = raw.lstrip(" ")
        if raw == "---":
            documents.append([])
        elif stripped and not stripped.startswith("#"):
            documents[-1].append(Line(number, len(raw) - len(stripped), stripped.rstrip(" ")))
    return [lines for lines in documents if lines]


class Reader:
    """Reads one document's lines top-down; each block knows its own indentation."""

    def __init__(self, name: str, lines: list[Line]):
        self.name, self.lines, self.at = name, lines, 0

    def fail(self, line: Line, reason: str) -> NotPlainYaml:
        return NotPlainYaml(f"{self.name}:{line.number}: {reason}: {line.text!r}")

    def document(self) -> dict:
        first = self.lines[0]
        if first.indent != 0 or first.text.startswith("-"):
            raise self.fail(first, "a document must be a mapping at the first column")
        found = self.mapping(0)
        if self.at < len(self.lines):
            raise self.fail(self.lines[self.at], "indented less than its block, or more")
        return found

    def block(self, parent: Line) -> dict | list:
        """The deeper block under `parent`, a line that ended in `key:`."""
        if self.at == len(self.lines) or self.lines[self.at].indent <= parent.indent:
            raise self.fail(parent, "a key without a value, or a block not indented under it")
        line = self.lines[self.at]
        if line.text.startswith("-"):
            return self.sequence(line.indent)
        return self.mapping(line.indent)

    def mapping(self, indent: int) -> dict:
        found: dict = {}
        while self.at < len(self.lines) and self.lines[self.at].indent == indent:
            line = self.lines[self.at]
            match = KEY.fullmatch(line.text)
            if not match:
                raise self.fail(line, "not `key: value` with a plain key")
            key, rest = match.groups()
            if key in found:
                raise self.fail(line, f"the key {key!r} twice")
            if key.lower() in NOT_PLAIN or key.lower() in BOOLEANS:
                raise self.fail(line, "a key that YAML 1.1 reads as a boolean or null")
            self.at += 1
            if rest is None or rest.startswith("#"):
                found[key] = self.block(line)
            else:
                found[key] = self.scalar_or_flow(line, rest)
        return found

    def sequence(self, indent: int) -> list:
        found: list = []
        while self.at < len(self.lines) and self.lines[self.at].indent == indent:
            line = self.lines[self.at]
            if not line.text.startswith("- "):
                raise self.fail(line, "a sequence item must be `- ` and a value")
            item = line.text[2:].lstrip(" ")
            if KEY.fullmatch(item):
                # `- key: value` starts a mapping whose keys sit at the first key's column.
                column = indent + len(line.text) - len(item)
                self.lines[self.at] = Line(line.number, column, item)
                found.append(self.mapping(column))
            elif item.startswith("-"):
                raise self.fail(line, "a sequence in a sequence")
            else:
                self.at += 1
                found.append(self.scalar_or_flow(line, item))
        return found

    def scalar_or_flow(self, line: Line, text: str):
        """The value that starts `text`; only a comment may follow it."""
        if text[0] in '"[{':
            try:
                value, end = json.JSONDecoder().raw_decode(text)
            except json.JSONDecodeError as error:
                raise self.fail(line, f"not one line of JSON ({error.msg})") from None
            if "\\" in text[:end]:
                raise self.fail(line, "an escape (YAML 1.1 and JSON disagree on some)")
            if isinstance(value, list) and not all(
                    isinstance(item, str) or type(item) is int for item in value):
                raise self.fail(line, "a flow list holds only strings and integers")
            if isinstance(value, dict) and value:
                raise self.fail(line, "a flow mapping other than {}")
        else:
            match = PLAIN.match(text) or INTEGER.match(text)
            if not match:
                raise self.fail(line, "not a plain word, an integer or a double-quoted string")
            word, end = match.group(), match.end()
            if word.lower() in NOT_PLAIN or (word.lower() in BOOLEANS and word not in BOOLEANS):
                raise self.fail(line, f"{word!r} means a boolean or null to YAML 1.1: quote it")
            value = BOOLEANS.get(word, int(word) if word[0].isdigit() else word)
        if not AFTER_VALUE.fullmatch(text[end:]):
            raise self.fail(line, "more after the value than a comment")
        if self.at < len(self.lines) and self.lines[self.at].indent > line.indent:
            raise self.fail(self.lines[self.at], "indented under a line that has its value")
        return value
