"""`kvlab up`: a whole cluster from one spec on this machine, one process per worker and router.

Each worker and the router is its own process (the layout docker compose uses too), so a slow
router cannot stall an engine's clock and each process's lag is its own. The launcher waits for
every /health, prints the endpoint, and on Ctrl-C (or SIGTERM) stops every child it started.

Once the cluster is up, a child that exits is restarted (``Cluster.supervise``), after a backoff
that doubles with each quick death, and the launcher says so; the rest keeps serving meanwhile (the
router takes a dead worker out of routing and migrates its streams). Only a failure during start-up
stops the whole cluster.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from emulator.spec import ClusterSpec, SpecError, load_spec, resolve_spec_path
from router.policies.registry import check_spec_settings

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
                 time_scale: float | None = None):
        self.spec_path = spec_path
        self.spec = spec
        self.host = host
        self.quiet = quiet
        self.time_scale = time_scale
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self._children: dict[str, _Child] = {}

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.spec.router.port}"

    def worker_urls(self) -> dict[str, str]:
        return {w.id: f"http://{self.host}:{w.port}" for w in self.spec.worker_list()}

    def start(self) -> "Cluster":
        self._check_ports_free()
        try:
            for worker in self.spec.worker_list():
                self._spawn(worker.id, ["worker", "--spec", str(self.spec_path), "--worker-id", worker.id,
                                        "--host", self.host])
            self._wait_ready(self.worker_urls().values())
            self._spawn("router", ["router", "--spec", str(self.spec_path), "--host", self.host])
            self._wait_ready([self.url])
        except BaseException:
            self.stop()
            raise
        return self

    def _check_ports_free(self) -> None:
        """A busy port would let /health answer from someone else's server: refuse to start instead."""
        ports = [w.port for w in self.spec.worker_list()] + [self.spec.router.port]
        busy = []
        for port in ports:
            with socket.socket() as sock:
                if sock.connect_ex((self.host, port)) == 0:
                    busy.append(port)
        if busy:
            raise RuntimeError(f"ports {busy} on {self.host} are already in use (another kvlab cluster?)")

    def _spawn(self, name: str, args: list[str]) -> None:
        if self.time_scale is not None and name != "router":
            args += ["--time-scale", str(self.time_scale)]
        self.procs.append((name, self._popen(args)))
        self._children[name] = _Child(args, time.monotonic())

    def _popen(self, args: list[str]) -> subprocess.Popen:
        out = subprocess.DEVNULL if self.quiet else None
        return subprocess.Popen([sys.executable, "-m", "kvlab.cli", *args], stdout=out, stderr=out,
                                start_new_session=True)

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
        for _, proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for _, proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.procs.clear()

    def __enter__(self) -> "Cluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", nargs="?", default=DEFAULT_SPEC,
                        help="cluster spec file, or the name of a bundled example (default: %(default)s)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--time-scale", type=float, default=None, help="override the spec's time scale")
    parser.add_argument("--verbose", action="store_true", help="show the workers' and router's logs")


def run(args: argparse.Namespace) -> int:
    try:
        path = resolve_spec_path(args.spec)
        spec = load_spec(path)
        check_spec_settings(spec)
    except (SpecError, FileNotFoundError) as exc:
        print(f"kvlab up: {exc}", file=sys.stderr)
        return 2
    cluster = Cluster(path, spec, args.host, quiet=not args.verbose, time_scale=args.time_scale)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        cluster.start()
        print(f"kvlab cluster '{spec.name}' is up: {len(spec.worker_list())} workers; "
              f"OpenAI endpoint {cluster.url}/v1 (Ctrl-C to stop)", flush=True)
        while True:
            time.sleep(0.5)
            for news in cluster.supervise(time.monotonic()):
                print(f"kvlab up: {news}", flush=True)
    except KeyboardInterrupt:
        print("stopping", flush=True)
        return 0
    except RuntimeError as exc:
        print(f"kvlab up: {exc}", file=sys.stderr)
        return 1
    finally:
        cluster.stop()
