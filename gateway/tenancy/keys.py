"""Tenants and API keys: creation, revocation, and authentication with a short-TTL cache.

Keys are stored as a keyed hash: ``HMAC-SHA256(server secret, SHA-256(key))`` (``KeyHasher``), so a copy of
the database alone cannot confirm a key. Keys carry 256 bits of randomness, so a fast hash is the right tool
(a password KDF would only slow every request). The looked-up hash is compared again with
``hmac.compare_digest`` so no branch depends on how much of a guess matched.

The server secret comes from ``TOLLWAY_KEY_SECRET`` or, when that is unset, from ``<data dir>/key-secret``
(made on first use; shared by ``--workers``; replicas set the variable). Rows from before the keyed hash
hold the plain SHA-256 digest: they are re-keyed at start (HMAC over the stored digest) and on use. Rotation:
set the new secret and keep the old one in ``TOLLWAY_KEY_SECRET_PREVIOUS``; a key is re-keyed the first time
it is used; ``tollway keys rekey-status`` counts the keys still on the old secret.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from tollway.errors import (
    AuthenticationFailed,
    InvalidRequest,
    NotFound,
    ServiceUnavailable,
)
from tollway.gateway.tenancy.roles import ROLES, Can, Role, require
from tollway.infra import changes
from tollway.lastgood import LastGood

KEY_PREFIX = "tw-"


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: resolved from a key, cached for the TTL."""

    key_id: int
    tenant_id: int
    tenant: str
    role: str
    allowed_models: frozenset[str] | None  # None: every model in the catalog
    rpm: int | None = None
    tpm: int | None = None
    max_parallel_requests: int | None = None  # the key's requests in flight at once, across every gateway
    name: str | None = None  # the key's label: the author of what it writes
    ingest: bool = False  # an app key that may also write documents into its tenant's collections

    @property
    def author(self) -> str:
        """How the change channel and the prompt repository name this caller."""
        return self.name or f"key:{self.key_id}@{self.tenant}"

    def may_use(self, model: str) -> bool:
        return self.allowed_models is None or model in self.allowed_models


@dataclass(frozen=True, slots=True)
class NewKey:
    id: int
    tenant: str
    role: str
    secret: str  # shown once, never stored
    ingest: bool = False


def secret_id(server: bytes) -> str:
    """A name for a server secret that does not reveal it (stored beside each key hash)."""
    return hashlib.sha256(b"tollway-key-secret:" + server).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class KeyHasher:
    """The keyed hash of API keys, with the secret before a rotation still accepted."""

    current: bytes = field(repr=False)
    previous: bytes | None = field(default=None, repr=False)

    def digest(self, secret: str) -> bytes:
        """What a key is stored as under the current secret."""
        return self.keyed(hashlib.sha256(secret.encode()).digest())

    def keyed(self, sha: bytes, server: bytes | None = None) -> bytes:
        """The keyed hash of a key's SHA-256 digest (the form rows from before the keyed hash hold)."""
        return hmac.new(server or self.current, sha, hashlib.sha256).digest()

    @property
    def current_id(self) -> str:
        return secret_id(self.current)

    def candidates(self, secret: str) -> list[bytes]:
        """What a stored row may hold for this key: current secret, previous one, plain SHA-256 (legacy)."""
        sha = hashlib.sha256(secret.encode()).digest()
        out = [self.keyed(sha)]
        if self.previous is not None:
            out.append(self.keyed(sha, self.previous))
        return [*out, sha]


def load_key_hasher(env_secret: str | None, env_previous: str | None, data_dir: Path) -> KeyHasher:
    """The process's key hasher: the environment's secret, or the data directory's (made once, 0600)."""
    if env_secret:
        current = env_secret.encode()
    else:
        path = data_dir / "key-secret"
        try:
            data_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "w") as out:
                out.write(secrets.token_hex(32) + "\n")
        current = b""
        for _ in range(50):  # another worker may be writing it this very moment
            current = path.read_bytes().strip()
            if current:
                break
            time.sleep(0.01)
        if not current:
            raise RuntimeError(f"{path} is empty: delete it or set TOLLWAY_KEY_SECRET")
    return KeyHasher(current, env_previous.encode() if env_previous else None)


async def rekey_legacy(conn: psycopg.AsyncConnection, hasher: KeyHasher) -> int:
    """Rows still holding a plain SHA-256 digest get the keyed hash (HMAC over the stored digest)."""
    cur = await conn.execute("SELECT id, key_hash FROM api_keys WHERE key_secret_id IS NULL")
    rows = await cur.fetchall()
    for key_id, digest in rows:
        await conn.execute("UPDATE api_keys SET key_hash = %s, key_secret_id = %s WHERE id = %s AND"
                           " key_secret_id IS NULL", (hasher.keyed(bytes(digest)), hasher.current_id, key_id))
    return len(rows)


