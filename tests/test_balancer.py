"""Balancer policies, passive ejection, reload and maglev stability.

Every random thing is seeded so a failure reproduces, but each tolerance below was chosen
against a sweep of 300 seeds (100 for maglev) and is about 1.5x the worst deviation seen
there, so the assertions are not tuned to one lucky seed.
"""

from __future__ import annotations

import heapq
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from reactor.balancer import (
    POLICIES,
    Backend,
    Balancer,
    build_maglev_table,
    stable_hash64,
)

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parent.parent

# Percentage points around the expected 25/25/50 split.  round_robin is exact by
# construction.  The others: worst deviation over the seed sweep was random 2.6,
# least_conn 2.3, p2c 2.5, maglev 2.3.
TOLERANCE_PP = {"random": 4.0, "round_robin": 0.0, "least_conn": 4.0, "p2c": 4.0, "maglev": 4.0}

# Connections in the load simulation stay open for 1..HOLD_MAX later picks (~30 open on
# average).  least_conn and p2c balance *open* connections, so at very low concurrency
# they are meant to spread past the weights (one connection on a weight-2 backend still
# loses to zero on a weight-1 one): with HOLD_MAX=5 the weight-2 backend gets ~42 %, at
# 60 ~49 %, at 200 ~49.7 %.  That is the policy, not noise, hence a realistic HOLD_MAX.
HOLD_MAX = 60


def random_ip(rng: random.Random) -> str:
    return f"{rng.randrange(1, 224)}.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"


def distinct_ips(rng: random.Random, n: int) -> list[str]:
    ips: set[str] = set()
    while len(ips) < n:
        ips.add(random_ip(rng))
    return sorted(ips)


def make_backends(weights, prefix="10.0.0.") -> list[Backend]:
    return [Backend((f"{prefix}{i + 1}", 7000), weight=w) for i, w in enumerate(weights)]


def simulate(bal: Balancer, n: int, rng: random.Random, hold_max: int = HOLD_MAX, ips=None) -> dict:
    """n connections; each stays open for a random number of later picks."""
    counts = {b: 0 for b in bal.backends}
    open_conns: list[tuple[int, int, Backend]] = []
    for k in range(n):
        while open_conns and open_conns[0][0] <= k:
            _, _, done = heapq.heappop(open_conns)
            bal.on_disconnect(done)
        ip = ips[k] if ips is not None else random_ip(rng)
        b = bal.pick(ip, 0.0)
        assert b is not None
        bal.on_connect(b)
        counts[b] += 1
        heapq.heappush(open_conns, (k + rng.randint(1, hold_max), k, b))
    return counts


@pytest.mark.parametrize("policy", POLICIES)
def test_distribution_follows_weights(policy):
    seed = 20240
    backends = make_backends([1, 1, 2])
    bal = Balancer(backends, policy, rng=random.Random(seed))
    rng = random.Random(seed + 1)
    ips = distinct_ips(rng, 3000) if policy == "maglev" else None
    if ips is not None:
        rng.shuffle(ips)
    counts = simulate(bal, 3000, rng, ips=ips)
    shares = [100.0 * counts[b] / 3000 for b in backends]
    print(f"{policy}: shares % = {[round(s, 2) for s in shares]}")
    tol = TOLERANCE_PP[policy]
    for share, expected in zip(shares, (25.0, 25.0, 50.0), strict=True):
        assert abs(share - expected) <= tol, (policy, shares)
    # Every connection was closed again, and accounted for.
    assert all(b.active >= 0 for b in backends)
    assert sum(b.total for b in backends) == 3000


def test_round_robin_is_nginx_smooth_sequence():
    a, b, c = (Backend((f"10.0.0.{i}", 80), name=n, weight=w)
               for i, (n, w) in enumerate([("a", 5), ("b", 1), ("c", 1)], 1))
    bal = Balancer([a, b, c], "round_robin")
    seq = "".join(bal.pick("1.2.3.4", 0.0).name for _ in range(14))
    # The interleaving documented for nginx's smooth weighted round robin.
    assert seq == "aabacaa" * 2


