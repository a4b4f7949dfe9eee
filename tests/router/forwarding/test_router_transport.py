"""The router's lean HTTP/1.1 transport: keep-alive reuse, streaming, stale connections, failures."""
import asyncio

import httpx
import pytest

from router.config import Timeouts
from router.forwarding.transport import LeanTransport
from router.forwarding.upstream import Upstream, UpstreamFailure

TIMEOUT = {"connect": 2.0, "read": 2.0, "write": 2.0, "pool": 2.0}


class RawServer:
    """A tiny asyncio HTTP server whose behaviour each test scripts; counts connections."""

    def __init__(self, respond):
        self.respond = respond
        self.connections = 0
        self.server = None

    async def __aenter__(self):
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc):
        self.server.close()

    async def _serve(self, reader, writer):
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
                if not await self.respond(writer):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def request(url, body=b"{}"):
    return httpx.Request("POST", url + "/x", content=body, headers={"content-type": "application/json"},
                         extensions={"timeout": TIMEOUT})


async def fixed(writer) -> bool:
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
    await writer.drain()
    return True


async def test_sequential_requests_reuse_one_connection():
    transport = LeanTransport()
    async with RawServer(fixed) as server:
        for _ in range(5):
            response = await transport.handle_async_request(request(server.url))
            assert response.status_code == 200 and await response.aread() == b"hello"
            await response.aclose()
        assert server.connections == 1
    await transport.aclose()


async def test_a_chunked_stream_arrives_chunk_by_chunk():
    release = asyncio.Event()

    async def stream(writer) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await writer.drain()
        await release.wait()
        writer.write(b"6\r\nsecond\r\n0\r\n\r\n")
        await writer.drain()
        return True

    transport = LeanTransport()
    async with RawServer(stream) as server:
        response = await transport.handle_async_request(request(server.url))
        parts = aiter(response.stream)
        assert await anext(parts) == b"first"          # before the server has finished
        release.set()
        assert await anext(parts) == b"second"
        with pytest.raises(StopAsyncIteration):
            await anext(parts)
        await response.aclose()
    await transport.aclose()


async def test_an_idle_connection_the_server_closed_is_replaced_transparently():
    async def once(writer) -> bool:
        await fixed(writer)
        return False   # close after one response, without saying so in the headers

    transport = LeanTransport()
    async with RawServer(once) as server:
        for pause in (0.05, 0.0, 0.0, 0.05, 0.0):   # with no pause the close races the reuse
            response = await transport.handle_async_request(request(server.url))
            assert await response.aread() == b"hello"
            await response.aclose()
            await asyncio.sleep(pause)
        assert server.connections == 5
    await transport.aclose()


async def test_failures_map_to_httpx_errors():
    transport = LeanTransport()
    async with RawServer(fixed) as server:
        url = server.url
    with pytest.raises(httpx.ConnectError):
        await transport.handle_async_request(request(url))    # nobody listens any more

    async def silent(writer) -> bool:
        await asyncio.sleep(10)
        return False

    async def cut(writer) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part")
        await writer.drain()
        return False

    async with RawServer(silent) as server:
        slow = request(server.url)
        slow.extensions["timeout"] = {**TIMEOUT, "read": 0.2}
        with pytest.raises(httpx.ReadTimeout):
            await transport.handle_async_request(slow)
    async with RawServer(cut) as server:
        response = await transport.handle_async_request(request(server.url))
        with pytest.raises(httpx.RemoteProtocolError):
            await response.aread()
    await transport.aclose()


async def test_an_unread_body_closes_its_connection_instead_of_reusing_it():
    async def big(writer) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n12345")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"67890")
        await writer.drain()
        return True

    transport = LeanTransport()
    async with RawServer(big) as server:
        response = await transport.handle_async_request(request(server.url))
        await response.aclose()     # abandoned after the head: the server must see the request dropped
        response = await transport.handle_async_request(request(server.url))
        assert await response.aread() == b"1234567890"
        await response.aclose()
        assert server.connections == 2
    await transport.aclose()


