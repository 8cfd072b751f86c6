"""The access log: a turn's lines in one write, the old line format, errors never raised."""

from __future__ import annotations

import os
import re
import signal
import socket
import time

import pytest

from reactor.accesslog import AccessLog
from reactor.errors import UsageError
from reactor.loop import Loop
from tests.helpers import recv_all

LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} event=access client=(\S+) backend=(\S+) "
    r"bytes_in=(\d+) bytes_out=(\d+) duration=(\d+\.\d{3}) reason=(\w+)$"
)


@pytest.fixture
def loop():
    lp = Loop()
    yield lp
    lp.close()


def test_lines_of_one_turn_go_out_in_one_write_at_its_end(loop, tmp_path):
    path = tmp_path / "access.log"
    log = AccessLog(loop, str(path))
    trace = []

    def turn():
        for i in range(3):
            log.access(f"127.0.0.1:{5000 + i}", "alpha", i, 2 * i, 0.0015, "client_eof")
        trace.append(("logged", path.read_text(), log.writes))
        loop.call_soon(loop.stop)

    loop.call_soon(turn)
    loop.run()
    trace.append(("after turn", log.writes, log.lines_written))
    assert trace == [("logged", "", 0), ("after turn", 1, 3)]
    rows = [LINE.match(x).groups() for x in path.read_text().splitlines()]
    assert rows == [(f"127.0.0.1:{5000 + i}", "alpha", str(i), str(2 * i), "0.002", "client_eof")
                    for i in range(3)]
    log.close()


def test_a_busy_turn_writes_early_rather_than_growing_without_bound(loop, tmp_path):
    path = tmp_path / "access.log"
    log = AccessLog(loop, str(path))
    for i in range(600):  # no loop turn at all
        log.access("127.0.0.1:1", "b", i, 0, 0.0, "client_eof")
    assert log.writes == 2 and log.lines_written == 512
    log.close()  # close flushes the rest
    assert len(path.read_text().splitlines()) == 600


def test_a_write_error_drops_and_counts_lines_but_never_raises(loop):
    r, w = os.pipe()
    os.close(r)  # EPIPE on write (Python ignores SIGPIPE)
    assert signal.getsignal(signal.SIGPIPE) == signal.SIG_IGN
    log = AccessLog(loop, True)
    log.fd = w  # stderr stands in for a pipe whose reader has gone
    log.access("x:1", "b", 0, 0, 0.0, "client_eof")
    log.access("y:1", "b", 0, 0, 0.0, "client_eof")
    log.flush()
    log.access("z:1", "b", 0, 0, 0.0, "client_eof")
    log.flush()
    assert (log.lines_written, log.lines_dropped) == (0, 3)
    os.close(w)


def test_a_path_that_cannot_be_opened_is_a_usage_error(loop, tmp_path):
    with pytest.raises(UsageError, match=r"^access_log: cannot open .*/no/such/dir/a\.log: "
                                         r"No such file or directory$"):
        AccessLog(loop, str(tmp_path / "no" / "such" / "dir" / "a.log"))


def test_a_buffer_holds_lines_across_turns_until_the_flush_time(loop, tmp_path):
    """nginx's buffer= and flush=: three turns of lines, one write, when the
    oldest line has waited ``flush`` seconds -- not at the end of each turn."""
    path = tmp_path / "access.log"
    log = AccessLog(loop, str(path), buffer=65536, flush=0.05)
    trace = []

    def turn(i: int) -> None:
        log.access(f"127.0.0.1:{5000 + i}", "alpha", i, i, 0.0, "client_eof")
        trace.append(("turn", i, log.writes, len(path.read_text().splitlines())))
        if i < 2:
            loop.call_soon(turn, i + 1)

    def check() -> None:
        trace.append(("flushed", log.writes, len(path.read_text().splitlines())))
        loop.stop()

    loop.call_soon(turn, 0)
    loop.call_later(0.3, check)
    loop.run()
    assert trace == [("turn", 0, 0, 0), ("turn", 1, 0, 0), ("turn", 2, 0, 0), ("flushed", 1, 3)]
    log.close()


def test_a_full_buffer_writes_at_once_and_close_writes_the_rest(loop, tmp_path):
    path = tmp_path / "access.log"
    log = AccessLog(loop, str(path), buffer=1000, flush=60)
    sizes = []
    for i in range(20):  # ~100 bytes a line: a write every ~10 lines
        log.access("127.0.0.1:1", "b", i, 0, 0.0, "client_eof")
        sizes.append(log.writes)
    first = sizes.index(1)
    assert 8 <= first <= 11 and sizes[-1] == 2, sizes
    assert all(len(line) for line in path.read_text().splitlines())
    held = 20 - len(path.read_text().splitlines())
    assert held > 0
    log.close()
    assert len(path.read_text().splitlines()) == 20 and log.lines_written == 20


def _exchange(addr) -> bytes:
    with socket.create_connection(addr, timeout=5) as c:
        c.sendall(b"hi")
        c.shutdown(socket.SHUT_WR)
        return recv_all(c)


def test_held_lines_are_written_on_reload_and_on_sigterm(spawn, tmp_path):
    """A buffered log loses nothing on the way out: SIGHUP (which reopens the
    file) and SIGTERM write what is held, long before ``flush`` would."""
    from tests.backends import ThreadServer
    from tests.helpers import wait_for

    def echo(conn) -> None:
        while data := conn.recv(65536):
            conn.sendall(data)
        conn.close()

    srv = ThreadServer(echo)
    path = tmp_path / "access.log"
    cfg = tmp_path / "g.toml"
    cfg.write_text(f'[gateway]\nlisten = "127.0.0.1:0"\naccess_log = "{path}"\n'
                   'access_log_buffer = 65536\naccess_log_flush = 60\n'
                   f'[admin]\nlisten = ""\n[[backend]]\naddress = "127.0.0.1:{srv.addr[1]}"\n')
    try:
        g = spawn("gateway", "--config", str(cfg))
        for _ in range(3):
            assert _exchange(g.addr) == b"hi"
        time.sleep(0.2)  # the gateway's side of the closes, and a turn or two after
        assert path.read_text() == ""  # held: neither full nor 60 s old
        g.signal(signal.SIGHUP)
        wait_for(lambda: len(path.read_text().splitlines()) == 3, timeout=5,
                 what="3 lines after SIGHUP")
        for _ in range(2):
            assert _exchange(g.addr) == b"hi"
        g.signal(signal.SIGTERM)
        assert g.wait(10) == 0
        rows = [LINE.match(x) for x in path.read_text().splitlines()]
        assert len(rows) == 5 and all(rows)
        assert [r.group(6) for r in rows] == ["client_eof"] * 5
    finally:
        srv.close()
