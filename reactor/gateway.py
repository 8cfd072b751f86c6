"""The gateway: listeners + balancer + relays + health, and their lifecycle.

This is the seed's ``LoadBalancerServer`` done as a layer-4 load balancer
(HAProxy ``mode tcp``, nginx ``stream``): limits at accept, a policy picks
the backend, a ``Relay`` couples the two streams, health checks and passive
ejection steer new connections away from broken backends, and the
lifecycle operations -- reload (SIGHUP), drain (SIGTERM) -- never cut a live
relay short of its grace.
"""

from __future__ import annotations

import logging
import os
import resource
import socket
import time
from typing import Any

from reactor.accesslog import AccessLog
from reactor.addr import bind_error
from reactor.balancer import Backend, Balancer
from reactor.config import BackendConfig, Config
from reactor.discovery import is_numeric as _is_numeric
from reactor.discovery import lookup
from reactor.health import HealthChecker
from reactor.listener import Listener, bind_socket, format_address
from reactor.loop import Loop
from reactor.relay import Relay
from reactor.splice import SpliceableStream, SplicingStream, pipe_pool, start_splice
from reactor.stream import Stream

log = logging.getLogger("reactor.gateway")

_V2_SIG = b"\r\n\r\n\x00\r\nQUIT\n"


def resolve_backend(bc: BackendConfig, resolver=socket.getaddrinfo) -> list[tuple[str, int]]:
    """A backend's host as numeric addresses (a DNS name may give several). Blocks."""
    return lookup(bc, resolver)


class GatewayBackend(Backend):
    """A balancer backend that remembers its config entry and address family."""

    __slots__ = ("config", "family")

    def __init__(self, address: tuple[str, int], name: str, bc: BackendConfig) -> None:
        super().__init__(address, name, bc.weight, bc.send_proxy)
        self.config = bc
        self.family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET


def make_backends(cfg: Config, resolved: dict[str, list[tuple[str, int]]] | None = None) -> list[Backend]:
    """Config backends -> balancer backends. A name resolving to several
    addresses gives one backend per address (a headless Service, Consul DNS),
    named ``NAME#ADDRESS``. ``resolved`` holds the addresses discovery found
    for each DNS name (keyed by ``BackendConfig.address``); with it this never
    blocks -- a name it lacks has no backend for now. Without it, names are
    looked up here (blocking: only before the loop runs)."""
    out: list[Backend] = []
    seen: set[tuple[str, int]] = set()
    for bc in cfg.backends:
        if _is_numeric(bc.host):
            addrs = [(bc.host, bc.port)]
        elif resolved is not None:
            addrs = resolved.get(bc.address, [])
        else:
            try:
                addrs = resolve_backend(bc)
            except OSError as exc:
                if not bc.resolve:
                    raise
                log.warning("event=resolve_failed backend=%s error=%s", bc.address, exc)
                addrs = []
        base = bc.name or bc.address
        for addr in addrs:
            if addr in seen:
                # two names (or a name and a literal) giving one address: one backend
                log.warning("event=duplicate_address backend=%s address=%s", base, format_address(addr))
                continue
            seen.add(addr)
            name = f"{base}#{format_address(addr)}" if (bc.resolve or len(addrs) > 1) else base
            out.append(GatewayBackend(addr, name, bc))
    return out


# Settings read once at start: a reload that changes them says so in the log.
_RESTART_ONLY = ("listen", "backlog", "reuseport", "workers", "splice")


