"""Limits and budgets shared by every replica, kept in Redis.

The requests/min and tokens/min of a config hold for all generator replicas together:
each bucket is one Redis hash updated by a Lua script (atomic), and a 429 seen by one
replica pauses them all. The adaptive concurrency window (AIMD) is shared the same way:
its state and the calls in flight are in Redis, changed only by Lua scripts, so all
replicas together keep within the one window. A job's token and money totals live in Redis too, so its budget
stops every replica's calls the moment it is reached.

While Redis is down (``airoboros.errors.is_unavailable``) every call that needs it waits
for it, with backoff, for up to ``REDIS_PATIENCE`` seconds, then raises the outage: a
limit or a budget is never skipped, and a short outage does not fail the calls (which
the LLM client would count as endpoint errors and, past its retries, as failed batches).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from airoboros.config import Price
from airoboros.errors import BudgetExhausted, is_unavailable
from airoboros.llm import limiter as lim
from airoboros.llm.accounting import Usage, UsageMeter
from airoboros.llm.limiter import RateLimiter, Ticket, TokenBucket

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Seconds a call waits for Redis to come back before the outage is raised to it. Below
#: the LLM client's default retry time (300 s), so that one wait is all a call makes.
REDIS_PATIENCE = 240.0
#: (first, largest) seconds between two tries while Redis is down; doubling.
REDIS_BACKOFF = (0.2, 5.0)
#: At most one warning per this many seconds (every call in flight waits at once).
_WARN_EVERY = 10.0
_last_warning = 0.0


async def _redis(op: Callable[[], Awaitable[T]], what: str) -> T:
    """``await op()``, waiting out a Redis outage (see the module)."""
    global _last_warning
    loop = asyncio.get_running_loop()
    deadline = loop.time() + REDIS_PATIENCE
    delay, cap = REDIS_BACKOFF
    waited = False
    while True:
        try:
            result = await op()
        except Exception as exc:
            if not is_unavailable(exc) or loop.time() >= deadline:
                raise
            now = time.monotonic()
            if now - _last_warning >= _WARN_EVERY:
                _last_warning = now
                log.warning(
                    "Redis unavailable (%s: %s); %s waits for it (up to %.0fs)",
                    type(exc).__name__,
                    exc,
                    what,
                    REDIS_PATIENCE,
                )
            waited = True
            await asyncio.sleep(min(delay, max(0.0, deadline - loop.time())))
            delay = min(delay * 2, cap)
            continue
        if waited:
            log.info("Redis is back; %s went through", what)
        return result


def _background(pending: set[asyncio.Task[Any]], work: Awaitable[Any]) -> None:
    """Run ``work`` on its own (a best-effort update); a failure is logged, not raised."""

    async def run() -> None:
        try:
            await work
        except Exception as exc:
            log.debug("background Redis update failed: %r", exc)

    task = asyncio.ensure_future(run())
    pending.add(task)
    task.add_done_callback(pending.discard)


# Refill the bucket for the time passed, then take `amount` if there is enough.
# Returns 0 when taken, else the seconds until there will be enough.
_TAKE = """
local key = KEYS[1]
local rate = tonumber(ARGV[1])
local cap = tonumber(ARGV[2])
local amount = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local level = tonumber(redis.call('HGET', key, 'level') or cap)
local stamp = tonumber(redis.call('HGET', key, 'stamp') or now)
level = math.min(cap, level + math.max(0, now - stamp) * rate)
local wait = 0
if level >= amount then
  level = level - amount
else
  wait = (amount - level) / rate
