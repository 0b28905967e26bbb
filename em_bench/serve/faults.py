"""Fault injection: a policy wrapper that fails the way a real provider does (rate limits,
server errors, slow and broken replies), reproducibly, and counts the requests in flight."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter, deque
from collections.abc import Iterable, Mapping
from typing import Any

from em_bench.errors import ConfigError
from em_bench.serve.policies import Policy
from em_bench.serve.protocol import ChatRequest, Fault, Reply, error_body

FAULT_KINDS = ("rate_limit", "server_error", "slow", "malformed")


def check_faults(rates: Mapping[str, float], delay: float = 1.0, latency: float = 0.0,
                 retry_after: int = 1, queue: Iterable[str | None] = ()) -> None:
    """ValueError unless these are FaultInjector settings it can run with."""
    unknown = (set(rates) | set(queue)) - set(FAULT_KINDS) - {None}
    if unknown:
        raise ValueError(f"unknown fault kinds {sorted(map(str, unknown))}; known: {FAULT_KINDS}")
    if any(r < 0 for r in rates.values()) or sum(rates.values()) > 1:
        raise ValueError(f"fault rates must be >= 0 and sum to at most 1; got {dict(rates)}")
    if min(delay, latency, retry_after) < 0:
        raise ValueError("the fault delay, latency and Retry-After must be >= 0")


def parse_faults(specs: Iterable[str]) -> dict[str, float]:
    """`serve --fault KIND=RATE` flags as FaultInjector rates; ConfigError naming a bad one."""
    rates: dict[str, float] = {}
    for spec in specs:
        kind, _, rate = spec.partition("=")
        try:
            if kind in rates:
                raise ValueError("given twice")
            rates[kind] = float(rate)
        except ValueError as e:
            raise ConfigError(f"--fault {spec!r}: {e}; expected KIND=RATE with a KIND of "
                              f"{', '.join(FAULT_KINDS)} and a RATE from 0 to 1") from None
    return rates


class FaultInjector:
    """Wraps a policy with the failures a real provider has, reproducibly, and watches load.

    Per request, one draw from a seeded RNG (taken in arrival order, under a lock) picks a fault
    with the probabilities in `rates` (keys from FAULT_KINDS, summing to at most 1), else a
    plain answer. A `queue` of fault kinds (None: a plain answer) comes first: its entries go to
    the first requests, one each in arrival order, and only the requests after them draw (so a
    test knows exactly how many faults of each kind it gets, whatever the timing):
      rate_limit   -> 429 with `Retry-After: retry_after` (seconds)
      server_error -> 500
      slow         -> sleep `delay` seconds, then the inner policy's answer
      malformed    -> 200 with a JSON content type and a body that is not JSON
    Every request also sleeps `latency` seconds first, so concurrent requests overlap for a
    concurrency benchmark. `injected` counts faults by kind; `peak_in_flight` is the most
    requests ever inside `respond` at once, so a test can assert a client kept to its bound.
    The model list and adapter routes are the inner policy's, without faults.
    """

    def __init__(self, inner: Policy, rates: Mapping[str, float], seed: int = 0,
                 delay: float = 1.0, latency: float = 0.0, retry_after: int = 1,
                 queue: Iterable[str | None] = ()):
        queue = list(queue)
        check_faults(rates, delay, latency, retry_after, queue)
        self.inner, self.name = inner, inner.name
        self.rates = {k: rates.get(k, 0.0) for k in FAULT_KINDS}
        self.delay, self.latency, self.retry_after = delay, latency, retry_after
        self.injected: Counter[str] = Counter()
        self.peak_in_flight = 0
        self._in_flight = 0
        self._queue = deque(queue)
        self._rng = random.Random(seed)
        self._lock = threading.Lock()

    def __getattr__(self, attr: str) -> Any:
        if attr in ("models", "load_adapter", "unload_adapter"):
            return getattr(self.inner, attr)
        raise AttributeError(attr)

    def _draw(self) -> str | None:
        """Enter: count this request in flight and pick its fault (None: answer normally), the
        queue's next entry while there is one, else by a draw."""
        with self._lock:
            self._in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self._in_flight)
            if self._queue:
                kind = self._queue.popleft()
            else:
                kind, u, edge = None, self._rng.random(), 0.0
                for name, rate in self.rates.items():
                    edge += rate
                    if u < edge:
                        kind = name
                        break
            if kind is not None:
                self.injected[kind] += 1
            return kind

    def respond(self, request: ChatRequest) -> Reply | Fault:
        kind = self._draw()
        try:
            time.sleep(self.latency)
            if kind == "rate_limit":
                return Fault(429, error_body("rate limit reached (injected)", "requests",
                                             code="rate_limit_exceeded"),
                             (("Retry-After", str(self.retry_after)),))
            if kind == "server_error":
                return Fault(500, error_body("internal error (injected)", "server_error"))
            if kind == "malformed":
                return Fault(200, b'{"id": "chatcmpl-broken", "choices": [',
                             (("Content-Type", "application/json"),))
            if kind == "slow":
                time.sleep(self.delay)
            return self.inner.respond(request)
        finally:
            with self._lock:
                self._in_flight -= 1
