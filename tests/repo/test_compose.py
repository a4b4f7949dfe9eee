"""docker-compose.yml must not rot: it matches the spec it mounts, and its commands really run.

There is no Docker engine here, so each kvlab service's command runs as a local process with the
compose network mapped to loopback (service hostnames -> 127.0.0.1, the mounted spec -> its file in
the repository), and a request goes through the router exactly as it would in the stack.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from emulator.spec import load_spec
from tests import ROOT

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
SPEC_IN_CONTAINER = "/etc/kvlab/spec.toml"


def _mounted_spec() -> Path:
    for volume in SERVICES["router"]["volumes"]:
        host, container = volume.split(":")[:2]
        if container == SPEC_IN_CONTAINER:
            return (ROOT / host).resolve()
    raise AssertionError("the router service does not mount the spec")


SPEC_PATH = _mounted_spec()
SPEC = load_spec(SPEC_PATH)


def _kvlab_services() -> dict[str, list[str]]:
    return {name: svc["command"] for name, svc in SERVICES.items() if svc.get("command", [None])[0] == "kvlab"}


def test_every_spec_worker_is_a_service_with_its_port():
    services = _kvlab_services()
    workers = {name: cmd for name, cmd in services.items() if cmd[1] == "worker"}
    assert set(workers) == {w.id for w in SPEC.worker_list()}
    for slot in SPEC.worker_list():
        cmd = workers[slot.id]
        assert cmd[cmd.index("--worker-id") + 1] == slot.id
        assert str(slot.port) in SERVICES[slot.id]["expose"]
    assert f"{SPEC.router.port}:{SPEC.router.port}" in SERVICES["router"]["ports"]
    for svc in services.values():
        assert svc[svc.index("--spec") + 1] == SPEC_IN_CONTAINER


def test_compose_services_are_the_ones_kvlab_render_derives_from_the_spec():
    from kvlab.render.services import SPEC_MOUNT, services
    assert SPEC_MOUNT == SPEC_IN_CONTAINER
    assert _kvlab_services() == {svc.name: list(svc.command) for svc in services(SPEC)}


def test_prometheus_scrapes_every_kvlab_service():
    prom = yaml.safe_load((ROOT / "deploy/prometheus.yml").read_text())
    targets = {t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    expected = {f"{w.id}:{w.port}" for w in SPEC.worker_list()} | {f"router:{SPEC.router.port}"}
    assert targets == expected


def _local(cmd: list[str]) -> list[str]:
    """The service's command on this machine: loopback for hostnames, the repo file for the mount."""
    mapped = [SPEC_PATH.as_posix() if a == SPEC_IN_CONTAINER else a for a in cmd[1:]]
    mapped = ["127.0.0.1" if a in ("0.0.0.0", "{id}") else a for a in mapped]   # every host is this one
    return [sys.executable, "-m", "kvlab.cli", *mapped]


def _wait_healthy(url: str, procs, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            assert p.poll() is None, f"a compose service exited early: {p.args}"
        try:
            if httpx.get(f"{url}/health", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url} never became healthy")


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


@pytest.mark.slow
def test_compose_commands_serve_a_request_on_loopback():
    ports = [SPEC.router.port] + [w.port for w in SPEC.worker_list()]
    busy = [p for p in ports if not _port_free(p)]
    assert not busy, f"ports {busy} are taken by another process: stop it (a running `kvlab up`?) and rerun"
    services = _kvlab_services()
    order = [n for n, c in services.items() if c[1] == "worker"] + ["router"]
    procs = []
    try:
        for name in order:
            procs.append(subprocess.Popen(_local(services[name]), cwd=ROOT, start_new_session=True,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            port = SPEC.router.port if name == "router" else next(w.port for w in SPEC.worker_list() if w.id == name)
            _wait_healthy(f"http://127.0.0.1:{port}", procs)
        reply = httpx.post(f"http://127.0.0.1:{SPEC.router.port}/v1/completions", timeout=60.0,
                           json={"model": SPEC.model, "prompt": "hello from compose", "max_tokens": 3})
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert body["usage"]["completion_tokens"] == 3 and body["choices"][0]["text"]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
