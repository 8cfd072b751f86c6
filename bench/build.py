"""Build the benchmark's native parts into bench/build/: the C load generator and echo
backends (required), and the Go seed gateway (optional: skipped without `go`).

    python -m bench.build        # what `make bench-build` runs
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
BUILD_DIR = BENCH_DIR / "build"
CFLAGS = ["-O2", "-Wall", "-Wextra", "-std=gnu11"]


class BuildError(Exception):
    pass


@dataclass(slots=True)
class Tools:
    loadgen: Path
    echo: Path
    goseed: Path | None
    goseed_note: str  # why goseed is None, or ""


def _stale(target: Path, *sources: Path) -> bool:
    if not target.exists():
        return True
    t = target.stat().st_mtime
    return any(s.stat().st_mtime > t for s in sources)


def build_c(name: str, build_dir: Path = BUILD_DIR) -> Path:
    """Compile bench/<name>.c into build_dir/<name> if missing or older than its source."""
    src = BENCH_DIR / f"{name}.c"
    out = build_dir / name
    if not _stale(out, src):
        return out
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise BuildError("no C compiler (apt-get install gcc)")
    build_dir.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    r = subprocess.run([cc, *CFLAGS, "-o", str(tmp), str(src)], capture_output=True, text=True)
    if r.returncode != 0:
        raise BuildError(f"{cc} {src.name} failed:\n{r.stderr.strip()}")
    tmp.replace(out)
    return out


def build_goseed(build_dir: Path = BUILD_DIR) -> tuple[Path | None, str]:
    src_dir = BENCH_DIR / "goseed"
    out = build_dir / "goseed"
    sources = [src_dir / "main.go", src_dir / "go.mod"]
    if not _stale(out, *sources):
        return out, ""
    go = shutil.which("go")
    if not go:
        return None, "go not found (apt-get install golang-go)"
    build_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, CGO_ENABLED="0", GOFLAGS="-mod=mod", GOPROXY="off")
    env.setdefault("GOCACHE", str(build_dir / "gocache"))
    env.setdefault("GOPATH", str(build_dir / "gopath"))
    r = subprocess.run(
        [go, "build", "-o", str(out), "."], cwd=src_dir, env=env, capture_output=True, text=True
    )
    if r.returncode != 0:
        return None, f"go build failed: {r.stderr.strip()[:300]}"
    return out, ""


def build_all(build_dir: Path = BUILD_DIR) -> Tools:
    loadgen = build_c("loadgen", build_dir)
    echo = build_c("echo", build_dir)
    goseed, note = build_goseed(build_dir)
    return Tools(loadgen=loadgen, echo=echo, goseed=goseed, goseed_note=note)


def main() -> int:
    try:
        tools = build_all()
    except BuildError as e:
        print(f"bench build: {e}", file=sys.stderr)
        return 1
    print(f"bench build: {tools.loadgen.name}, {tools.echo.name} in {BUILD_DIR}")
    if tools.goseed:
        print(f"bench build: goseed in {BUILD_DIR}")
    else:
        print(f"bench build: goseed skipped: {tools.goseed_note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
