"""Gateway configuration: TOML file and command-line flags → frozen dataclasses.

Every problem is a `UsageError` whose one-line message names the file, the key
and the reason: ``gateway.toml: backend[2].address: port 70000 out of range
(1..65535)``. ``backend[N]`` counts the ``[[backend]]`` tables from 0, in file
order. Unknown keys are errors (with a "did you mean" when one is close), so a
typo never silently falls back to a default.

Relative paths in the file (``backends_file``, an ``access_log`` path) are taken
relative to the file's directory, so a config means the same whatever the
working directory of the process that loads it.

Pure: reads files, never opens sockets or resolves names.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import ipaddress
import json
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from reactor.errors import UsageError

__all__ = [
    "BALANCE_POLICIES",
    "SPLICE_MODES",
    "LOG_LEVELS",
    "SEND_PROXY_VERSIONS",
    "WEIGHT_MIN",
    "WEIGHT_MAX",
    "BackendConfig",
    "GatewayConfig",
    "HealthConfig",
    "AdminConfig",
    "Config",
    "parse_address",
    "format_address",
    "parse_backend_spec",
    "read_backends_file",
    "load",
    "from_dict",
    "add_cli_options",
    "from_cli",
]

BALANCE_POLICIES = ("random", "round_robin", "least_conn", "p2c", "maglev")
SPLICE_MODES = ("off", "on", "auto")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
SEND_PROXY_VERSIONS = ("", "v1", "v2")
MAX_ACCESS_LOG_BUFFER = 16 * 1024 * 1024  # held lines are memory: a sane ceiling
WEIGHT_MIN, WEIGHT_MAX = 1, 256

Address = tuple[str, int]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


# --- dataclasses ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BackendConfig:
    """One upstream. `address` is the canonical "HOST:PORT" ("[v6]:PORT");
    max_fails/fail_timeout None mean "as in [health]" (see Config.max_fails_for)."""

    host: str
    port: int
    weight: int = 1
    send_proxy: str = ""
    resolve: bool = False
    resolve_interval: float = 30.0
    name: str = ""
    max_fails: int | None = None
    fail_timeout: float | None = None

    @property
    def address(self) -> str:
        return format_address(self.host, self.port)

    def __post_init__(self) -> None:
        if not self.name:
            object.__setattr__(self, "name", self.address)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "address": self.address,
            "weight": self.weight,
            "send_proxy": self.send_proxy,
            "resolve": self.resolve,
            "resolve_interval": self.resolve_interval,
            "name": self.name,
        }
        if self.max_fails is not None:
            d["max_fails"] = self.max_fails
        if self.fail_timeout is not None:
            d["fail_timeout"] = self.fail_timeout
        return d


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    """[gateway]. listen holds (host, port) pairs; host "" = all interfaces."""

    listen: tuple[Address, ...] = (("", 8080),)
    balance: str = "round_robin"
    connect_timeout: float = 2.0
    retries: int = 2
    idle_timeout: float = 600.0
    max_connections: int = 10000
    max_connections_per_ip: int = 0
    buffer_limit: int = 262144
    backlog: int = 511
    reuseport: bool = False
    workers: int = 1
    grace: float = 30.0
    accept_proxy: bool = False
    trusted_sources: tuple[Network, ...] = ()
    proxy_timeout: float = 5.0
    access_log: bool | str = True  # True = stderr, False = off, str = file path
    access_log_buffer: int = 0  # bytes held across turns; 0 = each turn's lines at its end
    access_log_flush: float = 1.0  # seconds the oldest held line may wait (with a buffer)
    log_level: str = "info"
    splice: str = "auto"
    watch: bool = False
    backends_file: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["listen"] = [format_address(h, p) for h, p in self.listen]
        d["trusted_sources"] = [str(n) for n in self.trusted_sources]
        return d


@dataclass(frozen=True, slots=True)
class HealthConfig:
    enabled: bool = True
    interval: float = 2.0
    timeout: float = 1.0
    rise: int = 2
    fall: int = 3
    max_fails: int = 1
    fail_timeout: float = 10.0

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclass(frozen=True, slots=True)
class AdminConfig:
    """[admin]. listen None = the admin endpoint is disabled."""

    listen: Address | None = ("127.0.0.1", 9901)

    def to_dict(self) -> dict[str, Any]:
        return {"listen": "" if self.listen is None else format_address(*self.listen)}


@dataclass(frozen=True, slots=True)
class Config:
    gateway: GatewayConfig = field(default_factory=GatewayConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    backends: tuple[BackendConfig, ...] = ()
    source: str = ""  # where it came from, for messages; not part of to_dict()

    def max_fails_for(self, backend: BackendConfig) -> int:
        return self.health.max_fails if backend.max_fails is None else backend.max_fails

    def fail_timeout_for(self, backend: BackendConfig) -> float:
        return self.health.fail_timeout if backend.fail_timeout is None else backend.fail_timeout

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, and in the file's own shape: from_dict(c.to_dict()) == c
        (apart from `source`)."""
        return {
            "gateway": self.gateway.to_dict(),
            "health": self.health.to_dict(),
            "admin": self.admin.to_dict(),
            "backend": [b.to_dict() for b in self.backends],
        }


