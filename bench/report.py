"""Turn raw runs into figures, tables (tabulate), a JSON file and a PNG chart.

A "msg" is one pingpong round trip: a 64-byte request and its echo, i.e. two forwarded
messages through the proxy. CPU figures are the proxy's own user+system time over the
measured window (all its threads and worker processes), divided by the work done.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from tabulate import tabulate

REFS = ("haproxy", "reactor")

RECV = {"recvfrom", "recv", "read", "recvmsg", "readv", "recvmmsg"}
SEND = {"sendto", "send", "write", "sendmsg", "writev", "sendmmsg"}
SPLICE = {"splice", "sendfile", "tee", "vmsplice"}
POLL = {"epoll_wait", "epoll_pwait", "epoll_pwait2", "poll", "ppoll", "select", "pselect6"}


def _pp_metrics(rec: dict, key: str) -> dict:
    res, win = rec["result"], rec["window"]
    n = res["count"]
    out = {
        f"{key}.msgs": res["rate"],
        f"{key}.p50": res["lat_us"]["p50"],
        f"{key}.p99": res["lat_us"]["p99"],
        f"{key}.p999": res["lat_us"]["p999"],
        f"{key}.bound": _bound(win),
    }
    out.update(_cpu_per(win, n, key))
    if rec.get("self_syscalls") and n:
        out[f"{key}.self"] = sum(rec["self_syscalls"].values()) / n
    return out


def _cpu_per(win: dict, n: int, key: str) -> dict:
    """The proxy's CPU, user and system µs per unit of work (message, connection)."""
    if not win["proxy_cpu"] or not n:
        return {}
    user, sys_ = win["proxy_cpu"]["user"], win["proxy_cpu"]["sys"]
    return {f"{key}.cpu": (user + sys_) / n * 1e6, f"{key}.user": user / n * 1e6,
            f"{key}.sys": sys_ / n * 1e6}


def _churn_metrics(rec: dict, key: str) -> dict:
    res, win = rec["result"], rec["window"]
    n = res["count"]
    out = {
        f"{key}.cps": res["rate"],
        f"{key}.p99": res["lat_us"]["p99"] / 1e3,
        f"{key}.errors": res["errors"],
        f"{key}.bound": _bound(win),
        **_cpu_per(win, n, key),
    }
    return out


def _strace_metrics(rec: dict, key: str, n: int, top: int) -> dict:
    """Syscalls per unit (message, connection) by strace and by our own counters, and
    the ``top`` most frequent."""
    out = {}
    if rec.get("strace") and n:
        out[f"{key}.total"] = sum(c["calls"] for c in rec["strace"].values()) / n
        most = sorted(rec["strace"].items(), key=lambda kv: -kv[1]["calls"])[:top]
        out[f"{key}.mix"] = ", ".join(f"{k} {c['calls'] / n:.2f}" for k, c in most)
    if rec.get("self_syscalls") and n:
        out[f"{key}.self"] = sum(rec["self_syscalls"].values()) / n
    return out


def _held(rec: dict) -> str:
    """A paced run: did the peer keep up with the offered rate? One that could not ran
    saturated, and its figures are not "the same work in the same time" as the others'."""
    want = rec["params"].get("rate") or 0
    got = rec["result"]["rate"]
    return "yes" if got >= 0.97 * want else f"no: {fmt(got)}/s"


def _bound(win: dict) -> str:
    px = win.get("proxy_cores")
    cores = f"{px:.2f}/{win['load_cores']:.2f}" if px is not None else f"-/{win['load_cores']:.2f}"
    other = win.get("other_cores", 0.0)
    if other >= 0.1:
        cores += f" +{other:.1f} other"
    return f"{win['bound']} ({cores})"


def _classify(counts: dict[str, dict[str, int]]) -> dict[str, int]:
    groups = {"recv": 0, "send": 0, "splice": 0, "poll": 0, "other": 0}
    for name, c in counts.items():
        g = (
            "recv"
            if name in RECV
            else "send"
            if name in SEND
            else "splice"
            if name in SPLICE
            else "poll"
            if name in POLL
            else "other"
        )
        groups[g] += c["calls"]
    return groups


