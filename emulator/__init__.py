"""The emulated cluster's description and the math built on it: physics (floor 1), the spec, the engine's
settings and workloads (floor 2, modules here), the simulator and the planner (floor 5)."""
