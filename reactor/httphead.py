"""An HTTP/1.x request head parser: pure, bounded, and strict where it matters.

The admin endpoint needs exactly this much HTTP: a request line and headers,
no body, no keep-alive. ``parse_request_head(data)`` is a pure function of
bytes (fuzzed with hypothesis in the tests); ``HeadReader`` feeds it
incrementally as bytes arrive, enforcing the hard size cap *before* the head
is complete, so a client cannot make us buffer more than ``MAX_HEAD`` bytes.

What is accepted (RFC 9112, recipient side):

* ``METHOD SP request-target SP HTTP/1.x``; the method a token, the target in
  origin-form (``/path?query``), printable ASCII only;
* header lines ``name: value``; the name a token with no whitespace before
  the colon (RFC 9112 §5.1: must be rejected, it is a smuggling vector),
  obsolete line folding rejected (§5.2), values without control characters;
* lines ended by CRLF, or a bare LF (§2.2 allows it); a bare CR is an error;
* empty lines before the request line are skipped (§2.2).

Anything else raises ``BadRequest`` (a ValueError) whose message says why.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_HEAD = 8192  # bytes, request line + headers + the blank line
MAX_HEADERS = 100

_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_REQUEST_LINE = re.compile(rb"(" + _TOKEN + rb") (/[\x21-\x7e]*) HTTP/1\.([0-9])")
_HEADER = re.compile(rb"(" + _TOKEN + rb"):[ \t]*(.*?)[ \t]*")
_VALUE_BAD = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")  # CTLs but HTAB
_METHOD_PREFIX_BAD = re.compile(rb"[^!#$%&'*+\-.^_`|~0-9A-Za-z]")
_END = re.compile(rb"\r?\n\r?\n")


class BadRequest(ValueError):
    """The bytes are not a request head we accept; the message says why."""


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    target: str  # as sent: path and query
    path: str
    query: str
    version: str  # "1.0" or "1.1"
    headers: tuple[tuple[str, str], ...]  # names lower-cased, in order

    def header(self, name: str, default: str | None = None) -> str | None:
        name = name.lower()
        for k, v in self.headers:
            if k == name:
                return v
        return default


def _lines(head: bytes) -> list[bytes]:
    lines = head.split(b"\n")
    out = []
    for line in lines:
        if line.endswith(b"\r"):
            line = line[:-1]
        if b"\r" in line:
            raise BadRequest("bare CR in request head")
        out.append(line)
    return out


def parse_request_head(data: bytes) -> Request:
    """Parse a complete request head (the final blank line may be present or not).

    Raises ``BadRequest`` when it is longer than ``MAX_HEAD`` or malformed.
    """
    if len(data) > MAX_HEAD:
        raise BadRequest(f"request head over {MAX_HEAD} bytes")
    lines = _lines(bytes(data))
    while lines and lines[0] == b"":
        lines.pop(0)  # §2.2: tolerate empty lines before the request line
    while lines and lines[-1] == b"":
        lines.pop()  # the terminating blank line
    if not lines:
        raise BadRequest("empty request")
    if b"" in lines:
        raise BadRequest("blank line inside the request head")
    m = _REQUEST_LINE.fullmatch(lines[0])
    if m is None:
        raise BadRequest("malformed request line")
    method, target, minor = m.group(1), m.group(2), m.group(3)
    if minor not in (b"0", b"1"):
        raise BadRequest("unsupported HTTP version")
    if len(lines) - 1 > MAX_HEADERS:
        raise BadRequest(f"more than {MAX_HEADERS} headers")
    headers = []
    for line in lines[1:]:
        if line[:1] in (b" ", b"\t"):
            raise BadRequest("obsolete line folding")
        h = _HEADER.fullmatch(line)
        if h is None:
            raise BadRequest("malformed header line")
        value = h.group(2)
        if _VALUE_BAD.search(value):
            raise BadRequest("control character in a header value")
        headers.append((h.group(1).decode("ascii").lower(), value.decode("latin-1")))
    target_s = target.decode("ascii")
    path, _, query = target_s.partition("?")
    return Request(method.decode("ascii"), target_s, path, query, "1." + minor.decode(), tuple(headers))


class HeadReader:
    """Accumulates bytes until a complete head; bounded by ``MAX_HEAD``.

    ``feed(data)`` returns the ``Request`` once the blank line arrives, None
    while more is needed, and raises ``BadRequest`` as soon as the bytes can
    no longer become a valid head: over the cap, or a first word that is not
    a method token (a TLS ClientHello, say, is refused on its first byte
    rather than after 8 KiB or the timeout). Bytes after the head are kept
    in ``rest`` (the admin endpoint ignores them: it reads no bodies).
    """

    __slots__ = ("_buf", "done", "rest", "limit")

    def __init__(self, limit: int = MAX_HEAD) -> None:
        self._buf = bytearray()
        self.done = False
        self.rest = b""
        self.limit = limit

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> Request | None:
        if self.done:
            raise RuntimeError("head already complete")
        buf = self._buf
        start = max(0, len(buf) - 3)  # a terminator may straddle two reads
        # Never hold more than the cap plus the 4 terminator bytes.
        room = self.limit + 4 - len(buf)
        buf += data[:room] if len(data) > room else data
        m = _END.search(buf, start)
        if m is None:
            if len(buf) > self.limit:
                raise BadRequest(f"request head over {self.limit} bytes")
            self._check_prefix()
            return None
        end = m.end()
        if end > self.limit:
            raise BadRequest(f"request head over {self.limit} bytes")
        head = bytes(buf[:end])
        self.done = True
        self.rest = bytes(buf[end:])
        self._buf = bytearray()
        return parse_request_head(head)

    def _check_prefix(self) -> None:
        buf = self._buf.lstrip(b"\r\n")
        sp = buf.find(b" ")
        word = buf if sp < 0 else buf[:sp]
        if _METHOD_PREFIX_BAD.search(word):
            raise BadRequest("malformed request line")
        if sp == 0:
            raise BadRequest("malformed request line")
