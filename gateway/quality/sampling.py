"""Live sampling: a share of live answers per route (model, prompt label) scored off the request path.

After an answer has gone to the client, ``offer`` draws against the route's sampling rate (2% by
default; the monitor raises it for a route whose detectors near a threshold, ``quality_rates``) and puts
a copy on a bounded queue; it never waits: a full queue drops the sample and counts it
(``tollway_quality_samples{outcome="dropped"}``). Scorer tasks take samples off the queue, run the
reference-free checks (``tollway.evals.live``) and, where a judge model is configured, the judge (its call
is a ledger row of role ``eval``: evaluation spend, not the tenant's budget), and write one
``quality_samples`` row. Prompts and answers are stored with it only where the tenant's policy says so
(``store_content``), and only for ``content_retention_days``; ``erase`` deletes them on request.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import time
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import orjson
import psycopg
from psycopg_pool import AsyncConnectionPool
from pydantic import BaseModel, ConfigDict, Field

from tollway.config import parse_section
from tollway.errors import TollwayError
from tollway.evals import JUDGE_SYSTEM, Answer, DriftSettings, SamplingPolicy, check_answer, judge_score
from tollway.gateway.chat.exchange import Answered
from tollway.gateway.chat.wire import choice_text, usage_of
from tollway.gateway.metering.accounting import side_row
from tollway.gateway.metering.ledger import Ledger, LedgerRow
from tollway.gateway.observability.telemetry import Telemetry
from tollway.gateway.quality.incidents import IncidentSettings
from tollway.gateway.quality.watches import model_key, prompt_key, version_key
from tollway.infra import changes
from tollway.infra.db import storable
from tollway.jsontypes import JSON
from tollway.routing import ChainFailed, ConfigError, Router, Usage, count_messages, count_text

log = logging.getLogger("tollway.quality")
JUDGE_RUBRIC = ("Does the answer respond to the user's last message helpfully and correctly, without inventing "
                "facts? 10: fully; 0: not at all.")
_DRIFT = DriftSettings()  # the detectors' defaults
_INCIDENTS = IncidentSettings()


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RawQuality(_Strict):
    enabled: bool = True
    sample_rate: float = Field(default=0.02, ge=0, le=1)  # the base share of live answers scored per route
    max_sample_rate: float = Field(default=0.25, ge=0, le=1)  # the bound adaptive sampling rises to
    queue_size: int = Field(default=1000, ge=1)
    scorers: int = Field(default=2, ge=1, le=32)
    judge_model: str | None = None  # scores answers where set (a ledger row of role 'eval' each)
    judge_rubric: str = JUDGE_RUBRIC
    interval_s: float = Field(default=10.0, gt=0)  # how often the monitor reads new samples
    alpha: float = Field(default=0.0025, gt=0, lt=0.5)  # a route's false-alarm budget, across its detectors
    pass_drop: float | None = Field(default=0.05, gt=0, lt=1)  # the drop the SPRT looks for (null: mSPRT)
    sequential_share: float = Field(default=0.5, gt=0, lt=1)  # alpha's share for the pass-rate tests
    window: int = Field(default=200, ge=20)
    baseline_samples: int = Field(default=1000, ge=20)
    baseline_max: int = Field(default=5000, ge=20)
    evidence_hours: float = Field(default=_DRIFT.evidence_hours, ge=0)  # a pass-rate test climbs 1/this per hour
    alarm_days: float = Field(default=_DRIFT.alarm_days, ge=0)  # window tests: one false alarm in this many days
    incident_failures: int = Field(default=_INCIDENTS.min_failures, ge=0)  # failed attempts in 5 min (0: off)
    incident_share: float = Field(default=_INCIDENTS.share, ge=0, le=1)  # ... and this share of the model's requests
    min_samples: int = Field(default=200, ge=1)  # scored samples per progressive step (the rollout's own wins)
    watch_days: float = Field(default=7.0, gt=0)  # a moved prompt label is compared with its last version this long
    watch_max_days: float = Field(default=28.0, gt=0)  # ... and on, until its test has decided, at most this long
    auto_rollback: bool = True  # a breach on a moved prompt label moves it back (rollouts: their own flag)
    # a moved label is held to its old version's pass rate less this many standard errors (0: the rate itself)
    moved_caution: float = Field(default=_DRIFT.moved_caution, ge=0, le=5)
    retention_interval_s: float = Field(default=3600.0, gt=0)


@dataclass(frozen=True, slots=True)
class QualitySettings:
    enabled: bool
    policy: SamplingPolicy
    drift: DriftSettings
    queue_size: int = 1000
    scorers: int = 2
    judge_model: str | None = None
    judge_rubric: str = JUDGE_RUBRIC
    interval_s: float = 10.0
    watch_days: float = 7.0
    auto_rollback: bool = True
    retention_interval_s: float = 3600.0
    incidents: IncidentSettings = _INCIDENTS
    watch_max_days: float = 28.0


async def list_rates(conn: psycopg.AsyncConnection[Any]) -> list[JSON]:
    """The sampling rates the monitor asks for above the base rate (every replica reads them)."""
    cur = await conn.execute("SELECT key, rate, progress, updated_at FROM quality_rates ORDER BY key")
    return [{"key": k, "rate": r, "progress": p, "updated_at": u.isoformat()} for k, r, p, u in await cur.fetchall()]


def quality_settings(data: Any) -> QualitySettings:
    """The config file's ``quality:`` section."""
    raw = parse_section(RawQuality, data, "quality")
    if raw.max_sample_rate < raw.sample_rate:
        raise ConfigError("quality.max_sample_rate must be at least quality.sample_rate")
    drift = DriftSettings(alpha=raw.alpha, pass_drop=raw.pass_drop, sequential_share=raw.sequential_share,
                          window=raw.window,
                          baseline_samples=raw.baseline_samples, baseline_max=max(raw.baseline_max, raw.baseline_samples),
                          evidence_hours=raw.evidence_hours, alarm_days=raw.alarm_days,
                          min_samples=raw.min_samples, moved_caution=raw.moved_caution)
    return QualitySettings(raw.enabled, SamplingPolicy(base=raw.sample_rate, ceiling=raw.max_sample_rate), drift,
                           raw.queue_size, raw.scorers, raw.judge_model, raw.judge_rubric, raw.interval_s,
                           raw.watch_days, raw.auto_rollback, raw.retention_interval_s,
                           IncidentSettings(raw.incident_failures, raw.incident_share),
                           max(raw.watch_max_days, raw.watch_days))


