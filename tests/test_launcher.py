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
def test_kvlab_up_serves_the_openai_sdk_and_ctrl_c_stops_everything(name):
    spec = load_spec(name)
    proc = subprocess.Popen([sys.executable, "-m", "kvlab.cli", "up", name], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
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


def test_kvlab_up_restarts_a_worker_that_dies_and_keeps_serving():
    import httpx
    spec = load_spec("tiny-test")
    proc = subprocess.Popen([sys.executable, "-m", "kvlab.cli", "up", "tiny-test"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
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
