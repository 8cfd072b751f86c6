"""reactor.config: TOML and flags → Config, and the exact messages of every refusal."""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import math
import os
import tomllib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reactor import config
from reactor.config import (
    AdminConfig,
    BackendConfig,
    Config,
    GatewayConfig,
    HealthConfig,
    add_cli_options,
    from_cli,
    from_dict,
    load,
    parse_address,
    parse_backend_spec,
    read_backends_file,
)
from reactor.errors import UsageError

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "gateway.toml"
ONE_BACKEND = '\n[[backend]]\naddress = "10.0.0.1:9000"\n'


def write(tmp_path: Path, text: str, name: str = "gateway.toml") -> str:
    p = tmp_path / name
    p.write_text(text)
    return str(p)


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    """Every test runs in its own directory, so messages show short relative names."""
    monkeypatch.chdir(tmp_path)


def load_error(tmp_path: Path, text: str) -> str:
    """Load text from gateway.toml in tmp_path (cwd) and return the error message."""
    write(tmp_path, text)
    with pytest.raises(UsageError) as ei:
        load("gateway.toml")
    return str(ei.value)


# --- addresses ------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        (":8080", ("", 8080)),
        ("*:8080", ("", 8080)),
        ("0.0.0.0:0", ("0.0.0.0", 0)),
        ("127.0.0.1:80", ("127.0.0.1", 80)),
        ("[::1]:80", ("::1", 80)),
        ("[0:0::1]:80", ("::1", 80)),
        ("[::]:443", ("::", 443)),
        ("Game-1.Example.COM:7777", ("game-1.example.com", 7777)),
        ("localhost:65535", ("localhost", 65535)),
        ("  10.0.0.1:9000 ", ("10.0.0.1", 9000)),
    ],
)
def test_parse_address_accepts(text, expected):
    assert parse_address(text, what="x") == expected


@pytest.mark.parametrize(
    "text, kwargs, message",
    [
        ("10.0.0.1:70000", {}, "x: port 70000 out of range (0..65535)"),
        ("10.0.0.1:0", {"allow_zero_port": False}, "x: port 0 out of range (1..65535)"),
        ("10.0.0.1", {}, "x: missing port in '10.0.0.1' (expected HOST:PORT)"),
        ("10.0.0.1:", {}, "x: missing port in '10.0.0.1:'"),
        ("10.0.0.1:http", {}, "x: invalid port 'http' (expected a number)"),
        ("10.0.0.1:-1", {}, "x: invalid port '-1' (expected a number)"),
        ("10.0.0.1:٨٠", {}, "x: invalid port '٨٠' (expected a number)"),
        ("::1:80", {}, "x: IPv6 addresses need brackets: [::1]:80"),
        ("[::1]", {}, "x: missing port in '[::1]' (expected [HOST]:PORT)"),
        ("[::1:80", {}, "x: missing ']' in '[::1:80'"),
        ("[10.0.0.1]:80", {}, "x: invalid IPv6 address '10.0.0.1'"),
        ("[fe80::1%eth0]:80", {}, "x: IPv6 zone ids are not supported: '[fe80::1%eth0]:80'"),
        ("10.0.0.256:80", {}, "x: invalid IPv4 address '10.0.0.256'"),
        ("bad host:80", {}, "x: invalid host 'bad host' in 'bad host:80'"),
        ("-x.example:80", {}, "x: invalid host '-x.example' in '-x.example:80'"),
        ("", {}, "x: empty address (expected HOST:PORT)"),
        (":80", {"allow_empty_host": False}, "x: missing host in ':80' (expected HOST:PORT)"),
    ],
)
def test_parse_address_rejects(text, kwargs, message):
    with pytest.raises(UsageError) as ei:
        parse_address(text, what="x", **kwargs)
    assert str(ei.value) == message


def test_format_address_round_trips():
    for text in (":8080", "127.0.0.1:80", "[::1]:80", "example.com:1"):
        assert config.format_address(*parse_address(text, what="x")) == text


def test_backend_spec():
    b = parse_backend_spec("10.0.0.1:9000@5")
    assert (b.host, b.port, b.weight, b.name, b.address) == (
        "10.0.0.1",
        9000,
        5,
        "10.0.0.1:9000",
        "10.0.0.1:9000",
    )
    assert parse_backend_spec("[::1]:80").address == "[::1]:80"
    assert parse_backend_spec("[::1]:80").weight == 1


@pytest.mark.parametrize(
    "spec, message",
    [
        ("10.0.0.1:9000@0", "--backend: weight 0 out of range (1..256)"),
        ("10.0.0.1:9000@257", "--backend: weight 257 out of range (1..256)"),
        ("10.0.0.1:9000@x", "--backend: invalid weight 'x' (expected an integer)"),
        ("10.0.0.1:9000@", "--backend: invalid weight '' (expected an integer)"),
        ("10.0.0.1:0", "--backend: port 0 out of range (1..65535)"),
        (":9000", "--backend: missing host in ':9000' (expected HOST:PORT)"),
    ],
)
def test_backend_spec_rejects(spec, message):
    with pytest.raises(UsageError) as ei:
        parse_backend_spec(spec)
    assert str(ei.value) == message


