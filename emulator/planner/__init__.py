"""Analytical capacity planner: roofline service times plus queueing theory (pure, no I/O).

Entry points (see `api`): `capacity` (C_max of a cluster and what binds), `curve` (predicted
latency-throughput curve), `plan` (workers, GPUs and cost for a target rate).
"""
from emulator.planner import spares
from emulator.planner.api import Capacity, Limit, Plan, PoolPlan, capacity, curve, plan
from emulator.planner.cost import Cost
from emulator.planner.curve import Curve, CurvePoint
from emulator.planner.errors import PlannerError
from emulator.planner.inputs import LengthDist, PlanRequest, Slo, Workload
from emulator.planner.operating import Cluster

__all__ = ["Capacity", "Cluster", "Cost", "Curve", "CurvePoint", "LengthDist", "Limit", "Plan",
           "PlanRequest", "PlannerError", "PoolPlan", "Slo", "Workload", "capacity", "curve", "plan", "spares"]
