"""`kvlab worker`: run one emulated worker under uvicorn (uvloop when installed).

Settings come from flags, or from a cluster spec's worker slot (``--spec FILE --worker-id ID``, as
`kvlab up` starts workers) with any flag given on the command line taking precedence.

uvicorn handles SIGINT/SIGTERM: it stops accepting, lets open requests finish (up to
--graceful-shutdown-s), then the app's lifespan stops the engine driver and the KV event sockets.
"""
from __future__ import annotations

import argparse
import importlib.util
import logging

import uvicorn

from emulator.engine_config import DEFAULTS, ROLES
from emulator.physics.catalog import CatalogError
from kvlab.wire.http_server import ServerLimits, steady_gc, uvicorn_settings
from workers.config import WorkerConfig, worker_config
from workers.core.engine import EngineError

DEFAULT_PORT = 8100
log = logging.getLogger("kvlab.worker")


def add_arguments(p: argparse.ArgumentParser) -> None:
    # Defaults are None so that, with --spec, only flags actually given override the spec.
    d = WorkerConfig()
    p.add_argument("--spec", default=None, help="cluster spec (file or bundled name); needs --worker-id")
    hw = p.add_argument_group("model and hardware")
    hw.add_argument("--model", help=f"catalog model name (default {d.model})")
    hw.add_argument("--gpu", help=f"catalog GPU name (default {d.gpu})")
    hw.add_argument("--tp", type=int, help="tensor-parallel degree (default 1)")
    hw.add_argument("--tp-link", help="catalog link for TP all-reduces (default: the GPU's intra-node link)")
    hw.add_argument("--weight-dtype", choices=["bf16", "fp16", "fp8"], help="default bf16")
    hw.add_argument("--kv-dtype", choices=["bf16", "fp16", "fp8"], help="default bf16")
    hw.add_argument("--catalog", help="user catalog TOML adding or overriding entries")
    srv = p.add_argument_group("server")
    srv.add_argument("--role", choices=ROLES, help="default both")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, help=f"default {DEFAULT_PORT} (or the spec's)")
    srv.add_argument("--worker-id", help="default: <role>-<port>")
    srv.add_argument("--served-model-name", help="name clients send as `model` (default: --model)")
    srv.add_argument("--model-alias", dest="model_aliases", action="append", help="another accepted name")
    srv.add_argument("--advertise-url", help="base URL handed to decode workers (default: from Host)")
    srv.add_argument("--tokenizer", help="tokenizer.json (default: kvlab's built-in tokenizer)")
    srv.add_argument("--log-level", default="info")
    srv.add_argument("--graceful-shutdown-s", type=float, default=5.0)
    eng = p.add_argument_group("engine")
    eng.add_argument("--time-scale", type=float, help="wall seconds per emulated second (default 1)")
    eng.add_argument("--stream-interval", type=int,
                     help="tokens per SSE chunk after the first (default 1); each chunk carries its tokens' gaps")
    eng.add_argument("--num-blocks", type=int, help="KV pool size in blocks (default: from HBM)")
    eng.add_argument("--max-num-seqs", type=int, help=f"default {DEFAULTS.max_num_seqs}")
    eng.add_argument("--max-num-batched-tokens", type=int, help=f"default {DEFAULTS.max_num_batched_tokens}")
    eng.add_argument("--max-waiting", type=int, help=f"queued requests before 503 (default {DEFAULTS.max_waiting})")
    eng.add_argument("--max-model-len", type=int, help="default: the model's context length")
    eng.add_argument("--eos-probability", type=float, help="per-token EOS chance (default 0: exactly max_tokens)")
    eng.add_argument("--preemption", choices=["recompute", "swap"])
    eng.add_argument("--eviction", choices=["lru", "lfu"])
    eng.add_argument("--scheduling-policy", choices=["fcfs", "priority"],
                     help="priority: lower request priority first (the router's tenant classes); default fcfs")
    eng.add_argument("--host-kv-gb", type=float, help="host memory for KV evicted from HBM (default 0: no host tier)")
    kv = p.add_argument_group("P/D handoff and KV events")
    kv.add_argument("--peer", dest="peers", action="append",
                    help="decode role: base URL of a prefill worker it may pull KV from (repeatable; with --spec: "
                         "the spec's prefill workers)")
    kv.add_argument("--peer-host", help="with --spec: host of the spec's prefill workers; '{id}' stands for each "
                                        "one's id (default: the listen host, and the id itself)")
    kv.add_argument("--peer-port", type=int, help="with --spec: port of every prefill worker (default: the spec's)")
    kv.add_argument("--kv-link", help="decode role: link the KV arrives over (default InfiniBand-NDR)")
    kv.add_argument("--kv-events-endpoint", help="ZMQ PUB address to bind, e.g. tcp://127.0.0.1:5557")
    kv.add_argument("--kv-events-replay-endpoint", help="ZMQ ROUTER address answering replay requests")


_CONFIG_FLAGS = ("model", "gpu", "tp", "tp_link", "weight_dtype", "kv_dtype", "catalog", "role", "worker_id",
                 "served_model_name", "model_aliases", "advertise_url", "tokenizer", "time_scale", "stream_interval",
                 "num_blocks",
                 "max_num_seqs", "max_num_batched_tokens", "max_waiting", "max_model_len", "eos_probability",
                 "preemption", "scheduling_policy", "eviction", "host_kv_gb", "kv_link", "kv_events_endpoint",
                 "kv_events_replay_endpoint",
                 "peers")


def config_from_args(args: argparse.Namespace) -> tuple[WorkerConfig, int]:
    """The worker's config and port: spec slot (if any), then the flags given."""
    fields: dict = {}
    if args.spec:
        fields = _spec_fields(args)
    spec_port = fields.pop("port", DEFAULT_PORT)   # popped either way: it is not a WorkerConfig field
    port = args.port or spec_port
    fields.update({k: getattr(args, k) for k in _CONFIG_FLAGS if getattr(args, k) is not None})
    fields.setdefault("worker_id", f"{fields.get('role', 'both')}-{port}")
    return worker_config(**fields), port


def _spec_fields(args: argparse.Namespace) -> dict:
    from emulator.spec import load_spec
    from workers.spec_config import prefill_peers, spec_fields

    if not args.worker_id:
        raise ValueError("--spec needs --worker-id")
    spec = load_spec(args.spec)
    peers = prefill_peers(spec, args.host, args.peer_host, args.peer_port)
    return {**spec_fields(spec, args.worker_id), "peers": peers}


def event_loop_name() -> str:
    return "uvloop" if importlib.util.find_spec("uvloop") is not None else "asyncio"


def run(args: argparse.Namespace) -> int:
    from workers.server import create_app  # deferred: `kvlab --help` need not import FastAPI

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # httpx logs every request at info: the health and KV-event polls alone would be ~20 lines a second.
    if logging.getLogger().level > logging.DEBUG:
        logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        config, port = config_from_args(args)
        app = create_app(config)
    except (CatalogError, EngineError, ValueError, OSError) as exc:
        log.error("cannot start worker: %s", exc)
        return 2
    steady_gc()
    uvicorn.run(app, host=args.host, port=port, loop=event_loop_name(), log_level=args.log_level,
                timeout_graceful_shutdown=args.graceful_shutdown_s, **uvicorn_settings(ServerLimits()))
    return 0
