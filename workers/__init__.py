"""Emulated vLLM-style workers: the pure engine (core/) and, around it, the worker server, its wall-clock driver,
metrics and KV events."""