async def rekey_status(conn: psycopg.AsyncConnection, hasher: KeyHasher) -> dict[str, int]:
    cur = await conn.execute("SELECT key_secret_id = %s, count(*) FROM api_keys WHERE revoked_at IS NULL"
                             " GROUP BY 1", (hasher.current_id,))
    counts = {bool(on_current): int(n) for on_current, n in await cur.fetchall()}
    return {"current_secret": counts.get(True, 0), "other_secret": counts.get(False, 0)}


def generate_secret() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


class KeyStore:
    """Key lookups, cached for ``cache_ttl_s`` (a change on the channel drops an entry at once).

    While the database is unreachable a known key keeps working: its last good entry is served for up to
    ``stale_max_s`` after it expired; a request waits at most ``stale_wait_s`` for a lookup (which goes on in
    the background), and for ``retry_s`` after a failed lookup no request waits on the database again. Once
    the database answers, every lookup is fresh again, so a revocation made before or during the outage
    applies with the first request after it."""

    def __init__(self, pool: AsyncConnectionPool, *, cache_ttl_s: float, cache_size: int = 10_000,
                 hasher: KeyHasher, stale_max_s: float = 3600.0, lookup_timeout_s: float = 2.0,
                 stale_wait_s: float = 0.25, retry_s: float = 2.0) -> None:
        self._pool = pool
        self._lookup_timeout = lookup_timeout_s
        self._hasher = hasher
        self._cache: LastGood[bytes, Principal | None] = LastGood(
            ttl_s=cache_ttl_s, down=ServiceUnavailable, stale_max_s=stale_max_s, stale_wait_s=stale_wait_s,
            retry_s=retry_s, max_size=cache_size)

    @property
    def hasher(self) -> KeyHasher:
        return self._hasher

    async def authenticate(self, secret: str) -> Principal:
        principal = await self._cache.get(self._hasher.digest(secret), lambda: self._lookup(secret))
        if principal is None:
            raise AuthenticationFailed("Incorrect API key provided.")
        return principal

    def forget(self, key_id: int | None = None) -> None:
        """Drop cached lookups of one key (revoked, limits changed), or of every key: the next request
        reads the database."""
        if key_id is None:
            self._cache.clear()
        else:
            self._cache.drop_where(lambda p: p is not None and p.key_id == key_id)

    async def _lookup(self, secret: str) -> Principal | None:
        candidates = self._hasher.candidates(secret)
        try:
            async with self._pool.connection(timeout=self._lookup_timeout) as conn:
                cur = await conn.execute(
                    "SELECT k.id, k.key_hash, k.tenant_id, t.name, k.role, k.allowed_models, k.rpm, k.tpm, k.name,"
                    " k.ingest, k.key_secret_id, k.max_parallel_requests"
                    " FROM api_keys k JOIN tenants t ON t.id = k.tenant_id"
                    " WHERE k.key_hash = ANY(%s) AND k.revoked_at IS NULL", (candidates,))
                row = await cur.fetchone()
                if row is not None and row[10] != self._hasher.current_id:  # an old secret's or a plain digest
                    await conn.execute("UPDATE api_keys SET key_hash = %s, key_secret_id = %s WHERE id = %s",
                                       (candidates[0], self._hasher.current_id, row[0]))
                if row is not None:  # at most once a minute per key (lookups are cached for seconds)
                    await conn.execute("UPDATE api_keys SET last_used_at = now() WHERE id = %s AND"
                                       " (last_used_at IS NULL OR last_used_at < now() - interval '1 minute')",
                                       (row[0],))
        except (psycopg.OperationalError, TimeoutError) as exc:
            raise ServiceUnavailable("The key store is unavailable; try again shortly.") from exc
        if row is None or not any(hmac.compare_digest(bytes(row[1]), c) for c in candidates):
            return None
        allowed = None if row[5] is None else frozenset(row[5])
        return Principal(key_id=row[0], tenant_id=row[2], tenant=row[3], role=row[4], allowed_models=allowed,
                         rpm=row[6], tpm=row[7], max_parallel_requests=row[11], name=row[8], ingest=row[9])


async def list_tenants(conn: psycopg.AsyncConnection) -> list[dict[str, Any]]:
    cur = await conn.execute(
        "SELECT t.id, t.name, t.created_at, count(k.id) FILTER (WHERE k.revoked_at IS NULL)"
        " FROM tenants t LEFT JOIN api_keys k ON k.tenant_id = t.id GROUP BY t.id ORDER BY t.name")
    return [{"id": i, "name": n, "created_at": c.isoformat(), "active_keys": k} for i, n, c, k in await cur.fetchall()]


