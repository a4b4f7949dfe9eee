"""`kvlab router`: run the router under uvicorn on uvloop.

Settings come from a cluster spec (``--spec``: its workers, router section, tenants and SLO), from a
router config file (``--config``: a RouterConfig as JSON or TOML), and from flags, in that order,
later ones winning. Workers are ``URL``, ``ID=URL`` or ``ID=URL#ROLE``, comma-separated:

    kvlab router --workers http://127.0.0.1:8100,http://127.0.0.1:8101 --policy prefix_bounded
    kvlab router --workers p0=http://h:8100#prefill,d0=http://h:8101#decode --policy pd_pair
    kvlab router --spec default            # what `kvlab up` runs
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import sys
from pathlib import Path

import msgspec
import uvicorn

from emulator.engine_config import ROLES, is_role
from kvlab.wire.http_server import steady_gc
from router.config import SALT_SECRET_ENV, RouterConfig, WorkerConfig, from_spec, read_secret
from router.policies.registry import BUILDERS
from router.processes import usable_cores

DEFAULT_PORT = 8000   # the port OpenAI-compatible servers (vLLM included) listen on by default


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--spec", help="cluster spec (file or bundled example name)")
    p.add_argument("--config", help="router config file (JSON or TOML RouterConfig)")
    p.add_argument("--host", default=None, help="listen address (default: the spec's, else 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help=f"default: the spec's, else {DEFAULT_PORT}")
    p.add_argument("--workers", help="URL | ID=URL | ID=URL#ROLE, comma-separated")
    p.add_argument("--worker-host", help="with --spec: host of the spec's workers; '{id}' stands for each "
                                         "worker's id (docker compose service names). Default: the listen host")
    p.add_argument("--worker-port", type=int, help="with --spec: one port for every worker (Kubernetes pods); "
                                                   "default: each worker's port in the spec")
    p.add_argument("--policy", choices=sorted(BUILDERS), help="default routing policy")
    p.add_argument("--policy-setting", action="append", default=[], metavar="KEY=VALUE",
                   help="a setting of the default policy (value parsed as JSON when it can be), repeatable")
    p.add_argument("--admin-token", help="enables POST/DELETE /admin/workers with this Bearer token")
    p.add_argument("--salt-secret-file", help="file holding the secret salted tenants' cache salts derive from "
                                              f"(default: ${SALT_SECRET_ENV}, else random per process)")
    p.add_argument("--tokenizer", help="tokenizer.json (default: kvlab's built-in tokenizer, as the workers)")
    p.add_argument("--block-size", type=int, help="KV block size in tokens (must match the workers')")
    p.add_argument("--kv-events", choices=["http", "zmq", "off"], help="how to follow the workers' KV events")
    p.add_argument("--max-input-tokens", type=int)
    p.add_argument("--max-tokens-limit", type=int)
    p.add_argument("--processes", type=int, default=None,
                   help="router processes on the port (SO_REUSEPORT), sharing in-flight counts and tenant "
                        "limits; default: the usable cores, or 1 with an admin token or no workers (membership "
                        "changes at run time need one process)")
    p.add_argument("--log-level", default="info")


def config_from_args(args: argparse.Namespace) -> tuple[RouterConfig, str, int]:
    host = args.host or "127.0.0.1"
    config, port = RouterConfig(), None
    if args.spec:
        spec_host = args.worker_host or ("127.0.0.1" if host in ("0.0.0.0", "::") else host)
        config, spec_port, spec_listen = from_spec(args.spec, spec_host, args.worker_port)
        port, host = spec_port, args.host or spec_listen
    if args.config:
        config = _read_config(args.config)
    config = _apply_flags(config, args)
    return _with_salt_secret(config, args.salt_secret_file), host, args.port or port or DEFAULT_PORT


def _with_salt_secret(config: RouterConfig, path: str | None) -> RouterConfig:
    """The salt secret from --salt-secret-file, else the config's, else the environment's (never logged:
    with it, salted tenants keep their cache across restarts and share it between routers)."""
    if path:
        return msgspec.structs.replace(config, salt_secret=read_secret(path))
    if config.salt_secret is None and os.environ.get(SALT_SECRET_ENV):
        return msgspec.structs.replace(config, salt_secret=os.environ[SALT_SECRET_ENV])
    return config


def _read_config(path: str) -> RouterConfig:
    raw = Path(path).read_bytes()
    decode = msgspec.toml.decode if path.endswith(".toml") else msgspec.json.decode
    return decode(raw, type=RouterConfig)


def _apply_flags(config: RouterConfig, args: argparse.Namespace) -> RouterConfig:
    changes: dict = {}
    if args.workers:
        changes["workers"] = [_worker(item) for item in args.workers.split(",") if item.strip()]
    if args.policy:
        changes["policy"] = args.policy
    if args.policy_setting:
        name = args.policy or config.policy
        settings = dict(config.policies.get(name, {}))
        settings.update(_setting(item) for item in args.policy_setting)
        changes["policies"] = {**config.policies, name: settings}
    for flag in ("admin_token", "tokenizer", "block_size", "kv_events"):
        if getattr(args, flag) is not None:
            changes[flag] = getattr(args, flag)
    limits = {k: getattr(args, k) for k in ("max_input_tokens", "max_tokens_limit") if getattr(args, k) is not None}
    if limits:
        changes["limits"] = msgspec.structs.replace(config.limits, **limits)
    return msgspec.structs.replace(config, **changes)


def _worker(item: str) -> WorkerConfig:
    item, _, role = item.strip().partition("#")
    worker_id, _, url = item.rpartition("=") if "=" in item else ("", "", item)
    role = role or "both"
    if not is_role(role):
        raise ValueError(f"--workers: role {role!r} of {url} is not one of {', '.join(ROLES)}")
    return WorkerConfig(url=url, id=worker_id, role=role)


def _setting(item: str) -> tuple[str, object]:
    key, _, value = item.partition("=")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # httpx logs every request at info: the health and KV-event polls alone would be ~20 lines a second.
    if logging.getLogger().level > logging.DEBUG:
        logging.getLogger("httpx").setLevel(logging.WARNING)
    if args.processes is not None and args.processes < 1:
        print("kvlab router: --processes must be at least 1", file=sys.stderr)
        return 2
    try:
        config, host, port = config_from_args(args)
        processes = args.processes or default_processes(config)
        if processes > 1:
            return _serve_processes(config, host, port, processes, args.log_level)
        from router.server import create_app, uvicorn_options
        app = create_app(config)
    except ImportError as exc:   # --spec without the emulator package installed
        print(f"kvlab router: --spec needs the emulator package ({exc})", file=sys.stderr)
        return 2
    except (ValueError, OSError, msgspec.MsgspecError) as exc:
        print(f"kvlab router: {exc}", file=sys.stderr)
        return 2
    _warn_about(config)
    # uvloop + httptools (with a header deadline, kvlab.wire.http_server): the fastest stack uvicorn offers;
    # no access log on the hot path.
    steady_gc()
    uvicorn.run(app, host=host, port=port, loop="uvloop", log_level=args.log_level, access_log=False,
                timeout_graceful_shutdown=5, **uvicorn_options(config.server))
    return 0


def default_processes(config: RouterConfig) -> int:
    """The usable cores; one process where membership may change at run time (an admin token, or no
    workers yet): with several, each process has its own pool and an admin change would reach one."""
    if config.admin_token is not None or not config.workers:
        return 1
    return usable_cores()


def _warn_about(config: RouterConfig) -> None:
    log = logging.getLogger("kvlab.router")
    if not config.workers:
        log.warning("no workers configured: add some with POST /admin/workers")
    if config.salt_secret is None and any(t.cache_salt for t in config.tenants):
        log.warning("salted tenants but no salt secret (--salt-secret-file or $%s): their cached prefixes "
                    "will not survive a router restart", SALT_SECRET_ENV)


def _serve_processes(config: RouterConfig, host: str, port: int, processes: int, log_level: str) -> int:
    """Several processes on the port (router.processes). Every process needs the same salt secret, or
    a salted tenant's prompts would hash differently in each: a random one is drawn here when none is set."""
    from router.processes import serve
    if config.salt_secret is None:
        config = msgspec.structs.replace(config, salt_secret=secrets.token_hex(16))
    if not config.workers:
        print("kvlab router: several processes need their workers at start (--workers or --spec), or "
              "--processes 1 to add them with POST /admin/workers", file=sys.stderr)
        return 2
    _warn_about(config)
    return serve(config, host, port, processes, log_level)
