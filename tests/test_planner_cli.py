"""`kvlab plan` end to end: flags in, a table or JSON out, clear errors for infeasible inputs."""
import json

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
