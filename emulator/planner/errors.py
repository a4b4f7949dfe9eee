"""The one exception the planner raises: inputs that have no answer, with the reason in words."""


class PlannerError(ValueError):
    """Infeasible or invalid planner input (the model does not fit, an SLO below what physics allows...)."""
