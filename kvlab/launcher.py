"""`kvlab up`: a whole cluster from one spec on this machine, one process per worker and router.

Each worker and the router is its own process (the layout docker compose uses too), so a slow
router cannot stall an engine's clock and each process's lag is its own. The launcher waits for
every /health, prints the endpoint, and on Ctrl-C, SIGTERM or SIGHUP (the terminal closed) stops every
child it started: the router first, so it stops taking requests while the workers can still finish the
streams it carries, then the workers. On Linux each child also gets SIGTERM when the launcher dies, however
it dies (a parent-death signal), so a killed launcher leaves no cluster holding its ports.

Once the cluster is up, a child that exits is restarted (``Cluster.supervise``), after a backoff
that doubles with each quick death, and the launcher says so; the rest keeps serving meanwhile (the
router takes a dead worker out of routing and migrates its streams). Only a failure during start-up
stops the whole cluster.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from emulator.spec import ClusterSpec, SpecError, load_spec, resolve_spec_path
from kvlab.wire.user_errors import UserError, number, positive
from router.policies.registry import check_spec_settings
from router.processes import usable_cores

DEFAULT_SPEC = "default"
READY_TIMEOUT_S = 60.0
RESTART_BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)   # waits before restarts after successive quick deaths
STABLE_S = 60.0   # a child up this long has recovered: its next death starts the backoff again


class _Child:
    """One supervised process: how to start it again, and its restart history."""
    __slots__ = ("args", "started", "deaths", "restart_at")

    def __init__(self, args: list[str], started: float):
        self.args = args
        self.started = started
        self.deaths = 0
        self.restart_at: float | None = None


class Cluster:
    """Processes of a running cluster; a context manager that always cleans up."""

    def __init__(self, spec_path: Path, spec: ClusterSpec, host: str = "127.0.0.1", quiet: bool = True,
                 time_scale: float | None = None, port: int | None = None, load_generator: bool = False):
        self.spec_path = spec_path
        self.spec = spec
        self.host = host
        self.quiet = quiet
        self.time_scale = time_scale
        self.port = port or spec.router.port
        self.load_generator = load_generator   # a load generator shares this host: leave it a core
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self._children: dict[str, _Child] = {}

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def worker_urls(self) -> dict[str, str]:
        return {w.id: f"http://{self.host}:{w.port}" for w in self.spec.worker_list()}

    def start(self) -> Cluster:
        self._check_ports_free()
        try:
            for worker in self.spec.worker_list():
                self._spawn(worker.id, ["worker", "--spec", str(self.spec_path), "--worker-id", worker.id,
                                        "--host", self.host])
            self._wait_ready(self.worker_urls().values())
            self._spawn("router", ["router", "--spec", str(self.spec_path), "--host", self.host,
                                   "--port", str(self.port), "--processes", str(self.router_processes())])
            self._wait_ready([self.url])
        except BaseException:
            self.stop()
            raise
        return self

    def router_processes(self) -> int:
        """The spec's [router] processes, else the cores this host has left once each worker (and a load
        generator) has one: a router process more than the free cores only steals time from the engines'
        clocks, which then lag."""
        if self.spec.router.processes is not None:
            return self.spec.router.processes
        busy = len(self.spec.worker_list()) + (1 if self.load_generator else 0)
        return max(1, usable_cores() - busy)

    def _check_ports_free(self) -> None:
        """A busy port would let /health answer from someone else's server: refuse to start instead."""
        workers = [w.port for w in self.spec.worker_list()]
        busy = [port for port in [*workers, self.port] if _in_use(self.host, port)]
        if self.port in busy:
            raise UserError(f"router port {self.port} on {self.host} is already in use; stop what holds it or "
                            f"pass --port N (or set [router] port in {self.spec_path})")
        if busy:
            raise UserError(f"worker ports {busy} on {self.host} are already in use; stop what holds them or "
                            f"set base_port in the [[pools]] of {self.spec_path}")

    def _spawn(self, name: str, args: list[str]) -> None:
        if self.time_scale is not None and name != "router":
            args += ["--time-scale", str(self.time_scale)]
        self.procs.append((name, self._popen(args)))
        self._children[name] = _Child(args, time.monotonic())

    def _popen(self, args: list[str]) -> subprocess.Popen:
        out = subprocess.DEVNULL if self.quiet else None
        return subprocess.Popen([sys.executable, "-m", "kvlab.cli", *args], stdout=out, stderr=out,
                                start_new_session=True, preexec_fn=_die_with_parent(os.getpid()))

    def supervise(self, now: float) -> list[str]:
        """Restart children that exited, each after its backoff; what happened, one line each."""
        news = []
        for i, (name, proc) in enumerate(self.procs):
            child = self._children[name]
            if proc.poll() is None:
                if now - child.started >= STABLE_S:
                    child.deaths = 0
                continue
            if child.restart_at is None:
                wait = RESTART_BACKOFF_S[min(child.deaths, len(RESTART_BACKOFF_S) - 1)]
                child.deaths += 1
                child.restart_at = now + wait
                news.append(f"{name} exited with code {proc.returncode}; restarting it in {wait:g} s")
            elif now >= child.restart_at:
                self.procs[i] = (name, self._popen(child.args))
                child.started, child.restart_at = now, None
                news.append(f"{name} restarted (restart {child.deaths})")
        return news

    def _wait_ready(self, urls) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        for url in urls:
            while True:
                self._check_alive()
                try:
                    if httpx.get(f"{url}/health", timeout=1.0).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{url} did not become healthy within {READY_TIMEOUT_S:.0f} s")
                time.sleep(0.1)

    def _check_alive(self) -> None:
        for name, proc in self.procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with code {proc.returncode} during start-up")

    def stop(self) -> None:
        """The router first (it drains while its workers still serve), then every worker."""
        router = [p for p in self.procs if p[0] == "router"]
        self._stop_group(router)
        self._stop_group([p for p in self.procs if p[0] != "router"])
        self.procs.clear()

    @staticmethod
    def _stop_group(procs: list[tuple[str, subprocess.Popen]]) -> None:
        for _, proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for _, proc in procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _in_use(host: str, port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex((host, port)) == 0


PR_SET_PDEATHSIG = 1   # linux/prctl.h


def _die_with_parent(parent: int):
    """A preexec hook: the child gets SIGTERM when the launcher dies (Linux; elsewhere nothing)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None

    def hook() -> None:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:   # the launcher died before the signal was armed
            os._exit(1)
    return hook


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", nargs="?", default=DEFAULT_SPEC,
                        help="cluster spec file, or the name of a bundled example (default: %(default)s)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=number(int, minimum=1, inclusive=True), default=None,
                        help="the router's port (default: the spec's [router] port)")
    parser.add_argument("--time-scale", type=positive, default=None, help="override the spec's time scale")
    parser.add_argument("--verbose", action="store_true", help="show the workers' and router's logs")


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    try:
        path = resolve_spec_path(args.spec)
        spec = load_spec(path)
        check_spec_settings(spec)
    except (SpecError, FileNotFoundError) as exc:
        print(f"kvlab up: {exc}", file=sys.stderr)
        return 2
    cluster = Cluster(path, spec, args.host, quiet=not args.verbose, time_scale=args.time_scale, port=args.port)
    for sig in (signal.SIGTERM, signal.SIGHUP):   # SIGHUP: the terminal closed; stop as for Ctrl-C
        signal.signal(sig, _interrupt)
    try:
        cluster.start()
        scale = args.time_scale or spec.engine.time_scale
        print(f"kvlab cluster '{spec.name}' is up: {len(spec.worker_list())} workers, "
              f"{cluster.router_processes()} router processes; "
              f"OpenAI endpoint {cluster.url}/v1; dashboard {cluster.url}/dashboard; time scale {scale:g} "
              f"(1 emulated second takes {scale:g} wall seconds; latencies are reported emulated) "
              f"(Ctrl-C to stop)", flush=True)
        while True:
            time.sleep(0.5)
            for news in cluster.supervise(time.monotonic()):
                print(f"kvlab up: {news}", flush=True)
    except KeyboardInterrupt:
        _say("stopping: the router first, then the workers")
        return 0
    except RuntimeError as exc:
        print(f"kvlab up: {exc}", file=sys.stderr)
        return 1
    finally:
        cluster.stop()


def _say(text: str) -> None:
    try:
        print(text, flush=True)
    except OSError:   # the terminal is gone (SIGHUP): stopping matters, the message does not
        pass
