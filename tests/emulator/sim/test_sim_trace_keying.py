"""`kvlab sim --trace` and `kvlab compare` key and score one trace the same way."""
import argparse
import json

from emulator.sim import cli as sim_cli
from emulator.sim.policy_settings import policy_settings, trace_prefix_blocks
from emulator.spec import load_spec
from loadtests import compare


def _trace(tmp_path, conversations=12):
    """Every prompt opens with the same 512-token block, as in the Mooncake traces; then its own."""
    lines = [{"timestamp": 100 * i, "input_length": 1500, "output_length": 4, "hash_ids": [0, 1000 + i, 2000 + i]}
             for i in range(conversations)]
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return path


def test_both_commands_key_a_trace_on_two_of_its_blocks():
    spec = load_spec("default")
    for policy in ("prefix_ring", "prefix_bounded", "kv_aware"):
        via_sim = policy_settings(spec, policy, trace=True)
        assert via_sim == compare.policy_settings(spec, policy, None, [])
        assert via_sim["prefix_blocks"] == trace_prefix_blocks(spec.engine.block_size) == 1024 // 16
    assert policy_settings(spec, "prefix_bounded")["prefix_blocks"] == 4   # synthetic: the spec's key


def test_sim_trace_spreads_conversations_that_share_a_system_block(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    sim_cli.add_arguments(parser)
    assert sim_cli.run(parser.parse_args(["default", "--trace", str(_trace(tmp_path)), "--policy", "prefix_ring",
                                          "--json"])) == 0
    summary = json.loads(capsys.readouterr().out)
    routed = [w["routed"] for w in summary["workers"].values()]
    assert sorted(routed) != [0, 12], routed   # keyed on 64 tokens, all twelve went to one worker


def test_sim_and_compare_report_the_same_hit_rate_for_the_same_run(tmp_path, capsys):
    trace = _trace(tmp_path)
    spec = load_spec("default")
    row = compare.simulate(spec, trace, "prefix_bounded", policy_settings(spec, "prefix_bounded", trace=True),
                           None, 1.0)
    parser = argparse.ArgumentParser()
    sim_cli.add_arguments(parser)
    assert sim_cli.run(parser.parse_args(["default", "--trace", str(trace), "--json"])) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["prefix_hit_rate"] == row.summary.prefix_hit_rate > 0   # the shared block hits