end
redis.call('HSET', key, 'level', tostring(level), 'stamp', tostring(now))
redis.call('EXPIRE', key, 3600)
return tostring(wait)
"""

_GIVE = """
local key = KEYS[1]
local cap = tonumber(ARGV[1])
local amount = tonumber(ARGV[2])
local level = tonumber(redis.call('HGET', key, 'level') or cap)
redis.call('HSET', key, 'level', tostring(math.min(cap, level + amount)))
return 1
"""


class RedisTokenBucket(TokenBucket):
    """A TokenBucket whose level lives in Redis, shared by every process using ``key``."""

    def __init__(self, redis: Any, key: str, rate: float, capacity: float) -> None:
        super().__init__(rate, capacity)
        self.redis = redis
        self.key = key
        self._take = redis.register_script(_TAKE)
        self._give = redis.register_script(_GIVE)
        self._pending: set[asyncio.Task[Any]] = set()

    async def take(self, amount: float) -> None:
        amount = min(amount, self.capacity)
        async with self._lock:  # FIFO within this process
            while True:
                wait = float(
                    await _redis(
                        lambda: self._take(
                            keys=[self.key], args=[self.rate, self.capacity, amount]
                        ),
                        "the rate limiter",
                    )
                )
                if wait <= 0:
                    return
                await asyncio.sleep(wait)

    def give_back(self, amount: float) -> None:
        # Best effort: tokens not given back (Redis is down) only make the limit stricter.
        _background(self._pending, self._give(keys=[self.key], args=[self.capacity, amount]))


# The shared AIMD window. KEYS[1]: a hash (cwnd, ssthresh, ceiling, recovery, seq);
# KEYS[2]: a sorted set of the places taken, scored by when each expires (a replica that
# died mid-call gives its places back that way). Take a place if the window has room:
# returns {seq, limit, level} (seq 0: no room).
_WINDOW_TAKE = """
local h = KEYS[1]
local z = KEYS[2]
local maxw = tonumber(ARGV[1])
local initial = tonumber(ARGV[2])
local id = ARGV[3]
local ttl = tonumber(ARGV[4])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZREMRANGEBYSCORE', z, '-inf', now)
local cwnd = tonumber(redis.call('HGET', h, 'cwnd') or '-1')
if cwnd < 0 then
  cwnd = math.min(initial, maxw)
  redis.call('HSET', h, 'cwnd', tostring(cwnd), 'ssthresh', tostring(maxw))
end
local limit = math.max(1, math.floor(math.min(cwnd, maxw)))
local n = redis.call('ZCARD', z)
redis.call('EXPIRE', h, 86400)
if n >= limit then return {0, limit, n} end
local seq = redis.call('HINCRBY', h, 'seq', 1)
redis.call('ZADD', z, now + ttl, id)
redis.call('EXPIRE', z, 86400)
return {seq, limit, n + 1}
"""

# Give a place back and apply the call's outcome: the rules of
# airoboros.llm.limiter.aimd_update, line for line. Returns the window (a string).
_WINDOW_GIVE = """
local h = KEYS[1]
local z = KEYS[2]
local id = ARGV[1]
local outcome = ARGV[2]
local seq = tonumber(ARGV[3])
local level = tonumber(ARGV[4])
local maxw = tonumber(ARGV[5])
local initial = tonumber(ARGV[6])
local probe_calls = tonumber(ARGV[7])
local probe_rtts = tonumber(ARGV[8])
local beta = tonumber(ARGV[9])
local beta_near = tonumber(ARGV[10])
local near = tonumber(ARGV[11])
local in_flight = redis.call('ZCARD', z)
redis.call('ZREM', z, id)
local cwnd = tonumber(redis.call('HGET', h, 'cwnd') or tostring(math.min(initial, maxw)))
local ss = tonumber(redis.call('HGET', h, 'ssthresh') or tostring(maxw))
local ceiling = tonumber(redis.call('HGET', h, 'ceiling') or '0')
local recovery = tonumber(redis.call('HGET', h, 'recovery') or '0')
if outcome == 'ok' then
  local limit = math.max(1, math.floor(cwnd))
  if 2 * in_flight >= limit then
    if cwnd < ss then
      cwnd = math.min(cwnd + 1, math.max(ss, cwnd))
    elseif ceiling > 0 and cwnd >= ceiling - 1 then
      cwnd = cwnd + 1 / math.max(probe_calls, probe_rtts * cwnd)
    else
      cwnd = cwnd + 1 / cwnd
    end
    if ceiling > 0 and math.floor(cwnd) > ceiling then ceiling = 0 end
  end
