"""The access log: a turn's lines in one write, the old line format, errors never raised."""

from __future__ import annotations

import os
import re
import signal

import pytest

from reactor.accesslog import AccessLog
from reactor.errors import UsageError
from reactor.loop import Loop

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
