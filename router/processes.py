"""Several router processes on one port: ``kvlab router --processes N`` (default: the usable cores).

One router process saturates one event loop. The supervisor here starts N processes that each bind
the same host:port with SO_REUSEPORT (the kernel spreads new connections over them) and route
identically: the same config, so the same hash rings (they are deterministic); each follows the
workers' KV events into its own KV index and probes their health itself; in-flight counts and tenant
limits live in shared memory (router.shared_state, which states the guarantees); metrics go to files
in PROMETHEUS_MULTIPROC_DIR and every process's /metrics and /cluster sum them (router.observability.metrics).

The supervisor restarts a process that dies (clearing what it had in flight first) and stops them
all on SIGTERM or SIGINT. Membership is fixed at start while more than one process runs: the admin
API's worker changes answer 409 (each process has its own pool, and a change would reach one).

Not shared, so seen by the answering process only: the TTFT/ITL windows and history of ``/cluster``
(the streams that process relayed: a sample of the whole), the block-hash memo's hit counts (left out
of the summed /metrics), and the finished-request rate that load shedding falls back on when the
spec gives no drain time (each process then measures about 1/N of the cluster's rate, and sheds
earlier than one process would). Health probes and KV-event polls run in every process.
"""
from __future__ import annotations

import ctypes
import logging
import multiprocessing as mp
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from multiprocessing.connection import wait
from pathlib import Path

from router.config import RouterConfig
from router.shared_state import ProcessShare

log = logging.getLogger("kvlab.router.processes")

METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
RESTART_PAUSE_S = 1.0   # between a crash and its restart: a process that dies at start must not spin
EARLY_DEATH_S = 10.0    # a process that dies this soon after its start died of its start-up ...
EARLY_DEATHS = 3        # ... and after this many such deaths in a row the supervisor gives up (exit 1)


def usable_cores() -> int:
    """Cores this process may run on: the CPU affinity, capped by a cgroup v2 CPU quota (containers)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def listening_socket(host: str, port: int, reuse_port: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    return sock


def check_port_free(host: str, port: int) -> None:
    """Refuse to start beside another server on the port (SO_REUSEPORT would otherwise share it)."""
    try:
        listening_socket(host, port, reuse_port=False).close()
    except OSError as exc:
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def serve(config: RouterConfig, host: str, port: int, processes: int, log_level: str) -> int:
    """Run `processes` router processes on host:port until SIGTERM or SIGINT; the exit status."""
    check_port_free(host, port)
    share = ProcessShare(processes, [w.id for w in config.workers], config.tenants)
    metrics_dir, own_dir = _metrics_dir()
    ctx = mp.get_context("spawn")   # a fresh interpreter each: nothing of the supervisor's state is forked
    stopping = False

    started: dict[int, float] = {}
    early: dict[int, int] = {}

    def start(index: int):
        proc = ctx.Process(target=child, args=(index, share, config, host, port, log_level, os.getpid()),
                           name=f"kvlab-router-{index}", daemon=False)
        proc.start()
        started[index] = time.monotonic()
        return proc

    def stop(signum, _frame) -> None:
        nonlocal stopping
        stopping = True

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    procs = [start(i) for i in range(processes)]
    log.info("router: %d processes on %s:%d", processes, host, port)
    try:
        while not stopping:
            wait([p.sentinel for p in procs], timeout=0.2)
            for i, proc in enumerate(procs):
                if proc.is_alive() or stopping:
                    continue
                _forget(share, i, proc.pid, metrics_dir)
                early[i] = early.get(i, 0) + 1 if time.monotonic() - started[i] < EARLY_DEATH_S else 0
                if early[i] >= EARLY_DEATHS:
                    log.error("router process %d exited with %s %d times at start; stopping", i, proc.exitcode,
                              early[i])
                    return 1
                log.error("router process %d (pid %s) exited with %s; restarting it", i, proc.pid, proc.exitcode)
                time.sleep(RESTART_PAUSE_S)
                procs[i] = start(i)
    finally:
        _stop_all(procs)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        share.remove()
        if own_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


def _metrics_dir() -> tuple[str, bool]:
    """(directory, whether we made it): $PROMETHEUS_MULTIPROC_DIR emptied of old files, else a new one."""
    given = os.environ.get(METRICS_DIR_ENV)
    if given:
        for old in Path(given).glob("*.db"):   # the previous run's files would add to this one's counters
            old.unlink(missing_ok=True)
        return given, False
    made = tempfile.mkdtemp(prefix="kvlab-router-metrics-")
    os.environ[METRICS_DIR_ENV] = made   # inherited by the processes, which read it when they import prometheus
    return made, True


def _forget(share: ProcessShare, index: int, pid: int | None, metrics_dir: str) -> None:
    share.clear(index)
    if pid is not None:
        from prometheus_client import multiprocess
        multiprocess.mark_process_dead(pid, metrics_dir)   # its live gauges (in flight) stop counting


def _stop_all(procs: list) -> None:
    for proc in procs:
        if proc.is_alive():
            proc.terminate()   # SIGTERM: uvicorn's graceful shutdown (timeout_graceful_shutdown)
    deadline = time.monotonic() + 10
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
        if proc.is_alive():
            proc.kill()
            proc.join(1)


def child(index: int, share: ProcessShare, config: RouterConfig, host: str, port: int, log_level: str,
          parent: int) -> None:
    """One router process (the spawn target): the app on its own SO_REUSEPORT socket."""
    _die_with(parent)
    logging.basicConfig(level=log_level.upper(), format=f"%(asctime)s %(levelname)s %(name)s[{index}]: %(message)s")
    if logging.getLogger().level > logging.DEBUG:
        logging.getLogger("httpx").setLevel(logging.WARNING)
    import uvicorn

    from kvlab.wire.http_server import steady_gc
    from router.server import create_app, uvicorn_options
    app = create_app(config, share.joined(index))
    sock = listening_socket(host, port, reuse_port=True)
    server = uvicorn.Server(uvicorn.Config(app, loop="uvloop", log_level=log_level, access_log=False,
                                           timeout_graceful_shutdown=5, **uvicorn_options(config.server)))
    steady_gc()
    server.run(sockets=[sock])


def _die_with(parent: int) -> None:
    """SIGTERM this process when the supervisor dies (Linux), so no router process outlives it."""
    if not sys.platform.startswith("linux"):
        return
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:   # the supervisor died before the call
        os.kill(os.getpid(), signal.SIGTERM)
