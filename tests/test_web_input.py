"""web_input.py: bodies read in place, a piece at a time, and the deadline a body earns."""
import pytest

import web_input
from conftest import multipart
from web_input import Body, ClientError, parse_multipart
from web_receiver import MIN_BODY_RATE, body_deadline

FIELDS = {"next": ("", "text/plain", b"/"),
          "file": ("caf\u00e9.bin", "application/octet-stream", bytes(range(256)) * 40)}


def body_of(data: bytes, spooled: bool) -> Body:
    body = Body(spooled)
    for start in range(0, len(data), 1000):  # as it arrives: in several writes
        body.write(data[start:start + 1000])
    return body


@pytest.mark.parametrize("spooled", [False, True], ids=["in memory", "in a scratch file"])
@pytest.mark.parametrize("piece", [7, 13, 1 << 20])  # delimiters straddle the small pieces
def test_a_multipart_body_is_parsed_in_place_and_handed_out_in_pieces(monkeypatch, spooled,
                                                                    piece):
    monkeypatch.setattr(web_input, "PIECE_BYTES", piece)
    data, headers = multipart(FIELDS)
    body = body_of(data, spooled)
    parts = parse_multipart(body, headers["Content-Type"])
    assert parts["next"].text() == "/"
    upload = parts["file"]
    assert (upload.filename, upload.content_type) == ("caf\u00e9.bin", "application/octet-stream")
    pieces = list(upload.pieces())
    assert b"".join(pieces) == FIELDS["file"][2] and max(map(len, pieces)) <= piece
    body.close()


def test_a_needle_cut_in_two_by_the_edge_between_pieces_is_found(monkeypatch):
    monkeypatch.setattr(web_input, "PIECE_BYTES", 4)
    body = body_of(b"abc--boundary--xyz", spooled=True)
    assert [body.find(b"--boundary", start) for start in (0, 3, 4)] == [3, 3, -1]
    assert body.find(b"xyz") == 15 and body.find(b"nothing") == -1


def test_a_form_with_too_many_parts_is_refused_without_reading_them_all():
    data, headers = multipart({f"f{number}": ("", "text/plain", b"x") for number in range(101)})
    with pytest.raises(ClientError, match="over 100 fields"):
        parse_multipart(body_of(data, spooled=False), headers["Content-Type"])


def test_a_text_field_too_long_for_a_form_is_not_read_as_text():
    data, headers = multipart({"next": ("", "text/plain", b"/" * (8 << 10 | 1))})
    assert parse_multipart(body_of(data, False), headers["Content-Type"])["next"].text() is None


def seconds_until_cut(rate: float, client_timeout: float, size: int = 10 << 20) -> float | None:
    """When a body arriving at `rate` bytes a second is cut, checked every tenth of a
    second; None if all `size` bytes arrive first."""
    for tenth in range(1, 100_000):
        now = tenth / 10
        if rate * now >= size:
            return None
        deadline = body_deadline(0.0, int(rate * (now - 0.1)), now - 0.1, client_timeout)
        if now > deadline:
            return now
    raise AssertionError("neither cut nor finished")


def test_a_trickle_is_cut_soon_and_a_steady_upload_never_whatever_they_declared():
    # The issue: 40 B/s must be cut within 30 s; the default CLIENT_TIMEOUT is 10 s.
    assert seconds_until_cut(40, client_timeout=10) <= 10.2
    assert seconds_until_cut(MIN_BODY_RATE / 2, client_timeout=10) == pytest.approx(20, abs=0.2)
    assert seconds_until_cut(MIN_BODY_RATE * 1.01, client_timeout=10) is None  # 10 MiB
    assert seconds_until_cut(MIN_BODY_RATE * 1.01, client_timeout=1) is None


def test_a_body_that_goes_silent_is_cut_whatever_time_it_earned_before():
    earned = body_deadline(0.0, 9 << 20, 5.0, client_timeout=10)  # 9 MiB in 5 s
    assert earned == 5.0 + 30  # MAX_SILENCE after the latest byte, not 10 + 576 s