# --- addresses ------------------------------------------------------------

_HOSTNAME = re.compile(
    r"(?=.{1,253}\.?$)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
    r"(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?",
    re.ASCII,
)
_DIGITS = re.compile(r"[0-9]+", re.ASCII)
_DOTTED_NUMERIC = re.compile(r"[0-9.]+", re.ASCII)


def format_address(host: str, port: int) -> str:
    """(host, port) → "HOST:PORT", "[v6]:PORT", or ":PORT" for all interfaces."""
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def _canonical_host(host: str, text: str) -> str:
    """Validate a bare (unbracketed) host; IP literals canonical, names lowercase."""
    if _DOTTED_NUMERIC.fullmatch(host):
        try:
            return str(ipaddress.IPv4Address(host))
        except ValueError:
            raise ValueError(f"invalid IPv4 address {host!r}") from None
    if not _HOSTNAME.fullmatch(host):
        raise ValueError(f"invalid host {host!r} in {text!r}")
    return host.lower()


def parse_address(
    text: str,
    *,
    what: str,
    allow_zero_port: bool = True,
    allow_empty_host: bool = True,
) -> Address:
    """Parse "HOST:PORT", "[v6]:PORT" or ":PORT" into (host, port).

    host "" (from ":PORT" or "*:PORT") means all interfaces, allowed only with
    allow_empty_host. IP literals come back canonical ("[0::1]:80" → "::1"),
    DNS names lowercased and unresolved. Errors raise UsageError("{what}: …").
    """
    try:
        return _parse_address(text, allow_zero_port, allow_empty_host)
    except ValueError as e:
        raise UsageError(f"{what}: {e}") from None


def _parse_address(text: str, allow_zero_port: bool, allow_empty_host: bool) -> Address:
    if not isinstance(text, str):
        raise ValueError(f"expected a string, got {_type_name(text)}")
    s = text.strip()
    if not s:
        raise ValueError("empty address (expected HOST:PORT)")
    if s.startswith("["):
        close = s.find("]")
        if close < 0:
            raise ValueError(f"missing ']' in {text!r}")
        inner, after = s[1:close], s[close + 1 :]
        if not after.startswith(":"):
            raise ValueError(f"missing port in {text!r} (expected [HOST]:PORT)")
        port_s = after[1:]
        if "%" in inner:
            raise ValueError(f"IPv6 zone ids are not supported: {text!r}")
        try:
            host = ipaddress.IPv6Address(inner).compressed
        except ValueError:
            raise ValueError(f"invalid IPv6 address {inner!r}") from None
    else:
        host, sep, port_s = s.rpartition(":")
        if not sep:
            raise ValueError(f"missing port in {text!r} (expected HOST:PORT)")
        if ":" in host:
            raise ValueError(f"IPv6 addresses need brackets: [{host}]:{port_s}")
        if host == "*":
            host = ""
        if host:
            host = _canonical_host(host, text)
        elif not allow_empty_host:
            raise ValueError(f"missing host in {text!r} (expected HOST:PORT)")
    if not _DIGITS.fullmatch(port_s):
        if not port_s:
            raise ValueError(f"missing port in {text!r}")
        raise ValueError(f"invalid port {port_s!r} (expected a number)")
    port = int(port_s)
    lo = 0 if allow_zero_port else 1
    if not lo <= port <= 65535:
        raise ValueError(f"port {port} out of range ({lo}..65535)")
    return host, port