@dataclass(frozen=True, slots=True)
class LiveSample:
    row: LedgerRow  # the answer's ledger row (a copy)
    label: str | None
    rollout_of: str | None
    messages: list[JSON]
    output: str
    payload: JSON | None
    response_format: Any
    guard_actions: tuple[str, ...]
    sources: tuple[JSON, ...]
    rate: float
    store_content: bool


class LiveQuality:
    def __init__(self, pool: AsyncConnectionPool, router: Router, ledger: Ledger, telemetry: Telemetry,
                 settings: QualitySettings, rng: random.Random | None = None) -> None:
        self.pool, self.router, self.ledger, self.telemetry = pool, router, ledger, telemetry
        self.settings = settings
        self.rng = rng or random.Random()
        self.rates: dict[str, float] = {}  # from quality_rates: what the monitor asks for, per key
        self.queue: asyncio.Queue[LiveSample] = asyncio.Queue(settings.queue_size)
        self.dropped = 0
        self.scored = 0
        self._workers: list[asyncio.Task[None]] = []

    def queue_state(self) -> JSON:
        """This replica's scoring queue (the admin API and the console show it)."""
        return {"depth": self.queue.qsize(), "size": self.queue.maxsize, "dropped": self.dropped,
                "scored": self.scored}

    # -- the request side: cheap, never waits -----------------------------------------------------
    def rate(self, model: str, tenant_id: int, prompt: str | None, label: str | None,
             version: str | None = None) -> float:
        if not self.rates:  # every route at the base rate (the usual case): no key to build
            return self.settings.policy.base
        rate = max(self.settings.policy.base, self.rates.get(model_key(model), 0.0))
        if prompt is not None and label is not None:
            rate = max(rate, self.rates.get(prompt_key(tenant_id, prompt, label), 0.0))
            if version is not None:  # a split's candidate (its rollout's watch may ask for more)
                rate = max(rate, self.rates.get(version_key(tenant_id, prompt, label, version), 0.0))
        return rate

    def offer(self, done: Answered) -> None:
        """An answered request: maybe a sample of it (after the answer went out, so it delays nothing).
        ``done.payload`` makes the chat.completion the checks read, for a sampled answer only."""
        row = done.row
        if not self.settings.enabled or row.status != 200 or row.model is None or row.cache_hit or row.degraded:
            return
        rate = self.rate(row.model, row.tenant_id, row.prompt_name, done.label, row.prompt_version)
        if rate <= 0 or self.rng.random() >= rate:
            return
        sample = LiveSample(
            row=dataclasses.replace(row, tags=None if row.tags is None else list(row.tags)), label=done.label,
            rollout_of=done.rollout_of if row.rollout == "canary" else None, messages=list(done.messages),
            output=done.output, payload=done.payload(), response_format=done.response_format,
            guard_actions=done.guard_actions, sources=done.sources, rate=rate, store_content=done.store_content)
        try:
            self.queue.put_nowait(sample)
        except asyncio.QueueFull:
            self.dropped += 1
            self.telemetry.quality_sample(row.model, "dropped")

    # -- the scorers ------------------------------------------------------------------------------
    def start(self) -> None:
        self._workers = [asyncio.create_task(self._work(), name=f"quality-scorer-{i}")
                         for i in range(self.settings.scorers)]

    async def stop(self, drain_s: float = 10.0) -> None:
        """Score what is queued (for at most ``drain_s``), then stop."""
        if any(not t.done() for t in self._workers):
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(drain_s):
                    await self.queue.join()
        for task in self._workers:
            task.cancel()
        for task in self._workers:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _work(self) -> None:
        while True:
            sample = await self.queue.get()
            try:
                await self.score(sample)
            except Exception:
                log.exception("could not score the live sample of %s", sample.row.request_id)
            finally:
                self.queue.task_done()

    async def score(self, s: LiveSample) -> int:
        row = s.row
        answer = Answer(s.output, s.payload)
        checks = check_answer(answer, response_format=s.response_format, guard_actions=s.guard_actions,
                              sources=s.sources)
        judged = await self._judge(s) if self.settings.judge_model else None
        outcome = "passed" if checks.passed else "failed"
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                "INSERT INTO quality_samples (tenant_id, request_id, end_user, model, rollout_of, prompt_name,"
                " prompt_label, prompt_version, passed, judge_score, refusal, guard_failed, retrieval_score,"
                " output_chars, tokens, cost_usd, checks, sample_rate, prompt_text, output_text, feedback_score)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s,"
                " (SELECT score FROM feedback WHERE request_id = %s AND tenant_id = %s ORDER BY id DESC LIMIT 1))"
                " RETURNING id",
                (row.tenant_id, row.request_id, storable(row.end_user), row.model, s.rollout_of, row.prompt_name, s.label,
                 row.prompt_version, checks.passed, judged, checks.refusal, checks.guard_failed,
                 checks.retrieval_score, len(s.output), row.input_tokens + row.output_tokens, row.cost_usd,
                 orjson.dumps(checks.checks).decode(), s.rate,
                 storable(orjson.dumps(s.messages).decode()) if s.store_content else None,
                 storable(s.output) if s.store_content else None, row.request_id, row.tenant_id))
            found = await cur.fetchone()
        assert found is not None
        self.scored += 1
        self.telemetry.quality_sample(row.model or "", outcome)
        return int(found[0])

    async def _judge(self, s: LiveSample) -> float | None:
        """The configured judge's score of this answer, 0..1 (None: it gave none, or failed)."""
        name = self.settings.judge_model
        assert name is not None
        entry = self.router.catalog.get(name)
        if entry is None:
            return None
        question = "\n".join(f"{m.get('role')}: {m.get('content')}" for m in s.messages if isinstance(m, dict))
        body: JSON = {"model": entry.name, "temperature": 0, "max_tokens": 200, "messages": [
            {"role": "system", "content": JUDGE_SYSTEM},
            {"role": "user", "content": f"Rubric:\n{self.settings.judge_rubric}\n\nConversation:\n{question}\n\n"
                                        f"Answer:\n{s.output}"}]}
        decision = self.router.direct(entry, reason="quality-judge")
        started = time.perf_counter()
        status, code, text, usage, replica = 200, None, "", Usage(), entry.upstream
        try:
            served = await self.router.call(decision, body, stream=False)
            served.release(True)
            replica = served.replica
            text = choice_text(served.response or {}, "message")
            usage = usage_of((served.response or {}).get("usage")) or Usage(
                input_tokens=count_messages(body["messages"]), output_tokens=count_text(text))
        except ChainFailed as failed:
            status, code = failed.error.status, failed.error.code
        except TollwayError as exc:
            status, code = exc.status, exc.code
        judge_row = side_row(s.row, suffix="judge", role="eval", attempt=1, entry=entry, replica=replica,
                             status=status, error_code=code, usage=usage,
                             usage_source="upstream" if status == 200 else None,
                             latency_ms=(time.perf_counter() - started) * 1000, stream=False, cache_hit=False,
                             saved_usd=Decimal(0), degraded=False, rollout=None, route_reason=decision.reason,
                             guard_outcome=None)
        self.ledger.record(dataclasses.replace(judge_row, tags=[*(judge_row.tags or []), "eval", "quality-judge"]))
        return judge_score(text) if status == 200 else None

    # -- the rates the monitor asks for -----------------------------------------------------------
    async def refresh_rates(self) -> None:
        async with self.pool.connection() as conn:
            cur = await conn.execute("SELECT key, rate FROM quality_rates")
            self.rates = {str(k): float(r) for k, r in await cur.fetchall()}


