"""Every user mistake on the `kvlab` command line is one line that names the input and the fix, exit 2,
no traceback."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kvlab.cli import main


@pytest.fixture
def tiny_trace(tmp_path):
    path = tmp_path / "trace.jsonl"
    path.write_text("".join(json.dumps({"timestamp": 10 * i, "input_length": 40, "output_length": 3,
                                        "hash_ids": [i]}) + "\n" for i in range(3)))
    return str(path)


# (argv, what the one line must name: the input and its fix)
CASES = [
    (["sim", "--trace", "no-such-file.jsonl"], ["no-such-file.jsonl", "pass --trace"]),
    (["sim", "tiny-test", "--policy", "kvaware", "--requests", "5"], ["'kvaware'", "did you mean 'kv_aware'"]),
    (["sim", "--trace", "TRACE", "--speedup", "0"], ["--speedup", "pass a number > 0"]),
    (["sim", "--rate", "-3"], ["--rate", "pass a number > 0"]),
    (["sim", "--requests", "many"], ["--requests", "not an integer"]),
    (["sim", "--limit", "-1", "--trace", "TRACE"], ["--limit", "'all'"]),
    (["sim", "defualt"], ["defualt", "did you mean 'default'"]),
    (["sim", "./nope.toml"], ["./nope.toml", "pass a spec file or an example name"]),
    (["sim", "--speedp", "2"], ["--speedp", "did you mean '--speedup'"]),
    (["simm"], ["'simm'", "did you mean 'sim'"]),
    (["compare", "--trace", "kvlab/specs/default.toml"], ["default.toml", "pass a .jsonl file"]),
    (["compare", "--trace", "TRACE", "--policies", "round_robin,kvaware"], ["did you mean 'kv_aware'"]),
    (["compare", "--trace", "TRACE", "--limit", "x"], ["--limit", "'all'"]),
    (["compare", "tiny-tset", "--trace", "TRACE"], ["did you mean 'tiny-test'"]),
    (["plan", "--rate", "0"], ["--rate", "pass a number > 0"]),
    (["plan", "--headroom", "0.5"], ["--headroom", ">= 1"]),
    (["up", "defualt"], ["did you mean 'default'"]),
    (["up", "--time-scale", "0"], ["--time-scale", "pass a number > 0"]),
    (["up", "--port", "0"], ["--port", ">= 1"]),
]


@pytest.mark.parametrize("argv,names", CASES, ids=[" ".join(c[0]) for c in CASES])
def test_a_mistake_is_one_line_naming_the_input_and_the_fix_exit_2(argv, names, tiny_trace, capsys):
    argv = [tiny_trace if a == "TRACE" else a for a in argv]
    try:
        code = main(argv)
    except SystemExit as exc:   # argparse's own errors exit from inside parse_args
        code = exc.code
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, (code, err)
    assert lines[0].startswith("kvlab") and "Traceback" not in err
    for name in names:
        assert name in lines[0], lines[0]
    assert out == ""   # nothing printed before the mistake was noticed


def test_from_a_shell_too_no_traceback():
    done = subprocess.run([sys.executable, "-m", "kvlab.cli", "sim", "--trace", "no-such-file.jsonl"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "no-such-file.jsonl" in done.stderr and "pass --trace" in done.stderr
