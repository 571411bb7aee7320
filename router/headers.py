"""Request headers: what the router reads from the client's, and what it forwards to the engine."""

from __future__ import annotations

from kvstack.common.errors import OpenAIError

Headers = list[tuple[bytes, bytes]]

# never forwarded upstream: hop-by-hop, recomputed, or replaced by the router
DROP = frozenset(
    {
        b"host",
        b"content-length",
        b"connection",
        b"keep-alive",
        b"transfer-encoding",
        b"te",
        b"trailer",
        b"upgrade",
        b"proxy-authorization",
        b"proxy-connection",
        b"expect",
        b"accept-encoding",  # identity only: the body is relayed as is
        b"x-request-id",
        b"authorization",
    }
)


def scan_headers(headers: Headers, session_name: bytes) -> tuple[bytes | None, int | None, bytes | None]:
    """(authorization, content-length, session header) in one pass; 400 on a bad Content-Length."""
    auth = declared = session = None
    for name, value in headers:
        if name == b"authorization":
            auth = value
        elif name == b"content-length":
            try:
                declared = int(value)
            except ValueError:
                raise OpenAIError(400, "invalid Content-Length header") from None
        elif name == session_name:
            session = value
    return auth, declared, session


def upstream_headers(
    headers: Headers, request_id: str, engine_key: bytes | None, pass_authorization: bool
) -> Headers:
    """The client's headers as the engine gets them: ``engine_key`` (a bearer token) replaces the
    client's authorization; without one, the client's is passed on only when ``pass_authorization``."""
    out = [(k, v) for k, v in headers if k not in DROP]
    out.append((b"x-request-id", request_id.encode("latin-1")))
    if engine_key is not None:
        out.append((b"authorization", b"Bearer " + engine_key))
    elif pass_authorization:
        out.extend((k, v) for k, v in headers if k == b"authorization")
    return out
