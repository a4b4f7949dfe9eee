"""`kvlab render k8s`: every bundled spec renders to objects the Kubernetes schemas accept, and the objects
agree with the spec — checked by feeding the rendered container arguments to kvlab's own router and worker
argument parsers, so the router really reaches each pod by the name the StatefulSet gives it."""
from __future__ import annotations

import argparse
import subprocess
import sys

import kubernetes_validate
import pytest
import yaml

from emulator.spec import example_spec_path, example_specs, load_spec, parse_spec
from kvlab.render import k8s
from kvlab.render.services import SPEC_MOUNT
from router import cli as router_cli
from router.config import SALT_SECRET_ENV
from workers import cli as worker_cli

K8S_VERSION = "1.30"
SPECS = example_specs()


def _render(name: str) -> tuple[object, list[dict]]:
    path = example_spec_path(name)
    return load_spec(path), k8s.manifests(load_spec(path), path.read_text(), admin_token="t0ken")


def _kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def _named(objects: list[dict], name: str, kind: str = "Deployment") -> dict:
    return next(o for o in objects if o["metadata"]["name"] == name and o["kind"] == kind)


def _container(obj: dict) -> dict:
    return obj["spec"]["template"]["spec"]["containers"][0]


def _parse(module, args: list[str], env: dict[str, str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    expanded = [a.replace("$(POD_NAME)", env.get("POD_NAME", "")).replace(SPEC_MOUNT, env["SPEC"]) for a in args]
    return parser.parse_args(expanded)


@pytest.mark.parametrize("name", SPECS)
def test_every_object_validates_against_the_kubernetes_schema(name):
    _, objects = _render(name)
    assert {"ConfigMap", "Secret", "Service", "StatefulSet", "Deployment"} <= {o["kind"] for o in objects}
    for obj in objects:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


@pytest.mark.parametrize("name", SPECS)
def test_pods_are_the_spec_workers_and_the_router_reaches_each_by_its_pod_dns_name(name):
    spec, objects = _render(name)
    pods = {f"{s['metadata']['name']}-{i}": s for s in _kind(objects, "StatefulSet")
            for i in range(s["spec"]["replicas"])}
    slots = {w.id: w for w in spec.worker_list()}
    assert set(pods) == set(slots)
    for pod, sts in pods.items():
        assert sts["metadata"]["labels"]["kvlab.dev/role"] == slots[pod].role
        assert sts["spec"]["serviceName"] == k8s.HEADLESS
        args = _parse(worker_cli, _container(sts)["args"][1:], {"POD_NAME": pod, "SPEC": str(example_spec_path(name))})
        config, port = worker_cli.config_from_args(args)
        assert (config.worker_id, config.role, port) == (pod, slots[pod].role, k8s.WORKER_PORT)
    router = _container(_named(objects, "kvlab-router"))
    config, _, port = router_cli.config_from_args(_parse(router_cli, router["args"][1:],
                                                         {"SPEC": str(example_spec_path(name))}))
    assert {w.id: w.url for w in config.workers} == {
        pod: f"http://{k8s.worker_dns(pod)}:{k8s.WORKER_PORT}" for pod in pods}
    assert port == spec.router.port == _named(objects, "kvlab-router", "Service")["spec"]["ports"][0]["port"]


@pytest.mark.parametrize("name", SPECS)
def test_one_spec_configmap_mounted_by_every_pod_and_scrape_targets_from_it(name):
    spec, objects = _render(name)
    text = _named(objects, "kvlab-spec", "ConfigMap")["data"]["spec.toml"]
    assert parse_spec(text).worker_list() == spec.worker_list()
    for workload in _kind(objects, "StatefulSet") + _kind(objects, "Deployment"):
        volumes = workload["spec"]["template"]["spec"]["volumes"]
        assert {"name": "spec", "configMap": {"name": "kvlab-spec"}} in volumes
    prom = yaml.safe_load(_named(objects, "kvlab-prometheus", "ConfigMap")["data"]["prometheus.yml"])
    targets = {t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    assert targets == ({f"{k8s.worker_dns(w.id)}:{k8s.WORKER_PORT}" for w in spec.worker_list()}
                       | {f"kvlab-router:{spec.router.port}"})
    dashboard = _named(objects, "kvlab-grafana-dashboard", "ConfigMap")["data"]["kvlab.json"]
    assert dashboard == k8s.DASHBOARD.read_text()


def test_router_admin_token_comes_from_the_secret():
    _, objects = _render("default")
    secret = _named(objects, "kvlab-router", "Secret")
    assert secret["stringData"]["admin-token"] == "t0ken"
    router = _container(_named(objects, "kvlab-router"))
    assert router["args"][router["args"].index("--admin-token") + 1] == "$(KVLAB_ADMIN_TOKEN)"
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in router["env"]}
    assert env["KVLAB_ADMIN_TOKEN"] == {"name": secret["metadata"]["name"], "key": "admin-token"}
    assert env[SALT_SECRET_ENV] == {"name": secret["metadata"]["name"], "key": "salt-secret"}
    assert len(secret["stringData"]["salt-secret"]) >= 32


def test_locust_runs_distributed_against_the_router_service():
    spec, objects = _render("default")
    master = _container(_named(objects, "kvlab-locust"))
    worker = _named(objects, "kvlab-locust-worker")
    assert "--master" in master["args"] and f"http://kvlab-router:{spec.router.port}" in master["args"]
    assert worker["spec"]["replicas"] == 2
    assert _container(worker)["args"][-1] == _named(objects, "kvlab-locust", "Service")["metadata"]["name"]


def test_cli_writes_one_file_per_object_and_names_a_bad_pool_in_one_line(tmp_path):
    out = tmp_path / "k8s"
    done = subprocess.run([sys.executable, "-m", "kvlab.cli", "render", "k8s", "default", "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    files = sorted(out.glob("*.yaml"))
    assert len(files) == len(_render("default")[1])
    assert all(yaml.safe_load(f.read_text())["kind"] for f in files)
    bad = tmp_path / "bad.toml"
    bad.write_text('model = "Llama-3.1-8B"\ngpu = "H100-SXM"\n[[pools]]\nname = "big_pool"\n')
    done = subprocess.run([sys.executable, "-m", "kvlab.cli", "render", "k8s", str(bad)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "pools[0].name" in done.stderr and "'big-pool'" in done.stderr