# --- backends file --------------------------------------------------------


def test_read_backends_file(tmp_path):
    p = write(
        tmp_path,
        "# game servers\n\n10.0.0.1:9000\n  10.0.0.2:9000@3   # the big one\n[::1]:9001\n",
        "backends.txt",
    )
    got = read_backends_file(p)
    assert [(b.address, b.weight) for b in got] == [
        ("10.0.0.1:9000", 1),
        ("10.0.0.2:9000", 3),
        ("[::1]:9001", 1),
    ]


@pytest.mark.parametrize(
    "text, message",
    [
        ("10.0.0.1:9000\n\n10.0.0.1:70000\n", "backends.txt:3: port 70000 out of range (1..65535)"),
        ("# c\n10.0.0.1:9000@999\n", "backends.txt:2: weight 999 out of range (1..256)"),
        ("a:1\nb:2\nA:1\n", "backends.txt:3: duplicate of line 1 (a:1)"),
        ("10.0.0.1\n", "backends.txt:1: missing port in '10.0.0.1' (expected HOST:PORT)"),
    ],
)
def test_read_backends_file_errors(tmp_path, text, message):
    write(tmp_path, text, "backends.txt")
    with pytest.raises(UsageError) as ei:
        read_backends_file("backends.txt")
    assert str(ei.value) == message


def test_read_backends_file_missing(tmp_path):
    with pytest.raises(UsageError) as ei:
        read_backends_file("nope.txt")
    assert str(ei.value) == "nope.txt: cannot read: No such file or directory"


def test_read_backends_file_empty_is_empty_list(tmp_path):
    assert read_backends_file(write(tmp_path, "# nothing yet\n\n", "b.txt")) == []


# --- loading files --------------------------------------------------------


def test_example_loads_and_shows_every_default():
    cfg = load(EXAMPLE)
    assert cfg.gateway == GatewayConfig()
    assert cfg.health == HealthConfig()
    assert cfg.admin == AdminConfig()
    assert [b.address for b in cfg.backends] == [
        "127.0.0.1:9001",
        "127.0.0.1:9002",
        "localhost:9003",
    ]
    assert cfg.backends[1].name == "game-2" and cfg.backends[1].weight == 2
    assert cfg.backends[2].send_proxy == "v2"
    # every key the schema knows is written out in the example
    raw = tomllib.loads(EXAMPLE.read_text())
    assert set(raw["gateway"]) == {f.name for f in dataclasses.fields(GatewayConfig)}
    assert set(raw["health"]) == {f.name for f in dataclasses.fields(HealthConfig)}
    text = EXAMPLE.read_text()
    for key in ("max_fails", "fail_timeout", "resolve_interval", "send_proxy", "name"):
        assert f"\n# {key} = " in text or f"\n{key} = " in text


def test_minimal_file_gets_defaults(tmp_path):
    cfg = load(write(tmp_path, ONE_BACKEND))
    assert cfg.gateway == GatewayConfig()
    assert cfg.gateway.listen == (("", 8080),)
    assert cfg.admin.listen == ("127.0.0.1", 9901)
    assert cfg.backends == (BackendConfig(host="10.0.0.1", port=9000),)
    assert cfg.backends[0].name == "10.0.0.1:9000"


def test_full_values_convert(tmp_path):
    cfg = load(
        write(
            tmp_path,
            """
[gateway]
listen = [":8080", "[::1]:0", "127.0.0.1:0"]
balance = "maglev"
connect_timeout = 1
idle_timeout = 0
accept_proxy = true
trusted_sources = ["10.0.0.0/8", "::1", "192.168.1.7"]
access_log = "logs/access.log"
log_level = "DEBUG"
splice = "auto"
backends_file = "backends.txt"
[health]
max_fails = 0
[admin]
listen = ""
[[backend]]
address = "game.example:7000"
max_fails = 5
fail_timeout = 2
resolve = true
""",
        )
    )
    gw = cfg.gateway
    assert gw.listen == (("", 8080), ("::1", 0), ("127.0.0.1", 0))
    assert gw.balance == "maglev"
    assert gw.connect_timeout == 1.0 and isinstance(gw.connect_timeout, float)
    assert gw.idle_timeout == 0.0
    assert gw.trusted_sources == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
        ipaddress.ip_network("192.168.1.7/32"),
    )
    # relative paths are anchored at the config file's directory
    assert gw.access_log == str(tmp_path / "logs" / "access.log")
    assert gw.backends_file == str(tmp_path / "backends.txt")
    assert gw.log_level == "debug"
    assert gw.splice == "auto"
    assert cfg.admin.listen is None
    b = cfg.backends[0]
    assert (b.max_fails, b.fail_timeout, b.resolve) == (5, 2.0, True)
    assert cfg.max_fails_for(b) == 5 and cfg.fail_timeout_for(b) == 2.0


