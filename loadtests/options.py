"""Command-line options shared by kvlab's locustfiles, and the load configuration they resolve to.

Locust passes unknown options to listeners of ``init_command_line_parser``; importing this module
registers them once, however many locustfiles import it. Every option also reads an environment
variable (KVLAB_<NAME>), which is how ``kvlab sweep`` configures its Locust subprocess.

The time scale (wall seconds per emulated second) decides how fast arrivals are sent and how measured
latencies are read. It comes from --time-scale, else from a kvlab router's ``GET /cluster`` (what its
workers run at), else from --spec, else 1 (a real server); the first log line of a test says which.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import httpx
import msgspec
from locust import events

from loadtests.payloads import TenantKeys
from loadtests.schedule import tenant_weights


def _add(parser, name: str, **kwargs: Any) -> None:
    env = "KVLAB_" + name.lstrip("-").replace("-", "_").upper()
    parser.add_argument(name, env_var=env, include_in_web_ui=True, **kwargs)


@events.init_command_line_parser.add_listener
def add_options(parser) -> None:
    _add(parser, "--model", default="", help="model name to request (default: the server's first /v1/models)")
    _add(parser, "--api", default="chat", choices=["chat", "completions"], help="OpenAI API to call")
    _add(parser, "--spec", default="", help="kvlab cluster spec whose workload, tenants and time scale to use")
    _add(parser, "--mix", default="", help="archetype weights, e.g. chat=3,rag=1,code=1,agentic=1")
    _add(parser, "--api-key", default="", help="API key for requests without a tenant key (or OPENAI_API_KEY)")
    _add(parser, "--time-scale", type=float, default=0.0,
         help="the server's time scale: rates and durations below are in its (emulated) time; default: what a "
              "kvlab router reports at /cluster, else the spec's, else 1 (a real server)")
    _add(parser, "--seed", type=int, default=None, help="workload seed (default: the spec's, else 0)")
    _add(parser, "--records", default="", help="append one JSON line per request (raw timings) to this file")
    _add(parser, "--itl-events", default="gap", choices=["gap", "mean"],
         help="fire one ITL event per token gap (exact percentiles) or one per request (cheaper)")
    _add(parser, "--http-client", default="fast", choices=["fast", "httpx"],
         help="fast: geventhttpclient, as Locust's FastHttpUser (cheapest per token); httpx: honours proxy settings")
    _add(parser, "--no-ignore-eos", action="store_true", help="do not send vLLM's ignore_eos=true")
    # open-loop arrivals (open_loop.py)
    _add(parser, "--rate", type=float, default=1.0, help="open loop: arrivals per second (server time)")
    _add(parser, "--arrival", default="", choices=["", "poisson", "gamma"], help="open loop: arrival process")
    _add(parser, "--cv", type=float, default=0.0, help="open loop: coefficient of variation of gamma gaps")
    _add(parser, "--rate-profile", default="constant", choices=["constant", "step", "burst"],
         help="open loop: constant rate, a step to factor x rate at --at, or a burst of --length at --at")
    _add(parser, "--factor", type=float, default=2.5, help="open loop: step/burst multiplier of --rate")
    _add(parser, "--at", type=float, default=60.0, help="open loop: wall seconds until the step or burst")
    _add(parser, "--length", type=float, default=20.0, help="open loop: wall seconds a burst lasts")
    _add(parser, "--stages", default="",
         help="open loop: rate:wall_seconds,... piecewise-constant stages (overrides --rate/--profile)")
    _add(parser, "--measured-until", type=float, default=0.0,
         help="open loop: after this many wall seconds keep the load on until every earlier request has "
              "finished, then stop the test (0: run until --run-time)")
    _add(parser, "--max-in-flight", type=int, default=4096,
         help="open loop: requests in flight beyond which arrivals are dropped (and counted) to protect the host")
    _add(parser, "--horizon", type=float, default=600.0,
         help="open loop: wall seconds of arrivals to generate when there is no --run-time")
    # trace replay (trace_user.py)
    _add(parser, "--trace", default="", help="trace replay: Mooncake-style JSON-lines trace")
    _add(parser, "--trace-limit", type=int, default=0, help="trace replay: first N records (0: all)")
    _add(parser, "--speedup", type=float, default=1.0, help="trace replay: divide trace gaps by this")
    # closed-loop shapes (shapes.py)
    _add(parser, "--shape", default="step", choices=["step", "burst"], help="shapes.py: which user-count shape")
    _add(parser, "--shape-users", type=int, default=10, help="shapes.py: base user count")
    _add(parser, "--shape-duration", type=float, default=300.0, help="shapes.py: seconds until the test stops")


@dataclass
class LoadConfig:
    """What every kvlab user needs, resolved once per Locust process."""
    host: str
    model: str
    api: str
    mix: dict[str, float]
    params: dict[str, dict]
    tenants: dict[str, float]
    keys: TenantKeys
    time_scale: float
    seed: int
    records: str
    itl_per_gap: bool
    ignore_eos: bool
    http_client: str = "fast"
    max_connections: int = 4096
    spec: Any = None
    time_scale_source: str = ""


def _build(host: str, options) -> LoadConfig:
    spec = _load_spec(options.spec) if options.spec else None
    workload = spec.workload if spec else None
    keys = TenantKeys.from_spec(spec, options.api_key or None) if spec else TenantKeys({}, options.api_key or None)
    tenants = tenant_weights(spec)
    scale, source = resolve_time_scale(options.time_scale, host, spec)
    return LoadConfig(
        host=host.rstrip("/"), model=options.model or detect_model(host, keys.headers(next(iter(tenants)))),
        api=options.api,
        mix=parse_weights(options.mix) if options.mix else dict(workload.mix if workload else {"chat": 1.0}),
        params=dict(workload.params) if workload else {}, tenants=tenants, keys=keys,
        time_scale=scale, time_scale_source=source,
        seed=options.seed if options.seed is not None else (workload.seed if workload else 0),
        records=options.records, itl_per_gap=options.itl_events == "gap",
        ignore_eos=not options.no_ignore_eos, spec=spec, http_client=options.http_client,
        max_connections=max(1, options.max_in_flight))


def resolve_time_scale(given: float, host: str, spec) -> tuple[float, str]:
    """(time scale, where it came from): --time-scale, a kvlab router's /cluster, the spec, else 1."""
    if given and given > 0:
        return given, "--time-scale"
    discovered = discover_time_scale(host)
    if discovered is not None:
        return discovered, f"{host.rstrip('/')}/cluster"
    if spec is not None:
        return spec.engine.time_scale, "the spec's engine.time_scale"
    return 1.0, "default: not a kvlab router and no --spec or --time-scale"


