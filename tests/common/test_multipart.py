"""multipart/form-data parsing (the router's and the simulator's audio routes): table-driven, against
bodies built by httpx, as the openai SDK sends them."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from kvstack.common import multipart


def form(data: dict[str, str], files: dict[str, Any]) -> tuple[bytes, str]:
    """The body and Content-Type httpx (the openai SDK's transport) sends for a form."""
    request = httpx.Request("POST", "http://x/", data=data, files=files)
    return request.read(), request.headers["content-type"]


def test_a_form_as_httpx_sends_it() -> None:
    body, content_type = form(
        {"model": "whisper", "stream": "true"}, {"file": ("a.wav", b"\r\n--RIFF\x00", "audio/wav")}
    )
    parts = multipart.parse(body, multipart.boundary_of(content_type))
    assert [(p.name, p.filename) for p in parts] == [("model", None), ("stream", None), ("file", "a.wav")]
    assert parts[2].data == b"\r\n--RIFF\x00" and parts[2].content_type == "audio/wav"
    assert multipart.text_fields(parts, ("model", "stream", "user")) == {"model": "whisper", "stream": "true"}


def test_quoted_names_and_a_preamble() -> None:
    body = (
        b'preamble\r\n--b\r\nContent-Disposition: form-data; name="a \\"q\\""\r\n\r\nv\r\n--b--\r\nepilogue'
    )
    (part,) = multipart.parse(body, b"b")
    assert (part.name, part.data) == ('a "q"', b"v")


@pytest.mark.parametrize(
    "content_type",
    [
        None,
        "",
        "application/json",
        "multipart/form-data",
        "multipart/form-data; boundary=",
        "text/plain; boundary=x",
    ],
)
def test_content_types_without_a_form_boundary(content_type: str | None) -> None:
    with pytest.raises(multipart.MultipartError):
        multipart.boundary_of(content_type)


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"no boundary here",
        b'--b\r\nContent-Disposition: form-data; name="m"\r\n\r\nv',  # never closed
        b"--bX\r\n",  # a boundary not followed by a line break
        b'--b\r\nContent-Disposition: form-data; name="m"\r\nv\r\n--b--',  # no blank line after headers
        b"--b\r\nno colon\r\n\r\nv\r\n--b--",
        b'--b\r\nContent-Disposition: attachment; name="m"\r\n\r\nv\r\n--b--',
        b"--b\r\nContent-Type: text/plain\r\n\r\nv\r\n--b--",  # no Content-Disposition
        b'--b\r\nContent-Disposition: form-data; name="m\r\n\r\nv\r\n--b--',  # unterminated quote
    ],
)
def test_malformed_bodies(body: bytes) -> None:
    with pytest.raises(multipart.MultipartError):
        multipart.parse(body, b"b")


def test_a_text_field_that_is_not_utf8() -> None:
    parts = multipart.parse(b'--b\r\nContent-Disposition: form-data; name="model"\r\n\r\n\xff\r\n--b--', b"b")
    with pytest.raises(multipart.MultipartError, match="UTF-8"):
        multipart.text_fields(parts, ("model",))


def test_an_empty_part_and_data_that_is_a_view_of_the_body() -> None:
    body = (
        b'--b\r\nContent-Disposition: form-data; name="e"\r\n\r\n\r\n'
        b'--b\r\nContent-Disposition: form-data; name="f"; filename="x"\r\n\r\n123\r\n--b--'
    )
    empty, file = multipart.parse(body, b"b")
    assert (empty.name, bytes(empty.data)) == ("e", b"")
    assert file.data.obj is body and bytes(file.data) == b"123"
