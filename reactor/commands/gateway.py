"""`reactor gateway`: the load-balancing TCP gateway.

    $ reactor gateway --listen 127.0.0.1:8080 --backend 127.0.0.1:9001 \\
          --backend 127.0.0.1:9002@2 --balance least_conn
    reactor gateway: pid=4242 listening on 127.0.0.1:8080 backends=2 balance=least_conn admin=127.0.0.1:9901

Signals, as HAProxy and nginx users expect: SIGHUP re-reads ``--config``
(new connections see the new backends and policy; live relays are
untouched); SIGTERM drains (listening socket closed at once, relays get
``grace`` seconds); a second SIGTERM, or SIGINT, stops at once.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from reactor import config as configmod
from reactor.config import Config
from reactor.errors import UsageError
from reactor.gateway import Gateway
from reactor.loop import Loop

log = logging.getLogger("reactor.gateway")


def add_arguments(p: argparse.ArgumentParser) -> None:
    configmod.add_cli_options(p)


def setup_logging(level: str = "info") -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s %(message)s", stream=sys.stderr)


def run(args: argparse.Namespace) -> int:
    cfg = configmod.from_cli(args)
    if args.check:
        print(f"{cfg.source}: ok ({len(cfg.backends)} backends, balance={cfg.gateway.balance})")
        return 0
    setup_logging(cfg.gateway.log_level)
    if cfg.gateway.workers > 1:
        from reactor.supervisor import run_supervisor

        return run_supervisor(cfg, args)
    return run_gateway(cfg, args)


def reload_config(args: argparse.Namespace) -> Config:
    """Re-read the file and re-apply the command-line flags over it."""
    return configmod.from_cli(args)


def run_gateway(cfg: Config, args: argparse.Namespace | None, *, sockets=None,
                banner: str = "reactor gateway", extra_setup=None) -> int:
    """Run one gateway worker until it is stopped or drained."""
    loop = Loop()
    gw = Gateway(loop, cfg)
    gw.start(sockets)
    admin = None
    if cfg.admin.listen is not None:
        from reactor.admin import AdminServer

        try:
            admin = AdminServer(loop, gw, cfg.admin.listen)
        except UsageError:
            gw.shutdown()
            loop.close()
            raise
    if extra_setup is not None:
        extra_setup(loop, gw)
    state = {"terms": 0}

    def on_term() -> None:
        state["terms"] += 1
        if state["terms"] == 1 and gw.relays:
            gw.on_stopped = loop.stop
            if admin is not None:
                admin.close()
            gw.drain()
        else:
            loop.stop()

    def on_int() -> None:
        loop.stop()

    def on_hup() -> None:
        if args is None or not getattr(args, "config", None):
            log.info("event=reload_skipped reason=no_config_file")
            return
        try:
            new = reload_config(args)
        except UsageError as exc:
            gw.reload_failures += 1
            log.error("event=reload_rejected error=%s", exc)
            return
        except OSError as exc:  # a DNS name that no longer resolves, …
            gw.reload_failures += 1
            log.error("event=reload_rejected error=%s", exc)
            return
        gw.reload(new)

    loop.add_signal_handler(signal.SIGTERM, on_term)
    loop.add_signal_handler(signal.SIGINT, on_int)
    loop.add_signal_handler(signal.SIGHUP, on_hup)
    gw.hup = on_hup  # the config watcher reuses it
    admin_txt = admin.name if admin is not None else "off"
    print(f"{banner}: pid={os.getpid()} listening on {' '.join(gw.addresses)} "
          f"backends={len(gw.balancer.backends)} balance={gw.balancer.policy} admin={admin_txt}",
          flush=True)
    try:
        loop.run()
    finally:
        gw.shutdown()
        if admin is not None:
            admin.close()
        loop.close()
    return 0