CLUSTER_VIEW_MAX_BYTES = 4 << 20   # a /cluster answer is a few kB per worker; more is not a kvlab router
DISCOVERY_WAIT_S = 5.0             # a router that just started has not polled its workers yet


def discover_time_scale(host: str, wait_s: float = DISCOVERY_WAIT_S) -> float | None:
    """The time scale a kvlab router's workers run at (``GET /cluster``), or None for any other server."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            with httpx.stream("GET", host.rstrip("/") + "/cluster", timeout=5.0) as response:
                if response.status_code != 200:
                    return None
                body = b""
                for chunk in response.iter_bytes():
                    body += chunk
                    if len(body) > CLUSTER_VIEW_MAX_BYTES:
                        return None
            view = msgspec.json.decode(body)
            if not isinstance(view, dict) or not isinstance(view.get("cluster"), dict):
                return None   # another server answering any GET: not a kvlab router
            scale = view["cluster"].get("time_scale")
        except (httpx.HTTPError, msgspec.DecodeError):
            return None
        if isinstance(scale, (int, float)) and not isinstance(scale, bool) and scale > 0:
            return float(scale)
        if scale is not None or time.monotonic() >= deadline:   # None: no worker has reported yet
            return None
        time.sleep(0.25)


_configs: dict[int, LoadConfig] = {}
log = logging.getLogger("kvlab.load")


@events.test_start.add_listener
def _announce(environment, **_):
    """Resolve the configuration before any user runs, and say which time scale the test uses."""
    if environment.host:
        config = load_config(environment)
        log.info("time scale %g (from %s): rates and latencies are in the server's emulated seconds",
                 config.time_scale, config.time_scale_source)


def load_config(environment) -> LoadConfig:
    """The configuration of this Locust environment (built on first use: it may ask the server)."""
    if not environment.host:
        raise ValueError("no host: pass --host http://HOST:PORT (the router or any OpenAI-compatible server)")
    config = _configs.get(id(environment))
    if config is None:
        config = _configs[id(environment)] = _build(environment.host, environment.parsed_options)
    return config


def mix_from_options(options) -> dict[str, float]:
    """The archetype mix asked for on the command line (--mix, else --spec's), or {} for none."""
    if options is None:
        return {}
    if options.mix:
        return parse_weights(options.mix)
    return dict(_load_spec(options.spec).workload.mix) if options.spec else {}


def _load_spec(name: str):
    from emulator.spec import load_spec
    return load_spec(name)


def detect_model(host: str, headers: dict[str, str]) -> str:
    """The first model the server lists (vLLM serves one); pass --model to choose another."""
    try:
        response = httpx.get(host.rstrip("/") + "/v1/models", headers=headers, timeout=10.0)
        response.raise_for_status()
        return response.json()["data"][0]["id"]
    except (httpx.HTTPError, KeyError, IndexError, ValueError) as exc:
        raise RuntimeError(f"could not read the model name from {host}/v1/models ({exc}); pass --model") from None


def parse_weights(text: str) -> dict[str, float]:
    """'chat=3,rag=1' -> {'chat': 3.0, 'rag': 1.0} (a bare name weighs 1)."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, weight = part.partition("=")
        out[name.strip()] = float(weight) if weight else 1.0
    return out
