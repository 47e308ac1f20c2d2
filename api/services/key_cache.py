"""API keys already authenticated, kept for `CACHE_SECONDS` so that a request costs no key query.

Where Redis is the broker, each API process remembers the callers of the keys it authenticated, under the
keys' HMAC (never the clear key), for `CACHE_SECONDS`. Revoking a key (`lorajobs keys revoke`, rotating the
bootstrap key) bumps a generation counter in Redis once the revocation is committed; every request reads the
counter (one Redis GET) and uses a remembered caller only when it was looked up under the current generation.
So a key revoked from any process or host is refused on the next request, and a key that stays valid costs a
database query once per `CACHE_SECONDS` per process.

Without Redis (the embedded default) nothing is cached: there is no cheap place every process can look, and the
one API process there would otherwise go on accepting a key `lorajobs keys revoke` revoked from another one.
A Redis that cannot be reached turns the cache off until it answers again (every request asks the database),
and a revocation whose counter bump fails logs a warning: the API processes may then accept the key until their
entries expire, `CACHE_SECONDS` at most.
"""

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import lru_cache

import redis
import redis.asyncio

from core.settings import Settings

log = logging.getLogger("lorajobs.api.keys")

CACHE_SECONDS = 30.0
MAX_ENTRIES = 10_000  # past it the cache starts over: bounded however many keys a process sees
REDIS_TIMEOUT_SECONDS = 0.5
GENERATION_KEY = "lorajobs:api_keys:generation"


@dataclass(frozen=True)
class Entry:
    caller: object  # api.services.projects.Caller (its Project is detached and only read)
    generation: bytes | None
    expires: float


def uses_redis(settings: Settings) -> bool:
    return settings.broker_url.startswith(("redis://", "rediss://"))


@lru_cache
def _client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=REDIS_TIMEOUT_SECONDS,
                                socket_connect_timeout=REDIS_TIMEOUT_SECONDS)


def invalidate(settings: Settings) -> None:
    """Every process's cached keys stop being used: called once a revocation is committed."""
    if not uses_redis(settings):
        return
    try:
        _client(settings.broker_url).incr(settings.broker_prefix + GENERATION_KEY)
    except redis.RedisError as exc:
        log.warning("API key cache not invalidated (%s): API processes may accept the revoked key for up to "
                    "%d s", type(exc).__name__, CACHE_SECONDS)


class KeyCache:
    """One process's remembered callers, checked against the shared generation on every use."""

    def __init__(self, settings: Settings):
        self.url = settings.broker_url
        self.name = settings.broker_prefix + GENERATION_KEY
        self._entries: dict[str, Entry] = {}
        self._lock = threading.Lock()
        self._clients: dict[asyncio.AbstractEventLoop, redis.asyncio.Redis] = {}

    def _client(self) -> redis.asyncio.Redis:
        """The running event loop's client: an asyncio client's connections belong to the loop that opened them.

        A served process runs one loop; tests start one per app, so a closed loop's client is dropped."""
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            with self._lock:
                self._clients = {known: c for known, c in self._clients.items() if not known.is_closed()}
                client = self._clients[loop] = redis.asyncio.Redis.from_url(
                    self.url, socket_timeout=REDIS_TIMEOUT_SECONDS, socket_connect_timeout=REDIS_TIMEOUT_SECONDS)
        return client

    async def _generation(self) -> tuple[bool, bytes | None]:
        """On the event loop, not a worker thread: one GET a request, without a thread hop."""
        try:
            return True, await self._client().get(self.name)
        except redis.RedisError as exc:
            log.warning("API key cache off, Redis unavailable: %s", type(exc).__name__)
            return False, None

    async def caller(self, digest: str, lookup: Callable[[], Awaitable[object]]) -> object:
        """The caller of the key whose HMAC is `digest`: remembered, or from `lookup()` (which raises a 401)."""
        reachable, generation = await self._generation()
        if not reachable:
            return await lookup()
        entry = self._entries.get(digest)
        if entry is not None and entry.generation == generation and entry.expires > time.monotonic():
            return entry.caller
        # The generation was read before the lookup: a revocation committed after it bumps it, so an entry made
        # from a lookup that raced the revocation is never used.
        caller = await lookup()
        with self._lock:
            if len(self._entries) >= MAX_ENTRIES:
                self._entries.clear()
            self._entries[digest] = Entry(caller, generation, time.monotonic() + CACHE_SECONDS)
        return caller


_caches: dict[tuple[str, str], KeyCache] = {}
_caches_lock = threading.Lock()


def for_settings(settings: Settings) -> KeyCache | None:
    """This process's cache for the deployment's Redis, or None where there is no Redis to invalidate it."""
    if not uses_redis(settings):
        return None
    key = (settings.broker_url, settings.broker_prefix)
    with _caches_lock:
        if key not in _caches:
            _caches[key] = KeyCache(settings)
        return _caches[key]
