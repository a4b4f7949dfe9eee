"""The one place the sweep talks to the analytical planner (emulator.planner): a ClusterSpec and its
workload become the planner's inputs, and its operating points come back as the sweep's columns.

Everything the planner needs is read from the same spec the live cluster and the simulator run, so a
gap between measured and planned is a gap in the model, never in the inputs. If the planner is
missing or refuses the spec, the sweep still runs and says why the planned column is empty.
"""
from __future__ import annotations

from dataclasses import dataclass

from emulator.planner import from_spec as planner_spec
from emulator.spec import ClusterSpec


@dataclass
class Prediction:
    points: list            # emulator.planner.CurvePoint per requested rate (ttft_p99, itl_p99, goodput, ...)
    c_max: float | None
    error: str | None = None      # why there is no prediction


def planner_inputs(spec: ClusterSpec, samples: int = planner_spec.SAMPLE_REQUESTS):
    """(PlanRequest, Workload, Cluster, Slo) for a spec: its deployment, engine limits, workload (its
    first `samples` requests), SLO."""
    from emulator.planner import Cluster, Slo

    request = planner_spec.plan_request(spec)
    workload = planner_spec.sampled_workload(spec, 1.0, samples)
    cluster = Cluster(workers=_count(spec, "both"), prefill=_count(spec, "prefill"), decode=_count(spec, "decode"))
    slo = Slo(ttft_p99=spec.slo.ttft_p99_s, itl_p99=spec.slo.itl_p99_s, e2e_p99=spec.slo.e2e_p99_s)
    return request, workload, cluster, slo


def _count(spec: ClusterSpec, role: str) -> int:
    return sum(p.count for p in spec.pools_with_role(role))


def predict(spec: ClusterSpec, rates: list[float]) -> Prediction:
    """The planner's curve at each rate and its C_max for the spec's cluster."""
    try:
        from emulator import planner
    except ImportError as exc:
        return Prediction([], None, f"planner not available ({exc})")
    try:
        request, workload, cluster, slo = planner_inputs(spec)
        curve = planner.curve(request, workload, slo, cluster, list(rates), spec.catalog_data())
        return Prediction(list(curve.points), float(curve.max_rate))
    except planner.PlannerError as exc:
        return Prediction([], None, f"planner refused the spec: {exc}")