def _weight_check(w: int) -> str | None:
    if not WEIGHT_MIN <= w <= WEIGHT_MAX:
        return f"{w} out of range ({WEIGHT_MIN}..{WEIGHT_MAX})"
    return None


def parse_backend_spec(text: str, *, what: str = "--backend") -> BackendConfig:
    """ "HOST:PORT[@WEIGHT]" → BackendConfig (the form --backend and
    backends_file use). Errors raise UsageError("{what}: …")."""
    if not isinstance(text, str):
        raise UsageError(f"{what}: expected a string, got {_type_name(text)}")
    addr, at, w = text.strip().partition("@")
    host, port = parse_address(addr, what=what, allow_zero_port=False, allow_empty_host=False)
    weight = 1
    if at:
        w = w.strip()
        if not _DIGITS.fullmatch(w):
            raise UsageError(f"{what}: invalid weight {w!r} (expected an integer)")
        weight = int(w)
        problem = _weight_check(weight)
        if problem:
            raise UsageError(f"{what}: weight {problem}")
    return BackendConfig(host=host, port=port, weight=weight)


def read_backends_file(path: str | os.PathLike) -> list[BackendConfig]:
    """One "HOST:PORT[@WEIGHT]" per line; "#" starts a comment; blank lines
    are skipped. Errors name the line: "backends.txt:3: port 0 out of range …".
    An empty list is not an error here (the gateway decides what it means)."""
    label = os.fspath(path)
    text = _read_text(label)
    out: list[BackendConfig] = []
    seen: dict[tuple[str, int], int] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{label}:{lineno}"
        b = parse_backend_spec(line, what=where)
        key = (b.host, b.port)
        if key in seen:
            raise UsageError(f"{where}: duplicate of line {seen[key]} ({b.address})")
        seen[key] = lineno
        out.append(b)
    return out


# --- schema and value checks ----------------------------------------------


class _Bad(Exception):
    """A value problem; the caller prefixes where it happened. sub locates it
    inside the value ("[2]" for an array item) and is glued onto the key."""

    def __init__(self, reason: str, sub: str = ""):
        super().__init__(reason)
        self.reason, self.sub = reason, sub


def _type_name(v: object) -> str:
    if isinstance(v, bool):
        return f"a boolean ({str(v).lower()})"
    if isinstance(v, int):
        return f"an integer ({v})"
    if isinstance(v, float):
        return f"a number ({v})"
    if isinstance(v, str):
        shown = v if len(v) <= 40 else v[:37] + "..."
        return f"a string ({shown!r})"
    if isinstance(v, list | tuple):
        return "an array"
    if isinstance(v, Mapping):
        return "a table"
    return f"a {type(v).__name__}"


def _want_bool(v: object) -> bool:
    if not isinstance(v, bool):
        raise _Bad(f"expected a boolean (true or false), got {_type_name(v)}")
    return v


def _want_int(v: object, lo: int | None = None, hi: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise _Bad(f"expected an integer, got {_type_name(v)}")
    if lo is not None and hi is not None and not lo <= v <= hi:
        raise _Bad(f"{v} out of range ({lo}..{hi})")
    if lo is not None and v < lo:
        raise _Bad(f"must be >= {lo}, got {v}")
    return v


def _want_seconds(v: object, *, zero_ok: bool) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise _Bad(f"expected a number of seconds, got {_type_name(v)}")
    try:
        f = float(v)
    except OverflowError:
        raise _Bad(f"{v} out of range") from None
    if not math.isfinite(f):
        raise _Bad(f"must be a finite number of seconds, got {v}")
    if zero_ok and f < 0:
        raise _Bad(f"must be >= 0, got {v}")
    if not zero_ok and f <= 0:
        raise _Bad(f"must be > 0, got {v}")
    return f


def _want_choice(v: object, choices: tuple[str, ...]) -> str:
    shown = ", ".join(repr(c) if c == "" else c for c in choices)
    if not isinstance(v, str):
        raise _Bad(f"expected one of {shown}, got {_type_name(v)}")
    if v not in choices:
        hint = difflib.get_close_matches(v, [c for c in choices if c], n=1)
        tail = f" (did you mean {hint[0]}?)" if hint else ""
        raise _Bad(f"{v!r} is not one of {shown}{tail}")
    return v


def _want_str(v: object) -> str:
    if not isinstance(v, str):
        raise _Bad(f"expected a string, got {_type_name(v)}")
    return v


def _want_address(v: object, *, allow_zero_port: bool, allow_empty_host: bool) -> Address:
    if not isinstance(v, str):
        raise _Bad(f'expected a "HOST:PORT" string, got {_type_name(v)}')
    try:
        return _parse_address(v, allow_zero_port, allow_empty_host)
    except ValueError as e:
        raise _Bad(str(e)) from None


def _want_listen(v: object) -> tuple[Address, ...]:
    """A string or an array of strings; each may have port 0."""
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list | tuple):
        raise _Bad(f'expected "HOST:PORT" or an array of them, got {_type_name(v)}')
    if not items:
        raise _Bad("needs at least one address")
    out: list[Address] = []
    for i, item in enumerate(items):
        try:
            a = _want_address(item, allow_zero_port=True, allow_empty_host=True)
        except _Bad as e:
            raise _Bad(e.reason, "" if isinstance(v, str) else f"[{i}]") from None
        # port 0 asks the kernel for a fresh port each time, so it may repeat
        if a in out and a[1] != 0:
            raise _Bad(f"duplicate address {format_address(*a)}", f"[{i}]")
        out.append(a)
    return tuple(out)


