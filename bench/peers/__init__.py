"""The peers under test: how to check for, start, and describe each one.

Every peer is a TCP proxy started by the harness on a given port, forwarding to the same
echo backends — except `direct`, where the load generator talks to a backend itself.
"""

from __future__ import annotations

import importlib.util
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

PEERS_DIR = Path(__file__).resolve().parent
REPO_DIR = PEERS_DIR.parent.parent


@dataclass(slots=True)
class Context:
    """What peers need from the harness."""

    python: str
    goseed: Path | None
    goseed_note: str
    workdir: Path  # scratch files (the haproxy config)
    max_conns: int  # haproxy's maxconn (and reactor's): must cover the idle workload
    reactor_dir: Path = REPO_DIR  # the checkout whose `reactor` package is benchmarked


@dataclass(slots=True)
class Launch:
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    admin_port: int | None = None
    cwd: Path = REPO_DIR


@dataclass(slots=True)
class Peer:
    name: str
    description: str
    # proxy CPUs as an index into the harness's CPU plan: "proxy" = CPU 0, "all" = every CPU
    cpus: str = "proxy"
    # run only when named in --peers (variants of another peer)
    optional: bool = False

    @property
    def is_direct(self) -> bool:
        return self.name == "direct"

    def missing(self, ctx: Context) -> str | None:
        """None when the peer can run here, else a note saying how to get it."""
        return None

    def version(self, ctx: Context) -> str:
        return ""

    def launch(
        self, ctx: Context, port: int, backends: list[tuple[str, int]], admin_port: int
    ) -> Launch:
        raise NotImplementedError


def _first_line(argv: list[str]) -> str:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    if r.returncode != 0:
        return ""
    out = (r.stdout or r.stderr).strip().splitlines()
    return out[0].strip() if out else ""


class Direct(Peer):
    def version(self, ctx: Context) -> str:
        return "no proxy: the load generator talks to one echo backend"


class HAProxy(Peer):
    def missing(self, ctx: Context) -> str | None:
        return None if shutil.which("haproxy") else "haproxy not found (apt-get install haproxy)"

    def version(self, ctx: Context) -> str:
        # "HAProxy version 2.6.12-1+deb12u4 2026/10/17 - https://..." -> the version alone
        return _first_line(["haproxy", "-v"]).split(" - ")[0]

    def launch(self, ctx, port, backends, admin_port):
        servers = "\n".join(f"    server s{i} {h}:{p}" for i, (h, p) in enumerate(backends))
        cfg = f"""global
    nbthread 1
    maxconn {ctx.max_conns}
defaults
    mode tcp
    timeout connect 5s
    timeout client 120s
    timeout server 120s
    maxconn {ctx.max_conns}
frontend fe
    bind 127.0.0.1:{port}
    default_backend be
backend be
    balance roundrobin
{servers}
"""
        path = ctx.workdir / f"haproxy-{port}.cfg"
        path.write_text(cfg)
        return Launch(["haproxy", "-f", str(path), "-db"])


class GoSeed(Peer):
    def missing(self, ctx: Context) -> str | None:
        return None if ctx.goseed else f"go-seed not built: {ctx.goseed_note}"

    def version(self, ctx: Context) -> str:
        return _first_line(["go", "version"]) or "go (version unknown)"

    def launch(self, ctx, port, backends, admin_port):
        argv = [str(ctx.goseed), "-listen", f"127.0.0.1:{port}"]
        for h, p in backends:
            argv += ["-backend", f"{h}:{p}"]
        return Launch(argv, env={"GOMAXPROCS": "1"})


class AsyncioPeer(Peer):
    script: str = ""
    uvloop: bool = False

    def __init__(self, name: str, description: str, script: str, uvloop: bool = False) -> None:
        Peer.__init__(self, name, description)
        self.script = script
        self.uvloop = uvloop

    def missing(self, ctx: Context) -> str | None:
        if not self.uvloop:
            return None
        r = subprocess.run([ctx.python, "-c", "import uvloop"], capture_output=True)
        return None if r.returncode == 0 else "uvloop not importable (pip install -e '.[bench]')"

    def version(self, ctx: Context) -> str:
        v = f"Python {platform.python_version()}"
        if self.uvloop:
            u = _first_line([ctx.python, "-c", "import uvloop; print(uvloop.__version__)"])
            v += f", uvloop {u}"
        return v

    def launch(self, ctx, port, backends, admin_port):
        argv = [ctx.python, str(PEERS_DIR / self.script), "--listen", f"127.0.0.1:{port}"]
        for h, p in backends:
            argv += ["--backend", f"{h}:{p}"]
        if self.uvloop:
            argv.append("--uvloop")
        return Launch(argv)