elseif outcome == 'congested' and seq > recovery then
  if ceiling > 0 and level >= near * ceiling then
    ceiling = math.min(ceiling, level)
    cwnd = math.min(math.min(cwnd, level) * beta_near, level - 1)
    ss = cwnd
  else
    ceiling = level
    cwnd = math.min(cwnd, level) * beta
    ss = math.max(1, 0.9 * level)
  end
  recovery = tonumber(redis.call('HGET', h, 'seq') or '0')
end
cwnd = math.min(math.max(cwnd, 1), maxw)
ss = math.min(math.max(ss, 1), maxw)
redis.call('HSET', h, 'cwnd', tostring(cwnd), 'ssthresh', tostring(ss),
  'ceiling', tostring(ceiling), 'recovery', tostring(recovery))
redis.call('EXPIRE', h, 86400)
return tostring(cwnd)
"""


class RedisRateLimiter(RateLimiter):
    """RateLimiter whose buckets, 429 pauses and adaptive window are shared through Redis
    under ``scope`` (one scope per endpoint and key, so every job and replica on it shares
    the limit)."""

    def __init__(self, redis: Any, scope: str, **kwargs: Any) -> None:
        self.redis = redis
        self.scope = scope
        super().__init__(**kwargs)
        self._pending: set[asyncio.Task[Any]] = set()
        #: seconds a place in the window outlives a replica that died holding it
        self.slot_ttl = 3600.0
        self._window_keys = [f"{scope}:aimd", f"{scope}:aimd:slots"]
        self._window_take = redis.register_script(_WINDOW_TAKE)
        self._window_give = redis.register_script(_WINDOW_GIVE)
        self._window_lock = asyncio.Lock()
        self._window_freed = asyncio.Event()

    def _mirror(self, cwnd: float) -> None:
        """Show the shared window locally (progress, metrics)."""
        if self.window is not None:
            self.window.state.cwnd = cwnd
            self._show_window()

    def _initial(self) -> int:
        return min(self.max_concurrency, self.initial_window or lim.AIMD_INITIAL)

    def stop_adapting(self) -> None:
        super().stop_adapting()
        self._window_freed.set()

    async def _window_acquire(self) -> Ticket | None:
        if self.window is None:
            return None
        # One caller of this process asks Redis at a time (FIFO here); it asks again when
        # a place of this process comes free, or after a short wait for the others'.
        async with self._window_lock:
            delay = 0.002
            while True:
                w = self.window
                if w is None:
                    return None
                self._window_freed.clear()
                slot_id = uuid.uuid4().hex
                args = [w.max_window, self._initial(), slot_id, self.slot_ttl]
                seq, limit, level = (
                    int(x)
                    for x in await _redis(
                        functools.partial(self._window_take, keys=self._window_keys, args=args),
                        "the concurrency window",
                    )
                )
                if self.window is not None and limit != self.window.limit:
                    self._mirror(float(limit))
                if seq > 0:
                    return Ticket(seq=seq, level=level, id=slot_id)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._window_freed.wait(), delay)
                delay = min(delay * 2, 0.05)

    def _window_release(self, ticket: Ticket) -> None:
        max_window = self.max_concurrency
        args = [
            ticket.id,
            ticket.outcome,
            ticket.seq,
            ticket.level,
            max_window,
            self._initial(),
            lim.AIMD_PROBE_CALLS,
            lim.AIMD_PROBE_RTTS,
            lim.AIMD_BETA,
            lim.AIMD_BETA_NEAR,
            lim.AIMD_NEAR,
        ]

        async def give() -> None:
            try:
                cwnd = await _redis(
                    lambda: self._window_give(keys=self._window_keys, args=args),
                    "the concurrency window",
                )
                self._mirror(float(cwnd))
            finally:
                self._window_freed.set()

        # In the background, waiting out a Redis outage: the call is done; until Redis
        # answers, its place stays taken (the window is only stricter meanwhile).
        _background(self._pending, give())

    def _bucket(self, kind: str, rate: float, capacity: float) -> TokenBucket:
        return RedisTokenBucket(self.redis, f"{self.scope}:{kind}", rate, capacity)

    def pause(self, seconds: float) -> None:
        super().pause(seconds)
        until_ms = int((time.time() + seconds) * 1000)
        # Best effort: this replica pauses anyway (above); the others learn it from Redis.
        _background(
            self._pending,
            self.redis.set(f"{self.scope}:pause", until_ms, px=max(1, int(seconds * 1000)) + 1000),
        )

    async def _wait_pause(self) -> None:
        await super()._wait_pause()
        raw = await _redis(lambda: self.redis.get(f"{self.scope}:pause"), "the rate limiter")
        if raw:
            delay = int(raw) / 1000 - time.time()
            if delay > 0:
                await asyncio.sleep(delay)


def limiter_scope(prefix: str, base_url: str | None, api_key: str | None) -> str:
    digest = hashlib.sha256(f"{base_url or 'openai'}|{api_key or ''}".encode()).hexdigest()[:16]
    return f"{prefix}:limit:{digest}"


# Reserve a call's worst case against a job's budget, across replicas: the rule of
# UsageMeter.areserve, atomically. The hash at KEYS[2] holds the reservations in flight
# ("tokens cost expires_at" by call id); expired ones (a replica died mid-call) are
# dropped. Returns the completion tokens held, -2 when the call must wait for calls in
# flight to settle, -1 when it cannot fit at all.
_RESERVE = """
local usage = KEYS[1]
local held = KEYS[2]
local id = ARGV[1]
local ptoks = tonumber(ARGV[2])
local ctoks = tonumber(ARGV[3])
local least = tonumber(ARGV[4])
local max_t = tonumber(ARGV[5])
local max_c = tonumber(ARGV[6])
local pp = tonumber(ARGV[7])
local cp = tonumber(ARGV[8])
local ttl = tonumber(ARGV[9])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local ut = tonumber(redis.call('HGET', usage, 'tokens') or '0')
local uc = tonumber(redis.call('HGET', usage, 'cost') or '0')
local n = 0
local all = redis.call('HGETALL', held)
for i = 1, #all, 2 do
  local rt, rc, exp = string.match(all[i + 1], '(%S+) (%S+) (%S+)')
  if tonumber(exp) < now then
    redis.call('HDEL', held, all[i])
  else
    ut = ut + tonumber(rt)
    uc = uc + tonumber(rc)
    n = n + 1
  end
