"""The API key cache: lookups are reused for `ttl` seconds, which bounds revocation."""

from __future__ import annotations

from sqlalchemy.orm import Session, sessionmaker

from service.api.auth import KeyCache, create_key, revoke_key
from service.storage.db import transaction


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _key(sessions: sessionmaker[Session], name: str, scope: str = "read") -> str:
    with transaction(sessions) as s:
        return create_key(s, scope=scope, name=name)[1]


def _revoke(sessions: sessionmaker[Session], name: str) -> None:
    with transaction(sessions) as s:
        revoke_key(s, name)


def test_revoked_key_is_refused_once_the_ttl_has_passed(sessions) -> None:
    clock = Clock()
    cache = KeyCache(5.0, clock=clock)
    secret = _key(sessions, "cached")
    assert cache.cached(secret) is None  # nothing looked up yet
    principal = cache.lookup(sessions, secret)
    assert principal is not None and principal.name == "cached" and principal.scope == "read"
    assert cache.cached(secret) == principal
    _revoke(sessions, "cached")
    clock.now += 4.9
    assert cache.lookup(sessions, secret) == principal  # within the documented bound
    clock.now += 0.2
    assert cache.cached(secret) is None
    assert cache.lookup(sessions, secret) is None
    assert cache.cached(secret) is None  # a refusal is never cached


def test_unknown_keys_are_not_cached_so_new_keys_work_at_once(sessions) -> None:
    cache = KeyCache(5.0, clock=Clock())
    assert cache.lookup(sessions, "lethe_not_a_key") is None
    secret = _key(sessions, "fresh", scope="submit")
    principal = cache.lookup(sessions, secret)
    assert principal is not None and principal.allows("submit")


def test_zero_ttl_looks_up_every_time(sessions) -> None:
    cache = KeyCache(0.0, clock=Clock())
    secret = _key(sessions, "uncached")
    assert cache.lookup(sessions, secret) is not None
    assert cache.cached(secret) is None
    _revoke(sessions, "uncached")
    assert cache.lookup(sessions, secret) is None