def test_per_backend_health_inherits(tmp_path):
    cfg = load(write(tmp_path, "[health]\nmax_fails = 4\nfail_timeout = 7.5\n" + ONE_BACKEND))
    b = cfg.backends[0]
    assert b.max_fails is None
    assert cfg.max_fails_for(b) == 4 and cfg.fail_timeout_for(b) == 7.5


def test_backends_file_makes_backend_tables_optional(tmp_path):
    cfg = load(write(tmp_path, '[gateway]\nbackends_file = "/etc/reactor/backends.txt"\n'))
    assert cfg.backends == ()
    assert cfg.gateway.backends_file == "/etc/reactor/backends.txt"


@pytest.mark.parametrize(
    "text, message",
    [
        # unknown keys, with and without a suggestion
        (
            "[gateway]\nconect_timeout = 1\n" + ONE_BACKEND,
            "gateway.toml: gateway.conect_timeout: unknown key (did you mean connect_timeout?)",
        ),
        ("[gateway]\nzzz = 1\n" + ONE_BACKEND, "gateway.toml: gateway.zzz: unknown key"),
        ("[gatway]\n" + ONE_BACKEND, "gateway.toml: gatway: unknown key (did you mean gateway?)"),
        (
            "[[backends]]\naddress = 'a:1'\n",
            "gateway.toml: backends: unknown key (did you mean backend?)",
        ),
        (
            ONE_BACKEND + "wieght = 2\n",
            "gateway.toml: backend[0].wieght: unknown key (did you mean weight?)",
        ),
        (
            "[health]\nintervall = 1\n" + ONE_BACKEND,
            "gateway.toml: health.intervall: unknown key (did you mean interval?)",
        ),
        (
            "[admin]\nlisten = ':1'\nport = 2\n" + ONE_BACKEND,
            "gateway.toml: admin.port: unknown key",
        ),
        # addresses
        (
            "[[backend]]\naddress = 'a:1'\n[[backend]]\naddress = 'b:2'\n[[backend]]\naddress = '10.0.0.1:70000'\n",
            "gateway.toml: backend[2].address: port 70000 out of range (1..65535)",
        ),
        (
            "[[backend]]\naddress = '10.0.0.1:0'\n",
            "gateway.toml: backend[0].address: port 0 out of range (1..65535)",
        ),
        (
            "[[backend]]\naddress = ':80'\n",
            "gateway.toml: backend[0].address: missing host in ':80' (expected HOST:PORT)",
        ),
        (
            "[[backend]]\nweight = 2\n",
            'gateway.toml: backend[0].address: missing (every [[backend]] needs address = "HOST:PORT")',
        ),
        (
            "[[backend]]\naddress = 9000\n",
            'gateway.toml: backend[0].address: expected a "HOST:PORT" string, got an integer (9000)',
        ),
        (
            "[gateway]\nlisten = ':65536'\n" + ONE_BACKEND,
            "gateway.toml: gateway.listen: port 65536 out of range (0..65535)",
        ),
        (
            "[gateway]\nlisten = [':1', 'x']\n" + ONE_BACKEND,
            "gateway.toml: gateway.listen[1]: missing port in 'x' (expected HOST:PORT)",
        ),
        (
            "[gateway]\nlisten = [':1', ':1']\n" + ONE_BACKEND,
            "gateway.toml: gateway.listen[1]: duplicate address :1",
        ),
        (
            "[gateway]\nlisten = []\n" + ONE_BACKEND,
            "gateway.toml: gateway.listen: needs at least one address",
        ),
        (
            "[gateway]\nlisten = 8080\n" + ONE_BACKEND,
            'gateway.toml: gateway.listen: expected "HOST:PORT" or an array of them, got an integer (8080)',
        ),
        (
            "[admin]\nlisten = '127.0.0.1'\n" + ONE_BACKEND,
            "gateway.toml: admin.listen: missing port in '127.0.0.1' (expected HOST:PORT)",
        ),
        # choices
        (
            "[gateway]\nbalance = 'roundrobin'\n" + ONE_BACKEND,
            "gateway.toml: gateway.balance: 'roundrobin' is not one of random, round_robin, least_conn, p2c, maglev (did you mean round_robin?)",
        ),
        (
            "[gateway]\nbalance = 'fastest'\n" + ONE_BACKEND,
            "gateway.toml: gateway.balance: 'fastest' is not one of random, round_robin, least_conn, p2c, maglev",
        ),
        (
            "[gateway]\nsplice = true\n" + ONE_BACKEND,
            "gateway.toml: gateway.splice: expected one of off, on, auto, got a boolean (true)",
        ),
        (
            "[gateway]\nlog_level = 'verbose'\n" + ONE_BACKEND,
            "gateway.toml: gateway.log_level: 'verbose' is not one of debug, info, warning, error, critical",
        ),
        (
            ONE_BACKEND + "send_proxy = 'v3'\n",
            "gateway.toml: backend[0].send_proxy: 'v3' is not one of '', v1, v2",
        ),
        # types
        (
            "[gateway]\nretries = '2'\n" + ONE_BACKEND,
            "gateway.toml: gateway.retries: expected an integer, got a string ('2')",
        ),
        (
            "[gateway]\nretries = 2.5\n" + ONE_BACKEND,
            "gateway.toml: gateway.retries: expected an integer, got a number (2.5)",
        ),
        (
            "[gateway]\nworkers = true\n" + ONE_BACKEND,
            "gateway.toml: gateway.workers: expected an integer, got a boolean (true)",
        ),
        (
            "[gateway]\nreuseport = 1\n" + ONE_BACKEND,
            "gateway.toml: gateway.reuseport: expected a boolean (true or false), got an integer (1)",
        ),
        (
            "[gateway]\nconnect_timeout = '2s'\n" + ONE_BACKEND,
            "gateway.toml: gateway.connect_timeout: expected a number of seconds, got a string ('2s')",
        ),
        (
            "[gateway]\nbackends_file = false\n" + ONE_BACKEND,
            "gateway.toml: gateway.backends_file: expected a string, got a boolean (false)",
        ),
        (
            "[gateway]\naccess_log = ''\n" + ONE_BACKEND,
            "gateway.toml: gateway.access_log: expected true, false or a file path, got a string ('')",
        ),
        (
            "gateway = 3\n" + ONE_BACKEND,
            "gateway.toml: gateway: expected a table, got an integer (3)",
        ),
        (
            "[backend]\naddress = 'a:1'\n",
            "gateway.toml: backend: expected an array of tables: write [[backend]], not [backend]",
        ),
        ("backend = ['a:1']\n", "gateway.toml: backend[0]: expected a table, got a string ('a:1')"),
        # ranges
        (
            "[gateway]\nconnect_timeout = 0\n" + ONE_BACKEND,
            "gateway.toml: gateway.connect_timeout: must be > 0, got 0",
        ),
        (
            "[gateway]\nconnect_timeout = -1.5\n" + ONE_BACKEND,
            "gateway.toml: gateway.connect_timeout: must be > 0, got -1.5",
        ),
        (
            "[gateway]\nconnect_timeout = inf\n" + ONE_BACKEND,
            "gateway.toml: gateway.connect_timeout: must be a finite number of seconds, got inf",
        ),
        (
            "[gateway]\nproxy_timeout = nan\n" + ONE_BACKEND,
            "gateway.toml: gateway.proxy_timeout: must be a finite number of seconds, got nan",
        ),
        (
            "[gateway]\nidle_timeout = -1\n" + ONE_BACKEND,
            "gateway.toml: gateway.idle_timeout: must be >= 0, got -1",
        ),
        (
            "[gateway]\ngrace = -0.5\n" + ONE_BACKEND,
            "gateway.toml: gateway.grace: must be >= 0, got -0.5",
        ),
        (
            "[gateway]\nretries = -1\n" + ONE_BACKEND,
            "gateway.toml: gateway.retries: must be >= 0, got -1",
        ),
        (
            "[gateway]\nmax_connections = 0\n" + ONE_BACKEND,
            "gateway.toml: gateway.max_connections: must be >= 1, got 0",
        ),
        (
            "[gateway]\nmax_connections_per_ip = -3\n" + ONE_BACKEND,
            "gateway.toml: gateway.max_connections_per_ip: must be >= 0, got -3",
        ),
        (
            "[gateway]\nbuffer_limit = 0\n" + ONE_BACKEND,
            "gateway.toml: gateway.buffer_limit: must be >= 1, got 0",
        ),
        (
            "[gateway]\nbacklog = 0\n" + ONE_BACKEND,
            "gateway.toml: gateway.backlog: must be >= 1, got 0",
        ),
        (
            "[gateway]\nworkers = 0\n" + ONE_BACKEND,
            "gateway.toml: gateway.workers: must be >= 1, got 0",
        ),
        (
            "[health]\ninterval = 0\n" + ONE_BACKEND,
            "gateway.toml: health.interval: must be > 0, got 0",
        ),
        (
            "[health]\ntimeout = -1\n" + ONE_BACKEND,
            "gateway.toml: health.timeout: must be > 0, got -1",
        ),
        ("[health]\nrise = 0\n" + ONE_BACKEND, "gateway.toml: health.rise: must be >= 1, got 0"),
        ("[health]\nfall = 0\n" + ONE_BACKEND, "gateway.toml: health.fall: must be >= 1, got 0"),
        (
            "[health]\nmax_fails = -1\n" + ONE_BACKEND,
            "gateway.toml: health.max_fails: must be >= 0, got -1",
        ),
        (
            "[health]\nfail_timeout = 0\n" + ONE_BACKEND,
            "gateway.toml: health.fail_timeout: must be > 0, got 0",
        ),
        (ONE_BACKEND + "weight = 0\n", "gateway.toml: backend[0].weight: 0 out of range (1..256)"),
        (
            ONE_BACKEND + "weight = 300\n",
            "gateway.toml: backend[0].weight: 300 out of range (1..256)",
        ),
        (
            ONE_BACKEND + "resolve_interval = 0\n",
            "gateway.toml: backend[0].resolve_interval: must be > 0, got 0",
        ),
        (
            ONE_BACKEND + "fail_timeout = 0\n",
            "gateway.toml: backend[0].fail_timeout: must be > 0, got 0",
        ),
        (
            ONE_BACKEND + "max_fails = -2\n",
            "gateway.toml: backend[0].max_fails: must be >= 0, got -2",
        ),
        # trusted sources
        (
            "[gateway]\ntrusted_sources = ['10.0.0.1/8']\n" + ONE_BACKEND,
            "gateway.toml: gateway.trusted_sources[0]: '10.0.0.1/8' has host bits set (did you mean 10.0.0.0/8?)",
        ),
        (
            "[gateway]\ntrusted_sources = ['::1', 'lan']\n" + ONE_BACKEND,
            "gateway.toml: gateway.trusted_sources[1]: 'lan' is not an IP network",
        ),
        (
            "[gateway]\ntrusted_sources = [10]\n" + ONE_BACKEND,
            "gateway.toml: gateway.trusted_sources[0]: expected a CIDR string, got an integer (10)",
        ),
        (
            "[gateway]\ntrusted_sources = '10.0.0.0/8'\n" + ONE_BACKEND,
            "gateway.toml: gateway.trusted_sources: expected an array of CIDR strings, got a string ('10.0.0.0/8')",
        ),
        (
            "[gateway]\naccept_proxy = true\n" + ONE_BACKEND,
            "gateway.toml: gateway.trusted_sources: must list the networks allowed to send PROXY headers when accept_proxy = true",
        ),
        # cross-backend
        (
            "[gateway]\n",
            "gateway.toml: backend: at least one [[backend]] is needed (or gateway.backends_file)",
        ),
        (
            "",
            "gateway.toml: backend: at least one [[backend]] is needed (or gateway.backends_file)",
        ),
        (
            "[[backend]]\naddress = 'a:1'\n[[backend]]\naddress = '10.0.0.1:9'\n[[backend]]\naddress = 'A:1'\n",
            "gateway.toml: backend[2].address: duplicate of backend[0] (a:1)",
        ),
        (
            "[[backend]]\naddress = '[::1]:9'\n[[backend]]\naddress = '[0::1]:9'\n",
            "gateway.toml: backend[1].address: duplicate of backend[0] ([::1]:9)",
        ),
        (
            "[[backend]]\naddress = 'a:1'\nname='x'\n[[backend]]\naddress = 'b:1'\nname = 'x'\n",
            "gateway.toml: backend[1].name: duplicate of backend[0] ('x')",
        ),
    ],
)
def test_load_rejects_with_exact_message(tmp_path, text, message):
    assert load_error(tmp_path, text) == message


