"""Kubernetes manifests from a cluster spec: plain objects a reader can follow, no templating engine.

- the spec itself as the ConfigMap ``kvlab-spec`` every kvlab pod mounts at SPEC_MOUNT (one source of truth);
- one StatefulSet per worker pool, named after the pool, so pod names are the spec's worker ids
  (``<pool>-<i>``) and the router's hash ring stays the same across restarts; one headless Service,
  ``kvlab-workers``, gives each pod the DNS name ``<id>.kvlab-workers``; every worker listens on WORKER_PORT
  (pods have their own addresses, so the spec's per-worker ports are not needed);
- the router as a Deployment + Service, reaching workers by that DNS name, its admin token and the secret
  salted tenants' cache salts derive from in the Secret ``kvlab-router`` (one secret for every router replica);
- Prometheus scrape annotations on every pod plus a scrape-config ConfigMap, the Grafana dashboard as a
  ConfigMap (label ``grafana_dashboard``, the Grafana sidecar's convention);
- Locust in its distributed mode: a master Deployment + Service and a worker Deployment.
"""
from __future__ import annotations

import secrets
from pathlib import Path

import yaml

from emulator.spec import ClusterSpec
from kvlab.render.services import SPEC_MOUNT, Service, router_service, worker_services
from router.config import SALT_SECRET_ENV