class Reactor(Peer):
    workers: int = 1
    admin: bool = True

    def __init__(
        self, name: str, description: str, workers: int, cpus: str, splice: str = ""
    ) -> None:
        Peer.__init__(self, name, description, cpus)
        self.workers = workers
        self.splice = splice  # "" = the gateway's default
        self.optional = bool(splice)
        self.admin = True  # the harness turns it off if the gateway cannot start with it
        self._help: str | None = None

    def _gateway_help(self, ctx: Context) -> str:
        if self._help is None:
            try:
                r = subprocess.run(
                    [ctx.python, "-m", "reactor", "gateway", "--help"],
                    capture_output=True,
                    text=True,
                    timeout=30,
                    cwd=ctx.reactor_dir,
                )
                self._help = r.stdout if r.returncode == 0 else ""
            except (OSError, subprocess.TimeoutExpired):
                self._help = ""
        return self._help

    def missing(self, ctx: Context) -> str | None:
        if (
            importlib.util.find_spec("reactor") is None
            and not (ctx.reactor_dir / "reactor").is_dir()
        ):
            return "the reactor package is not installed (make install)"
        h = self._gateway_help(ctx)
        if "--backend" not in h:
            return "`reactor gateway` is not in this checkout yet"
        if self.workers > 1 and "--workers" not in h:
            return "`reactor gateway --workers` does not exist yet"
        if self.splice and "--splice" not in h:
            return "`reactor gateway --splice` does not exist yet"
        return None

    def version(self, ctx: Context) -> str:
        try:
            r = subprocess.run(
                [ctx.python, "-m", "reactor", "--version"],
                capture_output=True,
                text=True,
                timeout=30,
                cwd=ctx.reactor_dir,
            )
            v = r.stdout.strip() or r.stderr.strip()
        except (OSError, subprocess.TimeoutExpired):
            v = "reactor"
        sha = _first_line(["git", "-C", str(ctx.reactor_dir), "rev-parse", "--short", "HEAD"])
        dirty = _first_line(["git", "-C", str(ctx.reactor_dir), "status", "--porcelain", "reactor"])
        if sha and dirty:
            sha += "+uncommitted changes"
        return f"{v} ({sha})" if sha else v

    def launch(self, ctx, port, backends, admin_port):
        h = self._gateway_help(ctx)
        argv = [ctx.python, "-m", "reactor", "gateway", "--listen", f"127.0.0.1:{port}"]
        for bh, bp in backends:
            argv += ["--backend", f"{bh}:{bp}"]
        if "--balance" in h:
            argv += ["--balance", "round_robin"]
        if "--workers" in h:
            argv += ["--workers", str(self.workers)]
        if "--max-connections" in h:
            argv += ["--max-connections", str(ctx.max_conns)]
        if self.splice:
            argv += ["--splice", self.splice]
        # default features on, the access log too (to the peer's log file):
        # the condition, though haproxy runs without a `log` line
        use_admin = "--admin" in h and self.admin
        if use_admin:
            argv += ["--admin", f"127.0.0.1:{admin_port}"]
        elif "--admin" in h:
            argv += ["--admin", "off"]  # its default port would collide between runs
        return Launch(argv, admin_port=admin_port if use_admin else None, cwd=ctx.reactor_dir)


def all_peers() -> list[Peer]:
    return [
        Direct("direct", "no proxy: the physical reference"),
        HAProxy("haproxy", "HAProxy mode tcp, balance roundrobin, nbthread 1"),
        GoSeed("go-seed", "the seed's Go gateway (random backend, two io.Copy), GOMAXPROCS=1"),
        AsyncioPeer("asyncio-streams", "asyncio streams proxy, round robin", "asyncio_streams.py"),
        AsyncioPeer(
            "asyncio-protocol", "asyncio protocol proxy, round robin", "asyncio_protocol.py"
        ),
        AsyncioPeer(
            "uvloop-protocol",
            "the asyncio protocol proxy on uvloop",
            "asyncio_protocol.py",
            uvloop=True,
        ),
        Reactor("reactor", "our gateway, round_robin, one worker", workers=1, cpus="proxy"),
        Reactor("reactor-w2", "our gateway, --workers 2 (on both CPUs)", workers=2, cpus="all"),
        Reactor("reactor-splice", "our gateway, --splice on", workers=1, cpus="proxy", splice="on"),
        Reactor(
            "reactor-splice-auto",
            "our gateway, --splice auto",
            workers=1,
            cpus="proxy",
            splice="auto",
        ),
    ]


def python_version() -> str:
    return f"{platform.python_implementation()} {sys.version.split()[0]}"
