"""`kvlab render k8s SPEC [--out DIR]`: Kubernetes manifests for a spec, to stdout or one file per object."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from emulator.spec import SpecError, load_spec, resolve_spec_path
from kvlab.render.k8s import RenderError, manifests, render_yaml


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", choices=["k8s"], help="what to render (k8s: Kubernetes manifests)")
    parser.add_argument("spec", nargs="?", default="default", help="cluster spec file or bundled example name")
    parser.add_argument("--out", default=None, help="write one YAML file per object here instead of stdout")
    parser.add_argument("--image", default="kvlab:latest", help="container image (default %(default)s: "
                                                                "`docker build -t kvlab:latest .`)")
    parser.add_argument("--locust-workers", type=int, default=2, help="Locust worker replicas (default %(default)s)")
    parser.add_argument("--admin-token", default=None,
                        help="the router's admin token (default: a fresh random one in the kvlab-router Secret)")
    parser.add_argument("--salt-secret-file", default=None,
                        help="file holding the tenants' cache-salt secret (default: a fresh random one; keep it "
                             "across renders to keep salted tenants' caches)")


def _read(path: str | None) -> str | None:
    return Path(path).read_text().strip() if path else None


def run(args: argparse.Namespace) -> int:
    try:
        path = resolve_spec_path(args.spec)
        objects = manifests(load_spec(path), Path(path).read_text(), image=args.image,
                            locust_workers=args.locust_workers, admin_token=args.admin_token,
                            salt_secret=_read(args.salt_secret_file))
    except (SpecError, RenderError, FileNotFoundError) as exc:
        print(f"kvlab render: {exc}", file=sys.stderr)
        return 2
    if args.out is None:
        sys.stdout.write(render_yaml(objects))
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i, obj in enumerate(objects):
        (out / f"{i:02d}-{obj['kind'].lower()}-{obj['metadata']['name']}.yaml").write_text(render_yaml([obj]))
    print(f"kvlab render: {len(objects)} objects in {out}/ (kubectl apply -f {out}/)")
    return 0
