"""Backends that change while the gateway runs: DNS names, a backends file, the config file.

Three sources move the backend list without a restart, besides SIGHUP:

* **DNS.** A ``[[backend]]`` with ``resolve = true`` is looked up again every
  ``resolve_interval``; every address in the answer is a backend (what a
  Kubernetes headless Service or Consul DNS hands out). The lookup runs in a
  short-lived daemon thread -- ``getaddrinfo`` blocks and cannot be made
  non-blocking -- and its answer comes back to the loop through
  ``Loop.call_soon_threadsafe``. The loop thread never waits for DNS.
* **A backends file** (``gateway.backends_file``, one ``HOST:PORT[@WEIGHT]`` a
  line), re-read when it changes -- for consul-template and friends.
* **The config file itself**, when ``gateway.watch = true``: a change behaves
  like SIGHUP.

Files are watched by polling ``stat`` once a second on a loop timer: one cheap
syscall, no inotify dependency, and it works on every filesystem (including the
bind mounts and ConfigMap symlink swaps where inotify misses changes). A change
is (mtime_ns, size, inode): an editor's rename-over counts, so does a rewrite.

The merged backend list is the ``[[backend]]`` tables followed by the file's
entries; an address in both is an error (the file's change is refused).

Choices, stated once:

* A lookup that fails (timeout, SERVFAIL, NXDOMAIN) or returns nothing keeps
  the last good answer: a DNS outage must not empty the pool. Health checks
  still take dead addresses out.
* At most one lookup per name is in flight; a resolver that hangs delays that
  name's next lookup, nothing else.
* A reload (SIGHUP) resolves every DNS name of the new config in a thread too,
  then applies the new config on the loop. A name with ``resolve = false`` that
  does not resolve rejects the reload (old config stays); a ``resolve = true``
  name that does not resolve starts empty and is retried every interval.
* Changes apply through ``Gateway.update_backends``: a backend whose address
  survives keeps its object (counters, health, maglev slot); one that left is
  drained, never cut.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from reactor.config import BackendConfig, Config, read_backends_file
from reactor.errors import UsageError

if TYPE_CHECKING:  # pragma: no cover
    from reactor.gateway import Gateway
    from reactor.loop import Handle, Loop

log = logging.getLogger("reactor.discovery")

Address = tuple[str, int]
Resolver = Callable[..., list]  # socket.getaddrinfo's signature
Resolved = dict[str, list[Address]]

POLL_INTERVAL = 1.0


def is_numeric(host: str) -> bool:
    """An IP literal needs no lookup."""
    for fam in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(fam, host)
            return True
        except OSError:
            pass
    return False


def lookup(bc: BackendConfig, resolver: Resolver = socket.getaddrinfo) -> list[Address]:
    """``bc``'s host as numeric (host, port) pairs, in the resolver's order,
    without duplicates. Blocks: call it off the loop thread (or before it runs)."""
    infos = resolver(bc.host, bc.port, 0, socket.SOCK_STREAM)
    out: list[Address] = []
    for family, _, _, _, sa in infos:
        if family not in (socket.AF_INET, socket.AF_INET6):
            continue
        addr = (sa[0], sa[1])
        if addr not in out:
            out.append(addr)
    return out


def file_signature(path: str) -> tuple[int, int, int] | None:
    """What tells us a file changed; None when it cannot be stat'ed."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def with_backends_file(cfg: Config, entries: list[BackendConfig] | None = None) -> Config:
    """``cfg`` with the backends file's entries after its ``[[backend]]`` tables.
    Reads the file unless ``entries`` is given. UsageError on a bad file or on
    an address (or name) that both lists hold."""
    path = cfg.gateway.backends_file
    if not path:
        return cfg
    if entries is None:
        entries = read_backends_file(path)
    by_addr = {(b.host, b.port): i for i, b in enumerate(cfg.backends)}
    by_name = {b.name: i for i, b in enumerate(cfg.backends)}
    for b in entries:
        i = by_addr.get((b.host, b.port), by_name.get(b.name))
        if i is not None:
            raise UsageError(f"{path}: {b.address} is also backend[{i}] in {cfg.source}")
    return dataclasses.replace(cfg, backends=cfg.backends + tuple(entries))


