"""Smoke test of the benchmark's moving parts (figures belong to `make bench`, not here):
the C load generator and echo backends build and speak the protocol the harness relies
on, and a stdlib proxy peer forwards a fixed count of messages exactly."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.build import build_c  # noqa: E402
from bench.driver import LineReader  # noqa: E402
from bench.strace import parse_summary  # noqa: E402

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(scope="module")
def tools(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    if not (os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler")
    d = tmp_path_factory.mktemp("benchbuild")
    return {"loadgen": build_c("loadgen", d), "echo": build_c("echo", d)}


@pytest.fixture
def spawn():
    procs: list[subprocess.Popen] = []

    def _spawn(argv: list[str], **kw) -> subprocess.Popen:
        p = subprocess.Popen(argv, **kw)
        procs.append(p)
        return p

    yield _spawn
    for p in procs:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
        p.wait(5)


def listening_ports(proc: subprocess.Popen, n: int) -> list[int]:
    reader = LineReader(proc.stdout.fileno())
    ports = []
    for _ in range(n):
        line = reader.readline(10)
        assert line and line.startswith("listening on 127.0.0.1:"), line
        ports.append(int(line.rsplit(":", 1)[1]))
    return ports


def sockets_of(pid: int) -> int:
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            n += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
        except FileNotFoundError:
            pass
    return n


def loadgen(tools, *args: str) -> list[dict]:
    r = subprocess.run(
        [str(tools["loadgen"]), "--timeout", "15", *args],
        capture_output=True,
        text=True,
        timeout=25,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return [json.loads(line) for line in r.stdout.splitlines()]


def echo_backends(tools, spawn) -> list[int]:
    echo = spawn([str(tools["echo"])] + ["--listen", "127.0.0.1:0"] * 3, stdout=subprocess.PIPE)
    return listening_ports(echo, 3)


def test_pingpong_fixed_count_through_asyncio_protocol_peer(tools, spawn):
    backends = echo_backends(tools, spawn)
    argv = [
        sys.executable,
        str(REPO / "bench/peers/asyncio_protocol.py"),
        "--listen",
        "127.0.0.1:0",
    ]
    for p in backends:
        argv += ["--backend", f"127.0.0.1:{p}"]
    peer = spawn(argv, stdout=subprocess.PIPE)
    (port,) = listening_ports(peer, 1)
    sockets_before = sockets_of(peer.pid)

    lg = spawn(
        [
            str(tools["loadgen"]),
            "--mode",
            "pingpong",
            "--port",
            str(port),
            "--conns",
            "2",
            "--count",
            "200",
            "--warmup",
            "0.1",
            "--timeout",
            "15",
            "--gate",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    reader = LineReader(lg.stdout.fileno())
    ready = json.loads(reader.readline(10))
    assert ready["event"] == "ready" and ready["connected"] == 2
    # each client connection costs the proxy two sockets: its own and the backend's
    assert sockets_of(peer.pid) - sockets_before == 4
    lg.stdin.write(b"go\n")
    lg.stdin.flush()
    result = json.loads(reader.readline(10))
    lg.stdin.close()
    assert lg.wait(5) == 0

    assert result["event"] == "result" and result["mode"] == "pingpong"
    assert result["count"] == 200 and result["lat_us"]["n"] == 200
    assert result["bytes_sent"] == result["bytes_recv"] == 200 * 64
    assert result["errors"] == 0
    lat = result["lat_us"]
    assert 0 < lat["p50"] <= lat["p99"] <= lat["p999"] <= lat["max"]
    assert result["duration_s"] > 0
    assert result["rate"] == pytest.approx(200 / result["duration_s"], rel=1e-3)
    assert peer.poll() is None


def test_gated_bulk_and_churn_against_echo(tools, spawn):
    (port, _, _) = echo_backends(tools, spawn)
    lg = spawn(
        [
            str(tools["loadgen"]),
            "--mode",
            "bulk",
            "--port",
            str(port),
            "--conns",
            "2",
            "--duration",
            "0.2",
            "--warmup",
            "0.05",
            "--timeout",
            "15",
            "--gate",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    reader = LineReader(lg.stdout.fileno())
    ready = json.loads(reader.readline(10))
    assert ready["event"] == "ready" and ready["connected"] == 2
    # gated: nothing is measured until the harness says go
    lg.stdin.write(b"go\n")
    lg.stdin.flush()
    result = json.loads(reader.readline(10))
    assert result["event"] == "result" and result["mode"] == "bulk"
    assert 0 < result["bytes_recv"] <= result["bytes_sent"]
    assert lg.poll() is None  # waits at the second gate
    lg.stdin.write(b"end\n")
    lg.stdin.flush()
    assert lg.wait(5) == 0

    (result,) = [
        e
        for e in loadgen(
            tools,
            "--mode",
            "churn",
            "--port",
            str(port),
            "--conns",
            "5",
            "--count",
            "100",
            "--warmup",
            "0.05",
        )
        if e["event"] == "result"
    ]
    assert result["count"] == 100 and result["errors"] == 0


def test_idle_connections_are_held(tools, spawn):
    (port, _, _) = echo_backends(tools, spawn)
    ready, result = loadgen(tools, "--mode", "idle", "--port", str(port), "--conns", "300")
    assert ready["connected"] == 300 and ready["connect_failed"] == 0
    assert result["connected"] == 300


def test_strace_summary_parse():
    text = """% time     seconds  usecs/call     calls    errors syscall
