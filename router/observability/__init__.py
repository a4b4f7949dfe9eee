"""What the router shows: Prometheus metrics, the cluster view and the live dashboard."""
