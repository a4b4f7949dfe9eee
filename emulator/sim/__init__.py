"""The discrete-event simulator: the workers' engine and the router's policies on a virtual clock."""
