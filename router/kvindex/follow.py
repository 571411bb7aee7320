"""Keep a :class:`KVEventSubscriber` following the engine registry's membership."""

from __future__ import annotations

from kvstack.router.engines import Endpoint, EngineRegistry
from kvstack.router.kvindex.subscriber import KVEventSubscriber


def sync_once(registry: EngineRegistry, subscriber: KVEventSubscriber, seen: dict[str, Endpoint]) -> None:
    """Subscribe to engines that joined (or changed endpoints), drop those that left."""
    current = {st.url: st for st in registry.all()}
    for url in [u for u in seen if u not in current]:
        subscriber.remove_engine(url)
        del seen[url]
    for url, st in current.items():
        if seen.get(url) != st.endpoint:  # new, or the URL now names another pod (IP reuse)
            subscriber.add_engine(st)
            seen[url] = st.endpoint


async def follow_registry(registry: EngineRegistry, subscriber: KVEventSubscriber) -> None:
    """Run until cancelled; the registry bumps ``generation`` on every membership or endpoint change."""
    seen: dict[str, Endpoint] = {}
    generation = -1
    while True:
        if generation != registry.generation:
            generation = registry.generation
            sync_once(registry, subscriber, seen)
        await registry.next_generation(generation)