def metrics_of(rec: dict) -> dict:
    """The figures of one run, keyed "<workload>.<figure>"; {} if it failed or was skipped."""
    if "result" not in rec or "error" in rec:
        return {}
    w = rec["workload"]
    if w.startswith("pingpong-"):
        return _pp_metrics(rec, "pp" + w.split("-")[1])
    if w == "bulk":
        res, win = rec["result"], rec["window"]
        out = {"bulk.mbs": res["bytes_recv"] / res["duration_s"] / 1e6, "bulk.bound": _bound(win)}
        if win["proxy_cpu"] and res["bytes_recv"]:
            cpu = win["proxy_cpu"]["user"] + win["proxy_cpu"]["sys"]
            out["bulk.cpu"] = cpu / (res["bytes_recv"] / 1e9)
        return out
    if w == "churn":
        return _churn_metrics(rec, "churn")
    if w == "paced-churn":
        out = _churn_metrics(rec, "pchurn")
        out["pchurn.held"] = _held(rec)
        return out
    if w.startswith("paced-"):
        key = "paced" + w.split("-")[1]
        out = _pp_metrics(rec, key)
        out[f"{key}.held"] = _held(rec)
        return out
    if w == "idle":
        idle = rec["idle"]
        conns = idle["connected"]
        out = {"idle.conns": conns, "idle.rss": idle["rss_idle_kib"] / 1024}
        if conns:
            out["idle.per_conn"] = (idle["rss_idle_kib"] - idle["rss_before_kib"]) / conns
        return out
    if w == "syscalls":
        n = rec["result"]["count"]
        out = _strace_metrics(rec, "sys", n, 3)
        if rec.get("strace") and n:
            for g, v in _classify(rec["strace"]).items():
                out[f"sys.{g}"] = v / n
        return out
    if w == "syscalls-churn":
        return _strace_metrics(rec, "csys", rec["result"]["count"], 6)
    return {}


# the figure whose spread over samples is kept alongside the chosen one
PRIMARY = {"pingpong": "msgs", "paced": "msgs", "bulk": "mbs", "churn": "cps"}
PRIMARY_OF = {"paced-churn": "cps"}


def summarize(data: dict) -> dict[str, dict]:
    """Per peer, every figure, from the least-disturbed sample of each (peer, workload).

    The machine is shared: other processes take CPU in some windows. Of a pair's samples
    (rounds), the one whose window saw the least CPU used outside the bench is reported,
    whole, so its figures stay consistent with each other; the spread of the primary
    figure over all samples is kept in the JSON.
    """
    samples: dict[tuple[str, str], list[tuple[dict, dict]]] = {}
    for rec in data["runs"]:
        m = metrics_of(rec)
        if m:
            samples.setdefault((rec["peer"], rec["workload"]), []).append((rec, m))
    summary: dict[str, dict] = {p: {} for p in data["peers"]}
    for (peer, workload), pairs in samples.items():
        out = summary.setdefault(peer, {})
        rec, m = min(pairs, key=lambda rm: rm[0].get("window", {}).get("other_cores", 0.0))
        out.update(m)
        prefix = next(iter(m)).split(".")[0]
        primary = f"{prefix}.{PRIMARY_OF.get(workload) or PRIMARY.get(workload.split('-')[0], '')}"
        if len(pairs) > 1 and primary in m:
            vals = [mm[primary] for _, mm in pairs if primary in mm]
            out[f"{primary}.spread"] = [min(vals), statistics.median(vals), max(vals)]
        out[f"{prefix}.samples"] = len(pairs)
        out[f"{prefix}.round"] = rec.get("round", 0)
        # every round's figures, for ratios between peers round by round (paired_ratio)
        out[f"{prefix}.by_round"] = {
            str(r.get("round", 0)): {k: v for k, v in mm.items() if isinstance(v, (int, float))}
            for r, mm in pairs
        }
        if f"{prefix}.cpu" in m and len(pairs) > 1:
            # the CPU cost over every round too: another tenant's load (or the
            # host's) only ever adds cost, so the best round is the estimate
            # least inflated by it, and the median shows how far it moved
            cpus = [mm[f"{prefix}.cpu"] for _, mm in pairs if f"{prefix}.cpu" in mm]
            out[f"{prefix}.cpu_best"] = min(cpus)
            out[f"{prefix}.cpu_median"] = statistics.median(cpus)
            share = pooled_user_share([r for r, _ in pairs])
            if share is not None:
                out[f"{prefix}.user"] = m[f"{prefix}.cpu"] * share
                out[f"{prefix}.sys"] = m[f"{prefix}.cpu"] * (1.0 - share)
                out[f"{prefix}.user_share"] = share
    return summary