def test_round_robin_skips_unavailable_and_eases_failed_back_in():
    a, b = make_backends([10, 10])
    bal = Balancer([a, b], "round_robin")
    b.healthy = False
    assert {bal.pick("x", 0.0) for _ in range(10)} == {a}
    b.healthy = True
    # max_fails=1: one failure ejects and drops the effective weight by weight // 1 to 0.
    assert b.record_failure(1.0, max_fails=1, fail_timeout=5.0) is True
    assert b.effective_weight == 0
    picks = [bal.pick("x", 6.0) for _ in range(60)]
    # Back after the ejection, b earns its weight back one pick at a time (nginx) ...
    assert picks[:10].count(b) <= 3
    assert b.effective_weight == 10
    # ... and then gets its full half.
    assert picks[-20:].count(b) == 10


def test_least_conn_prefers_lowest_active_per_weight_and_ties_by_weighted_rr():
    a, b, c = make_backends([1, 1, 2])
    bal = Balancer([a, b, c], "least_conn")
    a.active, b.active, c.active = 3, 2, 5  # ratios 3, 2, 2.5
    assert bal.pick("x", 0.0) is b
    a.active, b.active, c.active = 2, 2, 4  # all tied at 2: weighted round robin
    picks = [bal.pick("x", 0.0) for _ in range(8)]
    assert picks.count(c) == 4 and picks.count(a) == 2 and picks.count(b) == 2


def test_p2c_never_picks_the_loaded_backend_when_others_are_idle():
    backends = make_backends([1, 1, 1])
    bal = Balancer(backends, "p2c", rng=random.Random(3))
    backends[1].active = 50
    picks = {bal.pick("x", 0.0) for _ in range(500)}
    # Two distinct candidates: the loaded one always meets a less loaded rival.
    assert picks == {backends[0], backends[2]}


# -- passive ejection ----------------------------------------------------------------------


def test_max_fails_within_fail_timeout_ejects_then_recovers():
    b = Backend(("10.0.0.1", 7000))
    assert b.record_failure(0.0, max_fails=3, fail_timeout=10.0) is False
    assert b.record_failure(1.0, 3, 10.0) is False
    assert b.available(1.5) and b.state(1.5) == "up"
    assert b.record_failure(2.0, 3, 10.0) is True
    assert not b.available(2.0) and b.state(2.0) == "ejected"
    assert not b.available(11.9)
    # A failure of a connect still in flight does not eject it twice nor extend it.
    assert b.record_failure(5.0, 3, 10.0) is False
    assert b.ejected_until == 12.0
    assert b.available(12.0) and b.state(12.0) == "up"
    # Back on probation: one more failure ejects again at once (nginx semantics) ...
    assert b.record_failure(13.0, 3, 10.0) is True
    assert b.state(20.0) == "ejected" and b.available(23.0)
    # ... until a success clears the slate.
    b.record_success(24.0)
    assert b.record_failure(25.0, 3, 10.0) is False
    assert b.available(25.0)
    assert b.failures_total == 6


def test_failures_spread_wider_than_fail_timeout_do_not_eject():
    b = Backend(("10.0.0.1", 7000))
    assert b.record_failure(0.0, 3, 10.0) is False
    assert b.record_failure(5.0, 3, 10.0) is False
    assert b.record_failure(10.5, 3, 10.0) is False  # window 0..10 has closed; restart
    assert b.record_failure(12.0, 3, 10.0) is False
    assert b.available(12.0)
    assert b.record_failure(13.0, 3, 10.0) is True  # 10.5, 12, 13: three within 10 s


def test_max_fails_zero_disables_ejection():
    b = Backend(("10.0.0.1", 7000))
    assert not any(b.record_failure(float(t), 0, 10.0) for t in range(100))
    assert b.available(100.0) and b.failures_total == 100


@pytest.mark.parametrize("policy", POLICIES)
def test_pick_skips_ejected_unhealthy_draining_and_none_when_all_down(policy):
    up, ejected, down, draining = make_backends([1, 1, 1, 1])
    bal = Balancer([up, ejected, down, draining], policy, rng=random.Random(5))
    ejected.ejected_until = 100.0
    down.healthy = False
    draining.draining = True
    assert [b.state(50.0) for b in (up, ejected, down, draining)] == [
        "up", "ejected", "down", "draining"]
    rng = random.Random(6)
    assert {bal.pick(random_ip(rng), 50.0) for _ in range(300)} == {up}
    # The ejection expires: ejected is back in the rotation.
    got = {bal.pick(random_ip(rng), 100.0) for _ in range(300)}
    assert got == {up, ejected}
    up.healthy = False
    ejected.ejected_until = 1e9
    assert bal.pick("1.2.3.4", 100.0) is None
    assert Balancer([], policy).pick("1.2.3.4", 0.0) is None


