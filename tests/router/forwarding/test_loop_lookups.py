"""The request path never looks the running loop up: on Python 3.11 every look-up is a getpid() system
call, which cost a saturated router as much CPU as a request's read or write (strace: two a request).
Counted with cProfile on the router's own loop thread, as benchmarks/router_calls.py counts calls."""
from __future__ import annotations

import pstats
import subprocess
import sys

from benchmarks import router_calls as rc

REQUESTS = 40


def _look_ups(stats: pstats.Stats) -> int:
    return sum(nc for (file, _, name), (_, nc, *_r) in stats.stats.items()  # type: ignore[attr-defined]
               if file == "~" and "get_running_loop" in name)


def test_requests_and_streams_look_the_running_loop_up_far_less_than_once_each():
    port = rc.free_port()
    stub = subprocess.Popen([sys.executable, str(rc.HERE / "openai_stub.py"), "--port", str(port)])
    try:
        router = rc.RouterThread(f"http://127.0.0.1:{port}")
        try:
            rc.wait_healthy(router.port)
            client = rc.Client(router.port)
            for i in range(10):   # warm: connections open, first-request set-up done
                client.post(rc.body(i, i % 2 == 1, 4))
            router.start_profile()
            for i in range(REQUESTS):
                client.post(rc.body(100 + i, stream=i % 2 == 1, max_tokens=4))
            stats = router.stop_profile()
        finally:
            router.stop()
    finally:
        stub.terminate()
        stub.wait(10)
    # Background tasks (health probes, timers) may look it up now and then; the requests never do
    # (before: two a request, from asyncio.current_task() and the hit estimate's call_soon).
    assert _look_ups(stats) < REQUESTS / 10, _look_ups(stats)