# -- the content policy ---------------------------------------------------------------------------
async def apply_retention(conn: psycopg.AsyncConnection[Any]) -> dict[str, int]:
    """Delete stored content older than each tenant's retention (scores and metadata stay; a stored
    response is content through and through, so it goes whole)."""
    out = {}
    for table, columns, where in _CONTENT:
        cur = await conn.execute(
            f"UPDATE {table} t SET {columns} FROM tenants tn LEFT JOIN tenant_policies p ON p.tenant_id = tn.id"
            f" WHERE t.tenant_id = tn.id AND {where} AND t.created_at < now() - make_interval(days =>"
            " coalesce(p.content_retention_days, 30))")
        out[table] = cur.rowcount
    cur = await conn.execute(_EVAL_ANSWERS + " AND e.created_at < now() - make_interval(days =>"
                             " coalesce(p.content_retention_days, 30))")
    out["eval_results"] = cur.rowcount
    cur = await conn.execute(
        "DELETE FROM stored_responses s USING tenants tn LEFT JOIN tenant_policies p ON p.tenant_id = tn.id"
        " WHERE s.tenant_id = tn.id AND s.created_at < now() - make_interval(days =>"
        " coalesce(p.content_retention_days, 30))")
    out["stored_responses"] = cur.rowcount
    return out


