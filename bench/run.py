"""The harness: build, start the backends, run every (workload, peer) pair, report.

Each pair gets a freshly started proxy (so RSS baselines and caches start equal), pinned
to the proxy CPU; the echo backends, the load generator and strace share the other CPU.
Pairs run workload by workload, every peer in turn, so the peers compared in a row are
measured minutes apart at most, on the same machine state.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from bench import build, procstat, pyspy, report
from bench import strace as strace_mod
from bench.driver import LineReader, Loadgen, RunError, free_port, pin, stop, wait_port
from bench.peers import REPO_DIR, Context, Peer, all_peers, python_version

WORKLOADS = [
    "pingpong-1", "pingpong-50", "pingpong-500", "paced-50", "bulk", "churn", "paced-churn", "idle",
    "syscalls", "syscalls-churn",
]
ONCE = ("idle", "syscalls", "syscalls-churn")  # exact counts: one sample each, no window
PROFILED = [w for w in WORKLOADS if w not in ONCE]  # the ones with a window
SATURATED = 0.85  # a side using this share of its CPUs (or more) is the bottleneck


def select_workloads(spec: str | None, profile: bool = False) -> list[str]:
    """The workloads a ``--workloads`` list names ('pingpong' = all three, 'paced' and
    'syscalls' = both of theirs),
    in run order; with ``profile``, only those with a measured window."""
    pool = PROFILED if profile else WORKLOADS
    if not spec:
        return list(pool)
    want = spec.split(",")
    return [w for w in pool if w in want or w.split("-")[0] in want]


@dataclass(slots=True)
class Settings:
    duration: float  # measured window of pingpong, bulk and churn, seconds
    warmup: float
    rounds: int  # samples of each windowed pair, interleaved in time; the least-disturbed one is reported
    idle_conns: int
    strace_count: int  # messages in the strace window
    size: int = 64
    bulk_conns: int = 4
    bulk_size: int = 65536
    churn_workers: int = 50
    strace_conns: int = 50
    # paced-50: pingpong over 50 conns held at this many round trips/s, below every
    # peer's saturation, so all of them do the same work in the same time
    paced_rate: float = 20000.0
    paced_churn_rate: float = 2000.0  # paced-churn: connections/s, the same way
    strace_churn_count: int = 3000  # syscalls-churn: connection cycles under strace


def settings_for(quick: bool, fd_limit: int) -> Settings:
    # 10,000 idle clients are 20,000 fds in the proxy: stay under the hard limit we have
    idle_cap = max(100, (fd_limit - 256) // 2)
    if quick:
        return Settings(
            duration=0.5, warmup=0.15, rounds=1, idle_conns=min(2000, idle_cap), strace_count=2000,
            strace_churn_count=1000,
        )
    return Settings(
        duration=1.2, warmup=0.3, rounds=5, idle_conns=min(10000, idle_cap), strace_count=5000
    )


class Progress:
    """One line on stderr, rewritten in place on a terminal."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.i = 0
        self.t0 = time.monotonic()
        self.tty = sys.stderr.isatty()

    def step(self, label: str) -> None:
        self.i += 1
        line = f"[{self.i}/{self.total}] {time.monotonic() - self.t0:5.0f}s  {label}"
        if self.tty:
            sys.stderr.write("\r\033[K" + line)
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def note(self, text: str) -> None:
        if self.tty:
            sys.stderr.write("\r\033[K")
        sys.stderr.write(text + "\n")
        sys.stderr.flush()

    def done(self) -> None:
        if self.tty:
            sys.stderr.write("\r\033[K")
        sys.stderr.write(f"bench: {self.i} runs in {time.monotonic() - self.t0:.0f} s\n")


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def cpu_plan() -> tuple[set[int], set[int], str]:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) >= 2:
        return {cpus[0]}, {cpus[1]}, ""
    return {cpus[0]}, {cpus[0]}, "one CPU only: proxy and load side share it"


def fetch_stats(port: int | None) -> dict | None:
    if port is None:
        return None
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=2) as r:
            return json.loads(r.read())
    except (OSError, ValueError):
        return None


