"""kvlab physics and math: hardware/model catalogs, the roofline, cluster spec, simulator, planner. No I/O."""