end
local room = ctoks
if max_t >= 0 then room = math.min(room, max_t - ut - ptoks) end
if max_c >= 0 then
  local left = max_c - uc - ptoks * pp
  if cp > 0 then
    room = math.min(room, math.floor(left / cp + 1e-6))
  elseif left < 0 then
    room = -1
  end
end
if room >= ctoks or (room >= least and n == 0) then
  local cost = ptoks * pp + room * cp
  redis.call('HSET', held, id, tostring(ptoks + room) .. ' ' .. tostring(cost) .. ' ' .. tostring(now + ttl))
  redis.call('EXPIRE', held, 604800)
  return room
end
if n == 0 then return -1 end
return -2
"""


class RedisUsageMeter(UsageMeter):
    """UsageMeter whose job totals (for the budget) are shared through Redis."""

    def __init__(
        self,
        redis: Any,
        key: str,
        *,
        max_tokens: int | None = None,
        max_cost: float | None = None,
        prices: dict[str, Price] | None = None,
    ) -> None:
        super().__init__(max_tokens=max_tokens, max_cost=max_cost, prices=prices)
        self.redis = redis
        self.key = key
        self._reserve = redis.register_script(_RESERVE)
        #: seconds a reservation outlives its replica (a call cannot take longer)
        self.reservation_ttl = 3600.0

    async def seed(self, tokens: int, cost: float) -> None:
        """Start the shared totals from the store's, unless another replica did."""
        await _redis(lambda: self.redis.hsetnx(self.key, "tokens", tokens), "the budget")
        await _redis(lambda: self.redis.hsetnx(self.key, "cost", cost), "the budget")

    async def shared_total(self) -> Usage:
        raw = await _redis(lambda: self.redis.hgetall(self.key), "the budget")
        get = {(k.decode() if isinstance(k, bytes) else k): v for k, v in raw.items()}
        return Usage(0, int(float(get.get("tokens", 0))), 0, float(get.get("cost", 0.0)))

    async def acheck(self) -> None:
        if self.max_tokens is None and self.max_cost is None:
            return
        total = await self.shared_total()
        if self.max_tokens is not None and total.prompt_tokens >= self.max_tokens:
            raise BudgetExhausted(
                f"token budget of {self.max_tokens} reached ({total.prompt_tokens} used)"
            )
        if self.max_cost is not None and total.cost >= self.max_cost:
            raise BudgetExhausted(
                f"cost budget of ${self.max_cost:.2f} reached (${total.cost:.4f} spent)"
            )

    async def areserve(
        self,
        call_id: str,
        model: str,
        prompt_tokens: int,
        completion_tokens: int,
        *,
        min_completion: int,
    ) -> int:
        if not self.limited:
            return completion_tokens
        least = min(min_completion, completion_tokens)
        pp, cp = self.per_token(model)
        args = [
            call_id,
            prompt_tokens,
            completion_tokens,
            least,
            -1 if self.max_tokens is None else self.max_tokens,
            -1 if self.max_cost is None else self.max_cost,
            repr(pp),
            repr(cp),
            self.reservation_ttl,
        ]
        while True:
            got = int(
                await _redis(
                    lambda: self._reserve(keys=[self.key, f"{self.key}:held"], args=args),
                    "the budget",
                )
            )
            if got >= 0:
                return got
            if got == -1:
                total = await self.shared_total()
                need = prompt_tokens + least
                if self.max_tokens is not None and total.prompt_tokens + need > self.max_tokens:
                    raise BudgetExhausted(
                        f"token budget of {self.max_tokens} reached ({total.prompt_tokens} "
                        f"used; the next call needs at least {need})"
                    )
                raise BudgetExhausted(
                    f"cost budget of ${self.max_cost:.2f} reached (${total.cost:.4f} spent; "
                    f"the next call costs at least ${self.price(model, prompt_tokens, least):.4f})"
                )
            await asyncio.sleep(0.2)  # calls in flight elsewhere may settle lower

    async def arelease(self, call_id: str) -> None:
        if self.limited:
            await _redis(lambda: self.redis.hdel(f"{self.key}:held", call_id), "the budget")

    async def arecord(
        self, instructor: str, model: str, prompt_tokens: int, completion_tokens: int
    ) -> Usage:
        call = self.record(instructor, model, prompt_tokens, completion_tokens)

        async def add() -> Any:
            # A fresh pipeline per try. (Should Redis fail after applying it but before
            # answering, the retry counts the call twice: the budget errs on the safe side.)
            pipe = self.redis.pipeline()
            pipe.hincrby(self.key, "tokens", prompt_tokens + completion_tokens)
            pipe.hincrbyfloat(self.key, "cost", call.cost)
            pipe.expire(self.key, 7 * 24 * 3600)
            return await pipe.execute()

        await _redis(add, "the budget")
        return call