class Gateway:
    """One worker's gateway on one loop."""

    def __init__(self, loop: Loop, config: Config, *,
                 resolved: dict[str, list[tuple[str, int]]] | None = None) -> None:
        self.loop = loop
        self.config = config
        self.relays: set[Relay] = set()
        # a plain dict, not a Counter: Counter's __delitem__ and __missing__
        # are Python functions, ~3,000 instructions per proxied connection
        self.per_ip: dict[str, int] = {}
        self.listeners: list[Listener] = []
        # close reason -> count; a plain dict too: a Counter subclass defines
        # __delitem__, so every item assignment goes through a slot wrapper
        self.reasons: dict[str, int] = {}
        self.accepted_total = 0
        self.rejected_max_connections = 0
        self.rejected_per_ip = 0
        self.connect_failures = 0
        self.proxy_rejected = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.draining = False
        self.started = time.time()
        self.reloads = 0
        self.reload_failures = 0
        self._drain_timer = None
        self._sweep_timer = None
        self.on_stopped = None  # callback when a drain completes
        self.discovery = None  # set by Discovery.attach
        # removed by a reload but still carrying relays: address -> Backend
        self.draining_backends: dict[tuple[str, int], Backend] = {}
        self._apply_settings(config)
        # read once (a restart-only setting): the relays' stream class
        self.splice = config.gateway.splice
        self.stream_class = Stream if self.splice == "off" else SpliceableStream
        self.pipes = pipe_pool(loop) if self.splice != "off" else None
        self.balancer = Balancer(make_backends(config, resolved), config.gateway.balance)
        self.health = HealthChecker(loop, self)
        self.access: AccessLog | None = None
        self._swap_access_log(self._open_access_log(config))

    # -- settings -------------------------------------------------------------

    def _apply_settings(self, cfg: Config) -> None:
        g = cfg.gateway
        self.buffer_limit = g.buffer_limit
        self.connect_timeout = g.connect_timeout
        self.retries = g.retries
        self.idle_timeout = g.idle_timeout
        self.max_connections = g.max_connections
        self.max_connections_per_ip = g.max_connections_per_ip
        self.accept_proxy = g.accept_proxy
        self.trusted_sources = g.trusted_sources
        self.proxy_timeout = g.proxy_timeout
        self.config = cfg

    def max_fails_for(self, backend: Backend) -> int:
        return self.config.max_fails_for(backend.config)  # type: ignore[attr-defined]

    def fail_timeout_for(self, backend: Backend) -> float:
        return self.config.fail_timeout_for(backend.config)  # type: ignore[attr-defined]

    def _open_access_log(self, cfg: Config) -> AccessLog | None:
        g = cfg.gateway
        if g.access_log is False:
            return None
        return AccessLog(self.loop, g.access_log, g.access_log_buffer, g.access_log_flush)  # may raise OSError

    def _swap_access_log(self, new: AccessLog | None) -> None:
        # a reload reopens the file, as nginx's does (logrotate moves, we follow)
        if self.access is not None:
            self.access.close()
        self.access = new

    # -- lifecycle ------------------------------------------------------------

    def start(self, sockets: list[socket.socket] | None = None) -> None:
        """Bind (or adopt pre-bound ``sockets``), start checks and the idle sweep."""
        g = self.config.gateway
        if sockets is None:
            sockets = []
            try:
                for host, port in g.listen:
                    sockets.append(bind_socket(host, port, backlog=g.backlog, reuseport=g.reuseport))
            except OSError as exc:
                for s in sockets:
                    s.close()
                text = format_address((host or "*", port))
                raise bind_error("listen", text, exc) from None
        for s in sockets:
            # bare fds and TCP_NODELAY inherited from the listener: two syscalls
            # fewer per connection (see Stream.sock)
            self.listeners.append(Listener(self.loop, s, self._on_accept, bare=True, nodelay=True))
        if self.pipes is not None:
            self._configure_pipes()
        if self.config.health.enabled:
            self.health.start()
        self._schedule_sweep()

    def _configure_pipes(self) -> None:
        limit = self.pipes.configure(self.max_connections, self.buffer_limit, len(self.balancer.backends))
        # asked for explicitly (on): said out loud; the default (auto): quietly
        # (/stats shows splice.max_pipes either way)
        if limit == 0:
            log.log(logging.WARNING if self.splice == "on" else logging.DEBUG,
                    "event=splice_disabled reason=fd_budget max_connections=%d fd_limit=%s "
                    "hint=raise_RLIMIT_NOFILE_or_lower_max_connections",
                    self.max_connections, _fd_soft_limit())
        else:
            log.log(logging.INFO if self.splice == "on" else logging.DEBUG,
                    "event=splice mode=%s max_pipes=%d pipe_size=%d", self.splice, limit, self.pipes.size)

    @property
    def addresses(self) -> list[str]:
        return [lst.name for lst in self.listeners]

    def _schedule_sweep(self) -> None:
        if self.idle_timeout > 0:
            every = min(1.0, self.idle_timeout / 4)
            self._sweep_timer = self.loop.call_later(every, self._sweep)

    def _sweep(self) -> None:
        self._sweep_timer = None
        now = self.loop.now
        t = self.idle_timeout
        if t > 0:
            for relay in list(self.relays):
                relay.idle_check(now, t)
        self._schedule_sweep()

    def close_listeners(self) -> None:
        for lst in self.listeners:
            lst.close()

    def drain(self, grace: float | None = None) -> None:
        """SIGTERM: stop accepting now, let relays finish for ``grace`` seconds."""
        if self.draining:
            return
        self.draining = True
        grace = self.config.gateway.grace if grace is None else grace
        self.close_listeners()
        log.info("event=drain_start relays=%d grace=%.1fs", len(self.relays), grace)
        if not self.relays:
            self._drained()
            return
        self._drain_timer = self.loop.call_later(grace, self._drain_expired)

    def _drain_expired(self) -> None:
        self._drain_timer = None
        log.info("event=drain_timeout closing=%d", len(self.relays))
        for relay in list(self.relays):
            relay.finish("shutdown")
        self._drained()

    def _drained(self) -> None:
        log.info("event=drain_done")
        self.shutdown()
        if self.on_stopped is not None:
            self.on_stopped()

    def shutdown(self) -> None:
        """Stop everything now: listeners, checks, timers, relays."""
        self.close_listeners()
        self.health.stop()
        for h in (self._sweep_timer, self._drain_timer):
            if h is not None:
                self.loop.cancel_timer(h)
        self._sweep_timer = self._drain_timer = None
        for relay in list(self.relays):
            relay.finish("shutdown")
        if self.pipes is not None:
            self.pipes.clear()
        if self.access is not None:
            self.access.flush()  # the loop may not turn again

    def reload(self, new: Config, resolved: dict[str, list[tuple[str, int]]] | None = None) -> None:
        """Apply a new config to *new* connections; live relays are untouched
        (each relay read its settings when it was accepted). A backend that
        left the list is drained: no new connections, existing ones run to
        their natural end. ``resolved``: see ``make_backends``."""
        old = self.config
        for key in _RESTART_ONLY:
            if getattr(new.gateway, key) != getattr(old.gateway, key):
                log.warning("event=reload_ignored key=gateway.%s reason=needs_restart", key)
        if new.admin != old.admin:
            log.warning("event=reload_ignored key=admin.listen reason=needs_restart")
        backends = make_backends(new, resolved)  # may raise: nothing changed yet
        access = self._open_access_log(new)  # likewise
        self._apply_settings(new)
        added, removed = self.set_backends(backends)
        self.balancer.set_policy(new.gateway.balance)
        if self.pipes is not None:
            self._configure_pipes()  # max_connections or buffer_limit may have changed
        self._swap_access_log(access)
        self.health.reconfigure()
        if self._sweep_timer is None and not self.draining:
            self._schedule_sweep()
        self.reloads += 1
        log.info("event=reloaded backends=%d added=%d removed=%d balance=%s",
                 len(self.balancer.backends), len(added), len(removed), new.gateway.balance)

    def update_backends(self, cfg: Config, resolved: dict[str, list[tuple[str, int]]] | None = None
                        ) -> tuple[list[Backend], list[Backend]]:
        """Only the backend list changed (DNS answer, backends file): ``cfg`` is
        the current config with its new list; settings stay as they are."""
        backends = make_backends(cfg, resolved)
        self.config = cfg
        added, removed = self.set_backends(backends)
        self.health.reconfigure()
        return added, removed

    def set_backends(self, backends: list[Backend]) -> tuple[list[Backend], list[Backend]]:
        """Install a new backend list; returns (added, removed).

        A backend whose address stays keeps its object (counters, health,
        maglev slot); one that left is marked draining and kept in
        ``draining_backends`` while it carries relays; one that comes back
        while still draining is revived, counters and all."""
        revived = []
        for i, nb in enumerate(backends):
            old = self.draining_backends.pop(nb.address, None)
            if old is not None:
                old.name, old.send_proxy, old.config = nb.name, nb.send_proxy, nb.config  # type: ignore[attr-defined]
                old.weight = old.effective_weight = nb.weight
                old.current_weight = 0
                old.draining = False
                backends[i] = old
                revived.append(old)
        before = set(self.balancer.backends)
        removed = self.balancer.set_backends(backends)
        added = [b for b in self.balancer.backends if b not in before]
        # surviving Backend objects keep counters; refresh their config link
        by_addr = {b.address: b for b in backends}
        for b in self.balancer.backends:
            nb = by_addr.get(b.address)
            if nb is not None and nb is not b:
                b.config = nb.config  # type: ignore[attr-defined]
        for b in removed:
            b.draining = True
            if b.active > 0:
                self.draining_backends[b.address] = b
            log.info("event=backend_removed backend=%s active=%d", b.name, b.active)
        for b in added:
            log.info("event=backend_added backend=%s address=%s weight=%d%s", b.name,
                     format_address(b.address), b.weight, " revived=1" if b in revived else "")
        self._prune_draining()
        return added, removed

    def _prune_draining(self) -> None:
        for addr, b in list(self.draining_backends.items()):
            if b.active <= 0:
                del self.draining_backends[addr]

    # -- accepting ------------------------------------------------------------

    def _on_accept(self, fd: int, addr: tuple) -> None:
        self.accepted_total += 1
        if len(self.relays) >= self.max_connections:
            self.rejected_max_connections += 1
            self.reasons["max_connections"] = self.reasons.get("max_connections", 0) + 1
            os.close(fd)
            self.loop.syscalls.close += 1
            if self.access is not None:
                self.access.access(format_address(addr), "-", 0, 0, 0.0, "max_connections")
            return
        relay = Relay(self, fd, addr)
        self.relays.add(relay)
        if self.accept_proxy:
            from reactor.proxyproto import is_trusted

            if is_trusted(addr[0], self.trusted_sources):
                relay.expect_proxy()
                return
            relay.proxy_parser = _Spoofcheck(self, relay)
        if self.admit(relay):
            relay.start()

    def admit(self, relay: Relay) -> bool:
        """Per-IP limit, on the real client address (after any PROXY header)."""
        ip = relay.client_ip
        per_ip = self.per_ip
        n = per_ip.get(ip, 0)
        if self.max_connections_per_ip and n >= self.max_connections_per_ip:
            self.rejected_per_ip += 1
            relay.finish("max_connections_per_ip")
            return False
        per_ip[ip] = n + 1
        relay.ip_key = ip
        return True

    def relay_finished(self, relay: Relay) -> None:
        self.relays.discard(relay)
        ip = relay.ip_key
        if ip is not None:
            n = self.per_ip[ip] - 1
            if n > 0:
                self.per_ip[ip] = n
            else:
                del self.per_ip[ip]
        reasons = self.reasons
        reasons[relay.reason] = reasons.get(relay.reason, 0) + 1
        self.bytes_in += relay.client.bytes_in
        self.bytes_out += relay.client.bytes_out
        access = self.access
        if access is not None:
            relay.log_access(access)
        if self.draining and not self.relays and self._drain_timer is not None:
            self.loop.cancel_timer(self._drain_timer)
            self._drain_timer = None
            self.loop.call_soon(self._drained)

    def proxy_header(self, version: str, relay: Relay) -> bytes:
        from reactor.proxyproto import encode_v1, encode_v2

        src = relay.client_addr
        dst = relay.local_addr
        if dst is None:
            dst = relay.client.sock.getsockname()
            self.loop.syscalls.getsockname += 1
        src, dst = (src[0], src[1]), (dst[0], dst[1])
        return encode_v1(src, dst) if version == "v1" else encode_v2(src, dst)

    # -- introspection ----------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        now = self.loop.now
        live_in = sum(r.client.bytes_in for r in self.relays)
        live_out = sum(r.client.bytes_out for r in self.relays)
        return {
            "listeners": [{"address": lst.name, "accepted": lst.accepted,
                           "accept_paused_episodes": lst.exhausted_episodes} for lst in self.listeners],
            "connections": {
                "active": len(self.relays),
                "accepted_total": self.accepted_total,
                "rejected_max_connections": self.rejected_max_connections,
                "rejected_per_ip": self.rejected_per_ip,
                "proxy_rejected": self.proxy_rejected,
                "connect_failures": self.connect_failures,
                "closed_by_reason": dict(self.reasons),
            },
            "bytes": {"in": self.bytes_in + live_in, "out": self.bytes_out + live_out},
            "balance": self.balancer.policy,
            "backends": [dict(b.as_dict(now), health=self.health.state_of(b)) for b in self.balancer.backends],
            "draining_backends": [b.as_dict(now) for b in self._live_draining()],
            "draining": self.draining,
            "reloads": self.reloads,
            "reload_failures": self.reload_failures,
            "uptime": time.time() - self.started,
            "discovery": self.discovery.stats() if self.discovery is not None else None,
            "splice": self._splice_stats(),
            "loop": self.loop.statistics(),
        }

    def _splice_stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mode": self.splice}
        if self.pipes is not None:
            out.update(self.pipes.stats())
            out["directions_spliced"] = sum(
                (type(r.client) is SplicingStream) + (type(r.backend) is SplicingStream)
                for r in self.relays)
        return out

    def _live_draining(self) -> list[Backend]:
        self._prune_draining()
        return list(self.draining_backends.values())


