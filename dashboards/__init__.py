"""Grafana dashboards and Prometheus rules for kvstack, generated from Python (``kvstack dashboards``)."""