def _want_networks(v: object) -> tuple[Network, ...]:
    if not isinstance(v, list | tuple):
        raise _Bad(f"expected an array of CIDR strings, got {_type_name(v)}")
    out: list[Network] = []
    for i, item in enumerate(v):
        if not isinstance(item, str):
            raise _Bad(f"expected a CIDR string, got {_type_name(item)}", f"[{i}]")
        try:
            out.append(ipaddress.ip_network(item.strip(), strict=True))
        except ValueError:
            try:
                loose = ipaddress.ip_network(item.strip(), strict=False)
            except ValueError:
                raise _Bad(f"{item!r} is not an IP network", f"[{i}]") from None
            raise _Bad(f"{item!r} has host bits set (did you mean {loose}?)", f"[{i}]") from None
    return tuple(out)


def _want_access_log(v: object) -> bool | str:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.strip():
        return v
    raise _Bad(f"expected true, false or a file path, got {_type_name(v)}")


def _want_log_level(v: object) -> str:
    return _want_choice(v.lower() if isinstance(v, str) else v, LOG_LEVELS)


def _want_admin_listen(v: object) -> Address | None:
    if isinstance(v, str) and v.strip() in ("", "off"):
        return None
    return _want_address(v, allow_zero_port=True, allow_empty_host=True)


Check = Callable[[object], Any]

_GATEWAY: dict[str, Check] = {
    "listen": _want_listen,
    "balance": lambda v: _want_choice(v, BALANCE_POLICIES),
    "connect_timeout": lambda v: _want_seconds(v, zero_ok=False),
    "retries": lambda v: _want_int(v, lo=0),
    "idle_timeout": lambda v: _want_seconds(v, zero_ok=True),
    "max_connections": lambda v: _want_int(v, lo=1),
    "max_connections_per_ip": lambda v: _want_int(v, lo=0),
    "buffer_limit": lambda v: _want_int(v, lo=1),
    "backlog": lambda v: _want_int(v, lo=1),
    "reuseport": _want_bool,
    "workers": lambda v: _want_int(v, lo=1),
    "grace": lambda v: _want_seconds(v, zero_ok=True),
    "accept_proxy": _want_bool,
    "trusted_sources": _want_networks,
    "proxy_timeout": lambda v: _want_seconds(v, zero_ok=False),
    "access_log": _want_access_log,
    "access_log_buffer": lambda v: _want_int(v, lo=0, hi=MAX_ACCESS_LOG_BUFFER),
    "access_log_flush": lambda v: _want_seconds(v, zero_ok=False),
    "log_level": _want_log_level,
    "splice": lambda v: _want_choice(v, SPLICE_MODES),
    "watch": _want_bool,
    "backends_file": _want_str,
}

_HEALTH: dict[str, Check] = {
    "enabled": _want_bool,
    "interval": lambda v: _want_seconds(v, zero_ok=False),
    "timeout": lambda v: _want_seconds(v, zero_ok=False),
    "rise": lambda v: _want_int(v, lo=1),
    "fall": lambda v: _want_int(v, lo=1),
    "max_fails": lambda v: _want_int(v, lo=0),
    "fail_timeout": lambda v: _want_seconds(v, zero_ok=False),
}

