"""The quality monitor: drift detection per route over the scored live samples, alerts, automatic rollback
and progressive rollouts.

Every replica runs it; one at a time leads (a PostgreSQL advisory lock held on a connection of its own;
when the leader goes, another takes over and rebuilds its state from the samples). Each pass the leader
reads the samples scored since the last one, in order, and feeds them to its watches:

- **canary** (a model rollout with a canary share): the candidate's answers against the answers of the
  model it stands in for, served meanwhile (``RouteTest``);
- **prompt** (a prompt label moved in the last ``watch_days``, or split between two versions): the
  label's new version against the version it held before (or the split's two versions); the watch runs
  on past ``watch_days`` until its test has decided (``Watch.decided``), ``watch_max_days`` at most; a
  progressive rollout's step until it moves on or is rolled back, however long that takes;
- **steady** (every model's traffic without a prompt, every prompt label): the route against its own
  trailing baseline (``SteadyWatch``).

A breach raises an alert with its evidence (``tollway.infra.alerts``; OpenTelemetry counter; webhook). On a
canary with ``auto_rollback`` the rollout goes to 0% (``rolled_back``); on a moved prompt label, with
``quality.auto_rollback``, the label goes back to its previous version; both recorded in the change
channel with the alert and its evidence. A progressive rollout (model steps, or a prompt rollout's split
steps) moves to its next step once its test shows no regression over ``min_samples`` samples.

Each pass also writes the sampling rate each watch asks for (``quality_rates``), read by every replica.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from tollway.errors import NotFound
from tollway.evals import Finding, Scored
from tollway.gateway.observability.telemetry import Telemetry
from tollway.gateway.quality.incidents import BUCKET_S, KEEP_S, Incidents
from tollway.gateway.quality.sampling import LiveQuality, QualitySettings
from tollway.gateway.quality.watches import (
    SAMPLE_COLUMNS,
    Route,
    Row,
    Watch,
    Watches,
    model_key,
    prompt_key,
    row_of,
    version_key,
)
from tollway.infra.alerts import raise_alert
from tollway.jsontypes import JSON
from tollway.prompts import move_label, rollback
from tollway.routing import Rollout, list_rollouts, move_rollout

log = logging.getLogger("tollway.quality")
AUTHOR = "tollway-quality"  # what the monitor's own changes are recorded as
LOCK = 0x746F6C6C7761  # the advisory lock of the leading monitor
BATCH = 10_000


class Monitor:
    def __init__(self, pool: AsyncConnectionPool, database_url: str, settings: QualitySettings,
                 quality: LiveQuality, telemetry: Telemetry) -> None:
        self.pool, self.url, self.settings, self.quality, self.telemetry = pool, database_url, settings, quality, telemetry
        self.core = Watches(settings.drift, settings.policy, Incidents(settings.incidents))
        self.cursor = -1  # the last sample fed (-1: none yet; a new leader starts at the newest)
        self.first = 0  # the cursor this leadership started at: older samples were never fed (their traffic unseen)
        self.failures_from: float | None = None  # the failed attempts are read again from here (None: a new leader)
        self._lock: psycopg.AsyncConnection[Any] | None = None

    @property
    def watches(self) -> dict[str, Watch]:
        return self.core.watches

    async def close(self) -> None:
        if self._lock is not None:
            with contextlib.suppress(psycopg.Error):  # released now, not when the server ends the backend
                await self._lock.execute("SELECT pg_advisory_unlock(%s)", (LOCK,))
            with contextlib.suppress(psycopg.Error):
                await self._lock.close()
            self._lock = None

    @property
    def leading(self) -> bool:
        return self._lock is not None and not self._lock.closed

    async def leads(self) -> bool:
        if self._lock is not None and not self._lock.closed:
            return True
        try:
            conn = await psycopg.AsyncConnection.connect(self.url, autocommit=True)
        except psycopg.Error:
            return False
        cur = await conn.execute("SELECT pg_try_advisory_lock(%s)", (LOCK,))
        row = await cur.fetchone()
        if row is None or not row[0]:
            await conn.close()
            return False
        self._lock = conn
        self.rebuild()
        return True

    def rebuild(self) -> None:
        """Forget every watch: the next pass rebuilds them from the stored samples and changes, as a new
        leader does."""
        self.cursor, self.failures_from = -1, None
        self.core = Watches(self.settings.drift, self.settings.policy, Incidents(self.settings.incidents))

    async def tick(self) -> None:
        """One pass (a periodic job calls it): lead if nobody does, then read the rates every replica uses."""
        try:
            if await self.leads():
                await self.run_pass()
        except psycopg.OperationalError:
            await self.close()  # the lock's connection may be gone: lead again next pass if we can
            raise
        finally:
            await self.quality.refresh_rates()

    # -- one pass ---------------------------------------------------------------------------------
    async def run_pass(self) -> list[JSON]:
        """Sync the watches with what is rolled out, feed them the new samples, act on what they find.
        Returns the alerts raised."""
        raised: list[JSON] = []
        async with self.pool.connection() as conn:
            if self.cursor < 0:  # a new leader starts at the newest sample; the watches load their history
                cur = await conn.execute("SELECT coalesce(max(id), 0) FROM quality_samples")
                first = await cur.fetchone()
                self.cursor = self.first = int(first[0]) if first else 0
            await self._sync(conn)
            while True:
                cur = await conn.execute(f"SELECT {SAMPLE_COLUMNS} FROM quality_samples WHERE id > %s ORDER BY id LIMIT %s",
                                         (self.cursor, BATCH))
                rows = [row_of(r) for r in await cur.fetchall()]
                await self._failures(conn)  # after the samples: their failed attempts are in the ledger before them
                for row in rows:
                    self.cursor = row.id
                    if (route := self.core.route(row)) is not None:
                        watch, replayed = self.core.start(route, await self._history(conn, route, row))
                        if replayed:  # the replayed newest samples already breach
                            raised.append(await self._breach(conn, watch, replayed, row.id))
                    for watch, found in self.core.feed(row):
                        if found:
                            raised.append(await self._breach(conn, watch, found, row.id))
                        else:
                            await self._advance(conn, watch)
                if len(rows) < BATCH:
                    break
            self.core.tidy(time.time())
            await self._rates(conn)
        return raised

    async def _sync(self, conn: psycopg.AsyncConnection[Any]) -> None:
        wanted: dict[str, Watch] = {}
        rollouts = await list_rollouts(conn)
        self.core.completed = {r.model: r.candidate for r in rollouts if r.state == "complete"}
        for rollout in rollouts:
            if rollout.state == "active" and rollout.canary_percent > 0:
                w = self._canary(rollout)
                wanted[w.key] = w
        cur = await conn.execute(
            "SELECT DISTINCT ON (c.tenant_id, c.subject) extract(epoch FROM now() - c.at)::float8, c.id, c.tenant_id,"
            " c.before, c.after, c.author, r.candidate, r.previous, r.steps, r.step, r.min_samples, r.state"
            " FROM changes c LEFT JOIN prompt_rollouts r ON r.tenant_id = c.tenant_id"
            " AND c.subject = r.name || ':' || r.label WHERE c.kind = 'prompt_label'"
            " AND (c.at > now() - make_interval(secs => %s) OR r.state = 'active')"
            " ORDER BY c.tenant_id, c.subject, c.id DESC",
            (self.settings.watch_max_days * 86400,))
        overtime: set[str] = set()  # watches past watch_days: they run on only until decided
        for age, *change in await cur.fetchall():
            if (pw := self._prompt(*change)) is not None:
                # A rollout's step is watched until it moves on or back, however long its evidence takes (left
                # unwatched it would hold its split for good); the query also returns the latest change of a
                # label whose rollout is active when it is older than watch_max_days: only its step is kept.
                if pw.progressive:
                    wanted[pw.key] = pw
                elif age <= self.settings.watch_max_days * 86400:
                    wanted[pw.key] = pw
                    if age > self.settings.watch_days * 86400:
                        overtime.add(pw.key)
        watches = self.core.watches
        for key in [k for k, w in watches.items() if w.kind != "steady" and k not in wanted]:
            del watches[key]  # rolled back, completed, moved again: its test ends
        for key in [k for k in overtime if k in watches and watches[k].decided()]:
            del watches[key]  # past its days and decided: done with
            self.core.ended.add(key)
        for key, w in wanted.items():
            if key not in watches and key not in self.core.ended:  # e.g. a breach with auto_rollback off
                await self._load(conn, w)
                if key in overtime and w.decided():  # a new leader: this one had decided before its time ran out
                    self.core.ended.add(key)
                    continue
                watches[key] = w

    def _canary(self, r: Rollout) -> Watch:
        settings = replace(self.settings.drift, min_samples=r.min_samples)
        return Watch(
            key=f"canary:{r.model}:{r.candidate}:{r.updated_at.timestamp()}", kind="canary",
            subject=f"canary {r.candidate} for {r.model} at {r.canary_percent:g}%", rate_key=model_key(r.candidate),
            tenant_id=None, settings=settings, rollout=r,
            candidate=lambda s: s.model == r.candidate and s.rollout_of == r.model and s.id >= r.first_sample,
            baseline=lambda s: s.model == r.model and s.rollout_of is None)

    def _prompt(self, change_id: int, tenant_id: int, before: JSON | None, after: JSON | None, author: str,
                candidate: str | None, previous: str | None, steps: list[float] | None, step: int | None,
                min_samples: int | None, state: str | None) -> Watch | None:
        if after is None:
            return None
        name, label, version = after.get("prompt"), after.get("label"), after.get("version")
        split, share = after.get("split_version"), float(after.get("split_percent") or 0)
        progressive = state == "active" and candidate is not None and candidate == split
        if split and share > 0:
            new, old = split, version
        elif before is not None and before.get("version") != version and author != AUTHOR:
            new, old = version, before.get("version")
        else:
            return None
        settings = self.settings.drift if min_samples is None else replace(self.settings.drift, min_samples=min_samples)
        info = {"tenant_id": tenant_id, "name": name, "label": label, "version": new, "previous": old,
                "change": change_id, "split": bool(split and share > 0), "split_percent": share,
                "progressive": progressive, "steps": steps or [], "step": step or 0}
        return Watch(
            key=f"prompt:{tenant_id}:{name}:{label}:{change_id}", kind="prompt",
            subject=f"prompt {name}@{label} version {str(new)[:12]} (was {str(old)[:12]})",
            rate_key=version_key(tenant_id, str(name), str(label), str(new)) if info["split"]
            else prompt_key(tenant_id, str(name), str(label)), tenant_id=tenant_id, settings=settings, prompt=info,
            candidate=lambda s: s.tenant_id == tenant_id and s.prompt_name == name and s.prompt_version == new,
            baseline=lambda s: s.tenant_id == tenant_id and s.prompt_name == name and s.prompt_version == old)

    async def _failures(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """The failed attempts per model and bucket (upstream incidents): a new leader reads ``KEEP_S`` back,
        then each read starts two buckets before the last (a bucket is read whole; an attempt's row carries
        its request's start, and may land after a slow failure)."""
        incidents = self.core.incidents
        if incidents.settings.min_failures <= 0:
            return
        now = time.time()
        since = now - KEEP_S if self.failures_from is None else self.failures_from
        cur = await conn.execute(
            "SELECT model, floor(extract(epoch FROM created_at) / %s)::bigint AS b, count(*) FROM ledger"
            " WHERE role = 'attempt' AND model IS NOT NULL AND created_at >= to_timestamp(%s) GROUP BY 1, 2",
            (BUCKET_S, Incidents.bucket(since) * BUCKET_S))
        for model, bucket, n in await cur.fetchall():
            incidents.failed(model, int(bucket), int(n))
        self.failures_from = now - 2 * BUCKET_S

    def _outside_incidents(self, rows: list[Row]) -> list[Row]:
        """Stored samples without those answered inside an upstream incident (as ``feed`` sets them aside);
        those from before this leadership have their traffic counted first (never fed, never counted; two
        watches loading the same old rows count them twice, which only makes an old incident harder to mark)."""
        incidents = self.core.incidents
        for row in rows:
            if row.id <= self.first:
                incidents.sampled(row.model, row.scored.at, row.scored.rate)
        return [row for row in rows if not incidents.covers(row.model, row.scored.at)]

    async def _history(self, conn: psycopg.AsyncConnection[Any], route: Route, row: Row) -> list[Scored]:
        """A route's stored samples before ``row``, oldest first, as many as its new watch reads (a
        completed rollout's candidate answers count as the model's), less those inside upstream incidents."""
        cur = await conn.execute(
            f"SELECT {SAMPLE_COLUMNS} FROM (SELECT * FROM quality_samples WHERE {route.where} AND"
            " (rollout_of IS NULL OR rollout_of || ' ' || model = ANY(%s)) AND id < %s ORDER BY id DESC LIMIT %s) s"
            " ORDER BY id",
            (*route.args, [f"{m} {c}" for m, c in self.core.completed.items()], row.id, self.core.history_size()))
        return [r.scored for r in self._outside_incidents([row_of(r) for r in await cur.fetchall()])]

    async def _load(self, conn: psycopg.AsyncConnection[Any], w: Watch) -> None:
        """A new watch's history: its baseline and its candidate's samples so far (up to the cursor)."""
        assert w.baseline is not None
        models = None if w.rollout is None else [w.rollout.model, w.rollout.candidate]
        cur = await conn.execute(
            f"SELECT {SAMPLE_COLUMNS} FROM (SELECT * FROM quality_samples WHERE id <= %s AND (%s::text[] IS NULL"
            " OR model = ANY(%s)) AND (%s::bigint IS NULL OR tenant_id = %s) ORDER BY id DESC LIMIT %s) s ORDER BY id",
            (self.cursor, models, models, w.tenant_id, w.tenant_id, 4 * self.settings.drift.baseline_max))
        w.base = deque(maxlen=w.settings.baseline_max)
        rows = self._outside_incidents([row_of(r) for r in await cur.fetchall()])
        for row in rows:
            if w.old(row):
                w.base.append(row.scored)
        # the new version's samples through its tests; a paired watch's with the old version's beside them,
        # in the order they answered (before the new version's first, there is no test to read them)
        for row in rows:
            w.replay(row)

    # -- acting ---------------------------------------------------------------------------------
    async def _breach(self, conn: psycopg.AsyncConnection[Any], w: Watch, found: list[Finding], at: int) -> JSON:
        """``at``: the sample that completed the evidence (a steady route's alerts are one per shift; a
        change's, one per change: two monitors that both saw it raise one alert)."""
        if w.steady is not None:  # it has started over (or its breached detectors have): the breach it recorded
            samples, baseline, detectors = w.steady.breached or (0, 0, [])
        else:
            samples, detectors = (0, []) if w.test is None else (w.test.n, w.test.detectors)
            baseline = len(w.base)
        evidence: JSON = {"watch": w.key, "kind": w.kind, "findings": [f.as_json() for f in found],
                          "samples": samples, "baseline_samples": baseline, "alpha": w.settings.alpha,
                          "detectors": detectors}
        names = ", ".join(f"{f.detector} ({f.test})" for f in found)
        message = f"Quality drift on {w.subject}: {names}"
        action = None
        if w.rollout is not None and w.rollout.auto_rollback:
            action = "rollback"
        elif w.prompt is not None and (self.settings.auto_rollback or w.prompt["progressive"]):
            action = "rollback"
        evidence["action"] = action
        async with conn.transaction():
            alert_id = await raise_alert(conn, tenant_id=w.tenant_id, kind="drift", subject=w.subject,
                                         dedupe_key=f"drift:{w.key}" + (f":{at}" if w.steady is not None else ""),
                                         message=message, evidence=evidence)
        if alert_id is not None:  # not raised already (by another monitor, before a leadership change)
            self.telemetry.alert("drift")
            log.warning("%s (alert %s)", message, alert_id)
        if action == "rollback":
            await self._rollback(conn, w, {**evidence, "alert": alert_id}, message)
        if w.steady is None:
            w.done = True
        return {"alert": alert_id, "message": message, **evidence}

    async def _rollback(self, conn: psycopg.AsyncConnection[Any], w: Watch, evidence: JSON, why: str) -> None:
        try:
            if w.rollout is not None:
                await move_rollout(conn, w.rollout, action="rollback", author=AUTHOR, reason=why, evidence=evidence)
            elif w.prompt is not None:
                await self._move_prompt(conn, w.prompt, "rollback", why, evidence)
        except NotFound as exc:  # someone changed it meanwhile: theirs stands
            log.info("no rollback of %s: %s", w.subject, exc.message)

    async def _advance(self, conn: psycopg.AsyncConnection[Any], w: Watch) -> None:
        assert w.test is not None
        evidence: JSON = {"watch": w.key, "samples": w.test.n, "baseline_samples": len(w.base),
                          "detectors": w.test.detectors,
                          "accepted": {t.name: t.accepted for t in w.test.pass_tests}}
        why = f"no regression over {w.test.n} scored samples"
        try:
            if w.rollout is not None:
                after = await move_rollout(conn, w.rollout, action="advance", author=AUTHOR, reason=why,
                                           evidence=evidence)
                log.info("rollout of %s: %s (%s%%)", w.rollout.model, after.state, after.canary_percent)
            elif w.prompt is not None:
                await self._move_prompt(conn, w.prompt, "advance", why, evidence)
        except NotFound as exc:
            log.info("no step for %s: %s", w.subject, exc.message)
        w.done = True  # the next step is a new watch (next pass), from its first sample

    async def _move_prompt(self, conn: psycopg.AsyncConnection[Any], p: JSON, action: str, why: str,
                           evidence: JSON) -> None:
        tenant_id, name, label = p["tenant_id"], p["name"], p["label"]
        cur = await conn.execute("SELECT name FROM tenants WHERE id = %s", (tenant_id,))
        row = await cur.fetchone()
        if row is None:
            return
        tenant = str(row[0])
        reason = f"{why} (quality monitor)"
        cur = await conn.execute("SELECT version, split_version FROM prompt_labels WHERE tenant_id = %s AND name = %s"
                                 " AND label = %s", (tenant_id, name, label))
        held = await cur.fetchone()
        if held is None or (held[1] if p["split"] else held[0]) != p["version"]:
            log.info("prompt %s@%s moved meanwhile: the monitor leaves it", name, label)
            return
        step = p["step"]
        if action == "rollback":
            if p["split"]:  # the split goes: every user back on the version the label holds
                await move_label(conn, tenant_id, tenant, name, label, p["previous"], author=AUTHOR,
                                        reason=reason, admin=True, override=True, note=evidence)
            else:
                await rollback(conn, tenant_id, tenant, name, label, author=AUTHOR, reason=reason,
                                      note=evidence)
            state = "rolled_back"
        else:
            steps = p["steps"]
            nxt = next((i for i, s in enumerate(steps) if s > p["split_percent"]), None)
            if nxt is None or steps[nxt] >= 100:
                await move_label(conn, tenant_id, tenant, name, label, p["version"], author=AUTHOR,
                                        reason=reason, admin=True, override=True, note=evidence)
                state, step = "complete", len(steps) - 1
            else:
                await move_label(conn, tenant_id, tenant, name, label, p["previous"], author=AUTHOR,
                                        reason=reason, split_version=p["version"], split_percent=steps[nxt],
                                        admin=True, override=True, note=evidence)
                state, step = "active", nxt
        await conn.execute("UPDATE prompt_rollouts SET state = CASE WHEN state = 'active' THEN %s ELSE state END,"
                           " step = %s, updated_at = now() WHERE tenant_id = %s AND name = %s AND label = %s"
                           " AND candidate = %s", (state, step, tenant_id, name, label, p["version"]))

    async def _rates(self, conn: psycopg.AsyncConnection[Any]) -> None:
        policy = self.settings.policy
        rates = self.core.rates(time.time())
        async with conn.transaction():
            await conn.execute("DELETE FROM quality_rates WHERE NOT (key = ANY(%s))", (list(rates),))
            for key, (rate, progress) in rates.items():
                if rate > policy.base or progress > 0:
                    await conn.execute(
                        "INSERT INTO quality_rates (key, rate, progress) VALUES (%s, %s, %s) ON CONFLICT (key)"
                        " DO UPDATE SET rate = EXCLUDED.rate, progress = EXCLUDED.progress, updated_at = now()",
                        (key, max(rate, 1e-6), progress))

    def incidents(self) -> JSON:
        """The upstream incidents this leader knows of (eight days), and the samples they set aside."""
        incidents = self.core.incidents
        return {"set_aside": incidents.set_aside, "windows": [
            {"model": model, "start": _iso(start), "end": _iso(end)}
            for model in sorted(incidents.failures) for start, end in incidents.windows(model)]}

    def describe(self) -> list[JSON]:
        now = time.time()
        return [{**w.state(), "idle": self.core.idle(w, now)} for w in self.watches.values()]


def _iso(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).isoformat()
