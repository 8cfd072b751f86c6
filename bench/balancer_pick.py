"""Micro-benchmark: cost of one ``Balancer.pick`` per policy (it runs once per connection).

    .venv/bin/python bench/balancer_pick.py [--picks N]

Prints microseconds per pick (best of 5 runs) for a few pool sizes, all backends up, and
with one backend down (the slow paths).  Figures, not assertions: the machine is shared.
"""

from __future__ import annotations

import argparse
import random
import time

from tabulate import tabulate

from reactor.balancer import POLICIES, Backend, Balancer


def per_pick_us(bal: Balancer, ips: list[str], picks: int) -> float:
    best = float("inf")
    pick = bal.pick
    n = len(ips)
    for _ in range(5):
        t0 = time.perf_counter()
        for k in range(picks):
            pick(ips[k % n], 0.0)
        best = min(best, time.perf_counter() - t0)
    return best / picks * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--picks", type=int, default=20_000)
    args = ap.parse_args()
    rng = random.Random(1)
    ips = [
        f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}" for _ in range(4096)
    ]
    rows = []
    for size in (3, 10, 50):
        for policy in POLICIES:
            backends = [Backend((f"192.0.2.{i + 1}", 7000), weight=1 + i % 3) for i in range(size)]
            bal = Balancer(backends, policy, rng=random.Random(2))
            up = per_pick_us(bal, ips, args.picks)
            backends[0].healthy = False
            one_down = per_pick_us(bal, ips, args.picks)
            rows.append((size, policy, f"{up:.2f}", f"{one_down:.2f}"))
    print(tabulate(rows, headers=("backends", "policy", "us/pick all up", "us/pick one down")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