class _Spoofcheck:
    """For a client that is *not* a trusted source on an ``accept_proxy``
    listener: its data passes through, but a first packet that looks like a
    PROXY header (a spoofing attempt) closes the connection and is counted."""

    __slots__ = ("gateway", "relay")
    eof_ok = True  # EOF before any byte is a clean half-close, not a bad header

    def __init__(self, gateway: Gateway, relay: Relay) -> None:
        self.gateway = gateway
        self.relay = relay

    def feed(self, view: memoryview):
        from reactor.proxyproto import ProxyProtocolError

        head = bytes(view[:12])
        relay = self.relay
        relay.proxy_parser = None
        if head.startswith(b"PROXY ") or (len(head) >= 6 and _V2_SIG.startswith(head)):
            raise ProxyProtocolError("PROXY header from untrusted source")
        if relay.backend is not None:
            relay.client.peer = relay.backend
            relay.backend.write(view)
            if self.gateway.splice == "on":
                start_splice(relay.client)
        else:
            relay._hold(view)
        return None


def raise_fd_limit() -> tuple[int, int]:
    """Raise RLIMIT_NOFILE's soft limit to the hard one, as Go's runtime (the
    seed's server) and HAProxy do at start: the common soft default of 1024
    would cap a gateway at ~500 relays while the hard limit allows far more.
    Returns (old soft, new soft)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard or soft == resource.RLIM_INFINITY:
        return soft, soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (OSError, ValueError):
        return soft, soft
    return soft, hard


def _fd_soft_limit() -> int | str:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return "unlimited" if soft == resource.RLIM_INFINITY else soft
