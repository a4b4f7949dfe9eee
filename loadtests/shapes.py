"""Step and burst user-count shapes for the closed-loop users (add this file after the locustfile):

    locust -f loadtests/locustfile.py,loadtests/shapes.py --headless --host URL \
        --shape step --shape-users 10 --factor 2.5 --at 60 --shape-duration 240   # 10 users, 25 from 60 s
    ... --shape burst --shape-users 10 --factor 3 --at 60 --length 20          # 30 users for 20 s, then 10

A step shows how long the cluster takes to recover (queues drain, TTFT returns to its old level) after
load jumps 2-3x; a burst shows whether it recovers at all once the load falls back. For open-loop
steps and bursts use open_loop.py --rate-profile step|burst instead.
"""
import sys
from pathlib import Path

try:
    import loadtests  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from locust import LoadTestShape

import loadtests.options  # noqa: F401  (registers --shape, --factor, --at, --length)
from loadtests.schedule import users_at


class StepBurstShape(LoadTestShape):
    def tick(self):
        runner = self.runner
        assert runner is not None and runner.environment.parsed_options is not None   # locust sets both first
        o = runner.environment.parsed_options
        t = self.get_run_time()
        if t >= o.shape_duration:
            return None
        users = users_at(t, o.shape, o.shape_users, o.factor, o.at, o.length)
        return users, max(1.0, float(users))   # spawn the change within about a second: a sharp edge
