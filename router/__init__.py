"""The router: pure routing policies (policies/) and, around them, the front door, forwarding, the worker pool
and observability; config, server, CLI and the processes sharing one port (in-flight counts and tenant buckets
in shared memory) here."""
