"""`reactor stats`: the live picture of a running gateway, from its admin endpoint.

    reactor stats [--admin HOST:PORT] [--json] [--watch SECONDS] [--count N]

Fetches ``GET /stats`` from the gateway's admin endpoint (default
127.0.0.1:9901) and shows connections, backends, byte rates, the loop's lag
and events per wait, system calls per second by name, and user vs system CPU
time with context switches -- the seed's "does accept switch to kernel
mode?" answered by counting.

Rates need two samples. ``--watch S`` samples every S seconds and prints one
report per interval, each from the last two samples (``--count N`` stops
after N reports). Without ``--watch`` the command takes two samples 1 second
apart and prints one report. Each sample is itself one admin request, which
costs the gateway a handful of syscalls (accept, recv, send, shutdown,
close, epoll_ctl): on an idle gateway they are most of what you see.

``--json`` prints the last /stats object as the gateway sent it, plus a
``rates`` object (per-second values over ``rates.interval`` seconds); with
``--watch``, one JSON object per line per report.

The gateway not answering: a one-line error, exit 1.
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import time
from typing import Any

from tabulate import tabulate

from reactor.config import parse_address
from reactor.errors import RuntimeFailure, UsageError

DEFAULT_ADMIN = "127.0.0.1:9901"
TIMEOUT = 5.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--admin", metavar="HOST:PORT", default=DEFAULT_ADMIN,
                   help=f"the gateway's admin endpoint (default {DEFAULT_ADMIN})")
    p.add_argument("--json", action="store_true", help="the raw /stats JSON plus computed rates")
    p.add_argument("--watch", metavar="SECONDS", type=float,
                   help="report every SECONDS until Ctrl-C (or --count)")
    p.add_argument("--count", metavar="N", type=int, help="stop after N reports")


def fetch_stats(host: str, port: int, timeout: float = TIMEOUT) -> dict[str, Any]:
    """One ``GET /stats``; RuntimeFailure (one line) when it cannot be had."""
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", "/stats")
        resp = conn.getresponse()
        body = resp.read()
    except (OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise RuntimeFailure(f"cannot reach the admin endpoint at {where}: {reason.lower()}") from None
    finally:
        conn.close()
    if resp.status != 200:
        raise RuntimeFailure(f"admin endpoint at {where} answered {resp.status} {resp.reason}")
    try:
        data = json.loads(body)
    except ValueError:
        raise RuntimeFailure(f"admin endpoint at {where} sent something that is not JSON") from None
    if not isinstance(data, dict) or "loop" not in data or "process" not in data:
        raise RuntimeFailure(f"admin endpoint at {where} sent JSON that is not gateway stats")
    return data


def compute_rates(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Per-second rates between samples ``a`` and ``b`` (the gateway's own clock)."""
    dt = b["process"]["monotonic"] - a["process"]["monotonic"]
    dt = max(dt, 1e-6)  # two samples in one clock tick: rates are ~0, not an error

    def rate(x: float, y: float) -> float:
        return (y - x) / dt

    la, lb = a["loop"], b["loop"]
    pa, pb = a["process"], b["process"]
    sys_a, sys_b = la["syscalls"], lb["syscalls"]
    syscalls = {k: rate(sys_a.get(k, 0), v) for k, v in sys_b.items()}
    waits = lb["syscalls"].get("epoll_wait", 0) - la["syscalls"].get("epoll_wait", 0)
    events = lb["events_total"] - la["events_total"]
    ba = {x["name"]: x for x in a["backends"]}
    backends = {}
    for x in b["backends"]:
        prev = ba.get(x["name"], {"bytes_in": x["bytes_in"], "bytes_out": x["bytes_out"], "total": x["total"]})
        backends[x["name"]] = {
            "bytes_in": rate(prev["bytes_in"], x["bytes_in"]),
            "bytes_out": rate(prev["bytes_out"], x["bytes_out"]),
            "connections": rate(prev["total"], x["total"]),
        }
    cpu_user = pb["cpu_user"] - pa["cpu_user"]
    cpu_sys = pb["cpu_system"] - pa["cpu_system"]
    return {
        "interval": dt,
        "bytes_in": rate(a["bytes"]["in"], b["bytes"]["in"]),
        "bytes_out": rate(a["bytes"]["out"], b["bytes"]["out"]),
        "accepted": rate(a["connections"]["accepted_total"], b["connections"]["accepted_total"]),
        "backends": backends,
        "iterations": rate(la["iterations"], lb["iterations"]),
        "events": rate(la["events_total"], lb["events_total"]),
        "events_per_wait": (events / waits) if waits else 0.0,
        "syscalls": syscalls,
        "syscalls_total": sum(syscalls.values()),
        "cpu_user": cpu_user / dt,  # seconds of CPU per second: 1.0 = one core
        "cpu_system": cpu_sys / dt,
        "ctx_switches_voluntary": rate(pa["ctx_switches_voluntary"], pb["ctx_switches_voluntary"]),
        "ctx_switches_involuntary": rate(pa["ctx_switches_involuntary"], pb["ctx_switches_involuntary"]),
    }


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)  # pragma: no cover


