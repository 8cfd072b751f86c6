"""The loop's ordering guarantees, as traces (curio-style: append, then assert the whole list)."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time

import pytest

from reactor.loop import EPOLLIN, EPOLLOUT, Loop


@pytest.fixture
def loop():
    lp = Loop()
    yield lp
    lp.close()


def test_ready_queue_is_fifo_and_later_additions_wait_a_turn(loop):
    results = []

    def a():
        results.append("a")
        loop.call_soon(lambda: results.append("c (scheduled by a)"))

    loop.call_soon(a)
    loop.call_soon(lambda: results.append("b"))
    loop.call_soon(lambda: loop.call_soon(loop.stop))
    loop.run()
    assert results == ["a", "b", "c (scheduled by a)"]


def test_timers_fire_in_deadline_order_equal_deadlines_fifo(loop):
    results = []
    now = loop.time()
    loop.call_at(now + 0.03, results.append, "t30")
    loop.call_at(now + 0.01, results.append, "t10-first")
    loop.call_at(now + 0.01, results.append, "t10-second")
    loop.call_at(now + 0.01, results.append, "t10-third")
    loop.call_at(now + 0.02, results.append, "t20")
    loop.call_at(now + 0.04, loop.stop)
    loop.call_soon(results.append, "soon")
    loop.run()
    assert results == ["soon", "t10-first", "t10-second", "t10-third", "t20", "t30"]


def test_cancelled_handles_never_run(loop):
    results = []
    h1 = loop.call_soon(results.append, "cancelled-soon")
    h2 = loop.call_later(0.01, results.append, "cancelled-timer")
    loop.call_later(0.005, results.append, "kept")
    h1.cancel()
    loop.cancel_timer(h2)
    loop.call_later(0.03, loop.stop)
    loop.run()
    assert results == ["kept"]
    assert loop.statistics()["timers"] == 0


def test_mass_cancel_compacts_heap(loop):
    handles = [loop.call_later(100, lambda: None) for _ in range(1000)]
    for h in handles[:900]:
        loop.cancel_timer(h)
    # dead entries were shed: the heap is not carrying 900 corpses
    assert len(loop._timers) < 500
    assert loop.statistics()["timers"] == 100


def test_io_then_timers_then_ready_in_one_turn(loop):
    results = []
    a, b = socket.socketpair()
    try:
        b.send(b"x")

        def on_read(mask):
            results.append(("read", mask & EPOLLIN != 0))
            a.recv(1)
            loop.unregister(a.fileno())

        loop.register(a.fileno(), EPOLLIN, on_read)
        loop.call_soon(results.append, "ready")
        loop.call_at(loop.time() - 1, results.append, "overdue-timer")
        loop.call_later(0.02, loop.stop)
        loop.run()
    finally:
        a.close()
        b.close()
    # the first turn polls with timeout 0 (work is ready), dispatches I/O,
    # moves the overdue timer to the ready queue, then runs the ready queue
    assert results == [("read", True), "ready", "overdue-timer"]


def test_modify_changes_interest_without_reregistering(loop):
    results = []
    a, b = socket.socketpair()
    try:
        def on_event(mask):
            results.append("out" if mask & EPOLLOUT else "in")
            if mask & EPOLLOUT:
                loop.modify(a.fileno(), EPOLLIN)   # stop asking for writable
                b.send(b"!")
            else:
                loop.unregister(a.fileno())
                loop.stop()

        loop.register(a.fileno(), EPOLLOUT, on_event)
        loop.run()
    finally:
        a.close()
        b.close()
    assert results == ["out", "in"]


def test_signals_run_as_ordinary_callbacks(loop):
    results = []
    loop.add_signal_handler(signal.SIGHUP, lambda: results.append("hup"))
    loop.add_signal_handler(signal.SIGUSR1, lambda: (results.append("usr1"), loop.stop()))
    loop.call_soon(os.kill, os.getpid(), signal.SIGHUP)
    loop.call_later(0.02, os.kill, os.getpid(), signal.SIGUSR1)
    loop.call_later(5, loop.stop)  # safety net
    loop.run()
    assert results == ["hup", "usr1"]


def test_call_soon_threadsafe_wakes_a_blocked_loop(loop):
    results = []

    def from_thread():
        time.sleep(0.05)
        loop.call_soon_threadsafe(results.append, "from-thread")
        loop.call_soon_threadsafe(loop.stop)

    t = threading.Thread(target=from_thread)
    start = time.monotonic()
    t.start()
    loop.run()  # no timers, no I/O: blocks in epoll_wait until woken
    t.join()
    assert results == ["from-thread"]
    assert time.monotonic() - start < 2


def test_exception_in_callback_does_not_kill_loop(loop, caplog):
    results = []
    loop.call_soon(lambda: 1 / 0)
    loop.call_soon(results.append, "after")
    loop.call_soon(lambda: loop.call_soon(loop.stop))
    loop.run()
    assert results == ["after"]
    assert "callback_error" in caplog.text


def test_statistics_count_syscalls_and_lag(loop):
    loop.call_later(0.01, lambda: None)
    loop.call_later(0.02, loop.stop)
    loop.run()
    st = loop.statistics()
    assert st["iterations"] >= 2
    assert st["syscalls"]["epoll_wait"] == st["iterations"]
    assert st["lag_max"] >= 0
    assert st["ready"] == 0 and st["timers"] == 0
    assert set(st["syscalls"]) >= {"epoll_wait", "accept", "recv", "send", "connect", "shutdown", "close"}


def test_idle_loop_blocks_rather_than_spins(loop):
    loop.call_later(0.3, loop.stop)
    t0 = time.process_time()
    loop.run()
    cpu = time.process_time() - t0
    assert loop.statistics()["iterations"] <= 3
    assert cpu < 0.1


def test_stream_changes_epoll_mask_only_when_it_really_changes(loop):
    from reactor.stream import Stream

    a, b = socket.socketpair()

    class Sink:
        def data_received(self, view):
            pass

    st = Stream(loop, a, Sink())
    ctl = loop.syscalls["epoll_ctl"]
    trace = []
    for op in ("pause", "pause", "resume", "resume", "pause"):
        getattr(st, op + "_reading")()
        trace.append((op, loop.syscalls["epoll_ctl"] - ctl))
    # a repeated pause or resume is free: no epoll_ctl
    assert trace == [("pause", 1), ("pause", 1), ("resume", 2), ("resume", 2), ("pause", 3)]
    st.close()
    b.close()


def test_relayed_pairs_count_as_one_recv_and_one_send(loop):
    """The hot path counts a read-then-write once (``relayed``); through the
    mapping it is a recv and a send, exactly what the kernel saw -- for a
    small read (a cached view of the shared buffer), a large one, and EOF."""
    from reactor.stream import SMALL_VIEWS, Stream

    c_out, c_in = socket.socketpair()
    b_in, b_out = socket.socketpair()

    class P:
        def eof_received(self):
            pass

    a, b = Stream(loop, c_in, P()), Stream(loop, b_in, P())
    a.peer, b.peer = b, a
    before = dict(loop.syscalls)
    got = []
    for payload in (b"x" * 64, b"y" * (SMALL_VIEWS + 10), b"z" * 1024, b"w"):
        c_out.sendall(payload)
        loop.call_later(0.02, loop.stop)
        loop.run()
        got.append(b_out.recv(65536))
    c_out.shutdown(socket.SHUT_WR)
    loop.call_later(0.02, loop.stop)
    loop.run()
    after = dict(loop.syscalls)
    assert got == [b"x" * 64, b"y" * (SMALL_VIEWS + 10), b"z" * 1024, b"w"]
    # four relayed reads and the EOF's read; four writes
    assert after["recv"] - before["recv"] == 5
    assert after["send"] - before["send"] == 4
    assert loop.syscalls.relayed == 4
    assert a.bytes_in == b.bytes_out == 64 + SMALL_VIEWS + 10 + 1024 + 1
    # the mapping writes back through the same offset
    loop.syscalls["send"] += 1
    assert dict(loop.syscalls)["send"] == after["send"] + 1
    for s in (a, b):
        s.close()
    for s in (c_out, b_out):
        s.close()


def test_a_handler_keyerror_is_logged_even_after_it_dropped_its_fd(loop, caplog):
    # Two readable fds in one wait. The first handler unregisters the second fd
    # (its event is then skipped, silently: the fd is gone) and later raises a
    # KeyError of its own after dropping its own fd -- which must be logged, not
    # mistaken for the loop's lookup of an fd that is no longer registered.
    a, a_peer = socket.socketpair()
    b, b_peer = socket.socketpair()
    results = []

    def on_a(mask):
        results.append("a")
        loop.unregister(b.fileno())
        loop.unregister(a.fileno())
        loop.stop()
        {}["missing"]

    def on_b(mask):
        results.append("b")

    loop.register(a.fileno(), EPOLLIN, on_a)
    loop.register(b.fileno(), EPOLLIN, on_b)
    a_peer.send(b"x")
    b_peer.send(b"x")
    time.sleep(0.01)  # both readable before the wait
    with caplog.at_level("ERROR", logger="reactor.loop"):
        loop.run()
    # epoll reports them in registration order here; either way b never runs after a
    assert results in (["a"], ["b", "a"])
    errors = [r for r in caplog.records if "handler_error" in r.getMessage()]
    assert len(errors) == 1 and "KeyError: 'missing'" in caplog.text
    for s in (a, a_peer, b, b_peer):
        s.close()
