"""`kvlab worker`: run one emulated worker under uvicorn (uvloop when installed).

uvicorn handles SIGINT/SIGTERM: it stops accepting, lets open requests finish (up to
--graceful-shutdown-s), then the app's lifespan stops the engine driver and the KV event sockets.
"""
from __future__ import annotations

import argparse
import importlib.util
import logging

import uvicorn

from emulator.catalog import CatalogError
from workers.config import WorkerConfig
from workers.engine import ROLES, EngineError


def add_arguments(p: argparse.ArgumentParser) -> None:
    hw = p.add_argument_group("model and hardware")
    hw.add_argument("--model", default="Llama-3.1-8B", help="catalog model name")
    hw.add_argument("--gpu", default="H100-SXM", help="catalog GPU name")
    hw.add_argument("--tp", type=int, default=1, help="tensor-parallel degree")
    hw.add_argument("--tp-link", default=None, help="catalog link for TP all-reduces (default: the GPU's)")
    hw.add_argument("--weight-dtype", default="bf16", choices=["bf16", "fp16", "fp8"])
    hw.add_argument("--kv-dtype", default="bf16", choices=["bf16", "fp16", "fp8"])
    hw.add_argument("--catalog", default=None, help="user catalog TOML adding or overriding entries")
    srv = p.add_argument_group("server")
    srv.add_argument("--role", default="both", choices=ROLES)
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8100)
    srv.add_argument("--worker-id", default=None, help="default: <role>-<port>")
    srv.add_argument("--served-model-name", default=None, help="name clients send as `model` (default: --model)")
    srv.add_argument("--model-alias", action="append", default=[], help="another accepted model name (repeatable)")
    srv.add_argument("--advertise-url", default=None, help="base URL given to decode workers (default: from Host)")
    srv.add_argument("--tokenizer", default=None, help="tokenizer.json (default: kvlab's built-in tokenizer)")
    srv.add_argument("--log-level", default="info")
    srv.add_argument("--graceful-shutdown-s", type=float, default=5.0)
    eng = p.add_argument_group("engine")
    eng.add_argument("--time-scale", type=float, default=1.0, help="wall seconds per emulated second")
    eng.add_argument("--num-blocks", type=int, default=None, help="KV pool size (default: from HBM)")
    eng.add_argument("--max-num-seqs", type=int, default=256)
    eng.add_argument("--max-num-batched-tokens", type=int, default=8192)
    eng.add_argument("--max-waiting", type=int, default=1024, help="queued requests before 503")
    eng.add_argument("--max-model-len", type=int, default=None)
    eng.add_argument("--eos-probability", type=float, default=0.0)
    eng.add_argument("--preemption", default="recompute", choices=["recompute", "swap"])
    eng.add_argument("--eviction", default="lru", choices=["lru", "lfu"])
    kv = p.add_argument_group("P/D handoff and KV events")
    kv.add_argument("--kv-link", default=None, help="decode role: link KV arrives over (default InfiniBand-NDR)")
    kv.add_argument("--kv-events-endpoint", default=None, help="ZMQ PUB address to bind, e.g. tcp://127.0.0.1:5557")
    kv.add_argument("--kv-events-replay-endpoint", default=None, help="ZMQ ROUTER address for replay requests")


def config_from_args(args: argparse.Namespace) -> WorkerConfig:
    return WorkerConfig(
        model=args.model, gpu=args.gpu, tp=args.tp, tp_link=args.tp_link, weight_dtype=args.weight_dtype,
        kv_dtype=args.kv_dtype, catalog=args.catalog, role=args.role,
        worker_id=args.worker_id or f"{args.role}-{args.port}", served_model_name=args.served_model_name,
        model_aliases=list(args.model_alias), advertise_url=args.advertise_url, tokenizer=args.tokenizer,
        time_scale=args.time_scale, num_blocks=args.num_blocks, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, max_waiting=args.max_waiting,
        max_model_len=args.max_model_len, eos_probability=args.eos_probability, preemption=args.preemption,
        eviction=args.eviction, kv_link=args.kv_link, kv_events_endpoint=args.kv_events_endpoint,
        kv_events_replay_endpoint=args.kv_events_replay_endpoint)


def event_loop_name() -> str:
    return "uvloop" if importlib.util.find_spec("uvloop") is not None else "asyncio"


def run(args: argparse.Namespace) -> int:
    from workers.server import create_app  # FastAPI import deferred: `kvlab --help` stays fast

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        app = create_app(config_from_args(args))
    except (CatalogError, EngineError, ValueError, OSError) as exc:
        logging.getLogger("kvlab.worker").error("cannot start worker: %s", exc)
        return 2
    uvicorn.run(app, host=args.host, port=args.port, loop=event_loop_name(), log_level=args.log_level,
                timeout_graceful_shutdown=args.graceful_shutdown_s)
    return 0