def syscall_counters(stats: dict | None) -> dict[str, int] | None:
    """loop.syscalls from the gateway's /stats; with workers, the sum over all found."""
    if not isinstance(stats, dict):
        return None
    loop = stats.get("loop")
    if isinstance(loop, dict) and isinstance(loop.get("syscalls"), dict):
        return {k: int(v) for k, v in loop["syscalls"].items() if isinstance(v, int | float)}
    total: dict[str, int] = {}
    found = False

    def walk(o: object) -> None:
        nonlocal found
        if isinstance(o, dict):
            for k, v in o.items():
                if k == "syscalls" and isinstance(v, dict):
                    found = True
                    for name, n in v.items():
                        if isinstance(n, int | float):
                            total[name] = total.get(name, 0) + int(n)
                else:
                    walk(v)
        elif isinstance(o, list):
            for x in o:
                walk(x)

    walk(stats)
    return total if found else None


def machine_info() -> dict:
    info: dict = {
        "kernel": platform.release(),
        "arch": platform.machine(),
        "cpus": os.cpu_count(),
        "affinity": sorted(os.sched_getaffinity(0)),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["mem_kib"] = int(line.split()[1])
                break
        flags = Path("/proc/cpuinfo").read_text()
        info["virtualized"] = " hypervisor" in flags
    except OSError:
        pass
    for name in ("tcp_tw_reuse", "ip_local_port_range"):
        try:
            info[name] = Path(f"/proc/sys/net/ipv4/{name}").read_text().strip()
        except OSError:
            pass
    try:
        info["somaxconn"] = int(Path("/proc/sys/net/core/somaxconn").read_text())
    except OSError:
        pass
    return info


class Harness:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.fd_limit = raise_fd_limit()
        self.settings = settings_for(args.quick, self.fd_limit)
        if args.duration:
            self.settings.duration = args.duration
        if args.rounds:
            self.settings.rounds = args.rounds
        if args.profile and not args.duration:
            self.settings.duration = 4.0  # ~1,000 samples at 250/s
        self.proxy_cpus, self.load_cpus, self.cpu_note = cpu_plan()
        os.sched_setaffinity(0, self.load_cpus)
        self.workdir = Path(tempfile.mkdtemp(prefix="reactor-bench-"))
        self.tools = build.build_all()
        self.ctx = Context(
            python=sys.executable,
            goseed=self.tools.goseed,
            goseed_note=self.tools.goseed_note,
            workdir=self.workdir,
            max_conns=self.settings.idle_conns + 64,
            reactor_dir=(args.reactor_dir or REPO_DIR).resolve(),
        )
        self.echo: subprocess.Popen | None = None
        self.backends: list[tuple[str, int]] = []

    # ---- processes ----

    def start_echo(self) -> None:
        argv = [str(self.tools.echo)] + ["--listen", "127.0.0.1:0"] * 3
        self.echo = subprocess.Popen(argv, stdout=subprocess.PIPE, preexec_fn=pin(self.load_cpus))
        reader = LineReader(self.echo.stdout.fileno())
        self.backends = []
        for _ in range(3):
            line = reader.readline(10)
            if not line or "listening on" not in line:
                raise RunError(f"echo backends did not start: {line!r}")
            host, _, port = line.rsplit(" ", 1)[1].rpartition(":")
            self.backends.append((host, int(port)))
        for _, p in self.backends:
            wait_port(p, self.echo, 5, None)

    def proxy_cpus_for(self, peer: Peer) -> set[int]:
        return self.proxy_cpus | self.load_cpus if peer.cpus == "all" else self.proxy_cpus

    def start_peer(self, peer: Peer, tag: str) -> tuple[subprocess.Popen, int, int | None]:
        port, admin = free_port(), free_port()
        launch = peer.launch(self.ctx, port, self.backends, admin)
        log = self.workdir / f"{peer.name}-{tag}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                launch.argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **launch.env},
                cwd=launch.cwd,
                preexec_fn=pin(self.proxy_cpus_for(peer)),
            )
        try:
            wait_port(port, proc, 20, log)
            # a proxy that binds, then fails later in its start-up, must not pass for running
            time.sleep(0.05)
            if proc.poll() is not None:
                tail = log.read_text(errors="replace").strip().splitlines()[-1:]
                raise RunError(f"exited with {proc.returncode} after binding: {' '.join(tail)}")
            admin_port = launch.admin_port
            if admin_port is not None:
                try:
                    wait_port(admin_port, proc, 5, log)
                except RunError:
                    admin_port = None
        except BaseException:
            stop(proc)
            raise
        return proc, port, admin_port

    def probe(self, peer: Peer, warnings: list[str]) -> str | None:
        """Start and stop the peer once: None if it runs, else why not. A gateway that
        cannot start with its admin endpoint is run without it (no own counters then)."""
        if peer.is_direct:
            return None
        try:
            proc, _, _ = self.start_peer(peer, "probe")
            stop(proc)
            return None
        except RunError as e:
            if getattr(peer, "admin", False):
                peer.admin = False
                if self.probe(peer, warnings) is None:
                    warnings.append(
                        f"{peer.name}: runs only without --admin ({e}); its own syscall "
                        "counters are not read"
                    )
                    return None
            return f"does not start: {e}"

    # ---- one (workload, peer) pair ----

    def sample(self, proxy: subprocess.Popen | None, lg: Loadgen, admin: int | None) -> dict:
        pids = procstat.tree(proxy.pid) if proxy else []
        return {
            "t": time.monotonic(),
            "proxy": procstat.tree_cpu(pids),
            "proxy_pids": pids,
            "loadgen": procstat.cpu(lg.pid),
            "echo": procstat.cpu(self.echo.pid),
            "stats": fetch_stats(admin),
            "ticks": procstat.cpu_ticks(),
        }

    def run_pair(self, peer: Peer, workload: str) -> dict:
        rec: dict = {"peer": peer.name, "workload": workload}
        if peer.is_direct and workload in ONCE:
            rec["skipped"] = "no proxy to measure"
            return rec
        if workload.startswith("syscalls") and (note := strace_mod.available()):
            rec["skipped"] = note
            return rec
        proxy = None
        admin = None
        try:
            if peer.is_direct:
                port = self.backends[0][1]
            else:
                proxy, port, admin = self.start_peer(peer, workload)
            if workload == "idle":
                self.run_idle(rec, proxy, port)
            elif workload.startswith("syscalls"):
                self.run_syscalls(rec, proxy, port, admin, churn=workload == "syscalls-churn")
            else:
                self.run_window(rec, peer, workload, proxy, port, admin)
        except RunError as e:
            rec["error"] = str(e)
        finally:
            if proxy is not None:
                died = proxy.poll()
                stop(proxy)
                rec["proxy_exit"] = proxy.returncode
                log = self.workdir / f"{peer.name}-{workload}.log"
                lines = log.read_text(errors="replace").strip().splitlines() if log.exists() else []
                rec["proxy_log_tail"] = [line[:300] for line in lines[-2:]]
                if died is not None:
                    rec["error"] = (
                        f"proxy exited with {died} during the run: {' '.join(lines[-1:])}"
                    )
        return rec

    def loadgen(self, mode: str, port: int, conns: int, **kw) -> Loadgen:
        return Loadgen(self.tools.loadgen, mode, port, conns, self.load_cpus, **kw)

    def run_window(self, rec, peer, workload, proxy, port, admin) -> None:
        s = self.settings
        rate = None
        if workload.startswith("pingpong-"):
            mode, conns, size = "pingpong", int(workload.split("-")[1]), s.size
        elif workload == "paced-churn":
            mode, conns, size = "churn", s.churn_workers, 1
            rate = s.paced_churn_rate
        elif workload.startswith("paced-"):
            mode, conns, size = "pingpong", int(workload.split("-")[1]), s.size
            rate = s.paced_rate
        elif workload == "bulk":
            mode, conns, size = "bulk", s.bulk_conns, s.bulk_size
        else:
            mode, conns, size = "churn", s.churn_workers, 1
        rec["params"] = {
            "mode": mode,
            "conns": conns,
            "size": size,
            "duration": s.duration,
            "warmup": s.warmup,
        }
        if rate:
            rec["params"]["rate"] = rate
        with self.loadgen(
            mode,
            port,
            conns,
            duration=s.duration,
            size=size,
            warmup=s.warmup,
            timeout=s.warmup + s.duration + 60,
            rate=rate,
        ) as lg:
            rec["ready"] = lg.event("ready")
            spy = self.profiler(proxy, workload)
            try:
                a = self.sample(proxy, lg, admin)
                lg.go()
                rec["result"] = lg.event("result")
                b = self.sample(proxy, lg, admin)
                if spy is not None:
                    prof, rec["profile_note"] = spy.stop()
                    rec["profile"] = pyspy.to_json(prof)
            finally:
                if spy is not None:
                    spy.kill()  # a run that failed half-way leaves no profiler behind
            lg.go()
        self.account(rec, a, b, shares_load_cpu=peer.cpus == "all")

    def profiler(self, proxy: subprocess.Popen | None, workload: str) -> pyspy.PySpy | None:
        """With --profile, py-spy attached to a Python proxy for the window (None else)."""
        if not self.args.profile or proxy is None or proxy.args[0] != self.ctx.python:
            return None
        spy = pyspy.PySpy(proxy.pid, self.workdir / f"pyspy-{workload}-{proxy.pid}.txt",
                          self.load_cpus, rate=self.args.profile_rate)
        spy.start()
        return spy

    def account(self, rec: dict, a: dict, b: dict, shares_load_cpu: bool) -> None:
        wall = b["t"] - a["t"]
        px = b["proxy"] - a["proxy"]
        lg = b["loadgen"] - a["loadgen"]
        ec = b["echo"] - a["echo"]
        rec["window"] = {
            "wall_s": wall,
            "proxy_cpu": asdict(px) if a["proxy_pids"] else None,
            "proxy_pids": len(b["proxy_pids"]),
            "loadgen_cpu": asdict(lg),
            "echo_cpu": asdict(ec),
        }
        proxy_cores = px.total / wall if a["proxy_pids"] else 0.0
        load_cores = (lg.total + ec.total) / wall
        rec["window"]["proxy_cores"] = proxy_cores if a["proxy_pids"] else None
        rec["window"]["load_cores"] = load_cores
        busy = procstat.cpu_busy(a["ticks"], b["ticks"])
        rec["window"]["cpu_busy"] = {str(k): v for k, v in busy.items()}
        # CPU time that neither the proxy nor the load side used: the machine is shared
        ours = proxy_cores + load_cores
        rec["window"]["other_cores"] = max(0.0, sum(busy.values()) - ours)
        proxy_cpu_busy = max((busy.get(c, 0.0) for c in self.proxy_cpus), default=0.0)
        load_cpu_busy = max((busy.get(c, 0.0) for c in self.load_cpus), default=0.0)
        if shares_load_cpu:
            # the proxy spans both CPUs and shares one with the load side
            total = proxy_cores + load_cores
            proxy_sat = proxy_cores >= SATURATED * 2 or total >= SATURATED * 2
            bound = "machine" if total >= SATURATED * 2 else ("proxy" if proxy_sat else "neither")
        else:
            proxy_sat = proxy_cores >= SATURATED
            load_sat = load_cores >= SATURATED
            bound = {
                (True, True): "both",
                (True, False): "proxy",
                (False, True): "loadgen",
                (False, False): "neither",
            }[(proxy_sat, load_sat)]
            if bound == "neither" and max(proxy_cpu_busy, load_cpu_busy) >= SATURATED:
                bound = "contended"  # a CPU was full, but of other processes' work
        rec["window"]["bound"] = bound
        c0, c1 = syscall_counters(a["stats"]), syscall_counters(b["stats"])
        if c0 is not None and c1 is not None:
            rec["self_syscalls"] = {k: c1.get(k, 0) - c0.get(k, 0) for k in set(c0) | set(c1)}

    def run_idle(self, rec, proxy, port) -> None:
        s = self.settings
        rec["params"] = {"mode": "idle", "conns": s.idle_conns}
        pids = procstat.tree(proxy.pid)
        rss0 = procstat.tree_rss_kib(pids)
        with self.loadgen("idle", port, s.idle_conns, duration=0, warmup=0, timeout=120) as lg:
            rec["ready"] = lg.event("ready", 130)
            pids = procstat.tree(proxy.pid)
            rss1 = procstat.tree_rss_kib(pids)
            lg.go()
            rec["result"] = lg.event("result")
            lg.go()
        rec["idle"] = {
            "rss_before_kib": rss0,
            "rss_idle_kib": rss1,
            "processes": len(pids),
            "connected": rec["ready"]["connected"],
            "connect_s": rec["ready"]["connect_s"],
        }

    def run_syscalls(self, rec, proxy, port, admin, churn: bool = False) -> None:
        """strace -c over a fixed count of pingpong messages (50 conns), or with ``churn``
        of churn cycles (connect, 1-byte round trip, close: 50 workers)."""
        s = self.settings
        if churn:
            mode, conns, size, count = "churn", s.churn_workers, 1, s.strace_churn_count
        else:
            mode, conns, size, count = "pingpong", s.strace_conns, s.size, s.strace_count
        rec["params"] = {"mode": mode, "conns": conns, "size": size, "count": count}
        with self.loadgen(
            mode,
            port,
            conns,
            count=count,
            size=size,
            warmup=s.warmup,
            timeout=180,
        ) as lg:
            rec["ready"] = lg.event("ready")
            st0 = fetch_stats(admin)
            tracer = strace_mod.Strace(
                procstat.tree(proxy.pid), self.workdir / "strace.txt", self.load_cpus
            )
            tracer.attach()
            try:
                lg.go()
                rec["result"] = lg.event("result", 180)
            finally:
                counts = tracer.detach()
            st1 = fetch_stats(admin)
            lg.go()
        rec["strace"] = counts
        c0, c1 = syscall_counters(st0), syscall_counters(st1)
        if c0 is not None and c1 is not None:
            rec["self_syscalls"] = {k: c1.get(k, 0) - c0.get(k, 0) for k in set(c0) | set(c1)}

    # ---- the whole run ----

    def run(self) -> dict:
        peers = all_peers()
        if self.args.peers:
            want = self.args.peers.split(",")
            unknown = set(want) - {p.name for p in peers}
            if unknown:
                raise SystemExit(f"bench: unknown peer(s): {', '.join(sorted(unknown))}")
            peers = [p for p in peers if p.name in want]
        else:
            peers = [p for p in peers if not p.optional]
        workloads = select_workloads(self.args.workloads, self.args.profile)
        if not workloads:
            raise SystemExit(f"bench: no workload matches {self.args.workloads}")
        self.start_echo()
        try:
            return self._run(peers, workloads)
        finally:
            stop(self.echo)
            if not self.args.keep:
                shutil.rmtree(self.workdir, ignore_errors=True)

    def _run(self, peers: list[Peer], workloads: list[str]) -> dict:
        runnable, skipped, versions, warnings = [], {}, {}, []
        for p in peers:
            note = p.missing(self.ctx) or self.probe(p, warnings)
            if note:
                skipped[p.name] = note
            else:
                runnable.append(p)
                versions[p.name] = p.version(self.ctx)
        for name, note in skipped.items():
            sys.stderr.write(f"bench: skipping {name}: {note}\n")
        for w in warnings:
            sys.stderr.write(f"bench: {w}\n")
        if self.cpu_note:
            sys.stderr.write(f"bench: {self.cpu_note}\n")
        out: dict = {
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "quick": bool(self.args.quick),
            "machine": machine_info(),
            "python": python_version(),
            "versions": versions,
            "skipped": skipped,
            "warnings": warnings,
            "settings": asdict(self.settings),
            "cpus": {
                "proxy": sorted(self.proxy_cpus),
                "load": sorted(self.load_cpus),
                "note": self.cpu_note,
            },
            "fd_limit": self.fd_limit,
            "peers": [p.name for p in runnable],
            "descriptions": {p.name: p.description for p in runnable},
            "workloads": workloads,
            "profile_rate": self.args.profile_rate if self.args.profile else None,
            "runs": [],
        }
        # Rounds interleave in time so a burst of foreign load on this shared machine hits
        # one sample of several peers rather than every sample of one peer. Idle RSS and
        # strace counts are exact: one sample each.
        plan = [
            (r, w, p)
            for r in range(self.settings.rounds)
            for w in workloads
            for p in runnable
            if r == 0 or w not in ONCE
        ]
        # what the rest of the machine was doing just before we started (it is shared)
        t0_ticks = procstat.cpu_ticks()
        time.sleep(0.5)
        busy = procstat.cpu_busy(t0_ticks, procstat.cpu_ticks())
        out["background_cores"] = round(sum(busy.values()), 2)
        if out["background_cores"] >= 0.3:
            sys.stderr.write(
                f"bench: note: {out['background_cores']:.1f} cores busy before the bench "
                "started: throughput figures will be noisy; CPU per message holds better\n"
            )
        progress = Progress(len(plan))
        t0 = time.monotonic()
        try:
            for r, w, p in plan:
                if self.echo.poll() is not None:
                    progress.note("bench: echo backends died; restarting them")
                    self.start_echo()
                progress.step(f"round {r + 1}  {w:<13} {p.name}")
                t = time.monotonic()
                rec = self.run_pair(p, w)
                rec["round"] = r
                rec["elapsed_s"] = round(time.monotonic() - t, 3)
                if "error" in rec:
                    progress.note(f"bench: {p.name} {w}: {rec['error']}")
                out["runs"].append(rec)
        finally:
            progress.done()
        out["elapsed_s"] = time.monotonic() - t0
        return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short windows: about a minute in all")
    ap.add_argument(
        "--peers",
        help="comma-separated subset of: "
        + ", ".join(p.name + (" (only when named)" if p.optional else "") for p in all_peers()),
    )
    ap.add_argument(
        "--workloads",
        help="comma-separated subset of: " + ", ".join(WORKLOADS)
        + " ('pingpong' = its three, 'paced' = both paced ones, 'syscalls' = both strace ones)",
    )
    ap.add_argument("--duration", type=float, help="measured window per run, seconds")
    ap.add_argument(
        "--rounds", type=int, help="samples per windowed run (the least-disturbed is reported)"
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent / "results",
        help="directory for the JSON and PNG results",
    )
    ap.add_argument(
        "--reactor-dir",
        type=Path,
        help="checkout whose reactor package to benchmark (default: this one)",
    )
    ap.add_argument(
        "--profile",
        action="store_true",
        help="py-spy on the Python proxies over each window; writes profile.md (and not "
        "latest.*: profiled figures are not the bench's). Default peers: reactor",
    )
    ap.add_argument("--profile-rate", type=int, default=250, help="py-spy samples/s (250)")
    ap.add_argument(
        "--keep",
        action="store_true",
        help="keep the scratch directory (peer logs, configs, strace output)",
    )
    args = ap.parse_args(argv)
    if args.profile:
        if note := pyspy.available():
            print(f"bench: --profile: {note}", file=sys.stderr)
            return 2
        if args.profile_rate <= 0:
            ap.error("--profile-rate must be positive")
        if not select_workloads(args.workloads, profile=True):
            ap.error(f"--profile: no windowed workload in {args.workloads} "
                     "(idle and syscalls have no window to profile)")
        args.peers = args.peers or "reactor"
        args.rounds = args.rounds or 1
    try:
        harness = Harness(args)
    except build.BuildError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 1
    try:
        data = harness.run()
    except KeyboardInterrupt:
        print("\nbench: interrupted", file=sys.stderr)
        return 130
    if args.profile:
        path = report.write_profile(data, args.out, harness.ctx.reactor_dir)
        print(f"bench: wrote {path}", file=sys.stderr)
        print(path.read_text())
        return 0
    summary = report.summarize(data)
    data["summary"] = summary
    paths = report.write(data, args.out)  # before printing: a closed stdout must not lose them
    for p in paths:
        print(f"bench: wrote {p}", file=sys.stderr)
    print(report.render(data))
    return 0
