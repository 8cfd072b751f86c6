"""`reactor gateway`: the load-balancing TCP gateway.

    $ reactor gateway --listen 127.0.0.1:8080 --backend 127.0.0.1:9001 \\
          --backend 127.0.0.1:9002@2 --balance least_conn
    reactor gateway: pid=4242 listening on 127.0.0.1:8080 backends=2 balance=least_conn admin=127.0.0.1:9901

Signals, as HAProxy and nginx users expect: SIGHUP re-reads ``--config``
(new connections see the new backends and policy; live relays are
untouched; a bad file is refused with one log line and the old config
stays); SIGTERM drains (listening socket closed at once, relays get
``grace`` seconds, then exit 0); a second SIGTERM, or SIGINT, stops at once.
With ``--workers N`` a supervisor runs N of these (see reactor.supervisor).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import socket
import sys

from reactor import config as configmod
from reactor.config import Config
from reactor.discovery import Discovery, with_backends_file
from reactor.errors import UsageError
from reactor.gateway import Gateway, raise_fd_limit
from reactor.loop import Loop

log = logging.getLogger("reactor.gateway")


def add_arguments(p: argparse.ArgumentParser) -> None:
    configmod.add_cli_options(p)
    # set by the supervisor on the workers it starts; not for people
    p.add_argument("--worker-id", type=int, default=None, help=argparse.SUPPRESS)


def setup_logging(level: str = "info") -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s %(message)s", stream=sys.stderr)


def load_config(args: argparse.Namespace) -> Config:
    """The file, the flags over it, and what a worker must have: its own
    SO_REUSEPORT socket on the port its supervisor chose."""
    cfg = configmod.from_cli(args)
    if getattr(args, "worker_id", None) is not None:
        cfg = dataclasses.replace(cfg, gateway=dataclasses.replace(cfg.gateway, reuseport=True, workers=1))
    return cfg


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    if args.check:
        merged = with_backends_file(cfg)
        extra = f", {len(merged.backends) - len(cfg.backends)} from {cfg.gateway.backends_file}" \
            if cfg.gateway.backends_file else ""
        print(f"{cfg.source}: ok ({len(merged.backends)} backends{extra}, balance={cfg.gateway.balance})")
        return 0
    setup_logging(cfg.gateway.log_level)
    if cfg.gateway.workers > 1:
        from reactor.supervisor import run_supervisor

        return run_supervisor(cfg, args)
    return run_gateway(cfg, args)


def reload_config(args: argparse.Namespace) -> Config:
    """Re-read the file and re-apply the command-line flags over it."""
    return load_config(args)


def run_gateway(cfg: Config, args: argparse.Namespace | None, *, sockets=None,
                banner: str = "reactor gateway", extra_setup=None,
                resolver=socket.getaddrinfo) -> int:
    """Run one gateway worker until it is stopped or drained."""
    old, new = raise_fd_limit()
    if new != old:
        log.debug("event=fd_limit soft=%d raised_from=%d", new, old)
    loop = Loop()
    config_path = getattr(args, "config", None) if args is not None else None
    state = {"terms": 0}
    disc = Discovery(loop, cfg, resolver=resolver, config_path=config_path,
                     on_config_change=lambda: on_hup())
    try:
        merged = disc.load()
        gw = Gateway(loop, merged, resolved=disc.resolved)
        disc.attach(gw)
        gw.start(sockets)
    except BaseException:
        loop.close()
        raise
    admin = None
    if cfg.admin.listen is not None:
        from reactor.admin import AdminServer

        try:
            admin = AdminServer(loop, gw, cfg.admin.listen)
        except BaseException:
            gw.shutdown()
            loop.close()
            raise
    if extra_setup is not None:
        extra_setup(loop, gw)

    def on_term() -> None:
        state["terms"] += 1
        if state["terms"] == 1 and gw.relays:
            # the port is released now, so a new instance can bind it while we finish
            # The admin stays up while draining: /healthz answers 503 so a
            # load balancer in front stops sending, and /stats shows the drain.
            gw.on_stopped = loop.stop
            disc.stop()
            gw.drain()
        else:
            if state["terms"] > 1:
                log.info("event=stop_now relays=%d", len(gw.relays))
            loop.stop()

    def on_int() -> None:
        loop.stop()

    def on_hup() -> None:
        if gw.draining:
            log.info("event=reload_skipped reason=draining")
            return
        if not config_path:
            log.info("event=reload_skipped reason=no_config_file")
            return
        try:
            new = reload_config(args)
        except UsageError as exc:
            disc.reject(exc)
            return
        disc.reload(new)

    if args is not None and getattr(args, "worker_id", None) is not None:
        parent = os.getppid()

        def watch_parent() -> None:
            # a worker whose supervisor was SIGKILLed drains rather than lingers
            if os.getppid() != parent:
                log.warning("event=supervisor_gone pid=%d", parent)
                state["terms"] = 0
                on_term()
            elif not gw.draining:
                loop.call_later(1.0, watch_parent)

        loop.call_later(1.0, watch_parent)

    loop.add_signal_handler(signal.SIGTERM, on_term)
    loop.add_signal_handler(signal.SIGINT, on_int)
    loop.add_signal_handler(signal.SIGHUP, on_hup)
    gw.hup = on_hup
    disc.start()
    admin_txt = admin.name if admin is not None else "off"
    print(f"{banner}: pid={os.getpid()} listening on {' '.join(gw.addresses)} "
          f"backends={len(gw.balancer.backends)} balance={gw.balancer.policy} admin={admin_txt}",
          flush=True)
    try:
        loop.run()
    finally:
        disc.stop()
        gw.shutdown()
        if admin is not None:
            admin.close()
        loop.close()
    return 0