------ ----------- ----------- --------- --------- ----------------
 50.00    0.000210           7      4000           sendto
 40.00    0.000173           5      4000        13 recvfrom
 10.00    0.000071           3        81           epoll_wait
------ ----------- ----------- --------- --------- ----------------
100.00    0.000454           4      8081        13 total
"""
    assert parse_summary(text) == {
        "sendto": {"calls": 4000, "errors": 0},
        "recvfrom": {"calls": 4000, "errors": 13},
        "epoll_wait": {"calls": 81, "errors": 0},
    }


def _pp_run(round_: int, other: float, user: float, sys_: float) -> dict:
    return {
        "peer": "p", "workload": "pingpong-50", "round": round_,
        "result": {"count": 1_000_000, "rate": 1.0,
                   "lat_us": {"p50": 1.0, "p99": 2.0, "p999": 3.0}},
        "window": {"proxy_cpu": {"user": user, "sys": sys_}, "other_cores": other,
                   "bound": "both", "proxy_cores": 1.0, "load_cores": 1.0},
    }


def test_user_sys_split_is_pooled_over_rounds():
    from bench.report import summarize

    # round 1 is the least disturbed and is reported; its own split (4:6) is one
    # small tick sample, the three rounds together say 3:7 (9 of 30 s user)
    runs = [_pp_run(0, 0.5, 2.0, 8.0), _pp_run(1, 0.0, 4.0, 6.0), _pp_run(2, 0.3, 3.0, 7.0)]
    out = summarize({"peers": ["p"], "runs": runs})["p"]
    assert out["pp50.round"] == 1
    assert out["pp50.cpu"] == pytest.approx(10.0)  # the reported window's total, untouched
    assert out["pp50.user_share"] == pytest.approx(0.3)
    assert out["pp50.user"] == pytest.approx(3.0)
    assert out["pp50.sys"] == pytest.approx(7.0)
    # every sample's CPU cost, not only the reported window's: 10.0 each here
    assert out["pp50.cpu_best"] == pytest.approx(10.0)
    assert out["pp50.cpu_median"] == pytest.approx(10.0)


def test_best_and_median_round_of_cpu_cost():
    from bench.report import summarize

    # per msg: 20, 12, 15 us; the least-disturbed window (round 0) is 20
    runs = [_pp_run(0, 0.0, 4.0, 16.0), _pp_run(1, 0.4, 2.0, 10.0), _pp_run(2, 0.2, 3.0, 12.0)]
    out = summarize({"peers": ["p"], "runs": runs})["p"]
    assert out["pp50.cpu"] == pytest.approx(20.0)
    assert out["pp50.cpu_best"] == pytest.approx(12.0)
    assert out["pp50.cpu_median"] == pytest.approx(15.0)


def test_paired_ratio_is_the_median_of_same_round_ratios():
    from bench.report import paired_ratio, summarize

    # a proxy at 10 then 20 then 30 us/msg as the machine got busier, its peer at
    # 8, 18, 40 in the same rounds: ratios 1.25, 1.11, 0.75 -> median 1.11
    a = [_pp_run(r, 0.0, 0.0, c) for r, c in enumerate((10.0, 20.0, 30.0))]
    b = [_pp_run(r, 0.0, 0.0, c) for r, c in enumerate((8.0, 18.0, 40.0))]
    for rec in a:
        rec["peer"] = "a"
    for rec in b:
        rec["peer"] = "b"
    s = summarize({"peers": ["a", "b"], "runs": a + b})
    assert paired_ratio(s["a"], s["b"], "pp50.cpu") == pytest.approx(20.0 / 18.0)
    # a round only one of them ran does not count
    s["b"]["pp50.by_round"].pop("2")
    assert paired_ratio(s["a"], s["b"], "pp50.cpu") == pytest.approx((1.25 + 20.0 / 18.0) / 2)
    assert paired_ratio(s["a"], {}, "pp50.cpu") is None


def test_rate_paces_pingpong_to_the_offered_rate(tools, spawn):
    # direct to an echo server, which could do tens of thousands of round trips a
    # second: held to 2,000/s over 10 conns for 1 s it completes about 2,000
    (port, _, _) = echo_backends(tools, spawn)
    ready, result = loadgen(
        tools, "--mode", "pingpong", "--port", str(port), "--conns", "10",
        "--duration", "1.0", "--warmup", "0.1", "--rate", "2000",
    )
    assert ready["connected"] == 10 and result["errors"] == 0
    assert 1800 <= result["count"] <= 2100, result
    assert result["bytes_recv"] == result["count"] * 64


def test_rate_paces_churn_to_the_offered_rate(tools, spawn):
    (port, _, _) = echo_backends(tools, spawn)
    ready, result = loadgen(
        tools, "--mode", "churn", "--port", str(port), "--conns", "10",
        "--duration", "1.0", "--warmup", "0.1", "--rate", "400",
    )
    assert result["errors"] == 0
    assert 340 <= result["count"] <= 420, result


def test_rate_must_not_be_negative(tools):
    r = subprocess.run([str(tools["loadgen"]), "--mode", "pingpong", "--port", "1", "--rate", "-5"],
                       capture_output=True, text=True, timeout=10)
    assert r.returncode == 2 and "--rate" in r.stderr


def test_paced_figures_say_whether_the_peer_held_the_rate():
    from bench.report import metrics_of

    rec = _pp_run(0, 0.0, 0.5, 1.5)
    rec["workload"] = "paced-50"
    rec["params"] = {"rate": 20000.0}
    rec["result"]["count"] = 24000
    rec["result"]["rate"] = 19990.0
    m = metrics_of(rec)
    assert m["paced50.held"] == "yes"
    assert m["paced50.cpu"] == pytest.approx(2.0 / 24000 * 1e6)
    assert m["paced50.user"] == pytest.approx(0.5 / 24000 * 1e6)
    rec["result"]["rate"] = 15000.0  # saturated: its cost is not at the offered rate
    assert metrics_of(rec)["paced50.held"] == "no: 15.0k/s"


def test_paced_churn_figures():
    from bench.report import metrics_of

    rec = {
        "peer": "p", "workload": "paced-churn", "round": 0, "params": {"rate": 2000.0},
        "result": {"count": 2400, "rate": 1999.0, "errors": 0,
                   "lat_us": {"p50": 100.0, "p99": 300.0, "p999": 900.0}},
        "window": {"proxy_cpu": {"user": 0.06, "sys": 0.18}, "other_cores": 0.0,
                   "bound": "neither", "proxy_cores": 0.2, "load_cores": 0.3},
    }
    m = metrics_of(rec)
    assert m["pchurn.held"] == "yes"
    assert m["pchurn.cpu"] == pytest.approx(100.0)  # 0.24 s over 2,400 connections
    assert m["pchurn.user"] == pytest.approx(25.0)
    assert m["pchurn.p99"] == pytest.approx(0.3)


def test_pyspy_raw_parse():
    from bench.pyspy import parse_raw

    raw = (
        "run (reactor/loop.py:378) 5\n"
        "run (reactor/loop.py:391);_on_event (reactor/stream.py:318) 7\n"
        "run (reactor/loop.py:391);_on_event (reactor/stream.py:297) 2\n"
        "run (reactor/loop.py:391);_on_event (reactor/stream.py:336);"
        "_on_event (reactor/stream.py:318) 1\n"
        "<module> (x.py) 3\n"
        "garbage line\n"
    )
    p = parse_raw(raw)
    assert p.samples == 18
    assert p.functions == {"run (reactor/loop.py)": 5, "_on_event (reactor/stream.py)": 10,
                           "<module> (x.py)": 3}
    # a recursive frame counts once towards inclusive
    assert p.inclusive == {"run (reactor/loop.py)": 15, "_on_event (reactor/stream.py)": 10,
                           "<module> (x.py)": 3}
    assert p.lines == {("run", "reactor/loop.py", 378): 5,
                       ("_on_event", "reactor/stream.py", 318): 8,
                       ("_on_event", "reactor/stream.py", 297): 2, ("<module>", "x.py", 0): 3}


def _bench(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def test_profile_without_a_windowed_workload_is_a_usage_error():
    r = _bench("--profile", "--workloads", "idle,syscalls")
    assert r.returncode == 2, r.stderr
    assert "no windowed workload in idle,syscalls" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.timeout(150)
def test_profile_shows_where_churn_spends_its_cpu(tools, tmp_path):
    """A real profiled run: py-spy on the gateway under churn must find the connect()
    every proxied connection makes, on the line that makes it."""
    from bench.pyspy import available, executable

    if (note := available()) is not None:
        pytest.skip(note)
    # Can py-spy read a Python process here at all (ptrace may be forbidden in a
    # container)? Asked of a plain sleeping interpreter, so that this skip can never
    # hide a fault of ours.
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        time.sleep(0.3)
        probe = subprocess.run([executable(), "dump", "--pid", str(sleeper.pid)],
                               capture_output=True, text=True, timeout=20)
    finally:
        sleeper.kill()
        sleeper.wait()
    if probe.returncode != 0:
        pytest.skip(f"py-spy cannot read a process on this machine: "
                    f"{(probe.stderr or probe.stdout).strip()[-200:]}")
    r = _bench("--profile", "--workloads", "churn", "--duration", "1.5", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    md = (tmp_path / "profile.md").read_text()
    assert "### churn: reactor (round 1)" in md
    samples = int(md.split("### churn: reactor (round 1)")[1].split()[0].replace(",", ""))
    assert samples >= 50, md
    assert "`err = sock.connect_ex(backend.address)`" in md
    share = float(md.split("On lines that make a syscall: **")[1].split("%")[0])
    assert 30 <= share <= 100, md  # churn is mostly connect, close, accept and their kin
    assert "µs/connection in this window" in md
    # a profiled run is not the bench's figures: nothing of latest.* is written
    assert not (tmp_path / "latest.json").exists()
    data = json.loads((tmp_path / "profile.json").read_text())
    run = next(r for r in data["runs"] if r["workload"] == "churn")
    assert run["profile"]["samples"] == samples


def test_workload_selection_by_name_and_family():
    from bench.run import select_workloads

    assert select_workloads("pingpong,idle") == ["pingpong-1", "pingpong-50", "pingpong-500", "idle"]
    assert select_workloads("paced") == ["paced-50", "paced-churn"]
    assert select_workloads("churn,syscalls") == ["churn", "syscalls", "syscalls-churn"]
    assert select_workloads("syscalls-churn") == ["syscalls-churn"]
    assert select_workloads("pingpong,idle", profile=True) == ["pingpong-1", "pingpong-50",
                                                              "pingpong-500"]
    assert select_workloads("idle,syscalls", profile=True) == []
    assert select_workloads("syscalls-churn", profile=True) == []
    assert select_workloads(None, profile=True) == ["pingpong-1", "pingpong-50", "pingpong-500",
                                                    "paced-50", "bulk", "churn", "paced-churn"]
    assert select_workloads("nosuch") == []


def test_churn_syscalls_per_connection():
    from bench.report import metrics_of

    rec = {
        "peer": "p", "workload": "syscalls-churn", "round": 0,
        "result": {"count": 1000},
        "strace": {"epoll_ctl": {"calls": 4000, "errors": 0},
                   "connect": {"calls": 1000, "errors": 1000},
                   "close": {"calls": 2000, "errors": 0},
                   "accept4": {"calls": 1020, "errors": 20}},
        "self_syscalls": {"epoll_ctl": 4000, "connect": 1000, "close": 2000, "accept": 1020,
                          "epoll_wait": 50},
    }
    m = metrics_of(rec)
    assert m == {"csys.total": pytest.approx(8.02), "csys.self": pytest.approx(8.07),
                 "csys.mix": "epoll_ctl 4.00, close 2.00, accept4 1.02, connect 1.00"}
