"""Request headers: what the router reads from the client's, and what it forwards to the engine;
and the headers of an engine's answer that reach the client."""

from __future__ import annotations

from kvstack.common.errors import OpenAIError

Headers = list[tuple[bytes, bytes]]

# never forwarded upstream: hop-by-hop (RFC 9110 7.6.1), recomputed, replaced by the router, or the
# client's own business (cookies belong to whatever site set them, never to an engine)
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
        b"cookie",
        b"x-forwarded-for",  # re-sent with the client's address appended
    }
)
_MAX_RETRY_AFTER = 32  # a delay in seconds or an HTTP date; anything longer is not one


def scan_headers(headers: Headers, session_name: bytes) -> tuple[bytes | None, int | None, bytes | None]:
    """(authorization, content-length, session header) in one pass.

    400 on a bad Content-Length, and on two Authorization headers: which one a proxy or an engine
    would honour differs, so neither is guessed.
    """
    auth = declared = session = None
    for name, value in headers:
        if name == b"authorization":
            if auth is not None:
                raise OpenAIError(400, "more than one Authorization header")
            auth = value
        elif name == b"content-length":
            try:
                declared = int(value)
            except ValueError:
                raise OpenAIError(400, "invalid Content-Length header") from None
        elif name == session_name:
            session = value
    return auth, declared, session


def header_value(headers: Headers, name: bytes, limit: int = 128) -> str | None:
    """The first ``name`` header's value (``name`` lower-case) as text, stripped; None when absent,
    empty, longer than ``limit`` or not printable ASCII (it ends up in logs)."""
    for key, value in headers:
        if key == name:
            text = value.strip()
            if 0 < len(text) <= limit and text.isascii() and text.decode("ascii").isprintable():
                return text.decode("ascii")
            return None
    return None


def upstream_headers(
    headers: Headers,
    request_id: str,
    engine_key: bytes | None,
    pass_authorization: bool,
    client_host: str | None = None,
) -> Headers:
    """The client's headers as the engine gets them.

    ``engine_key`` (a bearer token) replaces the client's authorization; without one, the client's
    is passed on only when ``pass_authorization``. Headers the client named in ``Connection`` are
    hop-by-hop and dropped. ``X-Forwarded-For`` gets ``client_host`` appended (the address the
    router saw), so the engine never takes a client's claim for its address.
    """
    drop = DROP
    forwarded: list[bytes] = []
    for name, value in headers:
        if name == b"connection":
            named = {t.strip().lower() for t in value.split(b",") if t.strip()}
            drop = drop | named
        elif name == b"x-forwarded-for":
            forwarded.append(value.strip())
    out = [(k, v) for k, v in headers if k not in drop]
    if client_host is not None:
        forwarded.append(client_host.encode("latin-1"))
    if forwarded:
        out.append((b"x-forwarded-for", b", ".join(forwarded)))
    out.append((b"x-request-id", request_id.encode("latin-1")))
    if engine_key is not None:
        out.append((b"authorization", b"Bearer " + engine_key))
    elif pass_authorization:
        out.extend((k, v) for k, v in headers if k == b"authorization")
    return out


def answer_headers(status: int, content_type: str, retry_after: str | None) -> Headers:
    """The headers of an engine's non-streamed answer as the client gets them.

    A 429 or 503 keeps the engine's ``Retry-After`` (when it is a plausible value), and gets one
    of 1 s when the engine gave none: a client is always told when to come back.
    """
    headers = [(b"content-type", content_type.encode("latin-1"))]
    if status in (429, 503):
        value = (retry_after or "").strip()
        plausible = 0 < len(value) <= _MAX_RETRY_AFTER and value.isascii() and value.isprintable()
        headers.append((b"retry-after", value.encode("ascii") if plausible else b"1"))
    return headers