_ADMIN: dict[str, Check] = {"listen": _want_admin_listen}

_BACKEND: dict[str, Check] = {
    "address": lambda v: _want_address(v, allow_zero_port=False, allow_empty_host=False),
    "weight": lambda v: _want_int(v, lo=WEIGHT_MIN, hi=WEIGHT_MAX),
    "send_proxy": lambda v: _want_choice(v, SEND_PROXY_VERSIONS),
    "resolve": _want_bool,
    "resolve_interval": lambda v: _want_seconds(v, zero_ok=False),
    "name": _want_str,
    "max_fails": lambda v: _want_int(v, lo=0),
    "fail_timeout": lambda v: _want_seconds(v, zero_ok=False),
}

_SECTIONS = ("gateway", "health", "admin", "backend")

# these sections are in the dataclasses under the same names as the keys
assert set(_GATEWAY) == {f.name for f in dataclasses.fields(GatewayConfig)}
assert set(_HEALTH) == {f.name for f in dataclasses.fields(HealthConfig)}


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+", re.ASCII)


def _key(key: object) -> str:
    """A key as TOML would write it, so odd keys stay on one line."""
    k = str(key)
    return k if _BARE_KEY.fullmatch(k) else json.dumps(k)


def _unknown(key: object, known: Any) -> str:
    hint = difflib.get_close_matches(str(key), list(known), n=1, cutoff=0.6)
    tail = f" (did you mean {hint[0]}?)" if hint else ""
    return f"unknown key{tail}"


class _Where:
    """Builds "source: key.path: reason" messages."""

    def __init__(self, source: str):
        self.source = source

    def error(self, path: str, reason: str) -> UsageError:
        return UsageError(
            f"{self.source}: {path}: {reason}" if path else f"{self.source}: {reason}"
        )


def _table(data: object, path: str, where: _Where, schema: Mapping[str, Check]) -> dict[str, Any]:
    """Check one table against its schema: converted values for the keys present."""
    if not isinstance(data, Mapping):
        raise where.error(path, f"expected a table, got {_type_name(data)}")
    for key in data:
        if key not in schema:
            raise where.error(f"{path}.{_key(key)}", _unknown(key, schema))
    out: dict[str, Any] = {}
    for key, check in schema.items():
        if key in data:
            try:
                out[key] = check(data[key])
            except _Bad as e:
                raise where.error(f"{path}.{key}{e.sub}", e.reason) from None
    return out


def _resolve_path(p: str, base_dir: str | None) -> str:
    if base_dir and p and not os.path.isabs(p):
        return os.path.normpath(os.path.join(base_dir, p))
    return p


def _build(data: object, source: str, base_dir: str | None) -> Config:
    where = _Where(source)
    if not isinstance(data, Mapping):
        raise where.error("", f"expected a table, got {_type_name(data)}")
    for key in data:
        if key not in _SECTIONS:
            raise where.error(_key(key), _unknown(key, _SECTIONS))

    gw = _table(data.get("gateway", {}), "gateway", where, _GATEWAY)
    if gw.get("backends_file"):
        gw["backends_file"] = _resolve_path(gw["backends_file"], base_dir)
    if isinstance(gw.get("access_log"), str):
        gw["access_log"] = _resolve_path(gw["access_log"], base_dir)
    health = _table(data.get("health", {}), "health", where, _HEALTH)
    admin = _table(data.get("admin", {}), "admin", where, _ADMIN)

    raw_backends = data.get("backend", [])
    if isinstance(raw_backends, Mapping):
        raise where.error(
            "backend", "expected an array of tables: write [[backend]], not [backend]"
        )
    if not isinstance(raw_backends, list | tuple):
        raise where.error("backend", f"expected an array of tables, got {_type_name(raw_backends)}")
    backends: list[BackendConfig] = []
    for i, raw in enumerate(raw_backends):
        path = f"backend[{i}]"
        b = _table(raw, path, where, _BACKEND)
        if "address" not in b:
            raise where.error(
                f"{path}.address", 'missing (every [[backend]] needs address = "HOST:PORT")'
            )
        host, port = b.pop("address")
        backends.append(BackendConfig(host=host, port=port, **b))

    return Config(
        gateway=GatewayConfig(**gw),
        health=HealthConfig(**health),
        admin=AdminConfig(**admin),
        backends=tuple(backends),
        source=source,
    )


