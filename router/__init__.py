"""The router: pure routing policies (policies/) and, around them, the front door, forwarding, the worker pool
and observability; config, server and CLI here."""