def test_unreadable_and_malformed_files(tmp_path):
    with pytest.raises(UsageError) as ei:
        load("missing.toml")
    assert str(ei.value) == "missing.toml: cannot read: No such file or directory"
    (tmp_path / "dir.toml").mkdir()
    with pytest.raises(UsageError) as ei:
        load("dir.toml")
    assert str(ei.value) == "dir.toml: cannot read: Is a directory"
    write(tmp_path, "[gateway]\nlisten = ':80'\nretries = \n", "bad.toml")
    with pytest.raises(UsageError) as ei:
        load("bad.toml")
    assert str(ei.value) == "bad.toml:3:11: invalid TOML: Invalid value"
    write(tmp_path, "[gateway]\nretries = 1\nretries = 2\n", "dup.toml")
    with pytest.raises(UsageError) as ei:
        load("dup.toml")
    assert str(ei.value).startswith("dup.toml:3:")
    (tmp_path / "latin1.toml").write_bytes(b"# caf\xe9\n")
    with pytest.raises(UsageError) as ei:
        load("latin1.toml")
    assert str(ei.value) == "latin1.toml: not UTF-8 text (byte 5)"
    # every message is a single line
    for name in ("missing.toml", "dir.toml", "bad.toml", "dup.toml", "latin1.toml"):
        with pytest.raises(UsageError) as ei:
            load(name)
        assert "\n" not in str(ei.value)


