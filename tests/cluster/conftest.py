"""The cluster fixtures (``cluster``, ``namespace``, ``cluster_tools``) for ``@pytest.mark.cluster`` tests.

They live in :mod:`kvstack.testing.pytest_plugin`; once the root conftest lists that module in
``pytest_plugins``, delete these imports (two registrations would start two session clusters).
"""

from kvstack.testing.pytest_plugin import cluster, cluster_tools, namespace, pytest_collection_finish

__all__ = ["cluster", "cluster_tools", "namespace", "pytest_collection_finish"]
