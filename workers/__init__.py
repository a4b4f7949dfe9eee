"""Emulated vLLM-style workers: a pure engine (KV blocks, scheduler, step timing) and its drivers."""
