"""PROXY protocol v1 (text) and v2 (binary) codec, per HAProxy's proxy-protocol.txt.

Pure: no sockets, no loop. The gateway feeds whatever bytes it reads into a
`ProxyHeaderParser` until it yields a `ProxyHeader` (which carries the payload
bytes that followed the header), and prepends `encode_v1`/`encode_v2` output to
what it sends a backend.

Receiving rules, and where we chose within what the spec allows:

- v1 vs v2 is told from the first bytes; input that stops being a prefix of
  either signature is rejected at once, so a stray client fails on its first
  packet rather than at the PROXY timeout.
- v1: the line must end in CRLF within 107 bytes (the spec's worst case); a lone
  CR or LF is an error; addresses must be canonical (no leading zeros in IPv4
  octets or ports, IPv6 without zone); TCP4 needs IPv4 and TCP6 needs IPv6.
  `PROXY UNKNOWN` accepts anything up to the CRLF and yields no addresses.
- v2: version nibble 2 only; commands LOCAL and PROXY only; families
  UNSPEC/INET/INET6/UNIX with UNSPEC/STREAM/DGRAM only. The length field may
  not exceed `max_v2_length` (default 1024: the 216-byte UNIX block plus room
  for the usual TLVs; the protocol's own ceiling is 65535), so at most
  16 + max_v2_length bytes are ever waited for. TLVs are parsed, a truncated
  TLV is an error, and a CRC32C TLV is verified as the spec requires.
- Only TCP over IPv4/IPv6 with the PROXY command yields addresses. LOCAL,
  UNSPEC, UDP and UNIX headers are valid but yield `src = dst = None`, meaning
  "use the real connection endpoints" (the spec's fallback to UNSPEC).
"""

from __future__ import annotations

import ipaddress
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = [
    "V1_MAX_LENGTH",
    "V2_SIGNATURE",
    "V2_DEFAULT_MAX_LENGTH",
    "PP2_TYPE_ALPN",
    "PP2_TYPE_AUTHORITY",
    "PP2_TYPE_CRC32C",
    "PP2_TYPE_NOOP",
    "PP2_TYPE_UNIQUE_ID",
    "ProxyProtocolError",
    "ProxyHeader",
    "ProxyHeaderParser",
    "encode_v1",
    "encode_v2",
    "parse",
    "is_trusted",
    "crc32c",
]

V1_PREFIX = b"PROXY "
V1_MAX_LENGTH = 107  # "PROXY UNKNOWN " + two full IPv6 + two 5-digit ports + CRLF
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_HEADER_LENGTH = 16
V2_DEFAULT_MAX_LENGTH = 1024
V2_PROTOCOL_MAX_LENGTH = 0xFFFF

PP2_TYPE_ALPN = 0x01
PP2_TYPE_AUTHORITY = 0x02
PP2_TYPE_CRC32C = 0x03
PP2_TYPE_NOOP = 0x04
PP2_TYPE_UNIQUE_ID = 0x05

_CMD_LOCAL = 0x0
_CMD_PROXY = 0x1
_FAMILY_NAMES = {0x0: "UNSPEC", 0x1: "INET", 0x2: "INET6", 0x3: "UNIX"}
_PROTO_NAMES = {0x0: "UNSPEC", 0x1: "STREAM", 0x2: "DGRAM"}
# (family, proto) -> (label, address block length)
_V2_LAYOUT: dict[tuple[int, int], tuple[str, int]] = {
    (0x1, 0x1): ("TCP4", 12),
    (0x1, 0x2): ("UDP4", 12),
    (0x2, 0x1): ("TCP6", 36),
    (0x2, 0x2): ("UDP6", 36),
    (0x3, 0x1): ("UNIX_STREAM", 216),
    (0x3, 0x2): ("UNIX_DGRAM", 216),
}

_V1_PORT = re.compile(rb"0|[1-9][0-9]{0,4}")
_V1_IPV4 = re.compile(rb"(?:0|[1-9][0-9]{0,2})(?:\.(?:0|[1-9][0-9]{0,2})){3}")
_V1_IPV6 = re.compile(rb"[0-9A-Fa-f:.]{2,45}")


class ProxyProtocolError(ValueError):
    """Malformed or unsupported PROXY protocol header: drop the connection."""