@pytest.mark.parametrize("policy", POLICIES)
def test_exclude(policy):
    backends = make_backends([1, 2, 3, 1])
    bal = Balancer(backends, policy, rng=random.Random(9))
    rng = random.Random(10)
    excluded = {backends[1], backends[2]}
    got = {bal.pick(random_ip(rng), 0.0, excluded) for _ in range(400)}
    assert got == {backends[0], backends[3]}
    # exclude and ill health combine
    backends[0].healthy = False
    assert {bal.pick(random_ip(rng), 0.0, excluded) for _ in range(50)} == {backends[3]}
    assert bal.pick("1.2.3.4", 0.0, backends) is None
    assert bal.pick("1.2.3.4", 0.0, (backends[3],)) in {backends[1], backends[2]}


# -- reload --------------------------------------------------------------------------------


def test_set_backends_keeps_objects_returns_removed():
    a, b, c = make_backends([1, 1, 1])
    bal = Balancer([a, b, c], "maglev")
    builds = bal.table_builds
    a.active, a.total, a.ejected_until = 2, 10, 99.0
    fresh_a = Backend(a.address, name="alpha", weight=1, send_proxy="v2")
    d = Backend(("10.0.0.9", 7000))
    removed = bal.set_backends([fresh_a, c, d])
    assert removed == [b]
    assert bal.backends[0] is a and bal.backends[1] is c and bal.backends[2] is d
    assert (a.name, a.send_proxy, a.active, a.total, a.ejected_until) == ("alpha", "v2", 2, 10, 99.0)
    assert bal.table_builds == builds + 1
    # Same set again (new objects, same addresses and weights): no rebuild.
    bal.set_backends([Backend(x.address) for x in (a, c, d)])
    assert bal.table_builds == builds + 1
    # A health flap does not rebuild either; a weight change does.
    c.healthy = False
    bal.pick("1.2.3.4", 0.0)
    assert bal.table_builds == builds + 1
    bal.set_backends([Backend(a.address, weight=3), Backend(c.address), Backend(d.address)])
    assert a.weight == 3 and bal.table_builds == builds + 2
    with pytest.raises(ValueError, match="duplicate"):
        bal.set_backends([Backend(a.address), Backend(a.address)])


def test_set_policy_and_validation():
    backends = make_backends([1, 2])
    bal = Balancer(backends, "random")
    assert bal.table_builds == 0
    bal.set_policy("maglev")
    assert bal.policy == "maglev" and bal.table_builds == 1
    bal.set_policy("round_robin")
    assert [bal.pick("x", 0.0) for _ in range(3)].count(backends[1]) == 2
    with pytest.raises(ValueError, match="unknown balancing policy"):
        bal.set_policy("fastest")
    with pytest.raises(ValueError, match="prime"):
        Balancer(backends, "maglev", table_size=65536)
    with pytest.raises(ValueError, match="weight"):
        Backend(("10.0.0.1", 1), weight=0)


def test_connection_accounting():
    (b,) = make_backends([1])
    Balancer.on_connect(b)
    Balancer.on_connect(b)
    Balancer.on_disconnect(b)
    assert (b.active, b.total) == (1, 2)
    Balancer.on_disconnect(b)
    Balancer.on_disconnect(b)  # a double close must not drive it negative
    assert b.active == 0


# -- maglev --------------------------------------------------------------------------------


def test_maglev_table_weights_and_determinism():
    backends = make_backends([1, 1, 2])
    table = build_maglev_table(backends, 65537)
    counts = [sum(1 for t in table if t is b) for b in backends]
    assert sum(counts) == 65537
    assert counts[2] / 65537 == pytest.approx(0.5, abs=0.01)
    assert counts[0] / 65537 == pytest.approx(0.25, abs=0.01)
    # The config's order does not matter.
    again = build_maglev_table(list(reversed(backends)), 65537)
    assert again == table


