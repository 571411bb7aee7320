"""Engine discovery: which engines exist, kept in the router's :class:`EngineRegistry`.

- :class:`StaticDiscovery`: URLs from the command line and/or a reloadable YAML/JSON file.
- :class:`KubernetesDiscovery`: list + watch of engine Pods by label selector.

Both only manage membership; :class:`kvstack.router.monitor.EngineMonitor` probes, scrapes and
learns the models of whatever is in the registry.
"""

from kvstack.router.discovery.kubernetes import KubernetesConfig, KubernetesDiscovery
from kvstack.router.discovery.static import StaticDiscovery, load_endpoints_file, parse_endpoints

__all__ = [
    "KubernetesConfig",
    "KubernetesDiscovery",
    "StaticDiscovery",
    "load_endpoints_file",
    "parse_endpoints",
]
