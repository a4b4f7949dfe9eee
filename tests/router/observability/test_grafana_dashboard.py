"""The Grafana dashboard (deploy/grafana/dashboards/kvlab.json): valid, complete, and every metric its
PromQL names is one the services really export, checked against a live worker's and router's /metrics."""
from __future__ import annotations

import json
import re

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests import ROOT
from tests.router_fixtures import MODEL, start_router, stream_completion  # noqa: F401  (fixture)

DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "kvlab.json"
DATASOURCE_UID = "kvlab-prometheus"   # deploy/grafana/provisioning/datasources/prometheus.yml
REQUIRED_PANELS = ("Prefill utilization", "Decode utilization", "Prefill : decode ratio", "KV cache usage by worker",
                   "Prefix hit rate by worker", "Hit rate per policy (router)", "TTFT (workers)", "ITL (workers)",
                   "TTFT / ITL (router, as clients see them)", "Rejections by tenant and reason",
                   "Routed requests by worker")

# Sample names each metric type exposes, from the family name the text parser reports.
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "summary": ("", "_sum", "_count"),
            "gauge": ("",), "unknown": ("",)}
_STRING = re.compile(r'"(?:\\.|[^"\\])*"')
_LABEL_LIST = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}


def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def queries(dashboard: dict) -> list[str]:
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are not functions, keywords or labels."""
    expr = _STRING.sub('""', expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)      # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)     # range selectors ($__rate_interval included)
    expr = _LABEL_LIST.sub("", expr)           # by (...), on (...), group_left (...)
    names = set()
    for match in _IDENT.finditer(expr):
        before, after = expr[:match.start()], expr[match.end():]
        if after.lstrip().startswith("(") or (before and (before[-1].isdigit() or before[-1] == ".")):
            continue   # a function or aggregation; or the exponent of a number
        if match.group().lower() not in _KEYWORDS:
            names.add(match.group())
    return names


def exported(text: str) -> dict[str, str]:
    """Every sample name a /metrics text can carry -> its family's type (labelled families with no
    children yet included: their TYPE line is there, their samples are not)."""
    out = {}
    for family in text_string_to_metric_families(text):
        for suffix in SUFFIXES.get(family.type, ("",)):
            out[family.name + suffix] = family.type
        for sample in family.samples:
            out.setdefault(sample.name, family.type)
    return out


def test_metric_names_are_parsed_out_of_promql():
    expr = ('histogram_quantile(0.99, sum by (le, instance) (rate(vllm:time_to_first_token_seconds_bucket'
            '{model_name="x", phase=~"a|b"}[$__rate_interval]))) * on(instance) group_left() kvlab:time_scale '
            '/ count(up) > bool 1e-9')
    assert metric_names(expr) == {"vllm:time_to_first_token_seconds_bucket", "kvlab:time_scale", "up"}


def test_dashboard_json_is_valid_and_has_the_panels():
    dashboard = load_dashboard()
    assert dashboard["uid"] and dashboard["title"] and isinstance(dashboard["schemaVersion"], int)
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    titles = {p["title"] for p in panels}
    assert set(REQUIRED_PANELS) <= titles, set(REQUIRED_PANELS) - titles
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    for panel in panels:
        assert panel["datasource"]["uid"] == DATASOURCE_UID and panel["targets"], panel["title"]
        assert all(t["expr"].strip() and t["datasource"]["uid"] == DATASOURCE_UID for t in panel["targets"])
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]


def test_every_query_names_metrics_the_services_export(start_worker, start_router):
    worker = start_worker(worker_id="w0")
    router = start_router([worker])
    response, _ = stream_completion(router.url, {"model": MODEL, "prompt": "hello there", "max_tokens": 4})
    assert response.status_code == 200
    available = {**exported(httpx.get(worker.url + "/metrics", trust_env=False).text),
                 **exported(httpx.get(router.url + "/metrics", trust_env=False).text)}

    missing = {(name, expr) for expr in queries(load_dashboard()) for name in metric_names(expr)
               if name not in available}
    assert not missing, sorted(missing)
    for expr in queries(load_dashboard()):   # rate() over a gauge is always a mistake
        for name in re.findall(r"\brate\(\s*([A-Za-z_:][A-Za-z0-9_:]*)", expr):
            assert available[name] in ("counter", "histogram"), (name, available[name])


@pytest.mark.parametrize("name", ["vllm:kv_cache_usage_perc", "kvlab:busy_seconds_total", "kvlab:time_scale",
                                  "vllm:inter_token_latency_seconds_bucket", "kvlab_router_rejections_total"])
def test_the_core_metrics_are_queried(name):
    assert any(name in metric_names(expr) for expr in queries(load_dashboard()))
