"""An incremental multipart parser (RFC 2046 5.1, with RFC 2387 multipart/related), for STOW-RS request bodies.

The body is fed in the chunks it arrives in; the parser keeps at most one
delimiter's length of body bytes (plus one part's header block) back, so a
request of any size is parsed in constant memory and each part's content can
go to disk as it arrives. The delimiter is CRLF "--" boundary; the first one
may open the body without its CRLF; text before it (the preamble) and after
the closing delimiter (the epilogue) is ignored, as RFC 2046 says.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from email.message import Message

MAX_HEADER_BYTES = 16 * 1024  # a part's header block; real ones are a few lines


class MalformedMultipart(ValueError):
    """The body does not follow RFC 2046's multipart syntax."""


@dataclass(frozen=True)
class PartStart:
    headers: dict[str, str]  # names in lower case

    @property
    def content_type(self) -> str | None:
        return self.headers.get("content-type")


@dataclass(frozen=True)
class PartData:
    data: bytes


@dataclass(frozen=True)
class PartEnd:
    pass


Event = PartStart | PartData | PartEnd


def media_type(value: str) -> tuple[str, dict[str, str]]:
    """A Content-Type header's media type (lower case) and parameters (names in lower case, values unquoted)."""
    message = Message()
    message["content-type"] = value
    params = {name.lower(): str(v) for name, v in (message.get_params() or [])[1:]}
    main = value.split(";", 1)[0].strip().lower()
    return main, params


class MultipartParser:
    """Feed body chunks, get events: PartStart, PartData (any number), PartEnd per part; `close()` at the end."""

    def __init__(self, boundary: str):
        if not boundary or len(boundary) > 70:
            raise MalformedMultipart("the boundary parameter must have 1 to 70 characters (RFC 2046 5.1.1)")
        self._delimiter = b"\r\n--" + boundary.encode("ascii", errors="strict")
        self._buffer = bytearray(b"\r\n")  # lets the opening delimiter start the body without its CRLF
        self._state = "preamble"  # preamble, after_delimiter, headers, body, epilogue
        self.parts = 0

    def feed(self, chunk: bytes) -> Iterator[Event]:
        if self._state == "epilogue":
            return
        self._buffer += chunk
        yield from self._parse()

    def close(self) -> Iterator[Event]:
        """The body ended: raises MalformedMultipart when it ended before the closing delimiter."""
        if self._state != "epilogue":
            where = "before its first boundary" if self._state == "preamble" else f"inside part {self.parts}"
            raise MalformedMultipart(f"the body ended {where}, without the closing boundary delimiter")
        return iter(())

    def _parse(self) -> Iterator[Event]:
        buffer, delimiter = self._buffer, self._delimiter
        while True:
            if self._state in ("preamble", "body"):
                at = buffer.find(delimiter)
                if at < 0:
                    keep = len(delimiter) - 1
                    if self._state == "body" and len(buffer) > keep:
                        yield PartData(bytes(buffer[:-keep]))
                    if len(buffer) > keep:
                        del buffer[:-keep]
                    return
                if self._state == "body":
                    if at:
                        yield PartData(bytes(buffer[:at]))
                    yield PartEnd()
                del buffer[:at + len(delimiter)]
                self._state = "after_delimiter"
            elif self._state == "after_delimiter":
                if len(buffer) < 2:
                    return
                if buffer[:2] == b"--":
                    self._state = "epilogue"
                    buffer.clear()
                    return
                line_end = buffer.find(b"\r\n")
                if line_end < 0:
                    if len(buffer) > 256:
                        raise MalformedMultipart("a boundary delimiter is followed by text, not a line end")
                    return
                if buffer[:line_end].strip(b" \t"):  # only transport padding may follow the boundary
                    raise MalformedMultipart("a boundary delimiter is followed by text, not a line end")
                del buffer[:line_end]  # keep the CRLF: the header block then ends at the first CRLF CRLF
                self._state = "headers"
            elif self._state == "headers":
                end = buffer.find(b"\r\n\r\n")
                if end < 0:
                    if len(buffer) > MAX_HEADER_BYTES:
                        raise MalformedMultipart(f"part {self.parts + 1}'s headers exceed {MAX_HEADER_BYTES} bytes")
                    return
                headers = _headers(bytes(buffer[2:end]), self.parts + 1)
                del buffer[:end + 4]
                self.parts += 1
                self._state = "body"
                yield PartStart(headers)
            else:
                return


def _headers(block: bytes, number: int) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in block.decode("latin-1").split("\r\n"):
        if not line:
            continue
        if line[0] in " \t" and headers:  # a folded continuation line (RFC 5322 2.2.3)
            last = next(reversed(headers))
            headers[last] += " " + line.strip()
            continue
        name, colon, value = line.partition(":")
        if not colon or not name.strip():
            raise MalformedMultipart(f"part {number} has a header line without a name: {line[:80]!r}")
        headers[name.strip().lower()] = value.strip()
    return headers