def test_unreadable_permission(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root reads everything")
    p = write(tmp_path, ONE_BACKEND)
    os.chmod(p, 0)
    with pytest.raises(UsageError) as ei:
        load(p)
    assert str(ei.value) == f"{p}: cannot read: Permission denied"


# --- to_dict / from_dict ----------------------------------------------------


def test_to_dict_round_trips_and_is_json(tmp_path):
    import json

    cfg = load(EXAMPLE)
    d = cfg.to_dict()
    json.dumps(d)  # /stats serves it
    assert d["gateway"]["listen"] == [":8080"]
    assert d["admin"]["listen"] == "127.0.0.1:9901"
    assert d["backend"][1]["name"] == "game-2"
    assert from_dict(d, cfg.source) == cfg


def test_from_dict_rejects_non_table():
    with pytest.raises(UsageError) as ei:
        from_dict([], "src")  # type: ignore[arg-type]
    assert str(ei.value) == "src: expected a table, got an array"


# --- command line ---------------------------------------------------------


def parse_cli(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_cli_options(p)
    return p.parse_args(argv)


def test_cli_defaults_are_none():
    ns = parse_cli([])
    for dest in (
        "config",
        "listen",
        "backend",
        "balance",
        "connect_timeout",
        "admin",
        "access_log",
        "splice",
    ):
        assert getattr(ns, dest) is None
    assert ns.check is False
    assert parse_cli(["--check"]).check is True


def test_cli_only():
    cfg = from_cli(parse_cli(["--backend", "127.0.0.1:9001", "--backend", "[::1]:9002@7"]))
    assert [(b.address, b.weight) for b in cfg.backends] == [
        ("127.0.0.1:9001", 1),
        ("[::1]:9002", 7),
    ]
    assert cfg.gateway == GatewayConfig()
    assert cfg.source == "command line"


def test_cli_without_backends():
    with pytest.raises(UsageError) as ei:
        from_cli(parse_cli([]))
    assert str(ei.value) == "no backends: give --backend HOST:PORT[@WEIGHT] or --config FILE"


def test_cli_overrides_file(tmp_path):
    path = write(
        tmp_path,
        """
[gateway]
listen = ":7000"
balance = "random"
connect_timeout = 9.0
retries = 5
idle_timeout = 60
max_connections = 5
max_connections_per_ip = 5
buffer_limit = 5
workers = 3
grace = 5
access_log = false
splice = "on"
backlog = 77
[admin]
listen = "127.0.0.1:9999"
[[backend]]
address = "10.0.0.1:1"
[[backend]]
address = "10.0.0.2:1"
""",
    )
    # the file alone
    cfg = from_cli(parse_cli(["--config", path]))
    assert cfg.gateway.balance == "random" and cfg.gateway.retries == 5
    assert len(cfg.backends) == 2 and cfg.source == path
    # every flag beats the file; untouched keys keep the file's value
    cfg = from_cli(
        parse_cli(
            [
                "--config",
                path,
                "--listen",
                ":8000",
                "--listen",
                "[::1]:8001",
                "--backend",
                "10.0.0.9:9@2",
                "--balance",
                "p2c",
                "--connect-timeout",
                "0.5",
                "--retries",
                "0",
                "--idle-timeout",
                "0",
                "--max-connections",
                "100",
                "--max-connections-per-ip",
                "10",
                "--buffer-limit",
                "65536",
                "--workers",
                "2",
                "--grace",
                "1.5",
                "--admin",
                "off",
                "--access-log",
                "--splice",
                "auto",
            ]
        )
    )
    gw = cfg.gateway
    assert gw.listen == (("", 8000), ("::1", 8001))
    assert [(b.address, b.weight) for b in cfg.backends] == [("10.0.0.9:9", 2)]  # replaced
    assert (gw.balance, gw.connect_timeout, gw.retries, gw.idle_timeout) == ("p2c", 0.5, 0, 0.0)
    assert (gw.max_connections, gw.max_connections_per_ip, gw.buffer_limit) == (100, 10, 65536)
    assert (gw.workers, gw.grace, gw.access_log, gw.splice) == (2, 1.5, True, "auto")
    assert gw.backlog == 77  # not a flag: from the file
    assert cfg.admin.listen is None


def test_cli_access_log_forms(tmp_path):
    base = ["--backend", "a:1"]
    assert from_cli(parse_cli(base)).gateway.access_log is True
    assert from_cli(parse_cli([*base, "--no-access-log"])).gateway.access_log is False
    assert from_cli(parse_cli([*base, "--access-log", "x.log"])).gateway.access_log == "x.log"
    path = write(tmp_path, "[gateway]\naccess_log = false\n" + ONE_BACKEND)
    assert from_cli(parse_cli(["--config", path, "--access-log"])).gateway.access_log is True
    assert from_cli(parse_cli(["--config", path])).gateway.access_log is False


def test_cli_admin_address():
    cfg = from_cli(parse_cli(["--backend", "a:1", "--admin", "[::1]:0"]))
    assert cfg.admin.listen == ("::1", 0)


def test_cli_backend_rescues_file_without_backends(tmp_path):
    path = write(tmp_path, "[gateway]\nretries = 1\n")
    with pytest.raises(UsageError) as ei:
        from_cli(parse_cli(["--config", path]))
    assert (
        str(ei.value)
        == f"{path}: backend: at least one [[backend]] is needed (or gateway.backends_file)"
    )
    cfg = from_cli(parse_cli(["--config", path, "--backend", "a:1"]))
    assert cfg.gateway.retries == 1 and cfg.backends[0].address == "a:1"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--retries", "-1"], "--retries: must be >= 0, got -1"),
        (["--connect-timeout", "0"], "--connect-timeout: must be > 0, got 0.0"),
        (["--idle-timeout", "nan"], "--idle-timeout: must be a finite number of seconds, got nan"),
        (["--max-connections", "0"], "--max-connections: must be >= 1, got 0"),
        (["--workers", "0"], "--workers: must be >= 1, got 0"),
        (["--grace", "-1"], "--grace: must be >= 0, got -1.0"),
        (["--buffer-limit", "0"], "--buffer-limit: must be >= 1, got 0"),
        (["--listen", "x"], "--listen: missing port in 'x' (expected HOST:PORT)"),
        (["--listen", ":1", "--listen", ":1"], "--listen: duplicate address :1"),
        (["--admin", "127.0.0.1:99999"], "--admin: port 99999 out of range (0..65535)"),
        (["--backend", "b:0"], "--backend: port 0 out of range (1..65535)"),
        (["--backend", "b:1@1000"], "--backend: weight 1000 out of range (1..256)"),
        (["--backend", "b:1", "--backend", "B:1@2"], "--backend: b:1 given twice"),
    ],
)
def test_cli_rejects(argv, message):
    args = parse_cli(["--backend", "a:1", *argv] if "--backend" not in argv else argv)
    with pytest.raises(UsageError) as ei:
        from_cli(args)
    assert str(ei.value) == message


