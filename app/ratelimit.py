"""API rate limits: requests per token and per client address, counted in Redis, answered with 429 + Retry-After.

Fixed windows of `api_rate_window_s`: each request increments one Redis counter per key and window (one round
trip, INCR and EXPIRE pipelined), so the limits hold across every web process. Limits are off while set to 0
(the default). When Redis cannot be reached the request is let through and a warning logged: the API must not
go down with the store of its limits.
"""

from __future__ import annotations

import logging
import math
import time
from functools import cache

import redis
from fastapi import HTTPException, status

from app.config import Settings

log = logging.getLogger(__name__)


@cache
def _client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)


def check_api_rate(settings: Settings, address: str | None, token_id: int | None) -> None:
    """Counts an API request against an address or token limit; raises a 429 with Retry-After past it."""
    limits = []
    if address is not None and settings.api_rate_per_address > 0:
        limits.append((f"addr:{address}", settings.api_rate_per_address))
    if token_id is not None and settings.api_rate_per_token > 0:
        limits.append((f"token:{token_id}", settings.api_rate_per_token))
    url = settings.resolved_rate_limit_url
    if not limits or not url:
        return
    window = settings.api_rate_window_s
    now = time.time()
    index = int(now // window)
    try:
        pipe = _client(url).pipeline(transaction=False)
        for key, _ in limits:
            name = f"instructloop:rate:{key}:{index}"
            pipe.incr(name)
            pipe.expire(name, window + 1)
        counts = pipe.execute()[::2]
    except redis.RedisError as exc:
        log.warning("API rate limits not counted (Redis: %s)", exc)
        return
    for (key, limit), count in zip(limits, counts, strict=True):
        if int(count) > limit:
            retry_after = max(1, math.ceil((index + 1) * window - now))
            what = "this token" if key.startswith("token:") else "this address"
            raise HTTPException(
                status.HTTP_429_TOO_MANY_REQUESTS,
                f"Too many requests from {what}: at most {limit} per {window} s; retry in {retry_after} s",
                headers={"Retry-After": str(retry_after)},
            )
