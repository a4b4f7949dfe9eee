"""The commands in README.md and loadtests/README.md run as written, and the defaults they state are the
code's. Each documented command runs in a cheap form (a tiny spec and trace, a few seconds of load against a
stub server that answers like a kvlab router); commands that start clusters or run for minutes are parsed by
the real argument parser instead, so a renamed or removed flag fails here."""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys

import pytest

from emulator import traces
from emulator.spec import example_spec_path, load_spec
from kvlab.cli import build_parser
from loadtests.fake_openai import FakeOpenAI
from tests import ROOT

DOCS = ("README.md", "loadtests/README.md")
BLOCK = re.compile(r"```bash\n(.*?)```", re.S)

# Long-running or outside kvlab: what each is checked by instead of running it here.
ELSEWHERE = {
    "bash scripts/demo.sh": "scripts/demo.sh",        # a full sweep: minutes; the file must exist
    "bash scripts/test.sh": "scripts/test.sh",
    "docker compose up": "docker-compose.yml",        # tests/repo/test_compose.py checks the stack
    # tests/loadtests/test_loadtests_aiperf.py:
    "python -m venv /tmp/aiperf && /tmp/aiperf/bin/pip install aiperf": None,
    "/tmp/aiperf/bin/aiperf profile": None,
}
# They start clusters and run until stopped or for minutes, or read data a user brings and write files.
PARSE_ONLY = ("up", "worker", "router", "sweep", "calibrate")


def documented_commands() -> list[tuple[str, str]]:
    """(doc, command) for every command line in the docs' bash blocks, continuations joined."""
    out = []
    for doc in DOCS:
        for block in BLOCK.findall((ROOT / doc).read_text()):
            for line in block.replace("\\\n", " ").splitlines():
                command = line.split(" #", 1)[0].strip().rstrip("&").strip()
                if command and not command.startswith("#"):
                    out.append((doc, command))
    return out


COMMANDS = documented_commands()


def test_the_docs_have_commands_to_check():
    kinds = {c.split()[0].rsplit("/", 1)[-1] for _, c in COMMANDS}
    assert {"kvlab", "locust"} <= kinds and len(COMMANDS) >= 20


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("docs")
    trace = folder / "trace.jsonl"
    trace.write_text("".join(json.dumps({"timestamp": 20 * i, "input_length": 600, "output_length": 3,
                                         "hash_ids": [0, i]}) + "\n" for i in range(6)))
    return {"trace": trace, "spec": example_spec_path("tiny-test")}


@pytest.fixture(scope="module")
def kvlab_like_server():
    server = FakeOpenAI(ttft_s=0.005, gap_s=0.001, tokens=3, cluster_time_scale=10.0).start()
    yield server
    server.stop()


def cheap(argv: list[str], tiny: dict, url: str) -> list[str]:
    """The same command on a tiny spec and trace, with small limits and a few seconds of load."""
    subst = {"SPEC": str(tiny["spec"]), "[SPEC]": str(tiny["spec"]), "my.toml": str(tiny["spec"]),
             "FILE": str(tiny["trace"]), "t.jsonl": str(tiny["trace"]), "URL": url,
             "http://127.0.0.1:8000": url, "../shared/data/traces/mooncake_conversation.jsonl": str(tiny["trace"])}
    small = {"--requests": "40", "--limit": "6", "--trace-limit": "6", "-t": "3s", "--run-time": "3s",
             "--shape-duration": "3", "-u": "2", "--at": "1"}
    out = [subst.get(a, a) for a in argv]
    for i, a in enumerate(out[:-1]):
        if a in small:
            out[i + 1] = small[a]
    if "--trace" not in out and out[:2] == ["kvlab", "compare"]:
        out += ["--trace", str(tiny["trace"])]   # the default is the shared trace, absent on CI
    if "shapes.py" in " ".join(out) and "--shape-duration" not in out:
        out += ["--shape-duration", "3"]   # a shape ends the test itself; -t does not apply
    if "--spec" in out and out[0] == "locust":
        out[out.index("--spec") + 1] = str(tiny["spec"])
    return out


@pytest.mark.parametrize("doc,command", COMMANDS, ids=[c for _, c in COMMANDS])
def test_every_documented_command_runs(doc, command, tiny, kvlab_like_server):
    for prefix, needs in ELSEWHERE.items():
        if command.startswith(prefix):
            assert needs is None or (ROOT / needs).exists(), f"{doc}: {command} needs {needs}"
            return
    command, _, consumer = command.partition(" | ")   # `kvlab render ... | kubectl apply`: kvlab's part runs here
    argv = shlex.split(command)
    argv[0] = argv[0].rsplit("/", 1)[-1]   # .venv/bin/kvlab -> kvlab
    assert argv[0] in ("kvlab", "locust"), f"{doc}: no check for {command!r}; add one to this test"
    argv = cheap(argv, tiny, kvlab_like_server.url)
    if argv[0] == "kvlab" and (argv[1] in PARSE_ONLY or "--live" in argv or "--help" in argv):
        args, extra = build_parser().parse_known_args([a for a in argv[1:] if a != "--help"])
        assert not extra, f"{doc}: {command}: unknown arguments {extra}"
        return
    if argv[0] == "kvlab":
        cmd = [sys.executable, "-m", "kvlab.cli", *argv[1:]]
    else:
        cmd = [sys.executable, "-m", "locust", *argv[1:]]
        if "--headless" not in cmd:
            cmd += ["--headless", "-t", "3s"]   # the web-UI form: the same users, headless
        cmd += ["--only-summary"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, f"{doc}: {command}\nran {cmd}\n{done.stderr[-2000:]}"
    if consumer:
        assert done.stdout.strip(), f"{doc}: {command} printed nothing for {consumer!r} to read"
    if argv[0] == "locust":
        assert "time scale 10 (from" in done.stderr   # the stub answers /cluster as kvlab's router does


# -- documented defaults are the code's ----------------------------------------------------------------

def test_the_documented_default_time_scale_is_the_default_specs():
    scale = load_spec("default").engine.time_scale
    readme, loadtests_readme = (ROOT / "README.md").read_text(), (ROOT / "loadtests/README.md").read_text()
    assert re.search(r"the default spec runs at time scale ([\d.]+)", readme)[1] == f"{scale:g}"
    assert re.search(r"\(the default spec: ([\d.]+)\)", loadtests_readme)[1] == f"{scale:g}"
    rate, per_wall = map(float, re.search(r"`--rate (\d+)` against it\s+sends (\d+) requests per wall second",
                                          loadtests_readme).groups())
    assert per_wall == pytest.approx(rate / scale)
    header = example_spec_path("default").read_text().split("\nname", 1)[0]
    assert f"at time scale {scale:g}" in header


def test_the_documented_compare_defaults_are_the_codes():
    text = (ROOT / "loadtests/README.md").read_text()
    blocks = 2 * traces.TRACE_BLOCK_TOKENS // load_spec("default").engine.block_size
    assert f"`--prefix-blocks`, default {blocks} sixteen-token blocks" in " ".join(text.split())
    spec_blocks = load_spec("default").router.settings["prefix_blocks"]
    assert f"rather than the spec's {spec_blocks}" in " ".join(text.split())
