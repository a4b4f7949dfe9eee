"""Forwarding a job to workers: the streaming proxy, SSE relay, upstream HTTP client, P/D sequencing, failover."""