def sse_stream(terminator_delay: float, finish: bool = True):
    """An SSE response: one token event, then [DONE] (or nothing more), then, after a pause, the
    chunked terminator in its own write: the order a worker's stream ends in."""
    async def respond(writer) -> bool:
        token = b'data: {"choices":[{"text":" a"}]}\n\n'
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n" % (len(token), token))
        if finish:
            writer.write(b"e\r\ndata: [DONE]\n\n\r\n")
        await writer.drain()
        await asyncio.sleep(terminator_delay)
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return True
    return respond


@pytest.mark.parametrize("delay", [0.0, 0.02])
async def test_a_stream_that_ends_with_done_returns_its_connection_to_the_pool(delay):
    transport = LeanTransport()
    upstream = Upstream(httpx.AsyncClient(), transport, Timeouts())
    async with RawServer(sse_stream(delay)) as server:
        for _ in range(3):
            stream = await upstream.open_stream("w", httpx.URL(server.url + "/v1/completions"), b"{}")
            events = await stream.next_events()
            events += [] if len(events) == 2 else await stream.next_events()
            assert events[0].startswith(b"data: {") and events[1:] == [b"data: [DONE]\n\n"]
            await stream.aclose()   # reads the terminator that follows [DONE], then pools the connection
        assert server.connections == 1
    await transport.aclose()


async def test_a_stream_abandoned_before_done_drops_its_connection():
    transport = LeanTransport()
    upstream = Upstream(httpx.AsyncClient(), transport, Timeouts())
    async with RawServer(sse_stream(0.05, finish=False)) as server:
        for _ in range(2):
            stream = await upstream.open_stream("w", httpx.URL(server.url + "/v1/completions"), b"{}")
            assert (await stream.next_events())[0].startswith(b"data: {")
            await stream.aclose()   # the client left mid-stream: the worker must see the request dropped
        assert server.connections == 2
    await transport.aclose()


# -- conformance: what an HTTP/1.1 server may legally (or wrongly) send ---------------------------------
def scripted(*writes: bytes, pause: float = 0.0, keep: bool = True):
    """A response written in the given pieces, `pause` seconds apart (bytes split anywhere)."""
    async def respond(writer) -> bool:
        for piece in writes:
            writer.write(piece)
            await writer.drain()
            if pause:
                await asyncio.sleep(pause)
        return keep
    return respond


async def _body_of(transport, url) -> bytes:
    response = await transport.handle_async_request(request(url))
    try:
        return await response.aread()
    finally:
        await response.aclose()


async def _fetched(transport, url) -> bytes:
    """The same request through ``fetch`` (the proxied non-streaming path): the body, whole."""
    _, body = await transport.fetch(httpx.URL(url + "/x"), b"{}", TIMEOUT, 600.0)
    return body


# Conformance holds on both ways of reading an answer: httpx's interface and the proxied path's fetch.
BOTH_READERS = pytest.mark.parametrize("body_of", [_body_of, _fetched], ids=["httpx", "fetch"])


@pytest.mark.parametrize("writes", [
    # size lines, data and CRLFs split across TCP segments
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", b"5", b"\r\nhel", b"lo\r", b"\n0\r\n", b"\r\n"),
    # chunk extensions, upper-case hex, a trailer after the last chunk
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;name=value\r\nhel\r\n2\r\nlo\r\n",
     b"0\r\nX-Trailer: yes\r\n\r\n"),
    # one byte per chunk
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"".join(b"1\r\n%c\r\n" % c for c in b"hello")
     + b"0\r\n\r\n",),
])
@BOTH_READERS
async def test_chunked_bodies_in_any_framing_are_read_whole_and_the_connection_reused(writes, body_of):
    transport = LeanTransport()
    async with RawServer(scripted(*writes, pause=0.01)) as server:
        for _ in range(2):
            assert await body_of(transport, server.url) == b"hello"
        assert server.connections == 1
    await transport.aclose()


