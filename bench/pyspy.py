"""Where a Python proxy's CPU goes, per workload: `py-spy record` over the measured window.

py-spy samples the proxy's Python stacks from outside (``--nonblocking``: it reads the
process's memory without stopping it, so the proxy runs as it would unprofiled, and
py-spy itself runs on the load CPUs). Idle samples -- a thread asleep in
``epoll_wait`` -- are dropped, so every sample is a moment the proxy was on a CPU, and a
syscall's kernel time is charged to the Python line that made it: ``n = _readv(...)``
is the kernel's receive path as much as the call. That is the point: the profile puts
the syscalls and the Python between them on one scale.

``python -m bench --profile`` (``make profile``) runs the chosen workloads once each
with the profiler attached and writes ``profile.md`` beside the results. Part of one
(churn, 50 workers, the gateway; 886 samples)::

    | self % | incl % | function |
    | 24.4 | 26.6 | `Relay.connect_next (reactor/relay.py)` |
    | 22.1 | 22.5 | `Stream.close (reactor/stream.py)` |
    | 19.2 | 51.9 | `Stream._on_event (reactor/stream.py)` |

    | self % | line | source |
    | 21.1 | `reactor/relay.py:192` (Relay.connect_next) | `err = sock.connect_ex(backend.address)` |
    | 16.3 | `reactor/stream.py:526` (Stream.close) | `os.close(self._fd)` |
    | 12.3 | `reactor/stream.py:318` (Stream._on_event) | `m = _write(peer._fd, view)` |

(on loopback a ``connect`` runs the whole handshake, both ends of it, inside the call.)
"""

from __future__ import annotations

import functools
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from bench.driver import LineReader, RunError, pin

_SUMMARY = re.compile(r"Samples: (\d+) Errors: (\d+)")
# "Relay.connect_next (reactor/relay.py:192)"; py-spy leaves the line off when it has none
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def executable() -> str | None:
    """py-spy from the venv beside this interpreter, else from PATH."""
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else shutil.which("py-spy")


def available() -> str | None:
    return None if executable() else "py-spy not found (pip install py-spy: make bench-tools)"


@dataclass(slots=True)
class Profile:
    samples: int = 0
    functions: Counter = field(default_factory=Counter)  # "func (file)" -> samples on top
    inclusive: Counter = field(default_factory=Counter)  # "func (file)" -> samples on stack
    lines: Counter = field(default_factory=Counter)  # (func, file, line) -> samples on top


def parse_raw(text: str) -> Profile:
    """Parse py-spy's ``--format raw`` (collapsed stacks: ``frame;frame;... count``)."""
    prof = Profile()
    for row in text.splitlines():
        stack, _, count = row.rstrip().rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        prof.samples += n
        seen = set()
        func = file = line = None
        for frame in stack.split(";"):
            m = _FRAME.match(frame)
            func, file, line = (m["func"], m["file"], m["line"]) if m else (frame, "?", None)
            name = f"{func} ({file})"
            if name not in seen:
                seen.add(name)
                prof.inclusive[name] += n
        prof.functions[f"{func} ({file})"] += n
        prof.lines[(func, file, int(line) if line else 0)] += n
    return prof


