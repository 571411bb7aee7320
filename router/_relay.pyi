# Types of the compiled relay (router/native, built as kvstack.router._relay); see native_relay.py.
from collections.abc import Sequence

Event = tuple[object, ...]

class Exchange:
    def __init__(
        self,
        host: str,
        port: int,
        request: bytes,
        connect_timeout_s: float,
        idle_timeout_s: float,
        max_bytes: int,
        pool_idle_s: float,
        max_event: int = 0,
    ) -> None: ...
    def wake_fd(self) -> int: ...
    def poll(self) -> list[Event]: ...
    def forward(self, fd: int, chunked: bool, unsent: Sequence[bytes] = ...) -> None: ...
    def cancel(self) -> None: ...

def clear_pool() -> None: ...
def forwarding_thread() -> bool: ...
