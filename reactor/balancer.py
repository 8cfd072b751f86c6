"""Backends and load-balancing policies for the gateway: pure logic, no sockets, no loop.

The gateway owns the clock and the sockets; this module only answers "which backend for
this client, now?" and keeps the per-backend bookkeeping that answer depends on.

Policies (``Balancer.POLICIES``):

``random``
    Weighted random: the seed's policy, done with weights.
``round_robin``
    nginx's smooth weighted round robin (``ngx_http_upstream_get_peer``): every eligible
    backend gains its effective weight, the largest ``current_weight`` wins and pays back
    the total.  Deterministic; weights 5/1/1 give ``a a b a c a a`` rather than
    ``a a a a a b c``.
``least_conn``
    nginx's ``least_conn``: the smallest ``active / weight`` wins; ties are broken by the
    smooth round robin above, run over the tied backends only.
``p2c``
    Power of two random choices (Mitzenmacher; Envoy's ``LEAST_REQUEST`` with
    ``choice_count = 2``): the first candidate is drawn by weight, the second uniformly
    among the others, and the smaller ``active / weight`` wins (a tie goes to the first,
    so an idle pool degrades to weighted random).
``maglev``
    Consistent hashing of the client IP with a Maglev lookup table (Eisenbud et al.,
    NSDI 2016, pseudocode listing 1) and Envoy's weighted variant: a backend of weight w
    claims table slots w/max_weight times as often as the heaviest one.

Maglev choices, stated once here:

* Table size: a prime, default 65537 (Envoy's default).  The paper wants M well above
  100 x the number of backends for < 1 % imbalance; 65537 keeps that up to ~650 backends.
  Building it is pure Python (~30 ms for a handful of backends here) and happens only on
  a reload that changes the (address, weight) set or on switching to maglev -- never on
  the connection path.  ``Balancer.table_builds`` counts the builds.
* Hashes: ``offset`` and ``skip`` come from two BLAKE2b digests (different ``person``
  strings) of the backend's canonical address ``HOST:PORT``, and the client key is a
  BLAKE2b digest of the client IP text.  Never Python's salted ``hash()``: every process
  (``--workers N``, a restarted worker, a test subprocess) with the same backend set
  builds the same table and maps a client the same way.  Backends are sorted by address
  before the build, so the order of the config file does not matter either.
* Health changes do NOT rebuild the table.  A client whose slot belongs to a backend
  that is unavailable (unhealthy, ejected, draining) or excluded walks the table forward
  to the first usable backend.  So a backend going down moves only its own clients, each
  to a deterministic fallback, spread over the survivors roughly by their table share,
  and they all come back when it recovers.  (Envoy rebuilds from the healthy hosts, which
  also reshuffles a little of everyone else's traffic on every health flap.)
* A reload that really removes or reweights backends DOES rebuild, because the table
  must be a function of the configured set alone for processes to agree.  Maglev then
  keeps most, not all, of the survivors' clients in place (the paper's trade-off); the
  tests measure how many move.

Connection accounting: the gateway calls ``Balancer.on_connect(b)`` as soon as it starts
connecting to the backend ``pick`` returned (the same callback, before any I/O, so a burst
of accepts sees the growing ``active`` counts -- nginx increments ``conns`` inside its get
peer for the same reason) and ``Balancer.on_disconnect(b)`` exactly once when that backend
connection is gone, failed connects included.  ``bytes_in``/``bytes_out`` are plain
counters the relay adds to directly.

Passive ejection (nginx ``max_fails``/``fail_timeout``): ``max_fails`` failures with no
more than ``fail_timeout`` seconds between the first and the last eject the backend for
``fail_timeout`` seconds.  As in nginx, the backend comes back on probation: until a
success clears it, the next failure ejects it again at once.  Each failure also lowers the
backend's round-robin ``effective_weight`` by ``weight // max_fails``; round robin earns it
back by one per pick, so a flapping backend is eased back in (nginx again).
"""