@BOTH_READERS
async def test_a_large_chunk_past_the_high_water_mark_arrives_whole(body_of):
    data = bytes(range(256)) * 4096   # 1 MiB, four times the transport's high-water mark
    transport = LeanTransport()
    async with RawServer(scripted(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n" % len(data),
                                  data, b"\r\n0\r\n\r\n")) as server:
        assert await body_of(transport, server.url) == data
    await transport.aclose()


@BOTH_READERS
async def test_connection_close_in_the_headers_is_never_reused(body_of):
    transport = LeanTransport()
    async with RawServer(scripted(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
                                  keep=True)) as server:
        for _ in range(3):
            assert await body_of(transport, server.url) == b"ok"
        assert server.connections == 3   # each request on a new connection, though the server kept them open
    await transport.aclose()


@BOTH_READERS
async def test_a_reused_connection_cut_after_part_of_the_answer_is_an_error_not_a_resend(body_of):
    """A resend is safe only while the server has said nothing: once a byte of the answer came, the
    worker may be running the request, and sending it again would run it twice."""
    answers = iter([b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", b"HTTP/1.1 200 OK\r\nContent-Le"])

    async def first_whole_then_cut(writer) -> bool:
        piece = next(answers)
        writer.write(piece)
        await writer.drain()
        return piece.endswith(b"ok")

    transport = LeanTransport()
    async with RawServer(first_whole_then_cut) as server:
        assert await body_of(transport, server.url) == b"ok"
        with pytest.raises(httpx.RemoteProtocolError):
            await body_of(transport, server.url)
        assert server.connections == 1   # no second connection: nothing was sent again
    await transport.aclose()


@BOTH_READERS
async def test_a_server_that_closes_every_idle_connection_at_once_costs_no_request(body_of):
    """The close races each reuse: whichever wins, every request gets its answer (a resend on a fresh
    connection where the reused one died before answering)."""
    transport = LeanTransport()
    async with RawServer(scripted(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", keep=False)) as server:
        bodies = [await body_of(transport, server.url) for _ in range(20)]
        assert bodies == [b"ok"] * 20
        assert server.connections == 20
    await transport.aclose()


async def test_a_reader_that_stops_reading_stops_the_socket_and_so_the_server():
    """Backpressure: the transport buffers at most about its high-water mark for a body nobody reads,
    so a fast server's writes block until the reader resumes, and then every byte arrives in order."""
    from router.forwarding.transport import HIGH_WATER
    total, piece = 256 * HIGH_WATER, b"x" * 65536   # 64 MiB: past what loopback's socket buffers hold
    sent = 0
    blocked = asyncio.Event()

    async def flood(writer) -> bool:
        nonlocal sent
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % total)
        while sent < total:
            writer.write(piece)
            sent += len(piece)
            try:
                await asyncio.wait_for(writer.drain(), 0.2)
            except TimeoutError:
                blocked.set()          # the client's window is full: it stopped reading
                await writer.drain()
        return True

    transport = LeanTransport()
    async with RawServer(flood) as server:
        response = await transport.handle_async_request(request(server.url))
        await asyncio.wait_for(blocked.wait(), 20)
        assert sent < total                                   # the server is held back
        assert response.stream._conn.buffered <= HIGH_WATER + 4 * len(piece)   # and little is buffered here
        body = await response.aread()
        assert len(body) == total and sent == total
        await response.aclose()
    await transport.aclose()


@pytest.mark.parametrize("garbage", [
    b"HTTP/1.1 abc OK\r\nContent-Length: 2\r\n\r\nok",                       # status not a number
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nok\r\n0\r\n\r\n",   # chunk size not hex
    b"HTTP/1.1 200 OK\r\nContent-Length: -2\r\n\r\nok",                       # negative length
    b"HTTP/1.1 200 OK\r\nBad Header Without Colon\r\nContent-Length: 2\r\n\r\nok",
    b"SSH-2.0-OpenSSH_9.6\r\n",                                               # not HTTP at all
])
@BOTH_READERS
async def test_a_malformed_response_is_a_protocol_error_and_its_connection_is_dropped(garbage, body_of):
    answers = iter([garbage, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"])

    async def bad_then_good(writer) -> bool:
        writer.write(next(answers))
        await writer.drain()
        return True

    transport = LeanTransport()
    async with RawServer(bad_then_good) as server:
        with pytest.raises(httpx.RemoteProtocolError):
            await body_of(transport, server.url)
        assert await body_of(transport, server.url) == b"ok"   # a fresh connection, not the broken one
        assert server.connections == 2
    await transport.aclose()


# -- the proxied path: LeanTransport.post / Upstream.post ------------------------------------------------
async def test_post_sends_the_request_httpx_would_and_reads_the_whole_body_over_one_connection():
    seen: list[bytes] = []

    async def echo(reader, writer):
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                body = await reader.readexactly(length)
                seen.append(head.lower() + body)
                writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nhel\r\n2\r\nlo\r\n0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    url = httpx.URL(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1/completions")
    transport = LeanTransport()
    upstream = Upstream(httpx.AsyncClient(), transport, Timeouts())
    try:
        assert await upstream.post("w", url, b'{"a":1}') == b"hello"
        assert await upstream.post("w", url, b'{"b":22}') == b"hello"
        response = await transport.handle_async_request(httpx.Request(
            "POST", url, content=b'{"b":22}', headers={"content-type": "application/json"},
            extensions={"timeout": TIMEOUT}))
        assert await response.aread() == b"hello"
        await response.aclose()
    finally:
        await transport.aclose()
        server.close()
    assert seen[0].startswith(b"post /v1/completions http/1.1\r\n") and seen[0].endswith(b'{"a":1}')
    assert seen[1] == seen[2]   # the same request head and body as through httpx's interface
    assert b"content-length: 8\r\n" in seen[1] and b"content-type: application/json\r\n" in seen[1]


async def test_a_post_whose_worker_stays_silent_fails_with_a_timeout():
    async def silent(writer) -> bool:
        await asyncio.sleep(5)
        return False

    transport = LeanTransport()
    async with RawServer(silent) as server:
        with pytest.raises(httpx.ReadTimeout):
            await transport.post(httpx.URL(server.url + "/x"), b"{}", {"connect": 2.0, "read": 0.05})
    await transport.aclose()


async def test_a_whole_answer_is_bounded_by_its_total_time_while_its_bytes_keep_coming():
    """Each wait for bytes has the read timeout; the whole call has the total: a worker that trickles
    its answer (a byte well within every read timeout) still fails once the total is spent."""
    sent = []

    async def trickle(writer) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(200):
            writer.write(b"1\r\nx\r\n")
            sent.append(1)
            await writer.drain()
            await asyncio.sleep(0.02)
        return False

    transport = LeanTransport()
    upstream = Upstream(httpx.AsyncClient(), transport, Timeouts(first_byte_s=2.0, total_s=0.3))
    async with RawServer(trickle) as server:
        with pytest.raises(httpx.ReadTimeout):
            await transport.fetch(httpx.URL(server.url + "/x"), b"{}", TIMEOUT, 0.3)
        assert len(sent) < 200   # failed while the answer was still coming
        sent.clear()
        with pytest.raises(UpstreamFailure) as failure:
            await upstream.post("w", httpx.URL(server.url + "/x"), b"{}")
        assert failure.value.reason == "timeout" and failure.value.dead and len(sent) < 200
    await transport.aclose()


@pytest.mark.parametrize("body_of", [_body_of, _fetched], ids=["httpx", "fetch"])
async def test_bytes_after_a_whole_answer_keep_its_connection_from_being_reused(body_of):
    async def answer_then_stray(writer) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Le")   # nobody asked: the connection is not to be trusted
        await writer.drain()
        return True

    transport = LeanTransport()
    async with RawServer(answer_then_stray) as server:
        assert await body_of(transport, server.url) == b"ok"
        await asyncio.sleep(0.15)
        assert await body_of(transport, server.url) == b"ok"
        assert server.connections == 2
    await transport.aclose()
