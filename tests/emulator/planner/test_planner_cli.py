"""`kvlab plan` end to end: flags in, a table or JSON out, clear errors for infeasible inputs."""
import json

import pytest

from kvlab import cli


def run(capsys, *argv):
    code = cli.main(["plan", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_plan_prints_a_table_with_pools_cost_and_binding(capsys):
    code, out, _ = run(capsys, "--model", "Llama-3.1-70B", "--tp", "4", "--mode", "disaggregated", "--rate", "20",
                       "--prompt-mean", "8000", "--output-mean", "128", "--ttft-p99", "2", "--itl-p99", "0.05",
                       "--price", "3.5")
    assert code == 0
    assert "prefill" in out and "decode" in out and "kv_memory" in out and "per 1M output tokens" in out


def test_plan_json_is_machine_readable(capsys):
    code, out, _ = run(capsys, "--rate", "10", "--ttft-p99", "0.5", "--itl-p99", "0.05", "--curve", "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["plan"]["pools"][0]["role"] == "colocated"
    assert doc["plan"]["gpus"] >= 1
    rates = [p["rate"] for p in doc["curve"]["points"]]
    assert rates == sorted(rates) and doc["curve"]["max_rate"] > 0
    assert any(p["ttft_p99"] is None for p in doc["curve"]["points"])  # overloaded: inf -> null


def test_plan_from_a_spec_reports_the_clusters_cmax(capsys):
    code, out, _ = run(capsys, "--spec", "default", "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["capacity"]["cluster"]["workers"] == 2
    assert doc["capacity"]["max_rate"] > 0 and doc["capacity"]["binding"]


@pytest.mark.slow
def test_plan_from_a_spec_agrees_with_the_sweeps_planned_cmax(capsys, tmp_path):
    """`kvlab plan --spec` and the sweep's planned column read the spec the same way (round robin
    included: it spreads prefixes over every worker, which the prefix-cache model must hear of)."""
    from emulator.spec import example_spec_path, load_spec
    from loadtests import planner_bridge
    text = open(example_spec_path("colocated-8b-h100")).read()
    spread = tmp_path / "spread.toml"
    spread.write_text(text.replace('policy = "prefix_bounded"', 'policy = "round_robin"')
                      .replace("settings = { prefix_blocks = 4, eps = 0.25 }", ""))
    for name in ("colocated-8b-h100", "disagg-70b-h100", str(spread)):
        code, out, _ = run(capsys, "--spec", name, "--json")
        assert code == 0
        assert json.loads(out)["capacity"]["max_rate"] == planner_bridge.predict(load_spec(name), [1.0]).c_max


def test_infeasible_slo_is_explained_not_computed(capsys):
    code, out, err = run(capsys, "--model", "Llama-3.1-70B", "--tp", "4", "--prompt-mean", "8000",
                         "--ttft-p99", "0.2", "--rate", "1")
    assert code == 2 and out == ""
    assert "below the minimum possible p99 TTFT" in err


@pytest.mark.slow
def test_plan_from_a_spec_reads_its_catalog_and_sees_the_simulators_step_times(capsys, tmp_path):
    """A calibrated catalog (here: an H100 at half its compute and bandwidth efficiency) changes the engine's step
    times in the simulator; `kvlab plan --spec` must plan from the same steps."""
    from emulator.physics import roofline
    from emulator.planner import context, prefill
    from emulator.spec import example_spec_path, load_spec
    from loadtests import planner_bridge
    from workers.spec_config import spec_engine
    (tmp_path / "slow.toml").write_text(
        '[[gpu]]\nname = "H100-SXM"\nbf16_tflops = 989.4\nfp8_tflops = 1978.9\nhbm_gb = 80.0\nhbm_tb_s = 3.35\n'
        'compute_efficiency = 0.35\nbandwidth_efficiency = 0.45\nlayer_overhead_us = 8.0\n'
        'intra_node_link = "NVLink4"\n')
    text = open(example_spec_path("default")).read()
    path = tmp_path / "calibrated.toml"
    path.write_text('catalog = "slow.toml"\n' + text)
    spec = load_spec(path)
    code, out, _ = run(capsys, "--spec", str(path), "--json")
    assert code == 0
    planned = json.loads(out)["capacity"]["max_rate"]
    assert planned == planner_bridge.predict(spec, [1.0]).c_max
    code, out, _ = run(capsys, "--spec", "default", "--json")
    assert planned < 0.9 * json.loads(out)["capacity"]["max_rate"]      # the slower GPU shows
    # the engine the simulator runs and the planner's context time a 2048-token prefill step alike
    import argparse

    from emulator.planner import cli as planner_cli
    parser = argparse.ArgumentParser()
    planner_cli.add_arguments(parser)
    args = parser.parse_args(["--spec", str(path)])
    req, work, _, _ = planner_cli._inputs(args)
    catalog = planner_cli._catalog(args)
    ctx = context.build(req, work, catalog)
    engine = spec_engine(spec, spec.worker_list()[0].id)
    shape = roofline.BatchShape().add(2048, 0)
    assert prefill.step_with(ctx, 0, 2048, 0, True).seconds == roofline.step_time(engine.dep, shape).seconds
