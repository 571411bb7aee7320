"""Local observability: a Prometheus process and its scrape config (``kvstack up --prometheus``)."""
