"""The guardrails part in the chat path: an input guard (the ``guard_input`` stage) and an output
transformer (the relay's chain), both over the policy this request runs under.

The policy is the config's ``guardrails:`` defaults, overridden per validator by the tenant's policy
(``PUT /v1/admin/guards``, ``tollway tenants guards``; applied at once through the change channel), and
by the rendered prompt's ``guards:``. A request whose policy names no validator costs one dictionary
lookup: no filter is built, nothing is held back.

Input: the request's own user messages (text content) are checked; a ``redact`` rewrites them before
anything is sent; a ``block`` is a 400 ``content_policy_violation`` naming the validator, raised before
admission, so nothing is reserved, sent or charged; a ``fallback`` answers with the policy's message.

Output: each choice's text goes through a held-back window (``tollway.guardrails.window``); content
deltas carry what was released, other delta fields (role, tool calls) pass through. A choice that a guard
stops gets its own final chunk (``finish_reason`` ``content_filter`` for a block, ``stop`` for a fallback,
``length`` for a truncation) and nothing more of it; once every choice has stopped the relay stops
reading the upstream (what it produced so far is charged).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from tollway.errors import ContentBlocked
from tollway.gateway.chat.answers import gateway_completion
from tollway.gateway.chat.exchange import ChatView, Fallback, GuardOutcome, GuardVerdict, OutputFilter
from tollway.gateway.chat.wire import REASONING
from tollway.guardrails import (
    BUILTIN,
    ChoiceGuard,
    Extra,
    GuardConfig,
    GuardPolicy,
    Moderation,
    Outcome,
    OutputPlan,
    PassageScreen,
    PolicyError,
    PromptGuards,
    Resolved,
    check_input,
    load_validator,
    moderate,
    parse_config,
    resolve,
    schema_of,
    warm,
)
from tollway.jsontypes import JSON
from tollway.routing import off_loop_if_long

log = logging.getLogger("tollway.gateway")
GUARD_MODEL = "tollway-guard"
FINISH = {"block": "content_filter", "fallback": "stop", "length": "length"}


def _outcome(o: Outcome) -> GuardOutcome:
    return GuardOutcome(o.validator, o.action, o.spans, o.ms, o.detail)


def _texts(content: Any) -> list[tuple[int | None, str]]:
    """The text pieces of a message's content: (part index or None for a plain string, text)."""
    if isinstance(content, str):
        return [(None, content)]
    if isinstance(content, list):
        return [(i, p["text"]) for i, p in enumerate(content)
                if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)]
    return []


def system_texts(view: ChatView) -> tuple[str, ...]:
    """The system text a leak guard protects: the request's system and developer messages and the rendered
    prompt's (never the context a retrieval added)."""
    messages = [*(view.prompt.messages if view.prompt else ()), *view.client_messages]
    return tuple(text for m in messages if isinstance(m, dict) and m.get("role") in ("system", "developer")
                 for _, text in _texts(m.get("content")))