def test_cli_file_errors_name_the_file(tmp_path):
    path = write(tmp_path, "[gateway]\nretries = 'x'\n" + ONE_BACKEND)
    with pytest.raises(UsageError) as ei:
        from_cli(parse_cli(["--config", path, "--retries", "1"]))
    assert str(ei.value) == f"{path}: gateway.retries: expected an integer, got a string ('x')"


def test_cli_argparse_rejects_bad_choice(capsys):
    with pytest.raises(SystemExit) as ei:
        parse_cli(["--balance", "fastest"])
    assert ei.value.code == 2
    assert "invalid choice: 'fastest'" in capsys.readouterr().err


def test_config_objects_are_frozen_and_slotted():
    cfg = from_cli(parse_cli(["--backend", "a:1"]))
    for obj in (cfg, cfg.gateway, cfg.health, cfg.admin, cfg.backends[0]):
        assert not hasattr(obj, "__dict__")
        first = dataclasses.fields(obj)[0].name
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(obj, first, None)


# --- property tests -------------------------------------------------------

toml_scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    st.sampled_from(
        ["", ":0", "a:1", "[::1]:80", "10.0.0.0/8", "v2", "p2c", "on", "10.0.0.1:9000@3"]
    ),
)
toml_values = st.recursive(
    toml_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)