def _check_backends(backends: tuple[BackendConfig, ...], source: str) -> None:
    by_addr: dict[tuple[str, int], int] = {}
    by_name: dict[str, int] = {}
    for i, b in enumerate(backends):
        key = (b.host, b.port)
        if key in by_addr:
            raise UsageError(
                f"{source}: backend[{i}].address: duplicate of backend[{by_addr[key]}] ({b.address})"
            )
        by_addr[key] = i
        if b.name in by_name:
            raise UsageError(
                f"{source}: backend[{i}].name: duplicate of backend[{by_name[b.name]}] ({b.name!r})"
            )
        by_name[b.name] = i


def _check(cfg: Config, source: str) -> None:
    """Rules that span keys, run once file and flags are merged."""
    gw = cfg.gateway
    if gw.accept_proxy and not gw.trusted_sources:
        raise UsageError(
            f"{source}: gateway.trusted_sources: must list the networks allowed to send "
            "PROXY headers when accept_proxy = true"
        )
    if not cfg.backends and not gw.backends_file:
        raise UsageError(
            f"{source}: backend: at least one [[backend]] is needed (or gateway.backends_file)"
        )


def from_dict(data: Mapping[str, Any], source: str, *, base_dir: str | None = None) -> Config:
    """Validate parsed TOML (or an equivalent dict) into a Config.

    source labels messages (normally the file name). base_dir, when given,
    anchors relative backends_file / access_log paths.
    """
    cfg = _build(data, source, base_dir)
    _check_backends(cfg.backends, source)
    _check(cfg, source)
    return cfg