class Guarding:
    """Implements ``InputGuard`` and ``OutputTransformer`` (``tollway.gateway.chat.exchange``)."""

    def __init__(self, config: GuardConfig | None = None, extras: Mapping[str, Extra] | None = None) -> None:
        self.config = config or GuardConfig()
        self.extras = dict(extras or {})
        self._memo: dict[tuple[int, int], tuple[Any, Any, Resolved | None]] = {}

    @classmethod
    def from_config(cls, data: Any) -> Guarding:
        """The config file's ``guardrails:`` section; its extra validators imported and built once (a
        validator that cannot be built is a start-up error, not a failure on the first request)."""
        config = parse_config(data)
        warm()
        extras = {}
        for name, spec in config.validators.items():
            validator = load_validator(name, spec)
            try:
                validator(**spec.args)
            except Exception as exc:
                raise PolicyError(f"guardrails.validators.{name}: {spec.use}({spec.args}) failed: {exc}") from exc
            extras[name] = Extra(name, validator, spec.args)
        return cls(config, extras)

    @property
    def names(self) -> frozenset[str]:
        """Validators the config adds, which tenant policies may name."""
        return frozenset(self.extras)

    def policy(self, view: ChatView) -> Resolved | None:
        """This request's policy (None: no guard runs), resolved once per tenant policy and prompt pair."""
        tenant = view.rules.guards if view.rules is not None else None
        prompt: PromptGuards | None = view.prompt.guards if view.prompt is not None else None
        return self.resolved(tenant, prompt)

    def passage_screen(self, view: ChatView) -> PassageScreen | None:
        """How this request's retrieved passages are screened for injections (None: they are not)."""
        return PassageScreen.of(self.policy(view))

    async def moderate(self, tenant: GuardPolicy | None, texts: list[str]) -> list[Moderation]:
        """``/v1/moderations``: each text through the detectors, flagged as the tenant's input policy (the
        config's defaults under the tenant's own) would treat it in a chat request; long texts off the event
        loop, as in a chat request."""
        policy = self.resolved(tenant, None)

        def run() -> list[Moderation]:
            return [moderate(policy, text, self.extras) for text in texts]

        return await off_loop_if_long(sum(map(len, texts)), run)

    def resolved(self, tenant: GuardPolicy | None, prompt: PromptGuards | None) -> Resolved | None:
        key = (id(tenant), id(prompt))
        hit = self._memo.get(key)
        if hit is not None and hit[0] is tenant and hit[1] is prompt:
            return hit[2]
        resolved = resolve(self.config, tenant, prompt)
        unknown = {n for side in (resolved.input, resolved.output) for n in side
                   if n not in self.extras and n not in BUILTIN}
        if unknown:  # a prompt names a validator this gateway's config does not add
            log.warning("guard validator(s) %s are not configured; they do not run", ", ".join(sorted(unknown)))
            resolved = replace(resolved, input={k: v for k, v in resolved.input.items() if k not in unknown},
                               output={k: v for k, v in resolved.output.items() if k not in unknown})
        effective = None if resolved.empty else resolved
        if len(self._memo) > 1024:
            self._memo.clear()
        self._memo[key] = (tenant, prompt, effective)
        return effective

    # -- input ------------------------------------------------------------------------------------
    async def check(self, view: ChatView) -> GuardVerdict:
        """The input guards over the client's user messages (they follow the prompt's: input guards run
        before retrieval adds any): redactions, and a block or a fallback."""
        policy = self.policy(view)
        if policy is None or not policy.input:
            return GuardVerdict()
        messages = list(view.messages)
        first = len(messages) - len(view.client_messages)
        slots = [(i, part, text) for i in range(first, len(messages))
                 if isinstance(m := messages[i], dict) and m.get("role") == "user"
                 for part, text in _texts(m.get("content"))]
        tools = [text for m in messages[first:] if isinstance(m, dict) and m.get("role") in ("tool", "function")
                 for _, text in _texts(m.get("content"))]
        texts = [text for _, _, text in slots]
        result = await off_loop_if_long(sum(map(len, texts)) + sum(map(len, tools)), check_input, policy, texts,
                                        self.extras, tools)
        changed = False
        for (i, part, text), new in zip(slots, result.texts, strict=True):
            if new != text:
                changed = True
                message = dict(messages[i])
                if part is None:
                    message["content"] = new
                else:
                    content = list(message["content"])
                    content[part] = {**content[part], "text": new}
                    message["content"] = content
                messages[i] = message
        outcomes = tuple(_outcome(o) for o in result.outcomes)
        redacted = tuple(messages) if changed else None
        stop = result.stop
        if stop is None:
            return GuardVerdict(outcomes, redacted)
        if stop.action == "block":
            return GuardVerdict(outcomes, redacted, blocked=ContentBlocked(
                f"The request was refused by the '{stop.validator}' input guard"
                f"{f' ({stop.detail})' if stop.detail else ''}; nothing was sent or charged.", param=stop.validator))
        return GuardVerdict(outcomes, redacted, fallback=Fallback(
            GUARD_MODEL, f"guard_fallback:{stop.validator}", gateway_completion(GUARD_MODEL, policy.fallback_message)))

    # -- output -----------------------------------------------------------------------------------
    def start(self, view: ChatView) -> OutputFilter | None:
        policy = self.policy(view)
        if policy is None or not policy.output:
            return None
        wants_json, schema = schema_of(view.params.get("response_format"))
        plan = OutputPlan(policy, system=system_texts(view) if "leak" in policy.output else (),
                          wants_json=wants_json, schema=schema, extras=self.extras)
        if plan.idle:
            return None
        return GuardFilter(plan, view.n)


