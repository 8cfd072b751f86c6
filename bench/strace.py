"""Exact syscall counts of a running process over a window: `strace -c -f -p PID ...`.

strace attaches to every thread (-f with -p), the harness waits until /proc shows a
tracer on each thread, runs a fixed number of messages, then SIGINTs strace, which
detaches and writes its summary. Counts are exact, so the figure is immune to noise
(the timings strace prints are not: ptrace slows the tracee, so they are ignored).
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path

from bench import procstat
from bench.driver import RunError, pin


def available() -> str | None:
    return None if shutil.which("strace") else "strace not found (apt-get install strace)"


class Strace:
    def __init__(self, pids: list[int], out: Path, cpus: set[int]) -> None:
        self.pids = pids
        self.out = out
        self.cpus = cpus
        self.proc: subprocess.Popen | None = None

    def attach(self, timeout_s: float = 10.0) -> None:
        argv = ["strace", "-c", "-f", "-o", str(self.out)]
        for p in self.pids:
            argv += ["-p", str(p)]
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            preexec_fn=pin(self.cpus),
        )
        end = time.monotonic() + timeout_s
        while not all(procstat.traced(p) for p in self.pids):
            if self.proc.poll() is not None:
                raise RunError(f"strace exited: {self.proc.stderr.read().decode()[-300:]}")
            if time.monotonic() > end:
                self.detach()
                raise RunError("strace did not attach in time")
            time.sleep(0.01)

    def detach(self) -> dict[str, dict[str, int]]:
        """Stop tracing; {syscall: {"calls": n, "errors": n}}."""
        if self.proc is None:
            return {}
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise RunError("strace did not detach") from None
        self.proc.stderr.close()
        self.proc = None
        return parse_summary(self.out.read_text())


def parse_summary(text: str) -> dict[str, dict[str, int]]:
    """Parse `strace -c` output: rows of % time, seconds, usecs/call, calls, [errors], name."""
    out: dict[str, dict[str, int]] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 5 or parts[-1] == "total" or not parts[0][0].isdigit():
            continue
        try:
            float(parts[0])
            calls = int(parts[3])
            errors = int(parts[4]) if len(parts) >= 6 else 0
        except ValueError:
            continue
        out[parts[-1]] = {"calls": calls, "errors": errors}
    return out