def pooled_user_share(recs: list[dict]) -> float | None:
    """The proxy's user share of its CPU, pooled over every sample of a pair.

    Discussion: Linux without VIRT_CPU_ACCOUNTING splits a process's (precise)
    runtime into user and system by which mode each scheduler tick (CONFIG_HZ,
    250 here) happened to land in. A 1.2 s window of a proxy with a 13% user
    share holds about 40 user ticks: +-16% from sampling alone, enough to swap
    the order of two peers whose user time differs by a third. The total is
    measured precisely; the split is a sample estimate, so it is taken from all
    rounds' ticks together (3 rounds: about +-9%) and applied to the reported
    window's total.
    """
    user = total = 0.0
    for rec in recs:
        cpu = rec.get("window", {}).get("proxy_cpu")
        if cpu:
            user += cpu["user"]
            total += cpu["user"] + cpu["sys"]
    return user / total if total > 0 else None


# (key, label, kind): kind "n" numeric with ratios, "s" text without
ROWS: list[tuple[str, str, str]] = []
for _c in (1, 50, 500):
    ROWS += [
        (f"pp{_c}.msgs", f"pingpong {_c}: msg/s", "n"),
        (f"pp{_c}.p50", f"pingpong {_c}: p50 µs", "n"),
        (f"pp{_c}.p99", f"pingpong {_c}: p99 µs", "n"),
        (f"pp{_c}.p999", f"pingpong {_c}: p99.9 µs", "n"),
        (f"pp{_c}.cpu", f"pingpong {_c}: CPU µs/msg", "n"),
        (f"pp{_c}.cpu_best", f"pingpong {_c}: CPU µs/msg, best round", "n"),
        (f"pp{_c}.cpu_median", f"pingpong {_c}: CPU µs/msg, median round", "n"),
        (f"pp{_c}.user", f"pingpong {_c}:  user µs/msg", "n"),
        (f"pp{_c}.sys", f"pingpong {_c}:  sys µs/msg", "n"),
        (f"pp{_c}.bound", f"pingpong {_c}: bound (proxy/load cores)", "s"),
        (f"pp{_c}.self", f"pingpong {_c}: own-counted syscalls/msg", "n"),
    ]
