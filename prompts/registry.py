"""What a gateway process holds of every tenant's prompts, to render from memory on the request path:
version contents, labels, compiled templates (compiled on first use, cached per version). Loaded at
start-up; a tenant is reloaded when the change channel announces a push or a label move. If a reload
fails (the store is broken or unreachable), the last good versions keep serving and the failure is kept
for ``tollway doctor`` and the logs.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from tollway.errors import NotFound, ServiceUnavailable
from tollway.guardrails import PromptGuards
from tollway.jsontypes import JSON
from tollway.prompts.labels import PRODUCTION, Label
from tollway.prompts.render import RenderPool
from tollway.prompts.spec import Prompt, PromptError, parse_prompt

log = logging.getLogger("tollway.prompts")


@dataclass(frozen=True, slots=True)
class Rendered:
    name: str
    version: str
    messages: tuple[JSON, ...]
    model: str | None
    params: JSON
    guards: PromptGuards | None = None
    label: str | None = None  # the label that chose the version (None: the request named a version)


ON_DEMAND = 64  # versions no label names, kept per tenant once a request has named them (the oldest go first)


@dataclass(slots=True)
class TenantPrompts:
    versions: dict[str, set[str]] = field(default_factory=dict)  # name -> every stored version's id
    # (name, version) -> file text: the versions labels name, and those requests named (``fetched``); a tenant's
    # history is not held whole: thousands of pushed versions would grow every gateway's memory
    contents: dict[tuple[str, str], str] = field(default_factory=dict)
    fetched: OrderedDict[tuple[str, str], None] = field(default_factory=OrderedDict)
    labels: dict[tuple[str, str], Label] = field(default_factory=dict)
    compiled: dict[tuple[str, str], Prompt] = field(default_factory=dict)

    def prompt(self, name: str, version: str) -> Prompt:
        key = (name, version)
        found = self.compiled.get(key)
        if found is None:
            found = self.compiled[key] = parse_prompt(name, version, self.contents[key])
        return found

    def keep(self, key: tuple[str, str], text: str) -> None:
        """A version a request named, held among the last ``ON_DEMAND`` such."""
        self.contents[key] = text
        self.fetched[key] = None
        self.fetched.move_to_end(key)
        while len(self.fetched) > ON_DEMAND:
            old, _ = self.fetched.popitem(last=False)
            self.contents.pop(old, None)
            self.compiled.pop(old, None)


class Registry:
    def __init__(self, pool: AsyncConnectionPool | None, renderer: RenderPool | None = None) -> None:
        self._pool = pool
        self.renderer = renderer  # bounds the time of templates that are not plain (None: in process)
        self._tenants: dict[int, TenantPrompts] = {}
        self.last_error: str | None = None  # the last failed load, for doctor and logs

    async def load(self, tenant_id: int | None = None) -> None:
        """Load every tenant (``None``) or one; on failure keep what was loaded before."""
        assert self._pool is not None, "a registry without a pool is loaded with load_with"
        try:
            async with self._pool.connection(timeout=5) as conn:
                await self.load_with(conn, tenant_id)
        except Exception as exc:
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.error("prompt store unavailable (%s); the last good versions keep serving", self.last_error)

    async def load_with(self, conn: Any, tenant_id: int | None = None, *, everything: bool | None = None) -> None:
        """Every version's id, the labels, and the text of the versions labels name (``everything``: of every
        version; by default only for a registry with no pool to read the rest from, as the CLI's)."""
        whole = self._pool is None if everything is None else everything
        if whole:
            cur = await conn.execute("SELECT tenant_id, name, version, content FROM prompt_versions"
                                     " WHERE %s::bigint IS NULL OR tenant_id = %s", (tenant_id, tenant_id))
        else:
            cur = await conn.execute(
                "WITH held AS (SELECT tenant_id, name, version FROM prompt_labels"
                " WHERE %(tid)s::bigint IS NULL OR tenant_id = %(tid)s"
                " UNION SELECT tenant_id, name, split_version FROM prompt_labels"
                " WHERE split_version IS NOT NULL AND (%(tid)s::bigint IS NULL OR tenant_id = %(tid)s))"
                " SELECT v.tenant_id, v.name, v.version, CASE WHEN h.version IS NOT NULL THEN v.content END"
                " FROM prompt_versions v LEFT JOIN held h"
                " ON h.tenant_id = v.tenant_id AND h.name = v.name AND h.version = v.version"
                " WHERE %(tid)s::bigint IS NULL OR v.tenant_id = %(tid)s", {"tid": tenant_id})
        versions = await cur.fetchall()
        cur = await conn.execute(
            "SELECT tenant_id, name, label, version, split_version, split_percent FROM prompt_labels"
            " WHERE %s::bigint IS NULL OR tenant_id = %s", (tenant_id, tenant_id))
        labels = await cur.fetchall()
        fresh: dict[int, TenantPrompts] = {}
        for tid, name, ver, content in versions:
            loaded = fresh.setdefault(tid, TenantPrompts())
            loaded.versions.setdefault(name, set()).add(ver)
            if content is not None:
                loaded.contents[(name, ver)] = content
        for tid, name, label, ver, split, percent in labels:
            fresh.setdefault(tid, TenantPrompts()).labels[(name, label)] = Label(name, label, ver, split, percent)
        for tid, loaded in fresh.items():
            old = self._tenants.get(tid)
            if old is None:
                continue
            for key in old.fetched:  # versions requests named stay held (a version never changes)
                if key not in loaded.contents and key[1] in loaded.versions.get(key[0], ()):
                    loaded.keep(key, old.contents[key])
            # and compiled templates of versions still held
            loaded.compiled = {k: v for k, v in old.compiled.items() if k in loaded.contents}
        if tenant_id is None:
            self._tenants = fresh
        else:
            self._tenants[tenant_id] = fresh.get(tenant_id, TenantPrompts())
        self.last_error = None

    async def _held(self, tenant_id: int, tenant: TenantPrompts, name: str, version: str) -> None:
        """``version``'s text in ``tenant``, read from the store if no label names it."""
        key = (name, version)
        if key in tenant.contents:
            if key in tenant.fetched:
                tenant.fetched.move_to_end(key)
            return
        row = None
        if self._pool is not None:  # (a registry without one holds every version: load_with)
            try:
                async with self._pool.connection(timeout=5) as conn:
                    cur = await conn.execute("SELECT content FROM prompt_versions WHERE tenant_id = %s AND name = %s"
                                             " AND version = %s", (tenant_id, name, version))
                    row = await cur.fetchone()
            except psycopg.Error as exc:  # the labelled versions keep serving; this one is not held here
                raise ServiceUnavailable(f"The prompt store is unavailable, and version '{version[:12]}' of prompt "
                                         f"'{name}' is not one this gateway holds; try again shortly.",
                                         code="prompts_unavailable") from exc
        if row is None:
            raise NotFound(f"Prompt '{name}' has no version '{version}'.", param="prompt.version",
                           code="prompt_not_found")
        tenant.keep(key, row[0])
        now = self._tenants.get(tenant_id)  # a reload may have replaced the tenant's entry while the row was read
        if now is not None and now is not tenant and version in now.versions.get(name, ()):
            now.keep(key, row[0])

    async def render(self, tenant_id: int, subject: str, ref: JSON) -> Rendered:
        """``ref``: the request's ``prompt`` object, ``{name, label | version | ref, variables}`` (``ref``: a
        label if the prompt has one of that name, else a version). A template that is not plain renders in the
        render pool, bounded in time (in this process when the registry has none)."""
        prompt, chosen, label_name = await self._resolve(tenant_id, subject, ref)
        messages = await prompt.render_in(self.renderer, ref.get("variables"), tenant_id)
        return Rendered(prompt.name, chosen, tuple(messages), prompt.model, prompt.params, prompt.guards, label_name)

    async def _resolve(self, tenant_id: int, subject: str, ref: JSON) -> tuple[Prompt, str, str | None]:
        name = ref.get("name")
        if not isinstance(name, str) or not name:
            raise PromptError("'prompt.name' is required.", param="prompt.name")
        label, version, either = ref.get("label"), ref.get("version"), ref.get("ref")
        if sum(x is not None for x in (label, version, either)) > 1:
            raise PromptError("Give one of 'prompt.label', 'prompt.version' or 'prompt.ref'.", param="prompt.version")
        if either is not None:  # a label of this prompt if it has one of that name, else a version
            key = "label" if str(either) in self.label_names(tenant_id, name) else "version"
            label, version = (str(either), None) if key == "label" else (None, str(either))
        tenant = self._tenants.get(tenant_id)
        versions = tenant.versions.get(name) if tenant is not None else None
        if tenant is None or not versions:
            raise NotFound(f"Prompt '{name}' does not exist.", param="prompt.name", code="prompt_not_found")
        label_name = None
        if version is not None:
            chosen = _by_id(versions, str(version), name)
        else:
            label_name = str(label or PRODUCTION)
            found = tenant.labels.get((name, str(label or PRODUCTION)))
            if found is None:
                raise NotFound(f"Prompt '{name}' has no label '{label or PRODUCTION}' (name a version, or move the "
                               "label first).", param="prompt.label", code="prompt_not_found")
            chosen = found.pick(subject)
        await self._held(tenant_id, tenant, name, chosen)
        return tenant.prompt(name, chosen), chosen, label_name

    async def render_ref(self, tenant_id: int, subject: str, name: str, ref: str,
                         variables: JSON | None) -> Rendered:
        """Render by one reference that is a label if the prompt has one of that name, else a version
        (the dry runs of the API and the CLI)."""
        return await self.render(tenant_id, subject, {"name": name, "ref": ref, "variables": variables})

    async def prompt(self, tenant_id: int, name: str, version: str) -> Prompt:
        """One version, compiled (NotFound if the store does not hold it)."""
        tenant = self._tenants.get(tenant_id)
        versions = tenant.versions.get(name) if tenant is not None else None
        if tenant is None or not versions:
            raise NotFound(f"Prompt '{name}' does not exist.", param="prompt", code="prompt_not_found")
        chosen = _by_id(versions, version, name)
        await self._held(tenant_id, tenant, name, chosen)
        return tenant.prompt(name, chosen)

    def label_version(self, tenant_id: int, name: str, label: str) -> str | None:
        tenant = self._tenants.get(tenant_id)
        found = tenant.labels.get((name, label)) if tenant is not None else None
        return None if found is None else found.version

    def has(self, tenant_id: int) -> bool:
        tenant = self._tenants.get(tenant_id)
        return tenant is not None and bool(tenant.versions)

    def label_names(self, tenant_id: int, name: str) -> set[str]:
        tenant = self._tenants.get(tenant_id)
        return set() if tenant is None else {label for (n, label) in tenant.labels if n == name}

    def count(self) -> dict[str, Any]:
        return {"tenants": len(self._tenants),
                "versions": sum(len(v) for t in self._tenants.values() for v in t.versions.values()),
                "held": sum(len(t.contents) for t in self._tenants.values())}


def _by_id(versions: set[str], ref: str, name: str) -> str:
    if ref in versions:
        return ref
    matches = [v for v in versions if len(ref) >= 7 and v.startswith(ref)]
    if len(matches) != 1:
        raise NotFound(f"Prompt '{name}' has no version '{ref}'.", param="prompt.version", code="prompt_not_found")
    return matches[0]