def _duration(s: float) -> str:
    s = int(s)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def render(st: dict[str, Any], r: dict[str, Any], admin: str) -> str:
    """The human report for sample ``st`` with rates ``r``."""
    conns = st["connections"]
    proc = st["process"]
    loop = st["loop"]
    out = []
    state = "draining" if st.get("draining") else "running"
    out.append(f"gateway pid {proc['pid']} ({state}), admin {admin}, uptime {_duration(st['uptime'])}, "
               f"balance {st['balance']}; rates over {r['interval']:.2f}s")
    out.append("")
    rejected = conns["rejected_max_connections"] + conns["rejected_per_ip"] + conns["proxy_rejected"]
    out.append(tabulate([[conns["active"], conns["accepted_total"], f"{r['accepted']:.1f}", rejected,
                          conns["connect_failures"], _bytes(st["bytes"]["in"]), _bytes(st["bytes"]["out"]),
                          _bytes(r["bytes_in"]) + "/s", _bytes(r["bytes_out"]) + "/s"]],
                        headers=["active", "accepted", "accepted/s", "rejected", "connect fails",
                                 "bytes in", "bytes out", "in/s", "out/s"],
                        tablefmt="simple", disable_numparse=True))
    out.append("")
    rows = []
    for b in st["backends"]:
        br = r["backends"].get(b["name"], {})
        rows.append([b["name"], b["state"], b["active"], b["total"], b["failures_total"],
                     _bytes(b["bytes_in"]), _bytes(b["bytes_out"]),
                     _bytes(br.get("bytes_in", 0.0)) + "/s", _bytes(br.get("bytes_out", 0.0)) + "/s"])
    out.append(tabulate(rows, headers=["backend", "state", "active", "total", "failures",
                                       "to backend", "from backend", "to/s", "from/s"],
                        tablefmt="simple", disable_numparse=True))
    out.append("")
    out.append(f"loop: {r['iterations']:.0f} iterations/s, {r['events']:.0f} events/s, "
               f"{r['events_per_wait']:.2f} events per wait (lifetime {loop['events_per_wait']:.2f}, "
               f"max {loop['events_max']}), timer lag last {loop['lag_last'] * 1000:.2f} ms "
               f"max {loop['lag_max'] * 1000:.2f} ms")
    out.append("")
    sc = sorted(((k, v, r["syscalls"].get(k, 0.0)) for k, v in loop["syscalls"].items() if v),
                key=lambda t: (-t[2], -t[1], t[0]))
    sc_rows = [[k, total, f"{rate:.1f}"] for k, total, rate in sc]
    sc_rows.append(["all", sum(v for _, v, _ in sc), f"{r['syscalls_total']:.1f}"])
    out.append(tabulate(sc_rows, headers=["syscall", "total", "per second"], tablefmt="simple",
                        disable_numparse=True))
    out.append("")
    user, system = r["cpu_user"], r["cpu_system"]
    both = user + system
    share = f"{100 * system / both:.0f}% of it in the kernel" if both > 0 else "idle"
    out.append(tabulate(
        [["user", f"{proc['cpu_user']:.2f}", f"{100 * user:.1f}%"],
         ["system", f"{proc['cpu_system']:.2f}", f"{100 * system:.1f}%"]],
        headers=["cpu", "seconds", "of one core"], tablefmt="simple", disable_numparse=True)
        + f"\n  ({share})")
    out.append("")
    out.append(f"context switches: voluntary {proc['ctx_switches_voluntary']} "
               f"({r['ctx_switches_voluntary']:.1f}/s), involuntary {proc['ctx_switches_involuntary']} "
               f"({r['ctx_switches_involuntary']:.1f}/s); rss {_bytes(proc['rss'])}, "
               f"fds {proc['num_fds']}/{proc['fd_soft_limit'] or 'unlimited'}")
    return "\n".join(out)


def run(args: argparse.Namespace) -> int:
    host, port = parse_address(args.admin, what="--admin", allow_zero_port=False)
    host = host or "127.0.0.1"  # ':PORT' (all interfaces) is reached on loopback
    if args.watch is not None and not args.watch > 0:
        raise UsageError("--watch: SECONDS must be > 0")
    if args.count is not None and args.count < 1:
        raise UsageError("--count: N must be >= 1")
    interval = args.watch if args.watch is not None else 1.0
    count = args.count if args.count is not None else (None if args.watch is not None else 1)
    prev = fetch_stats(host, port)
    done = 0
    while count is None or done < count:
        time.sleep(interval)
        cur = fetch_stats(host, port)
        rates = compute_rates(prev, cur)
        if args.json:
            print(json.dumps(dict(cur, rates=rates)), flush=True)
        else:
            if done:
                print()
            print(render(cur, rates, args.admin), flush=True)
        prev = cur
        done += 1
    sys.stdout.flush()
    return 0
