"""Eval runs inside the gateway: a golden set against a prompt reference and/or a model, through the same
chat path as live traffic (in process: each item is a chat request of the tenant's, under its budgets and
guards, whose ledger rows are tagged ``eval`` and ``eval-run:<id>``), stored per item and in aggregate
with the (prompt version, model, index version) that answered. The production gate is built on it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
import psycopg
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool
from pydantic import BaseModel, ConfigDict, Field

from tollway.config import parse_section
from tollway.errors import InvalidRequest, NotFound, TollwayError
from tollway.evals import (
    Answer,
    GateThresholds,
    GoldenSet,
    GoldenSetError,
    ItemResult,
    Target,
    compare,
    decide,
    parse_prompt_ref,
    parse_set,
    run_set,
    summary,
)
from tollway.gateway.chat.calls import CallContext, JSONResult
from tollway.gateway.chat.service import CompletionService
from tollway.gateway.chat.wire import choice_text, new_request_id
from tollway.gateway.metering.ledger import utcnow
from tollway.gateway.tenancy.keys import Principal
from tollway.infra.background import Background
from tollway.prompts import GateResult, Registry, file_at
from tollway.publicids import PublicIds

log = logging.getLogger("tollway.gateway")
_RUN_COLUMNS = ("id, purpose, set_name, set_digest, prompt, prompt_version, model, models, index_version, status,"
                " items, done, passed, summary, error, author, created_at, finished_at")
_RUN_NAMES = tuple(c.strip() for c in _RUN_COLUMNS.split(","))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RawGate(_Strict):
    min_pass_rate: float = Field(default=0.8, ge=0, le=1)
    max_regression: float = Field(default=0.05, ge=0, le=1)
    alpha: float = Field(default=0.05, gt=0, lt=1)
    require_significance: bool = True
    model: str | None = None  # the model the gate runs a prompt on (default: the prompt's own)


class RawEvals(_Strict):
    concurrency: int = Field(default=4, ge=1, le=64)
    max_concurrency: int = Field(default=16, ge=1, le=256)
    gate: RawGate = Field(default_factory=RawGate)


def eval_settings(data: Any) -> EvalSettings:
    """The config file's ``evals:`` section."""
    raw = parse_section(RawEvals, data, "evals")
    g = raw.gate
    return EvalSettings(raw.concurrency, raw.max_concurrency,
                        GateThresholds(g.min_pass_rate, g.max_regression, g.alpha, g.require_significance), g.model)


@dataclass(frozen=True, slots=True)
class EvalSettings:
    concurrency: int = 4  # default per run
    max_concurrency: int = 16
    gate: GateThresholds = field(default_factory=GateThresholds)
    gate_model: str | None = None  # the model a gate runs the prompt on (None: the prompt's own)


def _run_json(row: tuple[Any, ...], ids: PublicIds) -> dict[str, Any]:
    out = dict(zip(_RUN_NAMES, row, strict=True))
    out["id"] = ids.encode("run", out["id"])
    out["object"] = "eval.run"
    for key in ("created_at", "finished_at"):
        out[key] = None if out[key] is None else out[key].isoformat()
    return out