class GuardFilter:
    """One request's output guards over OpenAI chunks, one ``ChoiceGuard`` per choice."""

    def __init__(self, plan: OutputPlan, n: int) -> None:
        self.plan = plan
        self.n = n
        self.choices: dict[int, ChoiceGuard] = {}
        self.thoughts: dict[tuple[int, str], ChoiceGuard] = {}  # per choice and field, its reasoning's guard
        self.halted: set[int] = set()  # choices a guard of their reasoning stopped
        self.finished: set[int] = set()  # choices whose final chunk went out
        self.base: JSON = {}

    @property
    def done(self) -> bool:
        """Every choice was stopped by a guard: nothing more of the upstream's answer can go out."""
        stopped = {i for i, g in self.choices.items() if g.stopped} | self.halted
        return len(stopped) >= self.n

    def outcomes(self) -> list[GuardOutcome]:
        return [_outcome(o) for o in self.plan.record.all()]

    def _guard(self, index: int) -> ChoiceGuard:
        guard = self.choices.get(index)
        if guard is None:
            guard = self.choices[index] = self.plan.guard()
        return guard

    async def chunk(self, chunk: JSON) -> list[JSON]:
        self.base = {k: chunk.get(k) for k in ("id", "object", "created", "model")}
        choices = chunk.get("choices")
        if not choices:
            return [chunk]
        out = []
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            shaped = self._choice(choice)
            if shaped is not None:
                out.append(shaped)
        if not out and chunk.get("usage") is None:
            return []
        return [{**chunk, "choices": out}]

    def _think(self, index: int, delta: JSON, *, ending: bool) -> str | None:
        """The choice's reasoning fields in ``delta`` through their guards (``ending``: the reasoning is over, so
        what a guard holds back is released); the stop a guard called, if any."""
        for name in REASONING:
            value = delta.get(name)
            guard = self.thoughts.get((index, name))
            if isinstance(value, str) and value and guard is None:
                guard = self.thoughts[(index, name)] = self.plan.guard(reasoning=True)
            if guard is None:
                continue
            text = guard.feed(value).text if isinstance(value, str) and value else ""
            if ending and not guard.stopped:
                text += guard.end().text
                del self.thoughts[(index, name)]
            if text or isinstance(value, str):
                delta[name] = text
            if guard.stopped:
                return guard.stopped
        return None

    def _choice(self, choice: JSON) -> JSON | None:
        index = choice.get("index", 0)
        if index in self.finished:
            return None  # a guard ended this choice: the rest of it (and the upstream's finish) is dropped
        guard = self._guard(index)
        delta = dict(choice.get("delta") or {})
        content = delta.get("content")
        finish = choice.get("finish_reason")
        # the reasoning ends where the answer begins: what its guards hold back goes out before the answer
        stopped = self._think(index, delta, ending=bool(finish) or (isinstance(content, str) and bool(content)))
        if stopped:
            self.halted.add(index)
        text = ""
        if isinstance(content, str) and content and not stopped:
            text = guard.feed(content).text
        if finish or guard.stopped or stopped:
            if not guard.stopped and not stopped:
                text += guard.end().text
            if guard.stopped or stopped:
                finish = FINISH[guard.stopped or stopped or ""]
            self.finished.add(index)
        if isinstance(content, str) or text:
            delta["content"] = text
        if not text and not finish and not any(delta.get(n) for n in REASONING) and set(delta) <= {"content", *REASONING}:
            return None
        return {**choice, "delta": delta, "finish_reason": finish}

    async def end(self) -> list[JSON]:
        """The upstream ended (or the relay stopped it): release what every unfinished choice holds."""
        out = []
        for index, guard in sorted(self.choices.items()):
            if index in self.finished:
                continue
            delta: JSON = {}
            stopped = self._think(index, delta, ending=True)
            piece = guard.end() if not stopped else None
            self.finished.add(index)
            if piece is not None and (piece.text or piece.stop or delta):
                delta["content"] = piece.text
            stop = stopped or (piece.stop if piece is not None else None)
            if delta or stop:
                out.append({**self.base, "choices": [{"index": index, "delta": delta,
                                                      "finish_reason": FINISH.get(stop or "")}]})
        return out