# Values that mostly pass their key's check, so that generated configs reach
# the later checks (cross-key rules, to_dict) instead of stopping at the first key.
_seconds = st.floats(min_value=0.001, max_value=1e5)
_count = st.integers(min_value=0, max_value=10**6)
_GOOD = {
    "listen": st.sampled_from([":0", "127.0.0.1:0", "[::1]:8080", [":0", "[::1]:0"], []]),
    "balance": st.sampled_from(config.BALANCE_POLICIES),
    "trusted_sources": st.lists(
        st.sampled_from(["10.0.0.0/8", "::1", "192.168.0.0/16"]), max_size=2
    ),
    "access_log": st.sampled_from([True, False, "access.log"]),
    "log_level": st.sampled_from(config.LOG_LEVELS),
    "splice": st.sampled_from(config.SPLICE_MODES),
    "backends_file": st.sampled_from(["", "backends.txt"]),
    "address": st.sampled_from(["a:1", "b.example:2", "[::1]:3", "10.0.0.1:4"]),
    "weight": st.integers(min_value=0, max_value=300),
    "send_proxy": st.sampled_from(config.SEND_PROXY_VERSIONS),
    "name": st.sampled_from(["", "x", "y"]),
}


def _good(key: str, check) -> st.SearchStrategy:
    if key in _GOOD:
        return _GOOD[key]
    default = {
        **{f.name: f.default for f in dataclasses.fields(GatewayConfig)},
        **{f.name: f.default for f in dataclasses.fields(HealthConfig)},
        "resolve": False,
        "resolve_interval": 1.0,
        "max_fails": 1,
        "fail_timeout": 1.0,
    }[key]
    if isinstance(default, bool):
        return st.booleans()
    if isinstance(default, int):
        return _count
    return _seconds


