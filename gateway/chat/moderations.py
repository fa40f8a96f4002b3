"""``/v1/moderations``: the tenant's guard engine over the given texts, in OpenAI's response shape
(``tollway.guardrails.moderation`` says what each category means and when ``flagged`` is true).

The detectors run in process: a call costs $0 and uses no model tokens; it is not admitted against the
tenant's budgets (there is nothing to reserve) and it writes one ledger row (endpoint ``moderations``, model
``tollway-guards``) with the guard outcomes of its texts, like any request.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from tollway.errors import InvalidRequest
from tollway.gateway.chat.calls import CallContext, Calls, JSONResult
from tollway.gateway.chat.exchange import GuardOutcome
from tollway.gateway.http.protocol import ModerationPart, ModerationRequest, parse_json_object, validate
from tollway.gateway.http.streaming import BodyReader
from tollway.gateway.metering.accounting import format_cost
from tollway.gateway.tenancy.policy import TenantRules
from tollway.guardrails import GuardPolicy, Moderation
from tollway.routing import Usage

MODEL = "tollway-guards"
MAX_INPUTS = 256

Moderator = Callable[[GuardPolicy | None, list[str]], Awaitable[list[Moderation]]]


def texts_of(req: ModerationRequest) -> list[str]:
    if isinstance(req.input, str):
        return [req.input]
    if not req.input:
        raise InvalidRequest("input must be a string or a non-empty list.", param="input")
    if len(req.input) > MAX_INPUTS:
        raise InvalidRequest(f"input holds at most {MAX_INPUTS} items.", param="input")
    texts = []
    for i, item in enumerate(req.input):
        if isinstance(item, str):
            texts.append(item)
            continue
        assert isinstance(item, ModerationPart)
        if item.type == "text" and item.text is not None:
            texts.append(item.text)
        elif item.type != "image_url":
            raise InvalidRequest(f"input[{i}].type must be 'text' or 'image_url'.", param=f"input[{i}].type")
    if not texts:
        raise InvalidRequest("input has no text to moderate (images are not checked by Tollway's guards).",
                             param="input")
    return texts


class Moderations:
    def __init__(self, calls: Calls, moderator: Moderator | None) -> None:
        self.calls, self.moderator = calls, moderator

    async def __call__(self, ctx: CallContext, read_body: BodyReader) -> JSONResult:
        tally = self.calls.open(ctx, "moderations")
        with tally.closed_on_error():
            data = parse_json_object(await read_body())
            req = validate(ModerationRequest, data)
            texts = texts_of(req)
            tally.request(end_user=ctx.header_user)
            tally.gateway_answer(MODEL, "moderations")
            rules: TenantRules = await self.calls.rules(ctx.principal.tenant_id)
            results = await self.moderator(rules.guards, texts) if self.moderator is not None else []
            tally.guards([GuardOutcome(o.validator, o.action, o.spans, o.ms, o.detail).as_json()
                          for m in results for o in m.outcomes])
            cost = tally.close(200, usage=Usage(), usage_source="local")
        payload = {"id": f"modr-{ctx.request_id}", "model": req.model or MODEL,
                   "results": [m.result() for m in results],
                   "tollway": {"request_id": ctx.request_id, "cost_usd": format_cost(cost),
                               "at": int(time.time())}}
        return JSONResult(payload, {"x-tollway-model": MODEL, "x-tollway-cost-usd": format_cost(cost)})
