"""reactor.proxyproto: PROXY v1/v2 bytes exactly as the spec draws them, and a
parser that survives trickled, truncated and hostile input."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reactor.proxyproto import (
    PP2_TYPE_ALPN,
    PP2_TYPE_AUTHORITY,
    PP2_TYPE_CRC32C,
    PP2_TYPE_NOOP,
    V1_MAX_LENGTH,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyHeaderParser,
    ProxyProtocolError,
    crc32c,
    encode_v1,
    encode_v2,
    is_trusted,
    parse,
)

SIG = b"\x0d\x0a\x0d\x0a\x00\x0d\x0a\x51\x55\x49\x54\x0a"


def trickle(data: bytes, **kwargs) -> ProxyHeader:
    """Feed one byte at a time; the header must appear exactly at its last byte."""
    p = ProxyHeaderParser(**kwargs)
    for i in range(len(data)):
        got = p.feed(data[i : i + 1])
        if got is not None:
            assert got.length == i + 1
            return got
    raise AssertionError("never completed")


def v2(ver_cmd: int, fam: int, body: bytes) -> bytes:
    return SIG + bytes([ver_cmd, fam]) + struct.pack("!H", len(body)) + body


# --- the spec's own bytes -------------------------------------------------


def test_signature_constant():
    assert V2_SIGNATURE == SIG and len(SIG) == 12


def test_v1_tcp4_spec_example():
    line = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"
    assert encode_v1(("192.168.0.1", 56324), ("192.168.0.11", 443)) == line
    h = parse(line + b"GET / HTTP/1.1\r\nHost: 192.168.0.11\r\n\r\n")
    assert h == ProxyHeader(
        version=1,
        command="PROXY",
        family="TCP4",
        src=("192.168.0.1", 56324),
        dst=("192.168.0.11", 443),
        tlvs=(),
        length=len(line),
        rest=b"GET / HTTP/1.1\r\nHost: 192.168.0.11\r\n\r\n",
    )


def test_v1_tcp6():
    line = b"PROXY TCP6 2001:db8::1 ::1 65535 0\r\n"
    assert encode_v1(("2001:db8:0:0::1", 65535), ("::1", 0)) == line
    h = parse(line)
    assert (h.family, h.src, h.dst, h.rest) == ("TCP6", ("2001:db8::1", 65535), ("::1", 0), b"")


def test_v1_unknown():
    assert encode_v1(None, None) == b"PROXY UNKNOWN\r\n"
    assert encode_v1(("1.2.3.4", 1), None) == b"PROXY UNKNOWN\r\n"
    h = parse(b"PROXY UNKNOWN\r\nhi")
    assert (h.family, h.src, h.dst, h.length, h.rest) == ("UNKNOWN", None, None, 15, b"hi")
    # "the receiver must ignore anything presented before the CRLF"
    h = parse(b"PROXY UNKNOWN ffff:: whatever \x01\xff 99999\r\n")
    assert (h.family, h.src) == ("UNKNOWN", None)


def test_v1_worst_case_length_is_accepted_and_one_more_is_not():
    six = "ffff:" * 7 + "ffff"
    worst = f"PROXY UNKNOWN {six} {six} 65535 65535\r\n".encode()
    assert len(worst) == V1_MAX_LENGTH == 107
    assert parse(worst).length == 107
    assert trickle(worst).length == 107
    too_long = f"PROXY UNKNOWN {six} {six} 65535 655350\r\n".encode()
    with pytest.raises(ProxyProtocolError, match="no CRLF within 107 bytes"):
        parse(too_long)
    p = ProxyHeaderParser()
    with pytest.raises(ProxyProtocolError, match="no CRLF within 107 bytes"):
        for i in range(len(too_long)):
            assert p.feed(too_long[i : i + 1]) is None
    assert i == 106  # refused at the 107th byte, without waiting for more


def test_v1_max_tcp6_line():
    six = "ffff:" * 7 + "ffff"
    line = f"PROXY TCP6 {six} {six} 65535 65535\r\n".encode()
    assert len(line) == 104
    assert encode_v1((six, 65535), (six, 65535)) == line
    assert parse(line).src == (six, 65535)


def test_v2_tcp4_spec_layout():
    hdr = encode_v2(("192.168.0.1", 56324), ("192.168.0.11", 443))
    assert hdr == (
        SIG
        + b"\x21"  # version 2, PROXY
        + b"\x11"  # AF_INET, STREAM
        + b"\x00\x0c"  # 12 address bytes
        + bytes([192, 168, 0, 1, 192, 168, 0, 11])
        + struct.pack("!HH", 56324, 443)
    )
    assert len(hdr) == 28
    h = parse(hdr + b"payload")
    assert (h.version, h.command, h.family) == (2, "PROXY", "TCP4")
    assert (h.src, h.dst, h.length, h.rest, h.tlvs) == (
        ("192.168.0.1", 56324),
        ("192.168.0.11", 443),
        28,
        b"payload",
        (),
    )


def test_v2_tcp4_as_haproxy_sends_it():
    # a v2 header as emitted by HAProxy, captured with netcat (172.19.0.1:42578 → 172.19.0.3:80)
    wire = bytes.fromhex("0d0a0d0a000d0a515549540a 2111000c ac130001 ac130003 a652 0050 474554202f")
    h = parse(wire)
    assert (h.src, h.dst, h.rest) == (("172.19.0.1", 42578), ("172.19.0.3", 80), b"GET /")
    assert encode_v2(h.src, h.dst) == wire[:28]


def test_v2_tcp6_spec_layout():
    src, dst = ("2001:db8::1", 1), ("2001:db8::2", 65535)
    hdr = encode_v2(src, dst)
    assert hdr[12:16] == b"\x21\x21\x00\x24"  # PROXY, AF_INET6+STREAM, 36 bytes
    assert hdr[16:32] == ipaddress.IPv6Address("2001:db8::1").packed
    assert hdr[32:48] == ipaddress.IPv6Address("2001:db8::2").packed
    assert hdr[48:52] == b"\x00\x01\xff\xff"
    assert len(hdr) == 16 + 36
    h = parse(hdr)
    assert (h.family, h.src, h.dst) == ("TCP6", src, dst)


def test_v2_local():
    hdr = encode_v2(None, None)
    assert hdr == SIG + b"\x20\x00\x00\x00"
    h = parse(hdr + b"x")
    assert (h.command, h.family, h.src, h.dst, h.rest) == ("LOCAL", "UNSPEC", None, None, b"x")


def test_v2_local_with_an_address_block_ignores_it():
    # "Receivers MUST always consider this field to skip the appropriate number of bytes"
    body = bytes([10, 0, 0, 1, 10, 0, 0, 2]) + struct.pack("!HH", 1, 2)
    h = parse(v2(0x20, 0x11, body) + b"after")
    assert (h.command, h.src, h.dst, h.rest) == ("LOCAL", None, None, b"after")


@pytest.mark.parametrize(
    "fam, size, label",
    [(0x12, 12, "UDP4"), (0x22, 36, "UDP6"), (0x31, 216, "UNIX_STREAM"), (0x32, 216, "UNIX_DGRAM")],
)
def test_v2_other_families_fall_back_to_real_endpoints(fam, size, label):
    h = parse(v2(0x21, fam, bytes(size)) + b"z")
    assert (h.family, h.src, h.dst, h.length, h.rest) == (label, None, None, 16 + size, b"z")


def test_v2_unspec_proxy_command_skips_its_bytes():
    h = parse(v2(0x21, 0x00, b"") + b"z")
    assert (h.family, h.src, h.rest) == ("UNSPEC", None, b"z")
    # INET with an UNSPEC transport: block of unknown shape, skipped whole
    h = parse(v2(0x21, 0x10, b"\x01\x02\x03") + b"z")
    assert (h.family, h.src, h.tlvs, h.rest) == ("UNSPEC", None, (), b"z")


def test_v2_tlvs_and_crc32c():
    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    assert crc32c(b"") == 0
    tlvs = [(PP2_TYPE_ALPN, b"h2"), (PP2_TYPE_AUTHORITY, b"game.example"), (PP2_TYPE_NOOP, b"")]
    hdr = encode_v2(("10.0.0.1", 1000), ("10.0.0.2", 2000), tlvs=tlvs, crc=True)
    body_len = 12 + (3 + 2) + (3 + 12) + 3 + (3 + 4)
    assert hdr[14:16] == struct.pack("!H", body_len)
    assert hdr[16 + 12 : 16 + 12 + 5] == b"\x01\x00\x02h2"
    # the checksum is that of the header with its own field zeroed
    zeroed = hdr[:-4] + b"\0\0\0\0"
    assert struct.unpack("!I", hdr[-4:])[0] == crc32c(zeroed)
    h = parse(hdr + b"rest")
    assert h.tlvs[:3] == tuple(tlvs)
    assert h.tlv(PP2_TYPE_AUTHORITY) == b"game.example"
    assert h.tlv(PP2_TYPE_CRC32C) == hdr[-4:]
    assert h.tlv(0x30) is None
    assert h.rest == b"rest" and h.src == ("10.0.0.1", 1000)
    # one flipped bit anywhere after the fixed part is caught, except in the
    # CRC TLV's own type byte: that turns it into another TLV, unchecked
    crc_type_at = len(hdr) - 7
    assert hdr[crc_type_at] == PP2_TYPE_CRC32C
    for i in range(16, len(hdr)):
        if i == crc_type_at:
            continue
        bad = bytearray(hdr)
        bad[i] ^= 0x01
        with pytest.raises(ProxyProtocolError):
            parse(bytes(bad))


def test_v2_crc_only_tlv_on_local():
    hdr = encode_v2(None, None, crc=True)
    h = parse(hdr)
    assert h.command == "LOCAL" and h.tlv(PP2_TYPE_CRC32C) is not None


# --- mixed and mapped families ----------------------------------------------


def test_v4_mapped_sources_are_sent_as_tcp4():
    # a dual-stack listener reports IPv4 clients as ::ffff:a.b.c.d
    src, dst = ("::ffff:192.0.2.7", 5555, 0, 0), ("::ffff:192.0.2.1", 8080, 0, 0)
    assert encode_v1(src, dst) == b"PROXY TCP4 192.0.2.7 192.0.2.1 5555 8080\r\n"
    assert encode_v2(src, dst)[13] == 0x11


def test_mixed_families_map_ipv4_into_ipv6():
    assert encode_v1(("192.0.2.7", 1), ("2001:db8::1", 2)) == (
        b"PROXY TCP6 ::ffff:c000:207 2001:db8::1 1 2\r\n"
    )
    h = parse(encode_v2(("192.0.2.7", 1), ("2001:db8::1", 2)))
    assert h.family == "TCP6"
    assert ipaddress.IPv6Address(h.src[0]).ipv4_mapped == ipaddress.IPv4Address("192.0.2.7")


def test_ipv6_zone_is_dropped_on_encode():
    assert encode_v1(("fe80::1%eth0", 1), ("fe80::2", 2)) == b"PROXY TCP6 fe80::1 fe80::2 1 2\r\n"


@pytest.mark.parametrize(
    "src, dst, message",
    [
        (("example.com", 1), ("1.2.3.4", 2), "src: 'example.com' is not an IP address"),
        (("1.2.3.4", 1), ("1.2.3.4", 65536), "dst: port 65536 out of range"),
        (("1.2.3.4", -1), ("1.2.3.4", 2), "src: port -1 out of range"),
        (("1.2.3.4", True), ("1.2.3.4", 2), "src: port True out of range"),
        (("1.2.3.4",), ("1.2.3.4", 2), "src and dst must be"),
    ],
)
def test_encode_rejects_bad_addresses(src, dst, message):
    for enc in (encode_v1, encode_v2):
        with pytest.raises(ValueError, match=message.replace("(", r"\(")):
            enc(src, dst)


# --- malformed input ------------------------------------------------------


@pytest.mark.parametrize(
    "data, message",
    [
        (b"GET / HTTP/1.1\r\n\r\n", "not a PROXY protocol header"),
        (b"\x16\x03\x01\x02\x00", "not a PROXY protocol header"),
        (b"PROXX", "not a PROXY protocol header"),
        (b"PROXY\r\n", "not a PROXY protocol header"),
        (b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "not a PROXY protocol header"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "LF without CR"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX", "CR not followed by LF"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\r\n", "CR not followed by LF"),
        (b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n", "unknown protocol"),
        (b"PROXY  UNKNOWN\r\n", "unknown protocol"),
        (b"PROXY TCP4\r\n", "expected 'PROXY TCP4 SRC DST SPORT DPORT'"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "expected 'PROXY TCP4"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n", "expected 'PROXY TCP4"),
        (b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n", "expected 'PROXY TCP4"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n", "bad destination port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", "bad source port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n", "bad source port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n", "bad source port"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 99999999\r\n", "bad destination port"),
        (b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n", "bad source address"),
        (b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n", "bad source address"),
        (b"PROXY TCP4 256.2.3.4 5.6.7.8 1 2\r\n", "bad source address"),
        (b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n", "bad source address"),
        (b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", "bad source address"),
        (b"PROXY TCP6 ::1 fe80::1%eth0 1 2\r\n", "bad destination address"),
        (b"PROXY TCP6 ::1 1::2::3 1 2\r\n", "bad destination address"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.\xff 1 2\r\n", "bad destination address"),
        (SIG[:5] + b"X", "not a PROXY protocol header"),
        (SIG + b"\x11\x11\x00\x0c" + bytes(12), "unsupported version 1"),
        (SIG + b"\x31\x11\x00\x0c" + bytes(12), "unsupported version 3"),
        (SIG + b"\x22\x11\x00\x0c" + bytes(12), "unknown command 0x2"),
        (SIG + b"\x2f\x11\x00\x0c" + bytes(12), "unknown command 0xf"),
        (SIG + b"\x21\x41\x00\x0c" + bytes(12), "unknown address family 0x4"),
        (SIG + b"\x21\x13\x00\x0c" + bytes(12), "unknown transport protocol 0x3"),
        (SIG + b"\x21\x11\x04\x01" + bytes(1025), "header length 1025 exceeds the limit of 1024"),
        (SIG + b"\x21\x11\xff\xff", "header length 65535 exceeds the limit of 1024"),
        (SIG + b"\x21\x11\x00\x08" + bytes(8), "TCP4 needs 12 address bytes, length is 8"),
        (SIG + b"\x21\x21\x00\x0c" + bytes(12), "TCP6 needs 36 address bytes, length is 12"),
        (SIG + b"\x21\x11\x00\x0e" + bytes(14), "truncated TLV header"),
        (SIG + b"\x21\x11\x00\x10" + bytes(12) + b"\x01\x00\x05x", "overruns the header"),
        (SIG + b"\x21\x11\x00\x12" + bytes(12) + b"\x03\x00\x03abc", "CRC32C TLV of 3 bytes"),
        (SIG + b"\x21\x11\x00\x13" + bytes(12) + b"\x03\x00\x04abcd", "CRC32C mismatch"),
    ],
)
def test_malformed_headers_raise(data, message):
    with pytest.raises(ProxyProtocolError, match=message.replace("(", r"\(").replace("+", r"\+")):
        parse(data)
    # and trickled: the same error, at the latest on the last byte
    p = ProxyHeaderParser()
    with pytest.raises(ProxyProtocolError, match=message.replace("(", r"\(").replace("+", r"\+")):
        for i in range(len(data)):
            assert p.feed(data[i : i + 1]) is None


def test_garbage_is_refused_at_the_first_wrong_byte():
    p = ProxyHeaderParser()
    with pytest.raises(ProxyProtocolError):
        p.feed(b"G")
    p = ProxyHeaderParser()
    assert p.feed(b"PRO") is None
    with pytest.raises(ProxyProtocolError):
        p.feed(b"Z")
    p = ProxyHeaderParser()
    assert p.feed(SIG[:7]) is None
    with pytest.raises(ProxyProtocolError):
        p.feed(b"\x00")
    # a bad version is seen at byte 13, before the 16-byte fixed part is complete
    p = ProxyHeaderParser()
    assert p.feed(SIG) is None
    with pytest.raises(ProxyProtocolError, match="unsupported version"):
        p.feed(b"\x10")


def test_parser_is_spent_after_error_or_result():
    p = ProxyHeaderParser()
    with pytest.raises(ProxyProtocolError):
        p.feed(b"nope")
    with pytest.raises(ProxyProtocolError, match="not a PROXY"):
        p.feed(b"PROXY UNKNOWN\r\n")
    p = ProxyHeaderParser()
    assert p.feed(b"PROXY UNKNOWN\r\n") is not None
    assert p.buffered == 0
    with pytest.raises(ProxyProtocolError, match="already parsed"):
        p.feed(b"more")


def test_incomplete_input_waits_and_parse_refuses_it():
    for partial in (
        b"",
        b"P",
        b"PROXY TCP4 1.2.3.4",
        SIG,
        encode_v2(("1.2.3.4", 1), ("1.2.3.4", 2))[:-1],
    ):
        p = ProxyHeaderParser()
        assert p.feed(partial) is None
        assert p.buffered == len(partial)
        if partial:
            with pytest.raises(ProxyProtocolError, match="incomplete"):
                parse(partial)


def test_max_v2_length_and_version_restriction():
    big = encode_v2(("1.2.3.4", 1), ("5.6.7.8", 2), tlvs=[(0xE0, bytes(5000))])
    with pytest.raises(ProxyProtocolError, match="exceeds the limit of 1024"):
        parse(big)
    assert parse(big, max_v2_length=65535).tlv(0xE0) == bytes(5000)
    assert ProxyHeaderParser().max_header_length == 16 + 1024
    assert ProxyHeaderParser(version=1).max_header_length == 107
    assert ProxyHeaderParser(max_v2_length=0).max_header_length == 107
    with pytest.raises(ProxyProtocolError):
        parse(b"PROXY UNKNOWN\r\n", version=2)
    with pytest.raises(ProxyProtocolError):
        parse(encode_v2(None, None), version=1)
    assert parse(encode_v2(None, None), version=2).version == 2
    with pytest.raises(ValueError):
        ProxyHeaderParser(max_v2_length=70000)
    with pytest.raises(ValueError):
        ProxyHeaderParser(version=3)


def test_rest_keeps_every_following_byte():
    payload = bytes(range(256)) * 300  # 76.8 kB arriving with the header
    h = parse(encode_v1(("1.2.3.4", 1), ("5.6.7.8", 2)) + payload)
    assert h.rest == payload
    h = parse(encode_v2(("1.2.3.4", 1), ("5.6.7.8", 2)) + payload)
    assert h.rest == payload


# --- is_trusted -----------------------------------------------------------


def test_is_trusted():
    nets = [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("2001:db8::/32")]
    assert is_trusted("10.1.2.3", nets)
    assert is_trusted(("10.1.2.3", 5555), nets)
    assert is_trusted(("::ffff:10.1.2.3", 5555, 0, 0), nets)  # dual-stack listener
    assert is_trusted("2001:db8::7", nets)
    assert is_trusted(ipaddress.ip_address("10.0.0.1"), nets)
    assert is_trusted("2001:db8::7%eth0", nets)
    assert not is_trusted("11.0.0.1", nets)
    assert not is_trusted("::1", nets)
    assert not is_trusted("::ffff:11.0.0.1", nets)
    assert not is_trusted("10.0.0.1", [])
    assert not is_trusted("/run/gw.sock", nets)  # AF_UNIX peer
    assert not is_trusted("", nets)
    assert not is_trusted((), nets)
    assert not is_trusted(None, nets)  # type: ignore[arg-type]
    # an IPv4 network does not swallow ::a.b.c.d-compatible or IPv6 in general
    assert not is_trusted("::10.1.2.3", nets)
    assert is_trusted("127.0.0.1", [ipaddress.ip_network("0.0.0.0/0")])
    assert not is_trusted("::1", [ipaddress.ip_network("0.0.0.0/0")])


# --- properties -------------------------------------------------------------

ips = st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6))
ports = st.integers(0, 65535)


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, prev = [], 0
    for p in [*points, len(data)]:
        out.append(data[prev:p])
        prev = p
    return out


def feed_all(chunks: list[bytes], **kwargs) -> ProxyHeader:
    p = ProxyHeaderParser(**kwargs)
    result = None
    consumed = 0
    for i, c in enumerate(chunks):
        consumed += len(c)
        result = p.feed(c)
        if result is not None:
            # the rest of this chunk is in .rest; later chunks were never fed
            return ProxyHeader(
                **{
                    **{f: getattr(result, f) for f in ProxyHeader.__dataclass_fields__},
                    "rest": result.rest + b"".join(chunks[i + 1 :]),
                }
            )
    raise AssertionError(f"incomplete after {consumed} bytes")


def expected_pair(s_ip, d_ip):
    def v4(ip):
        return ip if ip.version == 4 else ip.ipv4_mapped

    if v4(s_ip) is not None and v4(d_ip) is not None:
        return "TCP4", v4(s_ip), v4(d_ip)

    def v6(ip):
        return ip if ip.version == 6 else ipaddress.IPv6Address("::ffff:" + str(ip))

    return "TCP6", v6(s_ip), v6(d_ip)


@settings(max_examples=300, deadline=None)
@given(
    ips,
    ports,
    ips,
    ports,
    st.binary(max_size=64),
    st.lists(st.integers(0, 200), max_size=6),
    st.sampled_from([1, 2]),
    st.lists(
        st.tuples(
            st.integers(0, 255).filter(lambda t: t != PP2_TYPE_CRC32C), st.binary(max_size=40)
        ),
        max_size=3,
    ),
    st.booleans(),
)
def test_encode_parse_round_trip(s_ip, sp, d_ip, dp, payload, cuts, version, tlvs, crc):
    if version == 1:
        wire = encode_v1((str(s_ip), sp), (str(d_ip), dp))
    else:
        wire = encode_v2((str(s_ip), sp), (str(d_ip), dp), tlvs=tlvs, crc=crc)
    h = feed_all(chunked(wire + payload, cuts))
    fam, s_want, d_want = expected_pair(s_ip, d_ip)
    assert (h.version, h.command, h.family) == (version, "PROXY", fam)
    assert ipaddress.ip_address(h.src[0]) == s_want and h.src[1] == sp
    assert ipaddress.ip_address(h.dst[0]) == d_want and h.dst[1] == dp
    assert h.length == len(wire)
    assert h.rest == payload
    if version == 2:
        got = [t for t in h.tlvs if t[0] != PP2_TYPE_CRC32C]
        assert got == [(t, bytes(v)) for t, v in tlvs]
        assert (h.tlv(PP2_TYPE_CRC32C) is not None) == crc
    # byte at a time gives the very same header
    assert trickle(wire + payload[:1]) == ProxyHeader(
        **{**{f: getattr(h, f) for f in ProxyHeader.__dataclass_fields__}, "rest": b""}
    )


def _feed_chunks_only_protocol_errors(data: bytes, cuts: list[int]) -> None:
    p = ProxyHeaderParser()
    try:
        for c in chunked(data, cuts):
            if p.feed(c) is not None:
                return
    except ProxyProtocolError:
        return
    # still waiting: it must be holding no more than a header can be long
    assert p.buffered <= p.max_header_length


@settings(max_examples=500, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=300),
        st.binary(max_size=300).map(lambda b: SIG + b),
        st.binary(max_size=300).map(lambda b: SIG + bytes([0x21]) + b),
        st.binary(max_size=120).map(lambda b: b"PROXY " + b),
        st.text(alphabet="PROXYTCUNKW46 .:0123456789abcdef\r\n", max_size=120).map(
            lambda s: ("PROXY " + s).encode()
        ),
    ),
    st.lists(st.integers(0, 400), max_size=8),
)
def test_random_bytes_only_raise_protocol_errors(data, cuts):
    _feed_chunks_only_protocol_errors(data, cuts)


@settings(max_examples=300, deadline=None)
@given(ips, ports, ips, ports, st.sampled_from([1, 2]), st.integers(0, 10**6), st.integers(0, 7))
def test_corrupted_headers_only_raise_protocol_errors(s_ip, sp, d_ip, dp, version, pos, bit):
    enc = encode_v1 if version == 1 else encode_v2
    wire = bytearray(enc((str(s_ip), sp), (str(d_ip), dp)))
    wire[pos % len(wire)] ^= 1 << bit
    _feed_chunks_only_protocol_errors(bytes(wire), [pos])