ROWS += [
    ("paced50.msgs", "paced 50: msg/s (offered: the same for all)", "n"),
    ("paced50.held", "paced 50: held the offered rate", "s"),
    ("paced50.p50", "paced 50: p50 µs", "n"),
    ("paced50.p99", "paced 50: p99 µs", "n"),
    ("paced50.cpu", "paced 50: CPU µs/msg", "n"),
    ("paced50.cpu_best", "paced 50: CPU µs/msg, best round", "n"),
    ("paced50.cpu_median", "paced 50: CPU µs/msg, median round", "n"),
    ("paced50.user", "paced 50:  user µs/msg", "n"),
    ("paced50.sys", "paced 50:  sys µs/msg", "n"),
    ("paced50.bound", "paced 50: bound (proxy/load cores)", "s"),
    ("bulk.mbs", "bulk: MB/s", "n"),
    ("bulk.cpu", "bulk: CPU s/GB", "n"),
    ("bulk.cpu_best", "bulk: CPU s/GB, best round", "n"),
    ("bulk.cpu_median", "bulk: CPU s/GB, median round", "n"),
    ("bulk.bound", "bulk: bound (proxy/load cores)", "s"),
    ("churn.cps", "churn: conn/s", "n"),
    ("churn.p99", "churn: p99 ms/conn", "n"),
    ("churn.cpu", "churn: CPU µs/conn", "n"),
    ("churn.cpu_best", "churn: CPU µs/conn, best round", "n"),
    ("churn.cpu_median", "churn: CPU µs/conn, median round", "n"),
    ("churn.user", "churn:  user µs/conn", "n"),
    ("churn.sys", "churn:  sys µs/conn", "n"),
    ("churn.errors", "churn: failed cycles", "n"),
    ("churn.bound", "churn: bound (proxy/load cores)", "s"),
    ("pchurn.cps", "paced churn: conn/s (offered: the same for all)", "n"),
    ("pchurn.held", "paced churn: held the offered rate", "s"),
    ("pchurn.p99", "paced churn: p99 ms/conn", "n"),
    ("pchurn.cpu", "paced churn: CPU µs/conn", "n"),
    ("pchurn.cpu_best", "paced churn: CPU µs/conn, best round", "n"),
    ("pchurn.cpu_median", "paced churn: CPU µs/conn, median round", "n"),
    ("pchurn.user", "paced churn:  user µs/conn", "n"),
    ("pchurn.sys", "paced churn:  sys µs/conn", "n"),
    ("pchurn.errors", "paced churn: failed cycles", "n"),
    ("pchurn.bound", "paced churn: bound (proxy/load cores)", "s"),
    ("idle.conns", "idle: connections", "n"),
    ("idle.rss", "idle: proxy RSS MiB", "n"),
    ("idle.per_conn", "idle: KiB/conn", "n"),
    ("sys.total", "syscalls/msg (strace)", "n"),
    ("sys.recv", " recv-side/msg", "n"),
    ("sys.send", " send-side/msg", "n"),
    ("sys.splice", " splice/msg", "n"),
    ("sys.poll", " epoll_wait/msg", "n"),
    ("sys.other", " other/msg", "n"),
    ("sys.mix", " most frequent", "s"),
    ("sys.self", "syscalls/msg (own counters)", "n"),
    ("csys.total", "churn: syscalls/connection (strace)", "n"),
    ("csys.mix", " most frequent", "s"),
    ("csys.self", "churn: syscalls/connection (own counters)", "n"),
]


def fmt(v: object) -> str:
    if v is None:
        return "—"
    if isinstance(v, str):
        return v
    x = float(v)
    a = abs(x)
    if a >= 1e6:
        return f"{x / 1e6:.2f}M"
    if a >= 1e4:
        return f"{x / 1e3:.1f}k"
    if a >= 100 or (x == int(x) and a >= 10):
        return f"{x:.0f}"
    if a >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def tables(data: dict) -> dict[str, str]:
    summary = data["summary"]
    peers = [p for p in data["peers"] if summary.get(p)]
    rows_present = [r for r in ROWS if any(r[0] in summary[p] for p in peers)]
    out = {}
    fig = [[label] + [fmt(summary[p].get(key)) for p in peers] for key, label, _ in rows_present]
    out["figures"] = tabulate(
        fig, headers=["figure", *peers], tablefmt="github", disable_numparse=True
    )
    for ref in REFS:
        if ref not in peers:
            out[f"÷ {ref}"] = f"({ref} did not run: no ratios)"
            continue
        rows = []
        for key, label, kind in rows_present:
            if kind != "n" or key.endswith(".errors"):
                continue
            r = summary[ref].get(key)
            cells = []
            for p in peers:
                v = summary[p].get(key)
                cells.append("—" if v is None or not r else f"{v / r:.2f}")
            rows.append([label, *cells])
        out[f"÷ {ref}"] = tabulate(
            rows, headers=[f"ratio to {ref}", *peers], tablefmt="github", disable_numparse=True
        )
    return out