def _label(cfg: Config, bc: BackendConfig) -> str:
    """Where a backend came from, for messages: ``gateway.toml: backend[1].address``."""
    for i, b in enumerate(cfg.backends):
        if b is bc:
            return f"{cfg.source}: backend[{i}].address"
    return f"{cfg.gateway.backends_file or cfg.source}: {bc.address}"


def resolve_names(cfg: Config, resolver: Resolver = socket.getaddrinfo,
                  known: Resolved | None = None, only: set[str] | None = None) -> Resolved:
    """Look up every backend of ``cfg`` given by DNS name (or those whose
    address is in ``only``). Blocks.

    A ``resolve = true`` name that fails keeps its ``known`` answer (or none
    for now: discovery retries it); any other name that fails raises
    UsageError naming the backend."""
    out: Resolved = {}
    for bc in cfg.backends:
        if is_numeric(bc.host) or bc.address in out or (only is not None and bc.address not in only):
            continue
        try:
            addrs = lookup(bc, resolver)
            if not addrs:
                raise OSError("no IPv4 or IPv6 address")
        except (OSError, UnicodeError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc)
            if not bc.resolve:
                raise UsageError(f"{_label(cfg, bc)}: cannot resolve {bc.host!r} ({reason})") from None
            log.warning("event=resolve_failed backend=%s error=%s", bc.address, reason)
            addrs = list((known or {}).get(bc.address, []))
        out[bc.address] = addrs
    return out