class Evals:
    def __init__(self, pool: AsyncConnectionPool, service: CompletionService, prompts: Registry,
                 settings: EvalSettings, ids: PublicIds) -> None:
        self.pool, self.service, self.prompts, self.settings = pool, service, prompts, settings
        self.ids = ids  # run ids as clients see them (tollway.publicids)
        self.background = Background("eval run", drain_s=30)
        self._running: dict[int, asyncio.Task[Any]] = {}

    # -- running ----------------------------------------------------------------------------------
    def _complete(self, principal: Principal, tags: tuple[str, ...]) -> Any:
        async def complete(body: dict[str, Any]) -> Answer:
            ctx = CallContext(request_id=new_request_id(), principal=principal, header_user=None,
                              started=time.perf_counter(), created_at=utcnow(), tags=tags)
            raw = orjson.dumps(body)

            async def read_body() -> bytes:
                return raw

            try:
                result = await self.service.chat(ctx, read_body)
            except TollwayError as exc:
                return Answer(status=exc.status, error=f"{exc.code}: {exc.message}")
            assert isinstance(result, JSONResult), "eval requests are not streamed"
            return Answer(choice_text(result.payload, "message"), result.payload)

        return complete

    def _labels(self, tenant_id: int, prompt: str | None) -> Any:
        name = None if prompt is None else parse_prompt_ref(prompt)[0]
        return lambda ref: name is not None and ref in self.prompts.label_names(tenant_id, name)

    def _check_target(self, golden: GoldenSet, target: Target) -> None:
        if target.prompt is None and golden.needs_prompt:
            raise InvalidRequest("This golden set has items with 'variables' only: run it against a prompt.",
                                 param="prompt")
        if target.prompt is None and target.model is None:
            raise InvalidRequest("Name a prompt, a model, or both.", param="model")

    async def start(self, principal: Principal, tenant_id: int, golden: GoldenSet, target: Target, *,
                    concurrency: int | None = None, purpose: str = "run") -> dict[str, Any]:
        """Record the run and start it in the background; its row says how far it got."""
        self._check_target(golden, target)
        concurrency = min(concurrency or self.settings.concurrency, self.settings.max_concurrency)
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                f"INSERT INTO eval_runs (tenant_id, key_id, author, purpose, set_name, set_digest, prompt, model,"
                f" items) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING {_RUN_COLUMNS}",
                (tenant_id, principal.key_id, principal.author, purpose, golden.name, golden.digest, target.prompt,
                 target.model, len(golden.items)))
            row = await cur.fetchone()
        assert row is not None
        run, number = _run_json(row, self.ids), int(row[0])
        task = self.background.spawn(self._execute(number, run["id"], principal, tenant_id, golden, target,
                                                   concurrency), name=f"eval-run-{run['id']}")
        self._running[number] = task
        task.add_done_callback(lambda _: self._running.pop(number, None))
        return run

    async def run(self, principal: Principal, tenant_id: int, golden: GoldenSet, target: Target, *,
                  concurrency: int | None = None, purpose: str = "run") -> dict[str, Any]:
        """Run to the end (the gate's way) and return the finished run."""
        run = await self.start(principal, tenant_id, golden, target, concurrency=concurrency, purpose=purpose)
        await self.wait(run["id"])
        return await self.get(tenant_id, run["id"], results=True)

    def _number(self, run_id: str) -> int:
        number = self.ids.decode("run", run_id)
        if number is None:
            raise NotFound(f"Eval run {run_id} does not exist.", param="run", code="run_not_found")
        return number

    async def wait(self, run_id: str) -> None:
        """Until a run this process started has finished (at once for any other)."""
        task = self._running.get(self._number(run_id))
        if task is not None:
            await asyncio.shield(task)

    async def _execute(self, run_id: int, public: str, principal: Principal, tenant_id: int, golden: GoldenSet,
                       target: Target, concurrency: int) -> None:
        """``run_id``: the row; ``public``: the id the tenant sees, also in its requests' tags."""
        async def store(result: ItemResult) -> None:
            item = result.as_json()
            if not (await self.service.calls.rules(tenant_id)).policy.store_content:
                item.pop("answer", None)  # the content policy: scores and metadata only
            async with self.pool.connection() as conn:
                await conn.execute(
                    "INSERT INTO eval_results (run_id, item_id, passed, score, result) VALUES (%s, %s, %s, %s, %s)",
                    (run_id, result.item_id, result.passed, result.score, Jsonb(item)))
                await conn.execute("UPDATE eval_runs SET done = done + 1, passed = passed + %s WHERE id = %s",
                                   (int(result.passed), run_id))

        try:
            results = await run_set(golden, target, self._complete(principal, ("eval", f"eval-run:{public}")),
                                    concurrency=concurrency, labels=self._labels(tenant_id, target.prompt),
                                    tags=["eval", f"eval-run:{public}"], on_item=store)
            versions = [r.versions for r in results if r.status == 200]
            models = sorted({str(v["model"]) for v in versions if v.get("model")})
            prompt_version = next((v["prompt_version"] for v in versions if v.get("prompt_version")), None)
            index_version = next((v["index_version"] for v in versions if v.get("index_version")), None)
            async with self.pool.connection() as conn:
                await conn.execute(
                    "UPDATE eval_runs SET status = 'done', summary = %s, models = %s, prompt_version = %s,"
                    " index_version = %s, finished_at = now() WHERE id = %s",
                    (Jsonb(summary(results)), models, prompt_version, index_version, run_id))
        except asyncio.CancelledError:  # shutdown ran out of patience: say so rather than "running" forever
            async with self.pool.connection() as conn:
                await conn.execute("UPDATE eval_runs SET status = 'failed', error = 'interrupted: the gateway shut"
                                   " down during the run', finished_at = now() WHERE id = %s", (run_id,))
            raise
        except Exception as exc:
            log.exception("eval run %s failed", public)
            async with self.pool.connection() as conn:
                await conn.execute("UPDATE eval_runs SET status = 'failed', error = %s, finished_at = now()"
                                   " WHERE id = %s", (f"{type(exc).__name__}: {exc}", run_id))

    # -- reading ----------------------------------------------------------------------------------
    async def get(self, tenant_id: int, run_id: str, *, results: bool = False) -> dict[str, Any]:
        number = self._number(run_id)
        async with self.pool.connection() as conn:
            cur = await conn.execute(f"SELECT {_RUN_COLUMNS} FROM eval_runs WHERE id = %s AND tenant_id = %s",
                                     (number, tenant_id))
            row = await cur.fetchone()
            if row is None:
                raise NotFound(f"Eval run {run_id} does not exist.", param="run", code="run_not_found")
            run = _run_json(row, self.ids)
            if results:
                cur = await conn.execute("SELECT result FROM eval_results WHERE run_id = %s ORDER BY item_id",
                                         (number,))
                run["results"] = [r[0] for r in await cur.fetchall()]
        return run

    async def recent(self, tenant_id: int, limit: int = 50) -> list[dict[str, Any]]:
        async with self.pool.connection() as conn:
            cur = await conn.execute(f"SELECT {_RUN_COLUMNS} FROM eval_runs WHERE tenant_id = %s"
                                     " ORDER BY id DESC LIMIT %s", (tenant_id, max(1, min(limit, 500))))
            return [_run_json(r, self.ids) for r in await cur.fetchall()]

    async def compare(self, tenant_id: int, a: str, b: str, alpha: float | None = None) -> dict[str, Any]:
        run_a = await self.get(tenant_id, a, results=True)
        run_b = await self.get(tenant_id, b, results=True)
        for run in (run_a, run_b):
            if run["status"] != "done":
                raise InvalidRequest(f"Eval run {run['id']} is {run['status']}; compare finished runs.",
                                     param="run", code="run_not_finished")
        if run_a["set_digest"] != run_b["set_digest"]:
            log.info("comparing runs %s and %s of different golden sets: paired on common item ids", a, b)
        comparison = compare({r["item_id"]: r for r in run_a["results"]}, {r["item_id"]: r for r in run_b["results"]})
        alpha = self.settings.gate.alpha if alpha is None else alpha
        brief = {k: v for k, v in run_a.items() if k != "results"}, {k: v for k, v in run_b.items() if k != "results"}
        return {"object": "eval.comparison", "a": brief[0], "b": brief[1], **comparison.as_json(alpha)}

    # -- the production gate ----------------------------------------------------------------------
    async def golden_set(self, tenant_id: int, name: str, version: str) -> GoldenSet | None:
        """The golden set a prompt version names, read from that version's commit."""
        prompt = await self.prompts.prompt(tenant_id, name, version)
        path = prompt.raw.golden_set
        if path is None:
            return None
        async with self.pool.connection() as conn:
            text = await file_at(conn, tenant_id, prompt.version, path)
        if text is None:
            raise NotFound(f"Golden set {path} is not in version {version} of prompt '{name}'.", param="golden_set")
        try:
            return parse_set(text, path)
        except GoldenSetError as exc:
            raise InvalidRequest(str(exc), param="golden_set", code="invalid_golden_set") from exc