from __future__ import annotations

import hashlib
import random
from bisect import bisect_right
from collections.abc import Collection, Iterable

__all__ = [
    "Backend",
    "Balancer",
    "DEFAULT_MAGLEV_TABLE_SIZE",
    "POLICIES",
    "STATES",
    "build_maglev_table",
    "format_address",
    "stable_hash64",
]

POLICIES: tuple[str, ...] = ("random", "round_robin", "least_conn", "p2c", "maglev")

DEFAULT_MAGLEV_TABLE_SIZE = 65537

STATES: tuple[str, ...] = ("up", "down", "ejected", "draining")

_KEY_PERSON = b"reactor-key"


def stable_hash64(data: str, person: bytes = _KEY_PERSON) -> int:
    """A 64-bit hash of ``data`` that is the same in every process (unlike ``hash()``)."""
    return int.from_bytes(
        hashlib.blake2b(data.encode(), digest_size=8, person=person).digest(), "little"
    )


def format_address(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    f = 3
    while f * f <= n:
        if n % f == 0:
            return False
        f += 2
    return True


class Backend:
    """One upstream server: its configuration, counters and health.

    Identity matters: the balancer and the gateway share these objects, and a reload keeps
    the object of every backend whose address survives, so counters and health carry over.
    Equality and hashing are therefore by identity (the default).
    """

    __slots__ = (
        "address",
        "name",
        "weight",
        "send_proxy",
        # counters
        "active",
        "total",
        "failures_total",
        "bytes_in",
        "bytes_out",
        # health
        "healthy",
        "ejected_until",
        "draining",
        # passive-ejection bookkeeping
        "fails",
        "fail_since",
        # smooth weighted round robin state (round_robin, least_conn ties)
        "current_weight",
        "effective_weight",
    )

    def __init__(
        self,
        address: tuple[str, int],
        name: str = "",
        weight: int = 1,
        send_proxy: str = "",
    ) -> None:
        host, port = address
        if not isinstance(weight, int) or isinstance(weight, bool) or weight < 1:
            raise ValueError(f"backend {format_address(address)}: weight must be an integer >= 1")
        self.address: tuple[str, int] = (host, int(port))
        self.name: str = name or format_address(self.address)
        self.weight: int = weight
        self.send_proxy: str = send_proxy
        self.active = 0
        self.total = 0
        self.failures_total = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.healthy = True
        self.ejected_until = 0.0
        self.draining = False
        self.fails = 0
        self.fail_since = 0.0
        self.current_weight = 0
        self.effective_weight = weight

    def __repr__(self) -> str:
        return f"<Backend {self.name} {format_address(self.address)} w={self.weight} active={self.active}>"

    def available(self, now: float) -> bool:
        """May take a new connection: healthy, not draining, not ejected."""
        return self.healthy and not self.draining and now >= self.ejected_until

    def state(self, now: float) -> str:
        """``draining`` > ``down`` (active check failed) > ``ejected`` (passive) > ``up``."""
        if self.draining:
            return "draining"
        if not self.healthy:
            return "down"
        if now < self.ejected_until:
            return "ejected"
        return "up"

    def record_failure(self, now: float, max_fails: int, fail_timeout: float) -> bool:
        """Count a failed connect; True if this very failure ejected the backend.

        ``max_fails <= 0`` disables ejection (the failure is still counted in
        ``failures_total``).  A failure while already ejected (several connects were in
        flight) extends nothing and returns False.
        """
        self.failures_total += 1
        if max_fails <= 0:
            return False
        self.effective_weight = max(0, self.effective_weight - self.weight // max_fails)
        if now < self.ejected_until:
            return False
        if self.fails >= max_fails:
            # Probation after an ejection: one failure is enough (nginx: fails stays
            # >= max_fails until a success resets it).
            self.ejected_until = now + fail_timeout
            self.fail_since = now
            return True
        if self.fails == 0 or now - self.fail_since > fail_timeout:
            self.fails = 0
            self.fail_since = now
        self.fails += 1
        if self.fails >= max_fails:
            self.ejected_until = now + fail_timeout
            return True
        return False

    def record_success(self, now: float) -> None:
        """A connect succeeded: forget past failures (ends probation)."""
        self.fails = 0

    def as_dict(self, now: float) -> dict[str, object]:
        """A JSON-ready snapshot for ``/stats`` and ``--json``."""
        return {
            "name": self.name,
            "address": format_address(self.address),
            "weight": self.weight,
            "state": self.state(now),
            "active": self.active,
            "total": self.total,
            "failures_total": self.failures_total,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "ejected_for": max(0.0, self.ejected_until - now),
        }


class Balancer:
    """Picks a backend per connection under one of ``POLICIES``.

    Not thread-safe, by design: it lives on one reactor loop.
    """

    POLICIES = POLICIES

    def __init__(
        self,
        backends: Iterable[Backend],
        policy: str,
        rng: random.Random | None = None,
        *,
        table_size: int = DEFAULT_MAGLEV_TABLE_SIZE,
    ) -> None:
        if not _is_prime(table_size):
            raise ValueError(f"maglev table size must be a prime, not {table_size}")
        self.rng = rng if rng is not None else random.Random()
        self.table_size = table_size
        self.backends: list[Backend] = []
        self._cum: list[int] = []
        self._total_weight = 0
        self._table: list[Backend] = []
        self._table_sig: tuple[tuple[str, int], ...] | None = None
        self.table_builds = 0
        self.policy = ""
        self._check_policy(policy)
        self.set_backends(backends)
        self.set_policy(policy)

    # -- configuration -----------------------------------------------------------------

    @staticmethod
    def _check_policy(name: str) -> None:
        if name not in POLICIES:
            raise ValueError(f"unknown balancing policy {name!r} (one of: {', '.join(POLICIES)})")

    def set_policy(self, name: str) -> None:
        """Switch policy; round-robin state restarts, a maglev table is built if needed."""
        self._check_policy(name)
        self.policy = name
        # ``pick`` is the policy's method itself, set on the instance: going
        # through the class's ``pick`` (its documentation) would be a call more
        # per connection
        self.pick = getattr(self, "_pick_" + name)
        for b in self.backends:
            b.current_weight = 0
            b.effective_weight = b.weight
        if name == "maglev":
            self._ensure_table()

    def set_backends(self, backends: Iterable[Backend]) -> list[Backend]:
        """Install a new backend list (a reload); returns the backends that left it.

        A new entry whose address matches a current backend is replaced by that current
        object, updated with the new name, weight and send_proxy, so its counters and
        health survive.  Removed backends are returned untouched: the gateway marks them
        ``draining`` and lets their connections finish.  The maglev table is rebuilt only
        if the set of (address, weight) pairs changed.
        """
        current = {b.address: b for b in self.backends}
        kept: list[Backend] = []
        seen: set[tuple[str, int]] = set()
        for new in backends:
            if new.address in seen:
                raise ValueError(f"duplicate backend address {format_address(new.address)}")
            seen.add(new.address)
            old = current.pop(new.address, None)
            if old is None:
                kept.append(new)
                continue
            old.name = new.name
            old.send_proxy = new.send_proxy
            if old.weight != new.weight:
                old.weight = new.weight
                old.effective_weight = new.weight
                old.current_weight = 0
            kept.append(old)
        removed = [b for b in self.backends if b.address in current]
        self.backends = kept
        self._cum = []
        total = 0
        for b in kept:
            total += b.weight
            self._cum.append(total)
        self._total_weight = total
        if self.policy == "maglev":
            self._ensure_table()
        return removed

    # -- connection accounting ---------------------------------------------------------

    @staticmethod
    def on_connect(backend: Backend) -> None:
        """The gateway starts a connection to ``backend`` (call right after ``pick``)."""
        backend.active += 1
        backend.total += 1

    @staticmethod
    def on_disconnect(backend: Backend) -> None:
        """That backend connection is gone (closed, or its connect failed)."""
        if backend.active > 0:
            backend.active -= 1

    # -- picking -----------------------------------------------------------------------

    def pick(
        self, client_ip: str, now: float, exclude: Collection[Backend] = ()
    ) -> Backend | None:
        """The backend for a new connection from ``client_ip``, or None if none is usable.

        Only backends that are ``available(now)`` and not in ``exclude`` are considered;
        the gateway passes the backends that already failed this connection when it
        retries.  ``exclude`` is tested with ``in``: pass a set for more than a couple.
        (``set_policy`` puts the policy's ``_pick_<name>`` method here, on the instance.)
        """
        return getattr(self, "_pick_" + self.policy)(client_ip, now, exclude)

    def _eligible(self, now: float, exclude: Collection[Backend]) -> list[Backend]:
        return [
            b
            for b in self.backends
            if b.healthy and not b.draining and now >= b.ejected_until and b not in exclude
        ]

    def _pick_random(self, client_ip: str, now: float, exclude: Collection[Backend] = ()) -> Backend | None:
        backends = self.backends
        if not backends:
            return None
        # Fast path: a weighted draw over everyone, kept if usable.  If not, a weighted
        # draw over the usable ones; together that is exactly weight-proportional among
        # the usable backends.
        b = backends[bisect_right(self._cum, self.rng.random() * self._total_weight)]
        if b.healthy and not b.draining and now >= b.ejected_until and b not in exclude:
            return b
        eligible = self._eligible(now, exclude)
        if not eligible:
            return None
        return self.rng.choices(eligible, [e.weight for e in eligible])[0]

    def _pick_round_robin(self, client_ip: str, now: float, exclude: Collection[Backend] = ()) -> Backend | None:
        best = None
        best_cw = total = 0
        for b in self.backends:
            if not b.healthy or b.draining or now < b.ejected_until or b in exclude:
                continue
            ew = b.effective_weight
            b.current_weight = cw = b.current_weight + ew
            total += ew
            if ew < b.weight:
                b.effective_weight = ew + 1
            if best is None or cw > best_cw:
                best = b
                best_cw = cw
        if best is not None:
            best.current_weight = best_cw - total
        return best

    def _pick_least_conn(self, client_ip: str, now: float, exclude: Collection[Backend] = ()) -> Backend | None:
        best = None
        many = False
        for b in self.backends:
            if not b.healthy or b.draining or now < b.ejected_until or b in exclude:
                continue
            if best is None:
                best = b
                continue
            # b.active / b.weight < best.active / best.weight, without division
            lhs = b.active * best.weight
            rhs = best.active * b.weight
            if lhs < rhs:
                best = b
                many = False
            elif lhs == rhs:
                many = True
        if not many or best is None:
            return best
        # Several share the least load: smooth weighted round robin among exactly those.
        ref_active, ref_weight = best.active, best.weight
        winner = None
        total = 0
        for b in self.backends:
            if not b.healthy or b.draining or now < b.ejected_until or b in exclude:
                continue
            if b.active * ref_weight != ref_active * b.weight:
                continue
            ew = b.effective_weight
            b.current_weight += ew
            total += ew
            if ew < b.weight:
                b.effective_weight = ew + 1
            if winner is None or b.current_weight > winner.current_weight:
                winner = b
        assert winner is not None
        winner.current_weight -= total
        return winner

    def _pick_p2c(self, client_ip: str, now: float, exclude: Collection[Backend] = ()) -> Backend | None:
        backends = self.backends
        n = len(backends)
        if n == 0:
            return None
        rng = self.rng
        if n > 1:
            i = bisect_right(self._cum, rng.random() * self._total_weight)
            j = int(rng.random() * (n - 1))
            if j >= i:
                j += 1
            a = backends[i]
            b = backends[j]
            if (
                a.healthy and not a.draining and now >= a.ejected_until and a not in exclude
                and b.healthy and not b.draining and now >= b.ejected_until and b not in exclude
            ):
                return b if b.active * a.weight < a.active * b.weight else a
        else:
            a = backends[0]
            if a.healthy and not a.draining and now >= a.ejected_until and a not in exclude:
                return a
            return None
        # Some candidate was unusable: the same draw among the usable ones.
        eligible = self._eligible(now, exclude)
        if len(eligible) < 2:
            return eligible[0] if eligible else None
        a = rng.choices(eligible, [e.weight for e in eligible])[0]
        b = eligible[int(rng.random() * (len(eligible) - 1))]
        if b is a:
            b = eligible[-1]
        return b if b.active * a.weight < a.active * b.weight else a

    def _pick_maglev(self, client_ip: str, now: float, exclude: Collection[Backend] = ()) -> Backend | None:
        table = self._table
        if not table:
            return None
        size = self.table_size
        slot = int.from_bytes(
            hashlib.blake2b(client_ip.encode(), digest_size=8, person=_KEY_PERSON).digest(),
            "little",
        ) % size
        b = table[slot]
        if b.healthy and not b.draining and now >= b.ejected_until and b not in exclude:
            return b
        # Walk forward to the first usable backend; check one exists so that an all-down
        # pool costs O(backends), not a walk over the whole table.
        for c in self.backends:
            if c.healthy and not c.draining and now >= c.ejected_until and c not in exclude:
                break
        else:
            return None
        while True:
            slot += 1
            if slot == size:
                slot = 0
            b = table[slot]
            if b.healthy and not b.draining and now >= b.ejected_until and b not in exclude:
                return b

    # -- maglev table ------------------------------------------------------------------

    def _ensure_table(self) -> None:
        sig = tuple(sorted((format_address(b.address), b.weight) for b in self.backends))
        if sig == self._table_sig:
            return
        self._table = build_maglev_table(self.backends, self.table_size)
        self._table_sig = sig
        self.table_builds += 1

    def maglev_owner(self, client_ip: str) -> Backend | None:
        """The table's owner of ``client_ip``, ignoring health (for tests and ``/stats``)."""
        if self.policy != "maglev" or not self._table:
            return None
        return self._table[stable_hash64(client_ip) % self.table_size]


def build_maglev_table(backends: Iterable[Backend], size: int) -> list[Backend]:
    """Maglev lookup table (paper listing 1) with Envoy's weighting; ``size`` is prime.

    Each backend walks its own permutation ``offset + k * skip (mod size)`` and claims
    the first free slot; a backend of weight w takes a turn in w of every max_weight
    rounds, so slot counts follow the weights.
    """
    entries = []
    for b in sorted(backends, key=lambda b: format_address(b.address)):
        key = format_address(b.address)
        offset = stable_hash64(key, b"maglev-offset") % size
        skip = stable_hash64(key, b"maglev-skip") % (size - 1) + 1
        # [backend, weight, next slot to try, skip, turn credit]
        entries.append([b, b.weight, offset, skip, 0])
    if not entries:
        return []
    max_weight = max(e[1] for e in entries)
    owner: list[Backend | None] = [None] * size
    filled = 0
    iteration = 0
    while filled < size:
        iteration += 1
        for e in entries:
            # Envoy: take a turn when iteration * weight >= target, target += max_weight.
            if iteration * e[1] < e[4]:
                continue
            e[4] += max_weight
            c = e[2]
            skip = e[3]
            while owner[c] is not None:
                c += skip
                if c >= size:
                    c -= size
            owner[c] = e[0]
            c += skip
            if c >= size:
                c -= size
            e[2] = c
            filled += 1
            if filled == size:
                break
    return owner  # type: ignore[return-value]