class Discovery:
    """Keeps one gateway's backend list in step with DNS and its files.

    Use: ``d = Discovery(loop, base)``; ``merged = d.load()`` (blocking, before
    the loop runs); ``gw = Gateway(loop, merged, resolved=d.resolved)``;
    ``d.attach(gw)``; ``d.start()``. ``reload(new_base)`` is SIGHUP.
    """

    def __init__(self, loop: Loop, base: Config, *, resolver: Resolver = socket.getaddrinfo,
                 poll_interval: float = POLL_INTERVAL, config_path: str | None = None,
                 on_config_change: Callable[[], None] | None = None) -> None:
        self.loop = loop
        self.base = base  # the config as read, without the backends file's entries
        self.resolver = resolver
        self.poll_interval = poll_interval
        self.config_path = config_path
        self.on_config_change = on_config_change
        self.gateway: Gateway | None = None
        self.resolved: Resolved = {}
        self.file_sig: tuple | None = None
        self.config_sig: tuple | None = None
        self._timers: dict[str, Handle] = {}
        self._intervals: dict[str, float] = {}
        self._inflight: set[str] = set()
        self._poll_timer: Handle | None = None
        self._gen = 0  # bumped by every reload; a late answer for an older one is dropped
        self._reloading = False
        self._queued: Config | None = None
        self._stopped = False
        # counters, for /stats
        self.lookups = 0
        self.lookup_failures = 0
        self.dns_changes = 0
        self.file_reloads = 0
        self.file_errors = 0
        self.config_changes = 0

    # -- setup ----------------------------------------------------------------

    def load(self) -> Config:
        """Blocking first read: the backends file merged in, every name resolved.
        UsageError for a bad file or a name that must resolve and does not."""
        self.file_sig = self._file_sig(self.base)
        merged = with_backends_file(self.base)
        self.resolved = resolve_names(merged, self.resolver)
        return merged

    def attach(self, gateway: Gateway) -> None:
        self.gateway = gateway
        gateway.discovery = self

    def start(self) -> None:
        if self.config_path:
            self.config_sig = file_signature(self.config_path)
        self._sync_timers()
        self._poll_timer = self.loop.call_later(self.poll_interval, self._poll)

    def stop(self) -> None:
        self._stopped = True
        for h in self._timers.values():
            self.loop.cancel_timer(h)
        self._timers.clear()
        if self._poll_timer is not None:
            self.loop.cancel_timer(self._poll_timer)
            self._poll_timer = None

    @staticmethod
    def _file_sig(cfg: Config) -> tuple | None:
        path = cfg.gateway.backends_file
        return file_signature(path) if path else None

    # -- threads --------------------------------------------------------------

    def _in_thread(self, fn: Callable[[], Any], done: Callable[[Any, BaseException | None], None]) -> None:
        """Run ``fn`` in a daemon thread; ``done(result, exc)`` runs on the loop.
        Daemon, not a pool: a resolver stuck in the C library must not hold up exit."""
        loop = self.loop

        def body() -> None:
            try:
                result, exc = fn(), None
            except BaseException as e:  # noqa: BLE001 - handed to the loop thread
                result, exc = None, e
            loop.call_soon_threadsafe(done, result, exc)

        threading.Thread(target=body, name="reactor-resolve", daemon=True).start()

    # -- periodic DNS -----------------------------------------------------------

    def _wanted(self) -> dict[str, BackendConfig]:
        gw = self.gateway
        if gw is None:
            return {}
        return {bc.address: bc for bc in gw.config.backends if bc.resolve and not is_numeric(bc.host)}

    def _sync_timers(self) -> None:
        """One timer per ``resolve = true`` name; follow the config's names and intervals."""
        if self._stopped:
            return
        wanted = self._wanted()
        for key in list(self._timers):
            if key not in wanted or self._intervals.get(key) != wanted[key].resolve_interval:
                self.loop.cancel_timer(self._timers.pop(key))
                self._intervals.pop(key, None)
        for key, bc in wanted.items():
            if key not in self._timers and key not in self._inflight:
                self._intervals[key] = bc.resolve_interval
                self._timers[key] = self.loop.call_later(bc.resolve_interval, self._due, key)

    def _due(self, key: str) -> None:
        self._timers.pop(key, None)
        bc = self._wanted().get(key)
        if bc is None or self._stopped:
            return
        self._inflight.add(key)
        self.lookups += 1
        resolver = self.resolver
        self._in_thread(lambda: lookup(bc, resolver), lambda r, e: self._answered(key, r, e))

    def _answered(self, key: str, addrs: list[Address] | None, exc: BaseException | None) -> None:
        self._inflight.discard(key)
        if self._stopped:
            return
        wanted = self._wanted()
        if key not in wanted:
            return  # a reload dropped the name while we were asking
        if exc is None and not addrs:
            exc = OSError("no IPv4 or IPv6 address")
        if exc is not None:
            self.lookup_failures += 1
            reason = getattr(exc, "strerror", None) or str(exc)
            log.warning("event=resolve_failed backend=%s error=%s keeping=%d", key, reason,
                        len(self.resolved.get(key, ())))
        elif set(addrs) != set(self.resolved.get(key, ())):
            old = set(self.resolved.get(key, ()))
            self.resolved[key] = list(addrs)
            self.dns_changes += 1
            log.info("event=resolve_changed backend=%s added=%d removed=%d addresses=%d", key,
                     len(set(addrs) - old), len(old - set(addrs)), len(addrs))
            gw = self.gateway
            gw.update_backends(gw.config, self.resolved)
        self._sync_timers()

    # -- files ------------------------------------------------------------------

    def _poll(self) -> None:
        self._poll_timer = None
        if self._stopped:
            return
        try:
            self._check_files()
        finally:
            if not self._stopped:
                self._poll_timer = self.loop.call_later(self.poll_interval, self._poll)

    def _check_files(self) -> None:
        gw = self.gateway
        if self._reloading:
            return  # look again next tick, once the reload in flight has landed
        if self.config_path and gw is not None and gw.config.gateway.watch:
            sig = file_signature(self.config_path)
            if sig != self.config_sig:
                self.config_sig = sig
                self.config_changes += 1
                log.info("event=config_changed file=%s", self.config_path)
                if self.on_config_change is not None:
                    self.on_config_change()
                return  # the reload re-reads the backends file too
        path = self.base.gateway.backends_file
        if not path:
            return
        sig = file_signature(path)
        if sig == self.file_sig:
            return
        self.file_sig = sig
        try:
            merged = with_backends_file(self.base)
        except UsageError as exc:
            self.file_errors += 1
            log.error("event=backends_file_rejected error=%s", exc)
            return
        self.file_reloads += 1
        self._resolve_then(merged, only_new=True,
                           apply=lambda cfg, resolved: self._apply_file(cfg, resolved))

    def _apply_file(self, merged: Config, resolved: Resolved) -> None:
        self.resolved = resolved
        added, removed = self.gateway.update_backends(merged, resolved)
        log.info("event=backends_file_reloaded file=%s backends=%d added=%d removed=%d",
                 merged.gateway.backends_file, len(self.gateway.balancer.backends),
                 len(added), len(removed))
        self._sync_timers()

    # -- reload -------------------------------------------------------------------

    def reload(self, new_base: Config) -> None:
        """SIGHUP (or a watched config change): apply ``new_base`` once its
        backends file is merged and its names resolved; on any error log one
        line and keep the old config."""
        if self._reloading:
            self._queued = new_base  # the newest wins; applied when the current one lands
            return
        self.file_sig = self._file_sig(new_base)
        try:
            merged = with_backends_file(new_base)
        except UsageError as exc:
            self.reject(exc)
            return

        def apply(cfg: Config, resolved: Resolved) -> None:
            try:
                self.gateway.reload(cfg, resolved=resolved)
            except UsageError as exc:  # e.g. the new access_log cannot be opened
                self.reject(exc)
                return
            self.base = new_base
            self.resolved = resolved
            self._sync_timers()

        self._resolve_then(merged, only_new=False, apply=apply)

    def reject(self, exc: BaseException) -> None:
        if self.gateway is not None:
            self.gateway.reload_failures += 1
        log.error("event=reload_rejected error=%s", exc)

    def _resolve_then(self, merged: Config, *, only_new: bool,
                      apply: Callable[[Config, Resolved], None]) -> None:
        """Resolve ``merged``'s names off the loop, then ``apply`` on it -- unless a
        newer reload started meanwhile. No names to look up: apply right away."""
        self._gen += 1
        gen = self._gen
        known = dict(self.resolved)
        todo = [bc for bc in merged.backends if not is_numeric(bc.host)
                and not (only_new and bc.address in known)]
        if not todo:
            apply(merged, {bc.address: known[bc.address] for bc in merged.backends
                           if bc.address in known})
            return
        resolver = self.resolver
        self._reloading = True

        only = {bc.address for bc in todo}

        def work() -> Resolved:
            keep = {bc.address: known[bc.address] for bc in merged.backends
                    if bc.address in known and bc.address not in only}
            keep.update(resolve_names(merged, resolver, known, only))
            return keep

        def done(resolved: Resolved | None, exc: BaseException | None) -> None:
            self._reloading = False
            queued, self._queued = self._queued, None
            if self._stopped:
                return
            if gen != self._gen or queued is not None:
                if queued is not None:
                    self.reload(queued)
                return
            if exc is not None:
                self.reject(exc)
                return
            apply(merged, resolved)

        self._in_thread(work, done)

    # -- introspection --------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        return {
            "names": {k: [f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in v]
                      for k, v in self.resolved.items()},
            "lookups": self.lookups,
            "lookup_failures": self.lookup_failures,
            "dns_changes": self.dns_changes,
            "backends_file_reloads": self.file_reloads,
            "backends_file_errors": self.file_errors,
            "config_changes": self.config_changes,
        }