Address = tuple[str, int]


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A parsed PROXY header.

    version: 1 or 2. command: "PROXY" or "LOCAL" (v1 is always "PROXY").
    family: "TCP4", "TCP6", "UNKNOWN" (v1), or for v2 also "UNSPEC", "UDP4",
    "UDP6", "UNIX_STREAM", "UNIX_DGRAM".
    src/dst: (host, port) of the original client and of the address it
    connected to, or None when the real connection endpoints must be used.
    tlvs: v2 (type, value) pairs in wire order, NOOP included; () for v1.
    length: bytes the header took on the wire. rest: bytes after the header
    that arrived with it, to be treated as the start of the payload.
    """

    version: int
    command: str
    family: str
    src: Address | None
    dst: Address | None
    tlvs: tuple[tuple[int, bytes], ...] = ()
    length: int = 0
    rest: bytes = b""

    def tlv(self, type_: int) -> bytes | None:
        """The value of the first TLV of this type, or None."""
        for t, v in self.tlvs:
            if t == type_:
                return v
        return None


# --- encoding -------------------------------------------------------------


def _ip(host: str, what: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{what}: {host!r} is not an IP address") from None
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id is not None:
        ip = ipaddress.IPv6Address(ip.packed)  # the zone means nothing to the receiver
    return ip


def _port(port: int, what: str) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"{what}: port {port!r} out of range (0..65535)")
    return port


def _pair(
    src: Iterable, dst: Iterable
) -> tuple[str, tuple[ipaddress._BaseAddress, int], tuple[ipaddress._BaseAddress, int]]:
    """Normalise two socket addresses to one family.

    Both IPv4 (or IPv4-mapped IPv6, which a dual-stack listener reports for
    IPv4 clients) → TCP4. Otherwise TCP6, mapping any plain IPv4 side into
    ::ffff:0:0/96, as HAProxy does for mixed families.
    """
    # getpeername() of an AF_INET6 socket has 4 items; only host and port matter
    src_t, dst_t = tuple(src), tuple(dst)
    if len(src_t) < 2 or len(dst_t) < 2:
        raise ValueError("src and dst must be (host, port) tuples")
    s_ip, d_ip = _ip(src_t[0], "src"), _ip(dst_t[0], "dst")
    s_port, d_port = _port(src_t[1], "src"), _port(dst_t[1], "dst")

    def v4(ip):
        if isinstance(ip, ipaddress.IPv4Address):
            return ip
        return ip.ipv4_mapped

    s4, d4 = v4(s_ip), v4(d_ip)
    if s4 is not None and d4 is not None:
        return "TCP4", (s4, s_port), (d4, d_port)

    def v6(ip):
        if isinstance(ip, ipaddress.IPv6Address):
            return ip
        return ipaddress.IPv6Address("::ffff:" + str(ip))

    return "TCP6", (v6(s_ip), s_port), (v6(d_ip), d_port)


def encode_v1(src: Iterable | None, dst: Iterable | None) -> bytes:
    """`PROXY TCP4|TCP6 SRC DST SPORT DPORT\\r\\n`, or `PROXY UNKNOWN\\r\\n` when
    either side is None. src/dst are (host, port[, ...]) with IP literal hosts."""
    if src is None or dst is None:
        return b"PROXY UNKNOWN\r\n"
    fam, (s, sp), (d, dp) = _pair(src, dst)
    return f"PROXY {fam} {s.compressed} {d.compressed} {sp} {dp}\r\n".encode("ascii")


def encode_v2(
    src: Iterable | None,
    dst: Iterable | None,
    *,
    tlvs: Iterable[tuple[int, bytes]] = (),
    crc: bool = False,
) -> bytes:
    """Binary v2 header. PROXY command with TCP4/TCP6 addresses, or LOCAL with
    family UNSPEC and no address block when either side is None (what a proxy
    sends on its own health checks). tlvs are appended in order; crc=True
    appends a PP2_TYPE_CRC32C TLV holding the checksum of the whole header."""
    if src is None or dst is None:
        ver_cmd, fam_byte, block = 0x20 | _CMD_LOCAL, 0x00, b""
    else:
        fam, (s, sp), (d, dp) = _pair(src, dst)
        ver_cmd = 0x20 | _CMD_PROXY
        fam_byte = 0x11 if fam == "TCP4" else 0x21
        block = s.packed + d.packed + struct.pack("!HH", sp, dp)
    body = bytearray(block)
    for t, v in tlvs:
        if not 0 <= t <= 0xFF or len(v) > 0xFFFF:
            raise ValueError(f"TLV type {t} / length {len(v)} out of range")
        body += struct.pack("!BH", t, len(v)) + bytes(v)
    crc_at = -1
    if crc:
        crc_at = V2_HEADER_LENGTH + len(body) + 3
        body += struct.pack("!BH", PP2_TYPE_CRC32C, 4) + b"\0\0\0\0"
    if len(body) > V2_PROTOCOL_MAX_LENGTH:
        raise ValueError(f"v2 header body of {len(body)} bytes exceeds 65535")
    out = bytearray(V2_SIGNATURE + struct.pack("!BBH", ver_cmd, fam_byte, len(body)) + body)
    if crc:
        out[crc_at : crc_at + 4] = struct.pack("!I", crc32c(out))
    return bytes(out)


# --- CRC32C (Castagnoli, RFC 4960 appendix B) --------------------------------


def _crc32c_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """CRC-32C of data (check value of b"123456789" is 0xE3069283)."""
    c = crc ^ 0xFFFFFFFF
    table = _CRC32C_TABLE
    for b in bytes(data):
        c = table[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


# --- decoding -------------------------------------------------------------


def _v1_port(tok: bytes, what: str) -> int:
    if not _V1_PORT.fullmatch(tok) or int(tok) > 65535:
        raise ProxyProtocolError(f"PROXY v1: bad {what} port {_show(tok)}")
    return int(tok)


def _v1_addr(tok: bytes, fam: str, what: str) -> str:
    try:
        if fam == "TCP4":
            if not _V1_IPV4.fullmatch(tok):
                raise ValueError
            return str(ipaddress.IPv4Address(tok.decode("ascii")))
        if not _V1_IPV6.fullmatch(tok):  # also keeps out zones ("%eth0")
            raise ValueError
        return ipaddress.IPv6Address(tok.decode("ascii")).compressed
    except ValueError:
        raise ProxyProtocolError(f"PROXY v1: bad {what} address {_show(tok)} for {fam}") from None


def _show(b: bytes) -> str:
    return repr(bytes(b[:48]))[1:]


def _parse_v1(line: bytes) -> tuple[str, Address | None, Address | None]:
    """line: the header without its CRLF."""
    parts = line.split(b" ")
    fam = parts[1] if len(parts) > 1 else b""
    if fam == b"UNKNOWN":
        return "UNKNOWN", None, None
    if fam not in (b"TCP4", b"TCP6"):
        raise ProxyProtocolError(f"PROXY v1: unknown protocol {_show(fam)}")
    if len(parts) != 6:
        raise ProxyProtocolError(
            f"PROXY v1: expected 'PROXY {fam.decode()} SRC DST SPORT DPORT', got {_show(line)}"
        )
    f = fam.decode()
    src = (_v1_addr(parts[2], f, "source"), _v1_port(parts[4], "source"))
    dst = (_v1_addr(parts[3], f, "destination"), _v1_port(parts[5], "destination"))
    return f, src, dst


def _parse_v2(hdr: bytes) -> tuple[str, str, Address | None, Address | None, tuple]:
    """hdr: the whole v2 header (16 + len bytes), signature already checked."""
    ver_cmd, fam_byte = hdr[12], hdr[13]
    cmd = ver_cmd & 0x0F
    command = "LOCAL" if cmd == _CMD_LOCAL else "PROXY"
    family, proto = fam_byte >> 4, fam_byte & 0x0F
    body = memoryview(hdr)[V2_HEADER_LENGTH:]

    key = (family, proto)
    need: int | None
    if key in _V2_LAYOUT:
        label, need = _V2_LAYOUT[key]
    elif key == (0x0, 0x0):
        label, need = "UNSPEC", 0
    else:
        # e.g. INET with an UNSPEC transport: the address block has no known
        # size, so the TLVs cannot be located; the spec says ignore it all
        label, need = "UNSPEC", None
    src = dst = None
    if need is not None and len(body) < need:
        if command == "PROXY":
            raise ProxyProtocolError(
                f"PROXY v2: {label} needs {need} address bytes, length is {len(body)}"
            )
        need = None  # LOCAL: the block is to be ignored anyway
    if command == "PROXY" and label in ("TCP4", "TCP6"):
        n = 4 if label == "TCP4" else 16
        s = ipaddress.ip_address(bytes(body[:n]))
        d = ipaddress.ip_address(bytes(body[n : 2 * n]))
        sp, dp = struct.unpack_from("!HH", body, 2 * n)
        src, dst = (s.compressed, sp), (d.compressed, dp)

    tlvs = []
    crc_at = -1
    pos = len(body) if need is None else need
    while pos < len(body):
        if len(body) - pos < 3:
            raise ProxyProtocolError("PROXY v2: truncated TLV header")
        t, n = body[pos], (body[pos + 1] << 8) | body[pos + 2]
        if pos + 3 + n > len(body):
            raise ProxyProtocolError(f"PROXY v2: TLV 0x{t:02x} of {n} bytes overruns the header")
        value = bytes(body[pos + 3 : pos + 3 + n])
        if t == PP2_TYPE_CRC32C:
            if n != 4:
                raise ProxyProtocolError(f"PROXY v2: CRC32C TLV of {n} bytes, expected 4")
            if crc_at < 0:
                crc_at = V2_HEADER_LENGTH + pos + 3
        tlvs.append((t, value))
        pos += 3 + n
    if crc_at >= 0:
        want = struct.unpack_from("!I", hdr, crc_at)[0]
        zeroed = bytearray(hdr)
        zeroed[crc_at : crc_at + 4] = b"\0\0\0\0"
        got = crc32c(zeroed)
        if got != want:
            raise ProxyProtocolError(
                f"PROXY v2: CRC32C mismatch (header says {want:08x}, computed {got:08x})"
            )
    return command, label, src, dst, tuple(tlvs)


class ProxyHeaderParser:
    """Incremental reader of one PROXY v1/v2 header.

    `feed(data)` returns None while more bytes are needed, then a ProxyHeader
    whose `rest` holds the bytes that followed the header. Raises
    ProxyProtocolError as soon as the input cannot be a valid header; after
    an error or a result the parser is spent and `feed` raises again.
    `version` may restrict acceptance to 1 or 2 (None = either).
    """

    __slots__ = ("_buf", "_done", "_error", "_max_v2", "_versions", "_scan_from")

    def __init__(self, *, max_v2_length: int = V2_DEFAULT_MAX_LENGTH, version: int | None = None):
        if not 0 <= max_v2_length <= V2_PROTOCOL_MAX_LENGTH:
            raise ValueError("max_v2_length must be within 0..65535")
        if version not in (None, 1, 2):
            raise ValueError("version must be None, 1 or 2")
        self._buf = bytearray()
        self._done = False
        self._error: ProxyProtocolError | None = None
        self._max_v2 = max_v2_length
        self._versions = (1, 2) if version is None else (version,)
        self._scan_from = 0

    @property
    def max_header_length(self) -> int:
        """The most bytes this parser will wait for before deciding."""
        return max(
            V1_MAX_LENGTH if 1 in self._versions else 0,
            V2_HEADER_LENGTH + self._max_v2 if 2 in self._versions else 0,
        )

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> ProxyHeader | None:
        if self._error is not None:
            raise self._error
        if self._done:
            raise ProxyProtocolError("PROXY header already parsed")
        self._buf += data
        try:
            result = self._step()
        except ProxyProtocolError as e:
            self._error = e
            self._buf = bytearray()
            raise
        if result is not None:
            self._done = True
            self._buf = bytearray()
        return result

    def _step(self) -> ProxyHeader | None:
        buf = self._buf
        if not buf:
            return None
        if buf[0] == 0x0D and 2 in self._versions:
            return self._step_v2()
        if buf[0] == 0x50 and 1 in self._versions:
            return self._step_v1()
        raise ProxyProtocolError(f"not a PROXY protocol header: starts with {_show(buf[:16])}")

    def _step_v1(self) -> ProxyHeader | None:
        buf = self._buf
        n = min(len(buf), len(V1_PREFIX))
        if buf[:n] != V1_PREFIX[:n]:
            raise ProxyProtocolError(f"not a PROXY protocol header: starts with {_show(buf[:16])}")
        limit = min(len(buf), V1_MAX_LENGTH)
        # only the bytes not scanned on an earlier call; a CR may be waiting for its LF
        i = self._scan_from
        while i < limit:
            c = buf[i]
            if c == 0x0D:
                if i + 2 > V1_MAX_LENGTH:
                    break  # its LF would fall beyond the limit
                if i + 1 >= len(buf):
                    break  # need the next byte to judge this CR
                if buf[i + 1] != 0x0A:
                    raise ProxyProtocolError("PROXY v1: CR not followed by LF")
                end = i + 2
                line = bytes(buf[:i])
                fam, src, dst = _parse_v1(line)
                return ProxyHeader(1, "PROXY", fam, src, dst, (), end, bytes(buf[end:]))
            if c == 0x0A:
                raise ProxyProtocolError("PROXY v1: LF without CR")
            i += 1
        self._scan_from = i
        if len(buf) >= V1_MAX_LENGTH:
            raise ProxyProtocolError(f"PROXY v1: no CRLF within {V1_MAX_LENGTH} bytes")
        return None

    def _step_v2(self) -> ProxyHeader | None:
        buf = self._buf
        n = min(len(buf), len(V2_SIGNATURE))
        if buf[:n] != V2_SIGNATURE[:n]:
            raise ProxyProtocolError(f"not a PROXY protocol header: starts with {_show(buf[:16])}")
        if len(buf) > 12:
            ver, cmd = buf[12] >> 4, buf[12] & 0x0F
            if ver != 2:
                raise ProxyProtocolError(f"PROXY v2: unsupported version {ver}")
            if cmd not in (_CMD_LOCAL, _CMD_PROXY):
                raise ProxyProtocolError(f"PROXY v2: unknown command 0x{cmd:x}")
        if len(buf) > 13:
            fam, proto = buf[13] >> 4, buf[13] & 0x0F
            if fam not in _FAMILY_NAMES:
                raise ProxyProtocolError(f"PROXY v2: unknown address family 0x{fam:x}")
            if proto not in _PROTO_NAMES:
                raise ProxyProtocolError(f"PROXY v2: unknown transport protocol 0x{proto:x}")
        if len(buf) < V2_HEADER_LENGTH:
            return None
        length = (buf[14] << 8) | buf[15]
        if length > self._max_v2:
            raise ProxyProtocolError(
                f"PROXY v2: header length {length} exceeds the limit of {self._max_v2}"
            )
        end = V2_HEADER_LENGTH + length
        if len(buf) < end:
            return None
        command, fam_label, src, dst, tlvs = _parse_v2(bytes(buf[:end]))
        return ProxyHeader(2, command, fam_label, src, dst, tlvs, end, bytes(buf[end:]))


def parse(data: bytes, **kwargs) -> ProxyHeader:
    """Parse a header that must be complete in `data` (tests, one-shot use)."""
    parser = ProxyHeaderParser(**kwargs)
    result = parser.feed(data)
    if result is None:
        raise ProxyProtocolError(f"PROXY header incomplete after {len(data)} bytes")
    return result


def is_trusted(
    addr: str | tuple | ipaddress._BaseAddress,
    networks: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network],
) -> bool:
    """Whether a peer may send a PROXY header: its address lies in one of
    `networks`. addr is an IP string, an ipaddress object or a socket address
    tuple; IPv4-mapped IPv6 peers (dual-stack listeners) match IPv4 networks.
    Anything that is not an IP address (e.g. an AF_UNIX peer) is untrusted."""
    if isinstance(addr, tuple):
        if not addr:
            return False
        addr = addr[0]
    if isinstance(addr, str):
        try:
            ip = ipaddress.ip_address(addr)
        except ValueError:
            return False
    elif isinstance(addr, ipaddress.IPv4Address | ipaddress.IPv6Address):
        ip = addr
    else:
        return False
    candidates = [ip]
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id is not None:
            ip = ipaddress.IPv6Address(ip.packed)
            candidates = [ip]
        if ip.ipv4_mapped is not None:
            candidates.append(ip.ipv4_mapped)
    for net in networks:
        for c in candidates:
            if c.version == net.version and c in net:
                return True
    return False
