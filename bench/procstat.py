"""Read a process tree's CPU time and memory straight from /proc.

CPU comes from /proc/PID/stat (utime, stime: clock ticks, all threads included); a
supervisor with worker processes is summed over its live descendants. RSS is VmRSS from
/proc/PID/status, summed over the tree (shared pages of forked workers count once per
process, as `ps` would show them).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(slots=True, frozen=True)
class Cpu:
    user: float  # seconds
    sys: float

    @property
    def total(self) -> float:
        return self.user + self.sys

    def __sub__(self, other: Cpu) -> Cpu:
        return Cpu(self.user - other.user, self.sys - other.sys)

    def __add__(self, other: Cpu) -> Cpu:
        return Cpu(self.user + other.user, self.sys + other.sys)


ZERO = Cpu(0.0, 0.0)


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # comm (field 2) may hold spaces and parentheses: split after the last ')'
    rest = raw[raw.rindex(")") + 2 :].split()
    return rest  # rest[0] is field 3 (state)


def ppid(pid: int) -> int | None:
    f = _stat_fields(pid)
    return int(f[1]) if f else None


def cpu(pid: int) -> Cpu:
    """The process's own user and system CPU seconds (every thread), ZERO if it is gone."""
    f = _stat_fields(pid)
    if not f:
        return ZERO
    # fields 14 and 15 (utime, stime) are rest[11], rest[12]
    return Cpu(int(f[11]) / CLK_TCK, int(f[12]) / CLK_TCK)


def descendants(pid: int) -> list[int]:
    """Live descendants of pid, found by walking every /proc entry's parent."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        p = ppid(int(name))
        if p is not None:
            children.setdefault(p, []).append(int(name))
    out: list[int] = []
    stack = [pid]
    while stack:
        for c in children.get(stack.pop(), []):
            out.append(c)
            stack.append(c)
    return out


def tree(pid: int) -> list[int]:
    return [pid, *descendants(pid)]


def tree_cpu(pids: list[int]) -> Cpu:
    total = ZERO
    for p in pids:
        total = total + cpu(p)
    return total


def rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def tree_rss_kib(pids: list[int]) -> int:
    return sum(rss_kib(p) for p in pids)


def threads(pid: int) -> list[int]:
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except FileNotFoundError:
        return []


def traced(pid: int) -> bool:
    """True when every thread of pid has a tracer (strace has attached to all of them)."""
    tids = threads(pid)
    if not tids:
        return False
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                for line in f:
                    if line.startswith("TracerPid:"):
                        if int(line.split()[1]) == 0:
                            return False
                        break
        except FileNotFoundError:
            continue
    return True


def cpu_ticks() -> dict[int, tuple[int, int]]:
    """Per CPU (busy, total) clock ticks since boot, from /proc/stat (idle + iowait = not busy)."""
    out: dict[int, tuple[int, int]] = {}
    with open("/proc/stat") as f:
        for line in f:
            if not line.startswith("cpu") or line.startswith("cpu "):
                continue
            name, *vals = line.split()
            nums = [int(v) for v in vals[:8]]  # user nice system idle iowait irq softirq steal
            total = sum(nums)
            out[int(name[3:])] = (total - nums[3] - nums[4], total)
    return out


def cpu_busy(a: dict[int, tuple[int, int]], b: dict[int, tuple[int, int]]) -> dict[int, float]:
    """Share of each CPU that was busy (by anyone) between two cpu_ticks() samples."""
    out = {}
    for cpu_id, (busy1, total1) in b.items():
        busy0, total0 = a.get(cpu_id, (busy1, total1))
        out[cpu_id] = (busy1 - busy0) / (total1 - total0) if total1 > total0 else 0.0
    return out
