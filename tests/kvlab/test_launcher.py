"""`kvlab up SPEC` serves the openai SDK for every bundled spec, and Ctrl-C leaves nothing behind."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from openai import OpenAI

from emulator.spec import example_specs, load_spec
from tests.conftest import free_port_block, interruptible, tiny_test_on_free_ports


def _descendants(pid: int) -> set[int]:
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True).stdout
    children: dict[int, list[int]] = {}
    for line in out.splitlines():
        child, parent = map(int, line.split())
        children.setdefault(parent, []).append(child)
    found, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            found.add(c)
            todo.append(c)
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = open(f"/proc/{pid}/stat").read().split()[2] if os.path.exists(f"/proc/{pid}/stat") else "X"
    return stat != "Z"


@pytest.mark.parametrize("name", sorted(example_specs()))
@pytest.mark.slow
def test_kvlab_up_serves_the_openai_sdk_and_ctrl_c_stops_everything(name):
    spec = load_spec(name)
    proc = subprocess.Popen([sys.executable, "-m", "kvlab.cli", "up", name], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=interruptible)
    try:
        line = proc.stdout.readline()
        assert "is up" in line, (line, proc.stderr.read() if proc.poll() is not None else "")
        children = _descendants(proc.pid)
        assert len(children) >= len(spec.worker_list()) + 1
        client = OpenAI(base_url=f"http://127.0.0.1:{spec.router.port}/v1", api_key="k", max_retries=0, timeout=60)
        key = spec.tenants[0].api_keys[0] if spec.tenants else "k"
        client = client.with_options(api_key=key)
        reply = client.chat.completions.create(model=spec.model, max_tokens=4,
                                               messages=[{"role": "user", "content": "hello kvlab"}])
        assert reply.choices[0].message.content and reply.usage.completion_tokens == 4
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    deadline = time.monotonic() + 10
    while any(_alive(c) for c in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [c for c in children if _alive(c)], "Ctrl-C left processes behind"


def test_a_bad_spec_fails_with_one_clear_message(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('model = "Llama-3.1-8B"\ngpu = "H100-SXM"\n[[pools]]\nrole = "both"\ncount = -2\n')
    result = subprocess.run([sys.executable, "-m", "kvlab.cli", "up", str(bad)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["kvlab up: spec error at pools[0].count: must be >= 1 (got -2)"]


def _worker_pid(launcher_pid: int, worker_id: str) -> int:
    for pid in _descendants(launcher_pid):
        try:
            cmdline = open(f"/proc/{pid}/cmdline").read().split("\0")
        except FileNotFoundError:
            continue
        if "--worker-id" in cmdline and cmdline[cmdline.index("--worker-id") + 1] == worker_id:
            return pid
    raise AssertionError(f"no process for worker {worker_id}")


@pytest.mark.slow
def test_kvlab_up_restarts_a_worker_that_dies_and_keeps_serving():
    import httpx
    spec = load_spec("tiny-test")
    proc = subprocess.Popen([sys.executable, "-m", "kvlab.cli", "up", "tiny-test"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=interruptible)
    try:
        assert "is up" in proc.stdout.readline()
        victim = _worker_pid(proc.pid, "both-0")
        os.kill(victim, signal.SIGKILL)
        said = [proc.stdout.readline(), proc.stdout.readline()]
        assert "both-0 exited with code -9; restarting it in" in said[0], said
        assert "both-0 restarted" in said[1], said
        assert proc.poll() is None   # the launcher, and the cluster, are still up
        port = next(w.port for w in spec.worker_list() if w.id == "both-0")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        assert _worker_pid(proc.pid, "both-0") != victim
        r = httpx.post(f"http://127.0.0.1:{spec.router.port}/v1/completions", timeout=30,
                       json={"model": spec.model, "prompt": "still there?", "max_tokens": 2})
        assert r.status_code == 200
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)


# -- closing the terminal, a killed launcher, ports ------------------------------------------------

def _port_in_use(port: int) -> bool:
    import socket
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _tiny_spec_on_free_ports(tmp_path):
    """tiny-test on ports nobody else uses, so parallel test runs cannot collide: (path, ports)."""
    text, ports = tiny_test_on_free_ports()
    path = tmp_path / "tiny.toml"
    path.write_text(text)
    return path, ports


def _start_up(args: list[str]) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "kvlab.cli", "up", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=interruptible)
    line = proc.stdout.readline()
    assert "is up" in line, (line, proc.stderr.read() if proc.poll() is not None else "")
    return proc, line


def _wait_gone(children: set[int], ports: list[int], within_s: float) -> tuple[list[int], list[int]]:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        left, busy = [c for c in children if _alive(c)], [p for p in ports if _port_in_use(p)]
        if not left and not busy:
            return [], []
        time.sleep(0.1)
    return [c for c in children if _alive(c)], [p for p in ports if _port_in_use(p)]


@pytest.mark.parametrize("how", ["SIGHUP", "SIGKILL"])
def test_closing_the_terminal_or_killing_the_launcher_leaves_no_process_and_frees_the_ports(tmp_path, how):
    """SIGHUP (the terminal closed) stops the cluster as Ctrl-C does; SIGKILL cannot be caught, so the
    children's parent-death signal must do it. Either way the ports are free within 5 s (the bar the
    next `kvlab up` needs)."""
    path, ports = _tiny_spec_on_free_ports(tmp_path)
    proc, _ = _start_up([str(path)])
    children = _descendants(proc.pid)
    try:
        assert len(children) >= 3 and all(_port_in_use(p) for p in ports)
        proc.send_signal(getattr(signal, how))
        proc.wait(timeout=30)
        left, busy = _wait_gone(children, ports, within_s=5.0)
        assert not left and not busy, f"after {how}: processes {left} alive, ports {busy} in use"
    finally:
        for c in children:
            if _alive(c):
                os.kill(c, signal.SIGKILL)


def test_up_prints_the_dashboard_and_time_scale_and_takes_port(tmp_path):
    path, ports = _tiny_spec_on_free_ports(tmp_path)
    other = free_port_block(1)
    proc, line = _start_up([str(path), "--port", str(other), "--time-scale", "3"])
    try:
        assert f"http://127.0.0.1:{other}/v1" in line and f"http://127.0.0.1:{other}/dashboard" in line
        assert "time scale 3" in line
        import httpx
        deadline, scale = time.monotonic() + 30, None
        while scale is None and time.monotonic() < deadline:   # the router has not polled its workers yet
            scale = httpx.get(f"http://127.0.0.1:{other}/cluster", timeout=10).json()["cluster"]["time_scale"]
            time.sleep(0.2)
        assert scale == 3
        assert not _port_in_use(ports[0])   # the spec's router port was left alone
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)


def test_a_busy_router_port_names_the_flag_and_the_spec_field(tmp_path):
    import socket
    path, ports = _tiny_spec_on_free_ports(tmp_path)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", ports[0]))
        holder.listen()
        result = subprocess.run([sys.executable, "-m", "kvlab.cli", "up", str(path)], capture_output=True,
                                text=True, timeout=60)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert f"port {ports[0]}" in lines[0] and "--port" in lines[0] and "[router] port" in lines[0]


def test_ctrl_c_during_a_stream_stops_the_router_first_and_tells_the_client(tmp_path):
    """The router drains while its workers still serve; a stream longer than the drain ends with
    "server shutting down", not with a failover error about workers that went first."""
    import httpx
    path, ports = _tiny_spec_on_free_ports(tmp_path)
    proc, _ = _start_up([str(path), "--time-scale", "20"])   # 400 tokens: well over the 5 s drain
    body = {"model": "Llama-3.1-8B", "prompt": "hello kvlab", "max_tokens": 400, "stream": True,
            "ignore_eos": True}
    events = []
    try:
        with httpx.stream("POST", f"http://127.0.0.1:{ports[0]}/v1/completions", json=body, timeout=60) as reply:
            for line in reply.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    if len(events) == 3:
                        proc.send_signal(signal.SIGINT)
    except httpx.HTTPError as exc:
        pytest.fail(f"the stream was cut instead of ended: {exc!r} after {len(events)} events")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    assert events[-1] == "[DONE]" and "server shutting down" in events[-2], events[-3:]
    assert not any("no other worker" in e for e in events)


def test_router_processes_leave_each_local_worker_and_the_load_generator_a_core(monkeypatch):
    import msgspec

    from kvlab import launcher
    spec = load_spec("default")
    workers = len(spec.worker_list())
    monkeypatch.setattr(launcher, "usable_cores", lambda: 16)
    assert launcher.Cluster(None, spec).router_processes() == 16 - workers
    assert launcher.Cluster(None, spec, load_generator=True).router_processes() == 16 - workers - 1
    monkeypatch.setattr(launcher, "usable_cores", lambda: 2)
    assert launcher.Cluster(None, spec, load_generator=True).router_processes() == 1
    pinned = msgspec.structs.replace(spec, router=msgspec.structs.replace(spec.router, processes=3))
    assert launcher.Cluster(None, pinned, load_generator=True).router_processes() == 3