def _five():
    return [Backend((f"10.1.0.{i}", 7000)) for i in range(1, 6)]


def test_maglev_backend_down_moves_only_its_own_keys():
    backends = _five()
    bal = Balancer(backends, "maglev")
    ips = distinct_ips(random.Random(11), 10_000)
    before = {ip: bal.pick(ip, 0.0) for ip in ips}
    victim = backends[2]
    victim.healthy = False
    after = {ip: bal.pick(ip, 0.0) for ip in ips}
    moved = [ip for ip in ips if after[ip] is not before[ip]]
    print(f"maglev, 1 of 5 down: moved {100 * len(moved) / len(ips):.2f}% of keys")
    assert len(moved) <= 0.25 * len(ips)
    assert all(before[ip] is victim for ip in moved)  # survivors' keys stay put
    assert all(after[ip] is not victim for ip in ips)
    # The orphans spread over all survivors, not onto one neighbour.
    spread = {b: sum(1 for ip in moved if after[ip] is b) for b in backends if b is not victim}
    print(f"orphans per survivor: {sorted(spread.values())}")
    assert all(0.15 * len(moved) <= n <= 0.35 * len(moved) for n in spread.values())
    # Deterministic fallback, and excluding behaves like being down.
    victim.healthy = True
    for ip in moved[:200]:
        assert bal.pick(ip, 0.0, (victim,)) is after[ip]
        assert bal.pick(ip, 0.0) is victim


def test_maglev_reload_without_a_backend_moves_few_survivor_keys():
    backends = _five()
    bal = Balancer(backends, "maglev")
    ips = distinct_ips(random.Random(12), 10_000)
    before = {ip: bal.pick(ip, 0.0) for ip in ips}
    victim = backends[2]
    assert bal.set_backends([b for b in backends if b is not victim]) == [victim]
    after = {ip: bal.pick(ip, 0.0) for ip in ips}
    moved = sum(1 for ip in ips if after[ip] is not before[ip])
    survivors_moved = sum(1 for ip in ips if before[ip] is not victim and after[ip] is not before[ip])
    print(f"maglev, 1 of 5 removed by reload: moved {100 * moved / len(ips):.2f}%, "
          f"of them from survivors {100 * survivors_moved / len(ips):.2f}%")
    assert moved <= 0.25 * len(ips)
    # A rebuilt Maglev table is only nearly stable for survivors (the paper's trade-off).
    assert survivors_moved <= 0.01 * len(ips)


_CHILD = """
import json, sys
from reactor.balancer import Backend, Balancer
spec = json.loads(sys.stdin.read())
bal = Balancer([Backend((h, p), weight=w) for h, p, w in spec["backends"]], "maglev")
print(json.dumps({"hash": hash("reactor"),
                  "map": [bal.pick(ip, 0.0).name for ip in spec["ips"]]}))
"""


def test_maglev_same_mapping_across_instances_and_processes():
    spec_backends = [(f"10.2.0.{i}", 9000 + i, w) for i, w in enumerate([1, 3, 2, 1], 1)]
    ips = distinct_ips(random.Random(13), 2000)

    def build():
        return Balancer([Backend((h, p), weight=w) for h, p, w in spec_backends], "maglev")

    one, two = build(), build()
    local = [one.pick(ip, 0.0).name for ip in ips]
    assert local == [two.pick(ip, 0.0).name for ip in ips]

    results = []
    for hashseed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=hashseed,
                   PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD],
            input=json.dumps({"backends": spec_backends, "ips": ips}),
            capture_output=True, text=True, env=env, timeout=30, check=True,
        )
        results.append(json.loads(proc.stdout))
    # The children really had differently salted str hashes ...
    assert results[0]["hash"] != results[1]["hash"]
    # ... and still agree with each other and with us.
    assert results[0]["map"] == local
    assert results[1]["map"] == local


def test_stable_hash_is_pinned():
    # Pinned values: changing the hash would remap every client of a running fleet on
    # upgrade, so it must be a deliberate, visible decision.
    assert stable_hash64("192.0.2.1") == 5622590545635415359
    assert stable_hash64("2001:db8::1") == 12895867909343854518