def _read_text(label: str) -> str:
    try:
        with open(label, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise UsageError(f"{label}: cannot read: {e.strerror or e}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"{label}: not UTF-8 text (byte {e.start})") from None


_TOML_POS = re.compile(r"^(?P<msg>.*?) \(at line (?P<line>\d+), column (?P<col>\d+)\)$")


def _read_toml(path: str | os.PathLike) -> dict[str, Any]:
    label = os.fspath(path)
    text = _read_text(label)
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        msg = str(e).splitlines()[0] if str(e) else "invalid TOML"
        m = _TOML_POS.match(msg)
        if m:
            raise UsageError(f"{label}:{m['line']}:{m['col']}: invalid TOML: {m['msg']}") from None
        raise UsageError(f"{label}: invalid TOML: {msg}") from None


def load(path: str | os.PathLike) -> Config:
    """Read and validate a TOML config file."""
    label = os.fspath(path)
    data = _read_toml(label)
    return from_dict(data, label, base_dir=os.path.dirname(os.path.abspath(label)))


# --- command line ---------------------------------------------------------

# flag dest → ([gateway] key, flag as typed); argparse already parsed ints and
# floats, the key's own check then applies the same ranges as in the file. The
# supervisor hands every one of them on to its workers.
CLI_GATEWAY: dict[str, tuple[str, str]] = {
    "balance": ("balance", "--balance"),
    "connect_timeout": ("connect_timeout", "--connect-timeout"),
    "retries": ("retries", "--retries"),
    "idle_timeout": ("idle_timeout", "--idle-timeout"),
    "max_connections": ("max_connections", "--max-connections"),
    "max_connections_per_ip": ("max_connections_per_ip", "--max-connections-per-ip"),
    "buffer_limit": ("buffer_limit", "--buffer-limit"),
    "workers": ("workers", "--workers"),
    "grace": ("grace", "--grace"),
    "access_log": ("access_log", "--access-log"),
    "access_log_buffer": ("access_log_buffer", "--access-log-buffer"),
    "access_log_flush": ("access_log_flush", "--access-log-flush"),
    "splice": ("splice", "--splice"),
}


def add_cli_options(parser: argparse.ArgumentParser) -> None:
    """The gateway's flags. Each defaults to None = "not given", so from_cli
    can tell a flag from the config file's value."""
    g = parser.add_argument_group("configuration (flags override --config)")
    g.add_argument("--config", metavar="FILE", help="TOML config file")
    g.add_argument("--check", action="store_true", help="validate the configuration and exit")
    g.add_argument(
        "--listen",
        action="append",
        metavar="HOST:PORT",
        help="address to listen on; repeatable; replaces the file's list (default :8080)",
    )
    g.add_argument(
        "--backend",
        action="append",
        metavar="HOST:PORT[@WEIGHT]",
        help="backend server; repeatable; replaces the file's [[backend]] list",
    )
    g.add_argument(
        "--balance", choices=BALANCE_POLICIES, help="balancing policy (default round_robin)"
    )
    g.add_argument("--connect-timeout", type=float, metavar="SECONDS", help="default 2.0")
    g.add_argument(
        "--retries",
        type=int,
        metavar="N",
        help="other backends tried after a failed connect (default 2)",
    )
    g.add_argument("--idle-timeout", type=float, metavar="SECONDS", help="0 = off (default 600)")
    g.add_argument("--max-connections", type=int, metavar="N", help="default 10000")
    g.add_argument(
        "--max-connections-per-ip", type=int, metavar="N", help="0 = unlimited (default)"
    )
    g.add_argument(
        "--buffer-limit", type=int, metavar="BYTES", help="per direction (default 262144)"
    )
    g.add_argument(
        "--workers", type=int, metavar="N", help="processes sharing the port (default 1)"
    )
    g.add_argument(
        "--grace", type=float, metavar="SECONDS", help="drain time on SIGTERM (default 30)"
    )
    g.add_argument(
        "--admin", metavar="HOST:PORT", help="admin endpoint, or 'off' (default 127.0.0.1:9901)"
    )
    g.add_argument(
        "--access-log",
        nargs="?",
        const=True,
        default=None,
        metavar="FILE",
        help="log each finished connection to stderr, or to FILE",
    )
    g.add_argument("--no-access-log", dest="access_log", action="store_const", const=False)
    g.add_argument(
        "--access-log-buffer",
        type=int,
        metavar="BYTES",
        help="hold up to BYTES of access lines across loop turns (nginx buffer=; default 0: "
        "each turn's lines at its end)",
    )
    g.add_argument(
        "--access-log-flush",
        type=float,
        metavar="SECONDS",
        help="with a buffer: write lines held this long (nginx flush=; default 1.0)",
    )
    g.add_argument("--splice", choices=SPLICE_MODES, help="relay with splice(2) (default auto)")


def from_cli(args: argparse.Namespace) -> Config:
    """The file named by --config (if any), then each given flag over it.
    --listen and --backend replace the file's lists rather than extend them."""
    path = getattr(args, "config", None)
    if path:
        source = os.fspath(path)
        data = _read_toml(source)
        cfg = _build(data, source, os.path.dirname(os.path.abspath(source)))
        _check_backends(cfg.backends, source)
    else:
        source = "command line"
        cfg = Config(source=source)

    gw_changes: dict[str, Any] = {}
    for dest, (key, flag) in CLI_GATEWAY.items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        try:
            gw_changes[key] = _GATEWAY[key](value)
        except _Bad as e:
            raise UsageError(f"{flag}: {e.reason}") from None
    listen = getattr(args, "listen", None)
    if listen:
        try:
            gw_changes["listen"] = _want_listen(list(listen))
        except _Bad as e:
            raise UsageError(f"--listen: {e.reason}") from None
    changes: dict[str, Any] = {}
    if gw_changes:
        changes["gateway"] = dataclasses.replace(cfg.gateway, **gw_changes)
    admin = getattr(args, "admin", None)
    if admin is not None:
        listen_addr = None if admin.strip() in ("off", "") else parse_address(admin, what="--admin")
        changes["admin"] = AdminConfig(listen=listen_addr)
    specs = getattr(args, "backend", None)
    if specs:
        backends = tuple(parse_backend_spec(s, what="--backend") for s in specs)
        seen: set[tuple[str, int]] = set()
        for b in backends:
            if (b.host, b.port) in seen:
                raise UsageError(f"--backend: {b.address} given twice")
            seen.add((b.host, b.port))
        changes["backends"] = backends
    if changes:
        cfg = dataclasses.replace(cfg, **changes)

    if not path and not cfg.backends:
        raise UsageError("no backends: give --backend HOST:PORT[@WEIGHT] or --config FILE")
    _check(cfg, source)
    return cfg
