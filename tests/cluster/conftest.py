"""Cluster tests use the session fixtures registered in tests/conftest.py (kvstack.testing.pytest_plugin)."""
