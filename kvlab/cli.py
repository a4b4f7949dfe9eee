"""The `kvlab` command. Each subcommand lives beside the part it drives and exposes
``add_arguments(parser)`` and ``run(args) -> int``; this file only maps names to modules and turns a
user's mistake (``UserError``, a bad flag) into one line and exit status 2."""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from kvlab.wire.user_errors import OneLineParser, UserError, did_you_mean, unknown_name

COMMANDS = {
    "up": ("kvlab.launcher", "start a router and its workers from a cluster spec on this machine"),
    "worker": ("workers.cli", "run one emulated worker (OpenAI-compatible HTTP server)"),
    "router": ("router.cli", "run the router in front of workers"),
    "sim": ("emulator.sim.cli", "run a workload through the discrete-event simulator"),
    "plan": ("emulator.planner.cli", "analytical capacity plan for a model, GPU and workload"),
    "sweep": ("loadtests.sweep",
              "measure a cluster's latency-throughput curve with Locust and compare with the planner"),
    "compare": ("loadtests.compare", "replay one trace through several routing policies, one table"),
    "render": ("kvlab.render.cli", "deployment manifests from a cluster spec (Kubernetes)"),
    "calibrate": ("emulator.calibrate.cli",
                  "fit a GPU entry's step-time coefficients to an engine; write a user catalog"),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """Every subcommand with its arguments; with `only`, the others by name alone: a subcommand's
    module is imported only to parse its own arguments (a worker process started by `kvlab up` then
    skips the planner's and the load tests' imports, half a second of CPU each)."""
    parser = OneLineParser(prog="kvlab", description="KV-aware LLM router and inference-cluster emulator")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        command.set_defaults(_module=module_name, _parser=command)
        if only is not None and name != only:
            continue
        module = _load(module_name)
        if module is not None:
            module.add_arguments(command)
    return parser


def _load(module_name: str):
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            return None  # that part is not installed in this build
        raise


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and not argv[0].startswith("-") and argv[0] not in COMMANDS:
        print(f"kvlab: {unknown_name('command', argv[0], COMMANDS)}", file=sys.stderr)
        return 2
    args, extra = build_parser(argv[0] if argv and argv[0] in COMMANDS else None).parse_known_args(argv)
    if extra:   # named on the subcommand, with the closest flag it has
        flags = [f for action in args._parser._actions for f in action.option_strings]
        args._parser.error(f"unrecognized argument {extra[0]!r}{did_you_mean(extra[0].split('=')[0], flags)}")
    module = _load(args._module)
    if module is None:
        print(f"kvlab {args.command}: not available in this build", file=sys.stderr)
        return 2
    try:
        return int(module.run(args) or 0)
    except UserError as exc:   # a mistake in the input: one line with its fix, not a traceback
        print(f"kvlab {args.command}: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:    # `kvlab sim ... | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