_CONTENT = (
    ("quality_samples", "prompt_text = NULL, output_text = NULL", "(t.prompt_text IS NOT NULL OR t.output_text IS NOT NULL)"),
    ("shadow_samples", "primary_output = NULL, candidate_output = NULL",
     "(t.primary_output IS NOT NULL OR t.candidate_output IS NOT NULL)"),
)
_EVAL_ANSWERS = ("UPDATE eval_results r SET result = r.result - 'answer' FROM eval_runs e, tenants tn LEFT JOIN"
                 " tenant_policies p ON p.tenant_id = tn.id WHERE r.run_id = e.id AND e.tenant_id = tn.id AND"
                 " r.result ? 'answer'")


async def erase(conn: psycopg.AsyncConnection[Any], tenant_id: int, end_user: str | None = None, *,
                author: str, subject: str, reason: str | None = None) -> dict[str, int]:
    """Delete the stored content of a tenant, or of one of its end users: live samples, shadow samples,
    stored responses (the Responses API's) and (tenant-wide only: eval items belong to no end user) the
    answers of eval runs. Scores stay. Recorded in the change channel."""
    out = {}
    end_user = storable(end_user)  # as it was stored
    async with conn.transaction():
        for table, columns, where in _CONTENT:
            cur = await conn.execute(
                f"UPDATE {table} t SET {columns} WHERE t.tenant_id = %s AND (%s::text IS NULL OR t.end_user = %s)"
                f" AND {where}", (tenant_id, end_user, end_user))
            out[table] = cur.rowcount
        if end_user is None:
            cur = await conn.execute(_EVAL_ANSWERS + " AND e.tenant_id = %s", (tenant_id,))
            out["eval_results"] = cur.rowcount
        cur = await conn.execute("DELETE FROM stored_responses WHERE tenant_id = %s AND (%s::text IS NULL OR"
                                 " end_user = %s)", (tenant_id, end_user, end_user))
        out["stored_responses"] = cur.rowcount
        await changes.record(conn, author=author, kind="content", subject=subject, action="erase",
                             tenant_id=tenant_id, after={"user": end_user, "erased": out}, reason=reason)
    return out
