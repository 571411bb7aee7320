"""Keep a :class:`KVEventSubscriber` following the engine registry's membership."""

from __future__ import annotations

from kvstack.router.engines import Endpoint, EngineRegistry
from kvstack.router.kvindex.subscriber import KVEventSubscriber

FeedKey = tuple[str, str | None, str | None]


def feed_key(endpoint: Endpoint) -> FeedKey:
    """What an engine's feed depends on: which pod it is and where it publishes. Another pod at the
    URL (IP reuse) or new event endpoints start it afresh; a new device or model list does not (a
    new feed forgets the engine's indexed blocks)."""
    return endpoint.name, endpoint.kv_events_endpoint, endpoint.kv_events_replay_endpoint


def sync_once(registry: EngineRegistry, subscriber: KVEventSubscriber, seen: dict[str, FeedKey]) -> None:
    """Subscribe to engines that joined (or changed feeds), drop those that left."""
    current = {st.url: st for st in registry.all()}
    for url in [u for u in seen if u not in current]:
        subscriber.remove_engine(url)
        del seen[url]
    for url, st in current.items():
        key = feed_key(st.endpoint)
        if seen.get(url) != key:  # new, or the URL now names another pod or publishes elsewhere
            subscriber.add_engine(st)
            seen[url] = key


async def follow_registry(registry: EngineRegistry, subscriber: KVEventSubscriber) -> None:
    """Run until cancelled; the registry bumps ``generation`` on every membership or endpoint change."""
    seen: dict[str, FeedKey] = {}
    generation = -1
    while True:
        if generation != registry.generation:
            generation = registry.generation
            sync_once(registry, subscriber, seen)
        await registry.next_generation(generation)
