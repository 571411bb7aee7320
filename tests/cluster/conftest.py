"""Cluster tests use the session fixtures registered in tests/conftest.py (kvstack_testing.pytest_plugin)."""