_ADMIN_LISTEN = {"listen": st.sampled_from(["", "off", "127.0.0.1:0", "[::1]:9901"])}


def section(
    schema: dict, n: int = 6, *, junk_too: bool = True, good: dict | None = None
) -> st.SearchStrategy:
    """Known keys with mostly good values, or (two thirds of the time) some junk."""
    good = good or {}
    required = {k: _good(k, None) for k in schema if k == "address"}
    optional = {
        k: good[k] if k in good else _good(k, c) for k, c in schema.items() if k not in required
    }
    known = st.fixed_dictionaries(required, optional=optional)
    junk_value = {k: st.one_of(_good(k, c), toml_values) for k, c in schema.items()}
    odd = st.fixed_dictionaries({}, optional=junk_value)
    junk = st.dictionaries(
        st.one_of(st.sampled_from(sorted(schema)), st.text(max_size=12)), toml_values, max_size=n
    )
    return st.one_of(known, odd, junk) if junk_too else known


def structured(junk_too: bool) -> st.SearchStrategy:
    return st.fixed_dictionaries(
        {},
        optional={
            "gateway": section(config._GATEWAY, junk_too=junk_too),
            "health": section(config._HEALTH, junk_too=junk_too),
            "admin": section(config._ADMIN, 1, junk_too=junk_too, good=_ADMIN_LISTEN),
            "backend": st.lists(section(config._BACKEND, 4, junk_too=junk_too), max_size=3),
        },
    )


random_config = st.one_of(
    structured(True),
    structured(True),
    st.dictionaries(st.text(max_size=10), toml_values, max_size=4),
)
near_valid_config = structured(False)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_config)
def test_from_dict_never_crashes(data):
    try:
        cfg = from_dict(data, "fuzz.toml")
    except UsageError as e:
        msg = str(e)
        assert msg.startswith("fuzz.toml: ")
        assert "\n" not in msg
        return
    assert isinstance(cfg, Config)
    assert from_dict(cfg.to_dict(), "fuzz.toml") == cfg


backend_addresses = st.one_of(
    st.ip_addresses(v=4).map(lambda ip: f"{ip}"),
    st.ip_addresses(v=6).map(lambda ip: f"[{ip}]"),
    st.from_regex(r"[a-z]([a-z0-9-]{0,8}[a-z0-9])?(\.[a-z]{2,5}){0,2}", fullmatch=True),
)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(backend_addresses, st.integers(1, 65535), st.integers(1, 256)),
        min_size=1,
        max_size=5,
        unique_by=lambda t: (t[0], t[1]),
    ),
    st.floats(min_value=1e-3, max_value=1e6),
)
def test_valid_configs_round_trip(backends, timeout):
    data = {
        "gateway": {"connect_timeout": timeout},
        "backend": [{"address": f"{h}:{p}", "weight": w} for h, p, w in backends],
    }
    cfg = from_dict(data, "gen.toml")
    assert cfg.gateway.connect_timeout == timeout
    assert [b.weight for b in cfg.backends] == [w for _, _, w in backends]
    for b, (_h, p, _) in zip(cfg.backends, backends, strict=True):
        assert b.port == p
        assert parse_address(b.address, what="x") == (b.host, b.port)
        assert not math.isnan(b.resolve_interval)
    assert from_dict(cfg.to_dict(), "gen.toml") == cfg


@settings(max_examples=300, deadline=None)
@given(near_valid_config)
def test_near_valid_configs(data):
    """Known keys with plausible values: either a Config that survives a round
    trip through to_dict, or one of the refusals such values can earn."""
    try:
        cfg = from_dict(data, "near.toml")
    except UsageError as e:
        reason = str(e).rsplit(": ", 1)[-1]
        assert any(
            reason.startswith(r) or r in reason
            for r in (
                "at least one [[backend]] is needed",
                "needs at least one address",
                "must be >= 1, got 0",
                "out of range (1..256)",
                "duplicate of backend[",
                "must list the networks allowed",
            )
        ), str(e)
        return
    assert from_dict(cfg.to_dict(), "near.toml") == cfg
    assert cfg.backends or cfg.gateway.backends_file
    for key, value in data.get("gateway", {}).items():
        if key not in ("listen", "trusted_sources", "access_log", "backends_file"):
            assert getattr(cfg.gateway, key) == value
