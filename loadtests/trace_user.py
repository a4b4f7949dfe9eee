"""Trace replay: every request of a Mooncake-style trace at its own timestamp, open loop.

    locust -f loadtests/trace_user.py --headless --host URL --trace ../shared/data/traces/mooncake_conversation.jsonl \
        --trace-limit 500 --speedup 2 --run-time 10m

Prompts are the trace's 512-token blocks expanded into token text (emulator.traces): requests that share
leading hash_ids share exactly that prompt prefix, so a server's prefix cache sees the trace's reuse.
Timestamps are the server's time: with --time-scale (kvlab's emulated cluster) they stretch on the wall
clock; --speedup compresses them (2 = twice the trace's rate).
"""
import sys
from pathlib import Path

try:
    import loadtests  # noqa: F401
except ImportError:  # a plain checkout, not installed: the repository root holds the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gevent
from locust import User, constant, events, task
from locust.exception import StopUser

import loadtests.options  # noqa: F401  (registers --trace, --speedup, ...)
from emulator import traces
from loadtests.client import client_for
from loadtests.dispatch import OpenLoop
from loadtests.options import load_config


def trace_schedule(path: str, time_scale: float, speedup: float = 1.0, limit: int | None = None,
                   tenant: str = "default"):
    """(wall send offset, request) for each trace record, expanded lazily as the dispatcher reaches it."""
    for request in traces.trace_requests(path, speedup=speedup, limit=limit, tenant=tenant, with_text=True):
        yield request.arrival_s * time_scale, request


class TraceUser(User):
    fixed_count = 1
    wait_time = constant(0)
    _started = False

    @task
    def replay(self):
        if TraceUser._started:
            raise StopUser()
        TraceUser._started = True
        options = self.environment.parsed_options
        if not options.trace:
            raise ValueError("trace replay needs --trace PATH (e.g. ../shared/data/traces/mooncake_conversation.jsonl)")
        config, client = load_config(self.environment), client_for(self.environment)
        schedule = trace_schedule(options.trace, config.time_scale, options.speedup, options.trace_limit or None,
                                  tenant=next(iter(config.tenants)))

        def send(request, extra):
            client.send(request, name="trace", **extra)

        def start(epoch):
            client.write({"event": "start", "t0": epoch, "time_scale": config.time_scale, "trace": options.trace})

        stats = OpenLoop(send, options.max_in_flight).run(schedule, on_start=start)
        client.write({"event": "end", "sent": stats.sent, "dropped": stats.dropped, "max_lag_s": stats.max_lag_s})
        gevent.spawn(self.environment.runner.quit)
        raise StopUser()


@events.test_start.add_listener
def _reset(environment, **_):
    TraceUser._started = False
