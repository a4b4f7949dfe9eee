"""A drawn cluster's planner context at a rate (prompt points binned for that rate's prefix hits)."""
from emulator.planner import context, operating
from emulator.planner.context import Context
from emulator.planner.operating import Cluster
from loadtests import planner_bridge
from loadtests.planner_draws import Draw


def context_at(draw: Draw, rate: float) -> tuple[Context, Cluster]:
    spec = draw.spec()
    req, work, cluster, _ = planner_bridge.planner_inputs(spec)
    return operating.at_rate(context.build(req, work, spec.catalog_data()), cluster, rate), cluster