async def list_keys(conn: psycopg.AsyncConnection, tenant: str | None = None) -> list[dict[str, Any]]:
    """Keys without their secrets: id, tenant, name, role, models, limits, created, last used, revoked."""
    tid = None if tenant is None else await tenant_id(conn, tenant)
    cur = await conn.execute(
        "SELECT k.id, t.name, k.name, k.role, k.allowed_models, k.ingest, k.prefix, k.created_at, k.last_used_at,"
        " k.revoked_at, k.rpm, k.tpm, k.max_parallel_requests FROM api_keys k JOIN tenants t ON t.id = k.tenant_id"
        " WHERE %s::bigint IS NULL OR k.tenant_id = %s ORDER BY t.name, k.id", (tid, tid))
    out = []
    for kid, tname, name, role, models, ingest, prefix, created, used, revoked, rpm, tpm, parallel \
            in await cur.fetchall():
        out.append({"id": kid, "tenant": tname, "name": name, "role": role, "models": models, "ingest": ingest,
                    "prefix": prefix, "rpm": rpm, "tpm": tpm, "max_parallel_requests": parallel,
                    "created_at": created.isoformat(),
                    "last_used_at": None if used is None else used.isoformat(),
                    "revoked_at": None if revoked is None else revoked.isoformat()})
    return out


async def tenant_id(conn: psycopg.AsyncConnection, name: str) -> int:
    """The one lookup of a tenant by name (404 ``tenant_not_found``)."""
    cur = await conn.execute("SELECT id FROM tenants WHERE name = %s", (name,))
    row = await cur.fetchone()
    if row is None:
        raise NotFound(f"tenant {name!r} does not exist", param="tenant", code="tenant_not_found")
    return int(row[0])


async def reachable_tenant(pool: AsyncConnectionPool, principal: Principal, named: str | None, what: str) -> int:
    """The tenant a request acts on: the key's own, or for an admin key the one it names (``what`` says,
    in the 403 of any other key, what it may only do for its own tenant)."""
    if named is None or named == principal.tenant:
        return principal.tenant_id
    require(principal.role, Can.ADMINISTER, f"This key may only {what}.", code="tenant_not_allowed")
    async with pool.connection() as conn:
        return await tenant_id(conn, named)


async def create_tenant(conn: psycopg.AsyncConnection, name: str, *, author: str = "system") -> int:
    try:
        async with conn.transaction():
            cur = await conn.execute("INSERT INTO tenants (name) VALUES (%s) RETURNING id", (name,))
            row = await cur.fetchone()
            assert row is not None
            await changes.record(conn, author=author, kind="tenant", subject=name, action="create",
                                 tenant_id=int(row[0]), after={"name": name})
    except psycopg.errors.UniqueViolation as exc:
        raise InvalidRequest(f"tenant {name!r} already exists", param="name") from exc
    except psycopg.errors.CheckViolation as exc:
        raise InvalidRequest(f"tenant name {name!r} is invalid (letters, digits, _ . -)", param="name") from exc
    return int(row[0])


async def create_key(conn: psycopg.AsyncConnection, tenant: str, *, hasher: KeyHasher, role: str = "app",
                     allowed_models: list[str] | None = None, name: str | None = None,
                     author: str = "system", ingest: bool = False) -> NewKey:
    if role not in ROLES:
        raise InvalidRequest(f"role must be one of {', '.join(ROLES)}", param="role")
    if ingest and role != Role.APP:
        raise InvalidRequest("only app keys take --ingest (admin keys may always ingest)", param="ingest")
    secret = generate_secret()
    async with conn.transaction():
        tid = await tenant_id(conn, tenant)
        cur = await conn.execute(
            "INSERT INTO api_keys (tenant_id, key_hash, key_secret_id, prefix, name, role, allowed_models, ingest)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s) RETURNING id",
            (tid, hasher.digest(secret), hasher.current_id, secret[:10], name, role, allowed_models, ingest))
        key_row = await cur.fetchone()
        assert key_row is not None
        await changes.record(conn, author=author, kind="key", subject=key_row[0], action="create", tenant_id=tid,
                             after={"id": key_row[0], "name": name, "role": role, "models": allowed_models,
                                    "ingest": ingest})
    return NewKey(id=int(key_row[0]), tenant=tenant, role=role, secret=secret, ingest=ingest)


async def revoke_key(conn: psycopg.AsyncConnection, key_id: int, *, author: str = "system",
                     reason: str | None = None) -> bool:
    async with conn.transaction():
        cur = await conn.execute(
            "UPDATE api_keys SET revoked_at = now() WHERE id = %s AND revoked_at IS NULL RETURNING tenant_id",
            (key_id,))
        row = await cur.fetchone()
        if row is None:
            return False
        await changes.record(conn, author=author, kind="key", subject=key_id, action="revoke", tenant_id=row[0],
                             reason=reason)
    return True


async def bootstrap_default_tenant(conn: psycopg.AsyncConnection, hasher: KeyHasher) -> NewKey | None:
    """On a database with no tenants, create tenant ``default`` with one app key (returned once). The
    quick start's only key, so it may also ingest documents."""
    async with conn.transaction():
        await conn.execute("LOCK TABLE tenants IN EXCLUSIVE MODE")
        cur = await conn.execute("SELECT EXISTS (SELECT 1 FROM tenants)")
        row = await cur.fetchone()
        if row is not None and row[0]:
            return None
        await create_tenant(conn, "default")
        return await create_key(conn, "default", hasher=hasher, role="app", name="bootstrap", ingest=True)