class EvalGate:
    """The gate a move of ``production`` passes (``tollway.prompts.Gate``): the candidate's golden set run
    against the candidate and the current version, decided by the config's thresholds."""

    def __init__(self, evals: Evals, pool: AsyncConnectionPool) -> None:
        self.evals, self.pool = evals, pool

    async def check(self, tenant: str, prompt: str, candidate: str, current: str | None,
                    actor: Principal | None = None) -> GateResult:
        async with self.pool.connection() as conn:
            cur = await conn.execute("SELECT id FROM tenants WHERE name = %s", (tenant,))
            row = await cur.fetchone()
        if row is None:
            return GateResult(False, f"tenant {tenant!r} does not exist", {"gate": "evals"})
        tenant_id = int(row[0])
        golden = await self.evals.golden_set(tenant_id, prompt, candidate)
        if golden is None:
            return GateResult(True, "no golden set: nothing to judge (the move passes)", {"gate": "evals"})
        if actor is None:
            return GateResult(False, "the gate needs a caller whose requests it may make", {"gate": "evals"})
        model = self.evals.settings.gate_model
        t = self.evals.settings.gate
        try:
            cand = await self.evals.run(actor, tenant_id, golden, Target(f"{prompt}@{candidate}", model), purpose="gate")
            base = None if current is None or current == candidate else await self.evals.run(
                actor, tenant_id, golden, Target(f"{prompt}@{current}", model), purpose="gate")
        except psycopg.Error as exc:
            return GateResult(False, f"the eval store failed ({type(exc).__name__})", {"gate": "evals"})
        if cand["status"] != "done" or (base is not None and base["status"] != "done"):
            return GateResult(False, "an eval run failed", {"gate": "evals", "candidate_run": cand["id"],
                                                           "current_run": None if base is None else base["id"]})
        comparison = None if base is None else compare({r["item_id"]: r for r in base["results"]},
                                                       {r["item_id"]: r for r in cand["results"]})
        passed, why = decide(cand["summary"], comparison, t)
        report = {"gate": "evals", "golden_set": golden.name, "items": len(golden.items),
                  "candidate": {"version": candidate, "run": cand["id"], **cand["summary"]},
                  "current": None if base is None else {"version": current, "run": base["id"], **base["summary"]},
                  "comparison": None if comparison is None else comparison.as_json(t.alpha),
                  "thresholds": {"min_pass_rate": t.min_pass_rate, "max_regression": t.max_regression,
                                 "alpha": t.alpha, "require_significance": t.require_significance}}
        return GateResult(passed, why, report)