class PySpy:
    """``py-spy record`` of a running process (and its children), from ``start`` to ``stop``:
    attached before the window opens, interrupted when it closes (as ``strace -c`` is)."""

    def __init__(self, pid: int, out: Path, cpus: set[int], *, rate: int = 250) -> None:
        exe = executable()
        if exe is None:
            raise RunError("py-spy not found")
        self.out = out
        self.rate = rate
        self.argv = [
            exe, "record", "--pid", str(pid), "--rate", str(rate), "--nonblocking",
            "--subprocesses", "--format", "raw", "--output", str(out),
        ]
        self.cpus = cpus
        self.proc: subprocess.Popen | None = None
        self.reader: LineReader | None = None

    def start(self, timeout_s: float = 10.0) -> None:
        """Attach; return once py-spy says it is sampling."""
        self.proc = subprocess.Popen(
            self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, preexec_fn=pin(self.cpus),
        )
        self.reader = LineReader(self.proc.stdout.fileno())
        end = time.monotonic() + timeout_s
        seen: list[str] = []
        try:
            while (line := self.reader.readline(max(0.01, end - time.monotonic()))) is not None:
                seen.append(line.strip())
                if "Sampling process" in line:
                    return
        except RunError:  # no line before the deadline
            pass
        self.kill()
        raise RunError(f"py-spy did not start sampling: {' '.join(seen)[-300:]}")

    def stop(self, timeout_s: float = 30.0) -> tuple[Profile, str]:
        """Interrupt: py-spy writes what it sampled; (profile, its summary line)."""
        if self.proc is None:
            raise RunError("py-spy was not started")
        self.proc.send_signal(signal.SIGINT)
        lines: list[str] = []
        end = time.monotonic() + timeout_s
        try:
            while (line := self.reader.readline(max(0.01, end - time.monotonic()))) is not None:
                lines.append(line.strip())
        except RunError:
            pass
        try:
            code = self.proc.wait(max(0.1, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.kill()
            raise RunError("py-spy did not finish after SIGINT") from None
        self.proc.stdout.close()
        self.proc = None
        if code != 0 or not self.out.exists():
            raise RunError(f"py-spy failed ({code}): {' '.join(lines)[-300:]}")
        m = _SUMMARY.search(" ".join(lines))
        # nonblocking reads race the running interpreter now and then: say how often
        note = f"{m[2]} more samples unreadable" if m else "py-spy printed no sample count"
        return parse_raw(self.out.read_text(errors="replace")), note

    def kill(self) -> None:
        """Stop py-spy without its output (a run that failed); a no-op once stopped."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc.stdout.close()
            self.proc = None


def to_json(prof: Profile, top: int = 40) -> dict:
    """The part of a profile the results keep (the heads of the function rankings)."""
    return {
        "samples": prof.samples,
        "functions": prof.functions.most_common(top),
        "inclusive": prof.inclusive.most_common(top),
        # every line, hottest first: the syscall share needs all of them, the table its head
        "lines": [[f, p, ln, c] for (f, p, ln), c in prof.lines.most_common()],
    }


# A line "makes a syscall" when its source calls one of these C-level wrappers (a sample
# on it is the syscall, kernel time included, or its argument parsing); the rest of the
# samples are the Python between the syscalls. A heuristic for the summary line only.
SYSCALL_LINE = re.compile(
    r"(\b(_write|_readv|_close|_splice|_ioctl|poll|accept|os\.\w+)\(|"
    r"\.(recv_into|recv|send|sendall|sendto|connect_ex|connect|shutdown|setsockopt|"
    r"getsockopt|register|modify|unregister|_accept)\(|sock\.close\(\))"
)


@functools.lru_cache(maxsize=256)
def _file_lines(root: Path, path: str) -> tuple[str, ...]:
    """``path`` from the checkout first, then the stdlib and site-packages (py-spy
    shortens paths to the package part: ``asyncio/selector_events.py``)."""
    for base in (root, *(Path(p) for p in {sysconfig.get_paths()[k] for k in ("stdlib", "purelib")})):
        try:
            return tuple((base / path).read_text().splitlines())
        except OSError:
            continue
    return ()


def _source(root: Path, path: str, line: int) -> str:
    text = _file_lines(root, path)
    return text[line - 1].strip() if 0 < line <= len(text) else ""


def syscall_share(prof: dict, root: Path) -> float:
    """The fraction of samples on lines that make a syscall (see SYSCALL_LINE)."""
    n = prof["samples"]
    hit = sum(c for _f, path, ln, c in prof["lines"] if SYSCALL_LINE.search(_source(root, path, ln)))
    return hit / n if n else 0.0


def markdown(title: str, prof: dict, root: Path, per_unit: str = "", top: int = 15) -> str:
    """One workload's profile as markdown: functions by self samples, then lines."""
    n = prof["samples"]
    head = [f"### {title}", "", f"{n:,} samples{per_unit}.", ""]
    if not n:
        return "\n".join(head + ["(no samples: the proxy was idle or py-spy could not read it)", ""])
    share = syscall_share(prof, root)
    if share:
        head += [f"On lines that make a syscall: **{100 * share:.0f}%** of the samples; the "
                 f"Python between them: {100 * (1 - share):.0f}%.", ""]
    else:  # uvloop: its loop and its syscalls are C, under the Python line that called in
        head += ["No sampled line makes a syscall itself: this proxy's I/O runs inside C "
                 "calls, on the Python line that called in.", ""]
    incl = dict(prof["inclusive"])
    rows = ["| self % | incl % | function |", "| ---: | ---: | --- |"]
    for name, c in prof["functions"][:top]:
        rows.append(f"| {100 * c / n:.1f} | {100 * incl.get(name, c) / n:.1f} | `{name}` |")
    lines = ["", "| self % | line | source |", "| ---: | --- | --- |"]
    for func, path, ln, c in prof["lines"][:top]:
        src = _source(root, path, ln).replace("|", "\\|")
        lines.append(f"| {100 * c / n:.1f} | `{path}:{ln}` ({func}) | `{src}` |")
    return "\n".join(head + rows + lines + [""])