# The figures the performance work tracks, for our gateway beside HAProxy.
HEADLINE: list[tuple[str, str]] = [
    ("sys.total", "syscalls per msg, pingpong 50 steady state (strace)"),
    ("sys.self", "syscalls per msg, same window (own counters)"),
    ("pp50.cpu", "CPU µs/msg, pingpong 50"),
    ("pp50.cpu_best", "CPU µs/msg, pingpong 50, best round"),
    ("pp50.user", "user CPU µs/msg, pingpong 50"),
    ("pp50.sys", "system CPU µs/msg, pingpong 50"),
    ("pp500.cpu", "CPU µs/msg, pingpong 500"),
    ("pp500.cpu_best", "CPU µs/msg, pingpong 500, best round"),
    ("pp1.p99", "p99 latency µs, pingpong 1"),
    ("paced50.cpu", "CPU µs/msg, pingpong 50 paced (same offered rate)"),
    ("paced50.user", "user CPU µs/msg, pingpong 50 paced"),
    ("paced50.sys", "system CPU µs/msg, pingpong 50 paced"),
    ("bulk.cpu", "CPU s/GB, bulk"),
    ("churn.cpu", "CPU µs/connection, churn"),
    ("churn.cpu_best", "CPU µs/connection, churn, best round"),
    ("csys.total", "syscalls per connection, churn (strace)"),
    ("pchurn.cpu", "CPU µs/connection, churn paced (same offered rate)"),
    ("pchurn.user", "user CPU µs/connection, churn paced"),
    ("pchurn.sys", "system CPU µs/connection, churn paced"),
    ("idle.per_conn", "RSS KiB/connection, idle"),
]


# Headline figures that are also given as the median of per-round ratios.
PAIRED = (
    "pp50.cpu", "pp500.cpu", "pp1.p99", "paced50.cpu", "paced50.user", "paced50.sys", "bulk.cpu",
    "churn.cpu", "pchurn.cpu", "pchurn.user", "pchurn.sys",
)


def paired_ratio(peer: dict, ref: dict, key: str) -> float | None:
    """The median over rounds of ``peer``'s figure ÷ ``ref``'s in the same round.

    Rounds interleave in time and, within a round, the peers of one workload run back
    to back, seconds apart: whatever the shared machine was doing then weighed on both
    figures of a round's ratio. The host's load drifts over minutes (the same proxy's
    CPU per message moved by a third between runs); the ratio within a round moves far
    less, and the median of the rounds' ratios is the comparison least swayed by it.
    """
    prefix = key.split(".")[0]
    a, b = peer.get(f"{prefix}.by_round") or {}, ref.get(f"{prefix}.by_round") or {}
    ratios = [a[r][key] / b[r][key] for r in a if r in b and a[r].get(key) and b[r].get(key)]
    return statistics.median(ratios) if ratios else None


def headline(data: dict) -> str | None:
    summary = data["summary"]
    rx, hp = summary.get("reactor"), summary.get("haproxy")
    if not rx:
        return None
    hp = hp or {}
    rows = []
    for key, label in HEADLINE:
        v, h = rx.get(key), hp.get(key)
        pr = paired_ratio(rx, hp, key) if key in PAIRED else None
        rows.append([label, fmt(v), fmt(h), "—" if v is None or not h else f"{v / h:.2f}",
                     "—" if pr is None else f"{pr:.2f}"])
    w2 = summary.get("reactor-w2", {}).get("pp500.msgs")
    w1 = rx.get("pp500.msgs")
    rows.append(
        [
            "msg/s at pingpong 500, --workers 2 ÷ --workers 1",
            "—" if not (w1 and w2) else f"{w2 / w1:.2f}",
            "",
            "",
            "",
        ]
    )
    return tabulate(
        rows,
        headers=["reactor headline", "reactor", "haproxy", "reactor ÷ haproxy",
                 "median of per-round ÷"],
        tablefmt="github",
        disable_numparse=True,
    )