WORKER_PORT = 8100
HEADLESS = "kvlab-workers"
LOCUST_WEB_PORT, LOCUST_MASTER_PORT = 8089, 5557   # Locust's defaults for the web UI and worker connections
LABELS = {"app.kubernetes.io/name": "kvlab", "app.kubernetes.io/part-of": "kvlab"}
DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "dashboards" / "kvlab.json"
# Per-pod CPU requests, from measured CPU per emulated output token on the default spec (16 tokens per SSE
# chunk; benchmarks/host_cost.py on a 2-core host, 57.3 req/s at time scale 1): ~8-9 us per token in each
# worker and ~9 us in the router, 0.13-0.15 core each at ~16k tokens per wall second (the default spec's
# C_max, ~56 emulated req/s, at time scale 1). A router's RSS grew 174 -> 220 MB over a 200 s run at that rate
# (memory requests 384Mi); the requests below leave headroom for larger pools per router and lower time scales.
WORKER_RESOURCES = {"requests": {"cpu": "250m", "memory": "384Mi"}, "limits": {"memory": "1Gi"}}
ROUTER_RESOURCES = {"requests": {"cpu": "500m", "memory": "384Mi"}, "limits": {"memory": "1Gi"}}
LOCUST_RESOURCES = {"requests": {"cpu": "500m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}}


class RenderError(ValueError):
    """A spec that cannot become Kubernetes objects as it is; the message names the field and the fix."""


def manifests(spec: ClusterSpec, spec_text: str, *, image: str = "kvlab:latest", locust_workers: int = 2,
              admin_token: str | None = None, salt_secret: str | None = None) -> list[dict]:
    """Every object for one cluster, in apply order (config first)."""
    _check_names(spec)
    workers = worker_services(spec)
    router = router_service(spec, worker_host="{id}." + HEADLESS)
    token = admin_token or secrets.token_hex(16)
    salt = salt_secret or secrets.token_hex(32)
    objects = [_config_map("kvlab-spec", {"spec.toml": spec_text}),
               _secret("kvlab-router", {"admin-token": token, "salt-secret": salt}),
               _config_map("kvlab-prometheus", {"prometheus.yml": prometheus_config(spec)}),
               _headless_service()]
    if DASHBOARD.is_file():   # a source checkout; an installed kvlab has no deploy/ folder
        objects.insert(3, _config_map("kvlab-grafana-dashboard", {"kvlab.json": DASHBOARD.read_text()},
                                      labels={"grafana_dashboard": "1"}))
    objects += [_stateful_set(pool, [w for w in workers if w.pool == pool], image) for pool in _pools(workers)]
    objects += [_router_deployment(router, image), _service("kvlab-router", "router", router.port)]
    objects += _locust(image, locust_workers, router.port)
    return objects


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the spec, configs) as literal blocks, so the ConfigMaps read like the files."""


_Dumper.add_representer(str, lambda d, v: d.represent_scalar("tag:yaml.org,2002:str", v,
                                                             style="|" if "\n" in v else None))


def render_yaml(objects: list[dict]) -> str:
    return "---\n".join(yaml.dump(o, Dumper=_Dumper, sort_keys=False, width=120) for o in objects)


def worker_dns(worker_id: str) -> str:
    return f"{worker_id}.{HEADLESS}"


def prometheus_config(spec: ClusterSpec) -> str:
    router = f"kvlab-router:{spec.router.port}"
    workers = [f"{worker_dns(w.id)}:{WORKER_PORT}" for w in spec.worker_list()]
    config = {"global": {"scrape_interval": "2s", "evaluation_interval": "2s"},
              "scrape_configs": [{"job_name": "kvlab-router", "static_configs": [{"targets": [router]}]},
                                 {"job_name": "kvlab-workers", "static_configs": [{"targets": workers}]}]}
    return yaml.safe_dump(config, sort_keys=False)


# -- objects -----------------------------------------------------------------------------------------

def _check_names(spec: ClusterSpec) -> None:
    for i, pool in enumerate(spec.pools):
        if "_" in pool.name:   # the spec allows it; DNS-1123 names (pods, StatefulSets) do not
            raise RenderError(f"spec error at pools[{i}].name: {pool.name!r} is not a Kubernetes name; "
                              f"use {pool.name.replace('_', '-')!r}")


def _pools(workers: list[Service]) -> list[str]:
    return list(dict.fromkeys(w.pool for w in workers))


def _meta(name: str, component: str | None = None, labels: dict | None = None) -> dict:
    merged = {**LABELS, **({"app.kubernetes.io/component": component} if component else {}), **(labels or {})}
    return {"name": name, "labels": merged}


def _config_map(name: str, data: dict, labels: dict | None = None) -> dict:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(name, labels=labels), "data": data}


def _secret(name: str, data: dict) -> dict:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": _meta(name), "type": "Opaque", "stringData": data}


def _headless_service() -> dict:
    return {"apiVersion": "v1", "kind": "Service", "metadata": _meta(HEADLESS, "worker"),
            "spec": {"clusterIP": "None", "publishNotReadyAddresses": True,
                     "selector": _selector("worker"),
                     "ports": [{"name": "http", "port": WORKER_PORT, "targetPort": "http"}]}}


def _service(name: str, component: str, port: int, extra_ports: list[dict] | None = None) -> dict:
    ports = [{"name": "http", "port": port, "targetPort": "http"}] + (extra_ports or [])
    return {"apiVersion": "v1", "kind": "Service", "metadata": _meta(name, component),
            "spec": {"selector": _selector(component), "ports": ports}}


def _selector(component: str, pool: str | None = None) -> dict:
    labels = {"app.kubernetes.io/name": "kvlab", "app.kubernetes.io/component": component}
    return {**labels, **({"kvlab.dev/pool": pool} if pool else {})}


def _stateful_set(pool: str, workers: list[Service], image: str) -> dict:
    args = ["worker", "--spec", SPEC_MOUNT, "--worker-id", "$(POD_NAME)", "--host", "0.0.0.0",
            "--port", str(WORKER_PORT), "--advertise-url", f"http://$(POD_NAME).{HEADLESS}:{WORKER_PORT}",
            "--peer-host", "{id}." + HEADLESS, "--peer-port", str(WORKER_PORT)]   # the prefill pods' names
    container = _container("worker", image, args, WORKER_PORT, WORKER_RESOURCES)
    container["env"] = [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]
    selector = _selector("worker", pool)
    return {"apiVersion": "apps/v1", "kind": "StatefulSet",
            "metadata": _meta(pool, "worker", {"kvlab.dev/pool": pool, "kvlab.dev/role": workers[0].role}),
            "spec": {"serviceName": HEADLESS, "replicas": len(workers), "podManagementPolicy": "Parallel",
                     "selector": {"matchLabels": selector},
                     "template": _pod_template(selector, container, WORKER_PORT)}}


def _router_deployment(router: Service, image: str) -> dict:
    args = [*router.command[1:], "--worker-port", str(WORKER_PORT), "--admin-token", "$(KVLAB_ADMIN_TOKEN)"]
    container = _container("router", image, args, router.port, ROUTER_RESOURCES)
    container["env"] = [_secret_env("KVLAB_ADMIN_TOKEN", "admin-token"),
                        _secret_env(SALT_SECRET_ENV, "salt-secret")]   # salted tenants' cache salts
    return _deployment("kvlab-router", "router", 1, _pod_template(_selector("router"), container, router.port))


def _locust(image: str, workers: int, router_port: int) -> list[dict]:
    locustfile = "/opt/kvlab/loadtests/locustfile.py"
    master_args = ["-f", locustfile, "--master", "--host", f"http://kvlab-router:{router_port}"]
    master = _container("locust-master", image, master_args, LOCUST_WEB_PORT, LOCUST_RESOURCES, probe=False)
    master["command"] = ["locust"]
    master["ports"].append({"name": "master", "containerPort": LOCUST_MASTER_PORT})
    worker = _container("locust-worker", image, ["-f", locustfile, "--worker", "--master-host", "kvlab-locust"],
                        None, LOCUST_RESOURCES, probe=False)
    worker["command"] = ["locust"]
    return [_deployment("kvlab-locust", "locust-master", 1,
                        _pod_template(_selector("locust-master"), master, None)),
            _service("kvlab-locust", "locust-master", LOCUST_WEB_PORT,
                     [{"name": "master", "port": LOCUST_MASTER_PORT, "targetPort": "master"}]),
            _deployment("kvlab-locust-worker", "locust-worker", workers,
                        _pod_template(_selector("locust-worker"), worker, None))]


def _secret_env(name: str, key: str) -> dict:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": "kvlab-router", "key": key}}}


def _deployment(name: str, component: str, replicas: int, template: dict) -> dict:
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta(name, component),
            "spec": {"replicas": replicas, "selector": {"matchLabels": template["metadata"]["labels"]},
                     "template": template}}


def _container(name: str, image: str, args: list[str], port: int | None, resources: dict,
               probe: bool = True) -> dict:
    container = {"name": name, "image": image, "command": ["kvlab"], "args": args,
                 "ports": [{"name": "http", "containerPort": port}] if port else [],
                 "resources": resources,
                 "volumeMounts": [{"name": "spec", "mountPath": SPEC_MOUNT, "subPath": "spec.toml",
                                   "readOnly": True}]}
    if probe and port:
        health = {"httpGet": {"path": "/health", "port": "http"}}
        container["readinessProbe"] = {**health, "periodSeconds": 2, "failureThreshold": 3}
        container["livenessProbe"] = {**health, "initialDelaySeconds": 10, "periodSeconds": 10,
                                      "failureThreshold": 6}
    return container


def _pod_template(labels: dict, container: dict, metrics_port: int | None) -> dict:
    annotations = ({"prometheus.io/scrape": "true", "prometheus.io/port": str(metrics_port),
                    "prometheus.io/path": "/metrics"} if metrics_port else {})
    return {"metadata": {"labels": {**LABELS, **labels}, **({"annotations": annotations} if annotations else {})},
            "spec": {"containers": [container],
                     "volumes": [{"name": "spec", "configMap": {"name": "kvlab-spec"}}]}}
