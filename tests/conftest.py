from __future__ import annotations

import pytest

from tests.helpers import Proc


@pytest.fixture
def spawn():
    """Start `python -m reactor ...` processes; every one is killed by pid afterwards."""
    procs: list[Proc] = []

    def _spawn(*args: str, **kw) -> Proc:
        p = Proc(list(args), **kw)
        procs.append(p)
        return p

    yield _spawn
    for p in procs:
        p.kill()
