"""Write a (modified) cluster spec back to a TOML file, for the processes that read specs from disk.

The sweep's tests and `kvlab compare --live` derive specs (another policy, a smaller cluster) and hand
them to `kvlab worker/router --spec FILE`. msgspec can decode TOML but encoding needs tomli_w, which
kvlab does not depend on; a spec is simple enough (tables, arrays of tables, inline tables of
scalars) to write here.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import msgspec


def write_spec(spec: Any, path: str | Path) -> Path:
    """`spec`: a ClusterSpec or the equivalent dict. None values are left out (they are the defaults)."""
    data = msgspec.to_builtins(spec) if not isinstance(spec, dict) else spec
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dumps(data))
    return path


def dumps(data: dict) -> str:
    lines = [f"{k} = {_value(v)}" for k, v in data.items() if _scalar_like(v)]
    for key, value in data.items():
        if isinstance(value, dict):
            lines += ["", f"[{key}]"] + [f"{k} = {_value(v)}" for k, v in value.items() if v is not None]
        elif isinstance(value, list) and value and all(isinstance(x, dict) for x in value):
            for table in value:
                lines += ["", f"[[{key}]]"] + [f"{k} = {_value(v)}" for k, v in table.items() if v is not None]
    return "\n".join(lines) + "\n"


def _scalar_like(v: Any) -> bool:
    if v is None or isinstance(v, dict):
        return False
    return not (isinstance(v, list) and v and all(isinstance(x, dict) for x in v))


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"TOML cannot hold {v}")
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)   # a JSON string is a valid TOML basic string
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{_key(k)} = {_value(x)}" for k, x in v.items() if x is not None) + " }"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def _key(k: str) -> str:
    return k if k.replace("_", "").replace("-", "").isalnum() else json.dumps(k)
