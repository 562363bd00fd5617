"""Observability: query statistics, Prometheus metrics, the push to the collector."""
