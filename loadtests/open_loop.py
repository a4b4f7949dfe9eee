"""Open-loop arrivals: Poisson (or gamma-bursty) requests at a rate, independent of responses.

    locust -f loadtests/open_loop.py --headless --host http://127.0.0.1:8000 --rate 4 --run-time 2m
    locust -f loadtests/open_loop.py ... --rate 4 --rate-profile step --factor 2.5 --at 60   # a 2.5x step at 60 s
    locust -f loadtests/open_loop.py ... --arrival gamma --cv 3                          # bursty arrivals

One Locust user is the dispatcher; each request runs in a greenlet of its own (loadtests/dispatch.py),
so the user count does not shape the load: the rate does. Rates are per second of the server's time
(see --time-scale; a real server's is 1).
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

import loadtests.options  # noqa: F401  (registers the --rate, --stages, ... options)
from loadtests.client import client_for
from loadtests.dispatch import OpenLoop
from loadtests.options import load_config
from loadtests.schedule import open_loop_requests, parse_stages, profile_stages, scheduled


class OpenLoopUser(User):
    fixed_count = 1          # one dispatcher is enough: concurrency comes from its greenlets
    wait_time = constant(0)
    _started = False

    @task
    def dispatch(self):
        if OpenLoopUser._started:
            raise StopUser()  # extra users (-u > 1) would only duplicate the schedule
        OpenLoopUser._started = True
        options = self.environment.parsed_options
        config, client = load_config(self.environment), client_for(self.environment)
        stages = (parse_stages(options.stages) if options.stages else
                  profile_stages(options.rate, options.rate_profile, options.factor, options.at, options.length,
                                 _horizon(options)))
        spec_workload = config.spec.workload if config.spec else None
        arrival = options.arrival or (spec_workload.arrival if spec_workload else "poisson")
        cv = options.cv or (spec_workload.cv if spec_workload else 1.0)
        items = open_loop_requests(stages, config.time_scale, mix=config.mix, params=config.params,
                                   tenants=config.tenants, arrival=arrival, cv=cv, seed=config.seed)

        def send(item, extra):
            request, stage = item
            client.send(request, stage=stage, **extra)

        def drop(item, extra):
            request, stage = item
            client.write({"id": request.request_id, "stage": stage, "status": 0, "error": "dropped: client cap",
                          "tokens": 0, "gaps": [], **extra})

        def start(epoch):
            per_stage = [sum(1 for _, _, k in items if k == i) for i in range(len(stages))]
            client.write({"event": "start", "t0": epoch, "time_scale": config.time_scale, "model": config.model,
                          "stages": [[s.rate, s.wall_s] for s in stages], "per_stage": per_stage})

        loop = OpenLoop(send, options.max_in_flight, on_drop=drop)
        stats = loop.run(scheduled(items), options.measured_until or None, on_start=start)
        client.write({"event": "end", "sent": stats.sent, "dropped": stats.dropped, "max_lag_s": stats.max_lag_s})
        gevent.spawn(self.environment.runner.quit)  # the schedule is done: end the test
        raise StopUser()


def _horizon(options) -> float:
    """Wall seconds of arrivals to generate up front: --run-time when given (no waste), else --horizon."""
    run_time = getattr(options, "run_time", None)
    return float(run_time) if run_time else options.horizon


@events.test_start.add_listener
def _reset(environment, **_):
    OpenLoopUser._started = False
