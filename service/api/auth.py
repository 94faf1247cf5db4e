"""Bearer API keys with ordered scopes: read < submit < admin.

Keys are random secrets shown once at creation; only their sha256 is stored, so a database
leak does not reveal usable keys. Key management works offline (the `lethe keys` commands)
against the configured database, and every change is audited.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import or_, select
from sqlalchemy.orm import Session, sessionmaker

from service.storage.tables import ApiKey, utcnow
from service.trust.audit import append_event

SCOPES = ("read", "submit", "admin")
SCOPE_RANK = {scope: rank for rank, scope in enumerate(SCOPES)}
KEY_PREFIX = "lethe_"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,199}$")


class ApiKeyError(ValueError):
    """A key management request was invalid (bad scope or name, unknown or duplicate key)."""


@dataclass(frozen=True)
class Principal:
    """Who is calling: the API key's id, name and scope."""

    key_id: str
    name: str
    scope: str

    @property
    def actor(self) -> str:
        return f"key:{self.name}"

    def allows(self, scope: str) -> bool:
        return SCOPE_RANK[self.scope] >= SCOPE_RANK[scope]


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def generate_secret() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def create_key(
    session: Session, *, scope: str, name: str | None = None, actor: str = "cli"
) -> tuple[ApiKey, str]:
    """Create a key; returns the row and the secret (which is not stored anywhere)."""
    if scope not in SCOPE_RANK:
        raise ApiKeyError(f"unknown scope {scope!r}; choose one of {', '.join(SCOPES)}")
    name = name or f"{scope}-{secrets.token_hex(4)}"
    if not _NAME_RE.match(name):
        raise ApiKeyError(
            f"invalid key name {name!r}: use letters, digits, '.', '_', '@' or '-' "
            "(at most 200 characters)"
        )
    if session.execute(select(ApiKey.id).where(ApiKey.name == name)).first():
        raise ApiKeyError(f"a key named {name!r} already exists")
    secret = generate_secret()
    key = ApiKey(name=name, key_hash=hash_secret(secret), scope=scope)
    session.add(key)
    session.flush()
    append_event(
        session,
        actor=actor,
        action="key.created",
        subject_type="api_key",
        subject_id=key.id,
        payload={"name": name, "scope": scope},
    )
    return key, secret


def list_keys(session: Session) -> list[ApiKey]:
    return list(session.execute(select(ApiKey).order_by(ApiKey.created_at)).scalars())


def revoke_key(session: Session, name_or_id: str, *, actor: str = "cli") -> ApiKey:
    key = session.execute(
        select(ApiKey).where(or_(ApiKey.name == name_or_id, ApiKey.id == name_or_id))
    ).scalar_one_or_none()
    if key is None:
        raise ApiKeyError(f"no key named {name_or_id!r}")
    if key.revoked_at is None:
        key.revoked_at = utcnow()
        append_event(
            session,
            actor=actor,
            action="key.revoked",
            subject_type="api_key",
            subject_id=key.id,
            payload={"name": key.name},
        )
    return key


def _principal_for_hash(session: Session, digest: str) -> Principal | None:
    row = session.execute(
        select(ApiKey.id, ApiKey.name, ApiKey.scope, ApiKey.revoked_at).where(
            ApiKey.key_hash == digest
        )
    ).first()
    if row is None or row.revoked_at is not None:
        return None
    return Principal(key_id=row.id, name=row.name, scope=row.scope)


def authenticate(session: Session, secret: str) -> Principal | None:
    """The principal for a presented secret, or None when unknown or revoked."""
    return _principal_for_hash(session, hash_secret(secret))


class KeyCache:
    """Valid principals by key hash, each trusted for `ttl` seconds after its lookup.

    This takes the key lookup off nearly every request. The price is a bound on revocation:
    a key revoked anywhere (`lethe keys revoke` is another process) is refused by every API
    process at most `ttl` seconds later (LETHE_AUTH_CACHE_SECONDS, default 5; 0 = look up
    every time). Unknown and revoked keys are never cached, so a new key works at once.
    """

    MAX_ENTRIES = 10_000  # a bound on memory; cleared wholesale when reached

    def __init__(self, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self.clock = clock
        self._entries: dict[str, tuple[Principal, float]] = {}
        self._lock = threading.Lock()

    def cached(self, secret: str) -> Principal | None:
        """The principal if a fresh lookup is cached (no database access), else None."""
        hit = self._entries.get(hash_secret(secret))
        if hit is not None and hit[1] > self.clock():
            return hit[0]
        return None

    def lookup(self, factory: sessionmaker[Session], secret: str) -> Principal | None:
        digest = hash_secret(secret)
        hit = self._entries.get(digest)
        if hit is not None and hit[1] > self.clock():
            return hit[0]
        with factory() as session:
            principal = _principal_for_hash(session, digest)
        with self._lock:
            if principal is None or self.ttl <= 0:
                self._entries.pop(digest, None)
            else:
                if len(self._entries) >= self.MAX_ENTRIES:
                    self._entries.clear()
                self._entries[digest] = (principal, self.clock() + self.ttl)
        return principal
