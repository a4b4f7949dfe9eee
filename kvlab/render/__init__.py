"""Deployments rendered from one spec: the kvlab services a spec implies (one list, read by docker compose's check
and by `kvlab render k8s`) and Kubernetes manifests built from it."""