def notes(data: dict) -> list[str]:
    s = data["settings"]
    lines = [
        f"machine: {data['machine'].get('cpu_model', '?')}, {data['machine'].get('cpus')} CPUs, "
        f"kernel {data['machine'].get('kernel')}; {data['python']}",
        f"proxy on CPU {data['cpus']['proxy']}, echo backends + load generator on CPU "
        f"{data['cpus']['load']}; reactor-w2 spans both. {data['cpus']['note']}".rstrip(),
        f"windows: {s['duration']} s after {s['warmup']} s warm-up, {s['rounds']} round(s): each "
        "figure is from the pair's least-disturbed window (least CPU used outside the bench); "
        f"idle {s['idle_conns']} conns; "
        f"syscalls: {s['strace_count']} msgs at {s['strace_conns']} conns under strace -c -f"
        + (f", and {s['strace_churn_count']} churn cycles (50 workers)"
           if "strace_churn_count" in s else ""),
        "msg = one round trip (64 B request + its echo: two forwarded messages). "
        "CPU = the proxy's own user+sys time in the window (/proc/PID/stat); its user/sys "
        "split is pooled over the rounds (the kernel splits by scheduler ticks: one window's "
        "split is a small sample).",
        f"paced 50 / paced churn: pingpong over 50 conns held at {s.get('paced_rate', 0):.0f} "
        f"msg/s, churn held at {s.get('paced_churn_rate', 0):.0f} conn/s: below every peer's "
        "saturation, so all do the same work in the same time -- what a message or a "
        "connection costs each proxy when none of them is the bottleneck (the closed-loop "
        "runs measure each at its own saturation, where a slower proxy also pays more "
        "wakeups).",
        "median of per-round ÷ (headline): each round's reactor figure over haproxy's in the "
        "same round (the two ran seconds apart), the median over the rounds.",
        "bound: the side whose CPU was saturated (>= 85 %): proxy, loadgen (echo + load "
        "generator share a CPU), both, neither (latency-bound), or contended (a CPU was full of "
        "other processes' work: the machine is shared); figures are proxy/load cores, and "
        "'other' the cores used by processes outside the bench in that window.",
    ]
    if "background_cores" in data:
        lines.append(
            f"background load before the run: {data['background_cores']:.2f} cores busy "
            "(processes outside the bench)"
        )
    for name, v in data.get("versions", {}).items():
        if v:
            lines.append(f"{name}: {v}")
    for name, note in data.get("skipped", {}).items():
        lines.append(f"skipped {name}: {note}")
    lines += data.get("warnings", [])
    skipped_runs = sorted(
        {
            f"{r['workload']}: {r['skipped']}"
            for r in data["runs"]
            if r.get("skipped") and r["peer"] != "direct"
        }
    )
    lines += [f"skipped {s}" for s in skipped_runs]
    for rec in data["runs"]:
        if "error" in rec:
            lines.append(f"failed {rec['peer']} {rec['workload']}: {rec['error']}")
        elif rec["workload"] == "idle" and "idle" in rec:
            got, want = rec["idle"]["connected"], rec["params"]["conns"]
            if got < want:
                lines.append(
                    f"{rec['peer']} idle: held {got} of {want} connections "
                    f"({rec['ready']['connect_failed']} failed); its log: "
                    f"{' / '.join(rec.get('proxy_log_tail') or ['(empty)'])}"
                )
        elif rec.get("result", {}).get("errors"):
            lines.append(
                f"{rec['peer']} {rec['workload']} round {rec.get('round', 0) + 1}: "
                f"{rec['result']['errors']} connections lost or cycles failed"
            )
    return lines


def markdown(data: dict) -> str:
    """The same report as a Markdown fragment, ready to paste into the README."""
    parts = [f"Run of {data['started']}{' (quick)' if data.get('quick') else ''}.", ""]
    for title, table in tables(data).items():
        if title != "figures":
            parts += [f"**{title}**", ""]
        parts += [table, ""]
    if (h := headline(data)) is not None:
        parts += [h, ""]
    parts += [f"- {line}" for line in notes(data)]
    return "\n".join(parts) + "\n"


