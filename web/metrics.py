"""Prometheus metrics of the web process (process-wide registry, as Prometheus expects).

Also exposed from the same registry: the outbox relay's (``taskmanager_outbox_*``, declared in
``workers/relay.py``, which cannot import ``web``) and the cache's (``core/cache.py``).
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

HTTP_REQUESTS = Counter(
    "http_requests_total", "HTTP requests answered", ["method", "route", "status"]
)
HTTP_LATENCY = Histogram(
    "http_request_duration_seconds",
    "HTTP request latency",
    ["route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
HTTP_ERRORS = Counter("http_unhandled_errors_total", "Unexpected errors answered with 500")
RATELIMIT_REJECTED = Counter(
    "ratelimit_rejected_total", "Requests refused with 429 by the API rate limit", ["caller"]
)
RATELIMIT_FAILOPEN = Counter(
    "ratelimit_failopen_total", "Requests let through unchecked because Redis was unreachable"
)
