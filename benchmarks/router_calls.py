"""Python calls per proxied request: a timing-free measure of the router's CPU per request.

One router process (in this process, on uvloop, as `kvlab router` runs it: prefix_bounded, no KV events)
in front of two stub OpenAI servers (benchmarks/openai_stub.py), and a client process sending
non-streaming requests one at a time (router_peers' ~64-token text prompts, max_tokens 1). After the
warm-up the client signals the router, which profiles (cProfile) exactly the next `--requests` requests,
then prints the calls per request and the functions called most. Call counts do not depend on how busy
the host is, so two checkouts compare closely where CPU-time A/Bs on a shared host are noisy; the
router's background work (health probes, the deadline tick) adds a few calls a request, the fewer the
more requests are profiled (compare runs of the same length).

Run: .venv/bin/python benchmarks/router_calls.py [--requests 2000] [--warmup 300] [--top 40]
     (another checkout's router: PYTHONPATH=<checkout> with this script's path)
"""
from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from router_overhead import Connection, _address, free_port  # noqa: E402 (benchmarks/ on the path first)
from router_peers import text_body  # noqa: E402


def client(url: str, warmup: int, requests: int, signal_fd: int) -> None:
    """Send the requests one at a time; write b"1" to `signal_fd` after the warm-up, b"0" at the end."""
    async def run() -> None:
        conn = Connection(*_address(url))
        for i in range(warmup + requests):
            if i == warmup:
                os.write(signal_fd, b"1")
                await asyncio.sleep(0.2)   # the router starts profiling before the next request
            status, _, _ = await conn.post("/v1/completions", text_body(i, False, 1))
            assert status == 200, status
        await asyncio.sleep(0.05)          # the last answer's bookkeeping ends
        os.write(signal_fd, b"0")
        conn.close()
    asyncio.run(run())


async def profile_router(stubs: list[str], args) -> tuple[pstats.Stats, int]:
    """(the profile of `args.requests` requests, the requests the router completed meanwhile)."""
    import uvicorn

    from router.cli import add_arguments, config_from_args
    from router.server import create_app, uvicorn_options
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    flags = parser.parse_args(["--workers", ",".join(f"s{i}={u}" for i, u in enumerate(stubs)), "--policy",
                               "prefix_bounded", "--kv-events", "off", "--host", "127.0.0.1",
                               "--port", str(free_port())])
    config, host, port = config_from_args(flags)
    server = uvicorn.Server(uvicorn.Config(create_app(config), host=host, port=port, loop="none",
                                           log_level="warning", access_log=False, **uvicorn_options(config.server)))
    serving = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.05)
    read_fd, write_fd = os.pipe()
    proc = subprocess.Popen([sys.executable, __file__, "--client", f"http://{host}:{port}", str(args.warmup),
                             str(args.requests), str(write_fd)], pass_fds=(write_fd,))
    os.close(write_fd)
    profile, loop, done = cProfile.Profile(), asyncio.get_running_loop(), asyncio.Event()
    counted: list[int] = []

    def on_signal() -> None:
        counted.append(server.server_state.total_requests)
        if os.read(read_fd, 1) == b"1":
            profile.enable()
        else:
            profile.disable()
            loop.remove_reader(read_fd)
            done.set()
    loop.add_reader(read_fd, on_signal)
    await done.wait()
    proc.wait()
    server.should_exit = True
    await serving
    return pstats.Stats(profile), counted[1] - counted[0]


def report(stats: pstats.Stats, requests: int, top: int) -> None:
    rows = sorted(((calls / requests, f"{Path(file).name}:{line}({name})" if file != "~" else name)
                   for (file, line, name), (_, calls, *_rest) in stats.stats.items()),   # type: ignore[attr-defined]
                  reverse=True)
    print(f"{stats.total_calls / requests:.1f} Python calls a request ({requests} requests)")   # type: ignore[attr-defined]
    for per_request, where in rows[:top]:
        print(f"  {per_request:6.2f}  {where}")


def main() -> None:
    if sys.argv[1:2] == ["--client"]:
        url, warmup, requests, fd = sys.argv[2:6]
        client(url, int(warmup), int(requests), int(fd))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="requests profiled")
    parser.add_argument("--warmup", type=int, default=300, help="requests sent before profiling")
    parser.add_argument("--top", type=int, default=40, help="functions listed, most called first")
    args = parser.parse_args()
    stubs, procs = [], []
    try:
        for _ in range(2):
            port = free_port()
            procs.append(subprocess.Popen([sys.executable, str(HERE / "openai_stub.py"), "--port", str(port)]))
            stubs.append(f"http://127.0.0.1:{port}")
        time.sleep(1.0)   # the stubs listen
        import uvloop
        stats, served = uvloop.run(profile_router(stubs, args))
    finally:
        for proc in procs:
            proc.terminate()
    if served != args.requests:
        print(f"warning: the router completed {served} requests while profiling, not {args.requests}")
    report(stats, args.requests, args.top)


if __name__ == "__main__":
    main()