def render(data: dict) -> str:
    parts = []
    for title, table in tables(data).items():
        parts.append(table if title == "figures" else f"{title}\n{table}")
    if (h := headline(data)) is not None:
        parts.append(h)
    parts.append("\n".join(notes(data)))
    return "\n\n".join(parts)


def chart(data: dict, path: Path) -> str | None:
    """A PNG of msg/s and CPU µs/msg per peer; None if matplotlib is missing."""
    try:
        import matplotlib  # noqa: PLC0415 - optional (the bench extra)

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        return "matplotlib not importable (pip install -e '.[bench]'): no chart"
    summary = data["summary"]
    peers = [p for p in data["peers"] if summary.get(p)]
    conns = [1, 50, 500]
    fig, axes = plt.subplots(2, 1, figsize=(11, 8))
    width = 0.8 / max(1, len(peers))
    for ax, metric, title in (
        (axes[0], "msgs", "pingpong messages/s (round trips, higher is better)"),
        (axes[1], "cpu", "proxy CPU µs per message (lower is better)"),
    ):
        for i, p in enumerate(peers):
            vals = [summary[p].get(f"pp{c}.{metric}") or 0 for c in conns]
            xs = [j + (i - (len(peers) - 1) / 2) * width for j in range(len(conns))]
            ax.bar(xs, vals, width, label=p)
        ax.set_xticks(range(len(conns)), [f"{c} conn{'s' if c > 1 else ''}" for c in conns])
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(ncol=4, fontsize=8)
    fig.suptitle(f"reactor bench {data['started']} ({data['machine'].get('cpus')} CPUs)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


def write(data: dict, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    png = out_dir / "latest.png"
    note = chart(data, png)
    if note:
        data["chart"] = note
    text = json.dumps(data, indent=1, default=str)
    paths = [out_dir / f"{stamp}.json", out_dir / "latest.json"]
    for p in paths:
        p.write_text(text)
    md = out_dir / "latest.md"
    md.write_text(markdown(data))
    paths.append(md)
    if not note:
        paths.append(png)
    return paths


def _profile_unit(rec: dict) -> str:
    """", the proxy's CPU per unit in the profiled window" for a profile's heading."""
    m = metrics_of(rec)
    cpu = next((k for k in m if k.endswith(".cpu")), None)
    if cpu is None:
        return ""
    key = cpu.rsplit(".", 1)[0]
    if key == "bulk":
        return f"; proxy CPU {fmt(m[cpu])} s/GB in this window"
    unit = "connection" if key in ("churn", "pchurn") else "msg"
    return (f"; proxy CPU {fmt(m[cpu])} µs/{unit} in this window (user {fmt(m[key + '.user'])}, "
            f"sys {fmt(m[key + '.sys'])})")


def write_profile(data: dict, out_dir: Path, root: Path) -> Path:
    """``--profile``: every profiled run's py-spy tables, in ``profile.md`` (and its JSON)."""
    from bench import pyspy

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "profile.json").write_text(json.dumps(data, indent=1, default=str))
    rate = data.get("profile_rate")
    parts = [
        f"Profiled run of {data['started']}: py-spy --nonblocking at {rate} samples/s over "
        "each measured window, idle samples dropped (a sample is a moment on a CPU; a "
        "syscall's kernel time counts on the line that made it). Python "
        f"{data['python']}; {'; '.join(f'{k}: {v}' for k, v in data['versions'].items())}.",
        "",
    ]
    for rec in data["runs"]:
        if "profile" in rec:
            title = f"{rec['workload']}: {rec['peer']} (round {rec['round'] + 1})"
            unit = f" ({rec.get('profile_note', '')}){_profile_unit(rec)}"
            parts.append(pyspy.markdown(title, rec["profile"], root, unit))
        elif "error" in rec:
            parts += [f"### {rec['workload']}: {rec['peer']}", "", f"failed: {rec['error']}", ""]
    path = out_dir / "profile.md"
    path.write_text("\n".join(parts))
    return path
