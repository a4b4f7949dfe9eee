"""SSE events as the relay reads them (router.forwarding.sse)."""
import pytest

from router.forwarding.sse import EventSplitter, data_of


@pytest.mark.parametrize(("event", "data"), [
    (b"data: {\"a\": 1}\n\n", b"{\"a\": 1}"),
    (b"data:[DONE]\n\n", b"[DONE]"),
    (b"data: last, no newline", b"last, no newline"),
    (b"event: message\ndata: second line\n\n", b"second line"),
    (b": a comment\n\n", None),
    (b"\n\n", None),
    (b"data: first\ndata: second\n\n", b"first"),
])
def test_the_payload_is_the_first_data_line_stripped(event, data):
    assert data_of(event) == data


def test_events_split_at_blank_lines_whatever_the_chunks():
    splitter = EventSplitter()
    assert splitter.feed(b"data: a\n\nda") == [b"data: a\n\n"]
    assert splitter.pending
    assert splitter.feed(b"ta: b\r\n\r\n") == [b"data: b\n\n"] and not splitter.pending
