"""multipart/form-data (RFC 7578) as the OpenAI audio routes send it: parsing only, no I/O.

The router reads the ``model`` (and ``stream``) fields of an audio request to route it, then forwards
the body untouched; the simulator reads the ``file`` too. Both parse a body already read whole, under
the router's body limit, so this is a plain scan with ``bytes.find``; a part's data is a view of the
body, never a copy (an audio file is most of it). Anything that is not well-formed multipart raises
:class:`MultipartError`, which callers turn into a 400.
"""

from __future__ import annotations

from dataclasses import dataclass

_CRLF = b"\r\n"
_MAX_BOUNDARY = 70  # RFC 2046 5.1.1
_MAX_HEADERS = 16 * 1024  # one part's header block


class MultipartError(ValueError):
    """The body is not the multipart/form-data its Content-Type announces."""


@dataclass(frozen=True, slots=True)
class Part:
    """One form field: its name, its file name when it is a file, and its bytes."""

    name: str
    filename: str | None
    content_type: str | None
    data: memoryview  # of the body


def _params(value: str) -> tuple[str, dict[str, str]]:
    """``type; a=1; b="x y"`` as ``("type", {"a": "1", "b": "x y"})`` (names lower-cased)."""
    head, _, rest = value.partition(";")
    params: dict[str, str] = {}
    i, n = 0, len(rest)
    while i < n:
        while i < n and rest[i] in " \t;":
            i += 1
        eq = rest.find("=", i)
        if eq < 0:
            break
        name = rest[i:eq].strip().lower()
        i = eq + 1
        if i < n and rest[i] == '"':
            out: list[str] = []
            i += 1
            while i < n and rest[i] != '"':
                if rest[i] == "\\" and i + 1 < n:
                    i += 1
                out.append(rest[i])
                i += 1
            if i >= n:
                raise MultipartError(f"unterminated quoted value of {name!r}")
            i += 1
            params[name] = "".join(out)
        else:
            end = rest.find(";", i)
            end = n if end < 0 else end
            params[name] = rest[i:end].strip()
            i = end
    return head.strip().lower(), params


def boundary_of(content_type: str | None) -> bytes:
    """The boundary of a ``multipart/form-data`` Content-Type; MultipartError for any other type."""
    if not content_type:
        raise MultipartError("Content-Type must be multipart/form-data")
    kind, params = _params(content_type)
    if kind != "multipart/form-data":
        raise MultipartError(f"Content-Type must be multipart/form-data, not {kind or 'empty'}")
    boundary = params.get("boundary", "")
    if not 0 < len(boundary) <= _MAX_BOUNDARY or not boundary.isascii():
        raise MultipartError("the multipart/form-data Content-Type has no valid boundary")
    return boundary.encode("ascii")


def _part(body: bytes, view: memoryview, start: int, end: int) -> Part:
    """The part in ``body[start:end]``: headers, a blank line, the data."""
    split = body.find(_CRLF + _CRLF, start, min(end, start + _MAX_HEADERS))
    if split < 0:
        raise MultipartError("a part has no header block")
    name = filename = content_type = None
    for line in body[start:split].split(_CRLF):
        key, sep, value = line.partition(b":")
        if not sep:
            raise MultipartError("a part has a malformed header line")
        header = key.strip().lower()
        text = value.decode("utf-8", "replace").strip()
        if header == b"content-disposition":
            kind, params = _params(text)
            if kind != "form-data" or "name" not in params:
                raise MultipartError("a part's Content-Disposition is not form-data with a name")
            name, filename = params["name"], params.get("filename")
        elif header == b"content-type":
            content_type = text
    if name is None:
        raise MultipartError("a part has no Content-Disposition")
    return Part(name=name, filename=filename, content_type=content_type, data=view[split + 4 : end])


def parse(body: bytes, boundary: bytes) -> list[Part]:
    """Every part of ``body`` in order; MultipartError unless it ends with the closing delimiter."""
    delimiter = b"--" + boundary
    start = 0 if body.startswith(delimiter) else body.find(_CRLF + delimiter)  # a preamble is allowed
    if start < 0:
        raise MultipartError("the body does not contain its multipart boundary")
    pos = start + (0 if start == 0 else 2) + len(delimiter)
    separator = _CRLF + delimiter
    view = memoryview(body)
    parts: list[Part] = []
    while True:
        if body.startswith(b"--", pos):
            return parts  # the closing delimiter; an epilogue after it is ignored
        if not body.startswith(_CRLF, pos):
            raise MultipartError("a multipart boundary is not followed by a line break")
        pos += 2
        end = body.find(separator, pos)
        if end < 0:
            raise MultipartError("the multipart body ends before its closing boundary")
        parts.append(_part(body, view, pos, end))
        pos = end + len(separator)


def text_fields(parts: list[Part], names: tuple[str, ...]) -> dict[str, str]:
    """The first value of each of ``names`` that is a text field (UTF-8), by name."""
    found: dict[str, str] = {}
    for part in parts:
        if part.name in names and part.name not in found and part.filename is None:
            try:
                found[part.name] = str(part.data, "utf-8")
            except UnicodeDecodeError:
                raise MultipartError(f"the form field {part.name!r} is not UTF-8 text") from None
    return found
