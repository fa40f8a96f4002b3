"""A prompt file: parsed strictly, its templates compiled in a sandbox, its variables declared and typed.

::

    # greet.yaml
    model: auto
    messages:
      - {role: system, content: "You greet {{ customer }} politely, in {{ language }}."}
    variables:
      customer: {type: string}
      language: {type: string, default: English}
    params: {temperature: 0.2, max_tokens: 64}
    golden_set: greet.golden.jsonl      # optional: JSONL in the same repository

Templates run in a bounded ``jinja2.sandbox.SandboxedEnvironment`` (``tollway.prompts.render``) with
``StrictUndefined``: a template that names a variable the file does not declare is refused when the file is
submitted, and rendering never reads anything but the declared variables, within limits of size and time.
Compiled templates are kept per version, so a request renders from memory. The YAML is read without
aliases.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import jinja2
import yaml
from jinja2 import meta
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tollway.errors import InvalidRequest
from tollway.guardrails import PolicyError, PromptGuards, parse_prompt_guards
from tollway.jsontypes import JSON
from tollway.prompts.render import (
    ENV,
    MAX_OUTPUT,
    RenderLimit,
    RenderPool,
    is_plain,
    load_yaml,
    plain_bound,
    render_all,
    uses,
)

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
_TYPES: dict[str, tuple[type, ...]] = {"string": (str,), "integer": (int,), "number": (int, float),
                                        "boolean": (bool,), "array": (list,), "object": (dict,)}
PARAMS = frozenset({"temperature", "top_p", "max_tokens", "max_completion_tokens", "response_format", "stop",
                    "seed", "presence_penalty", "frequency_penalty", "n", "tools", "tool_choice", "logit_bias"})


class PromptError(InvalidRequest):
    """A prompt file (or a reference to one) that cannot be used; ``param`` names the field or variable."""

    code = "invalid_prompt"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class RawVariable(_Strict):
    type: Literal["string", "integer", "number", "boolean", "array", "object"] = "string"
    default: Any = None
    description: str | None = None


class RawMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str


class RawPrompt(_Strict):
    model: str | None = None
    description: str | None = None
    messages: list[RawMessage] = Field(min_length=1)
    variables: dict[str, RawVariable] = Field(default_factory=dict)
    params: dict[str, Any] = Field(default_factory=dict)
    golden_set: str | None = None
    guards: dict[str, Any] | None = None  # this prompt's guard policy (tollway.guardrails.policy.PromptGuards)


class RenderRefused(PromptError):
    code = "prompt_render_limit"


@dataclass(frozen=True, slots=True)
class Prompt:
    """One version of one prompt, compiled."""

    name: str
    version: str
    raw: RawPrompt
    templates: tuple[tuple[str, jinja2.Template], ...]  # (role, compiled content)
    guards: PromptGuards | None = None
    plain: bool = True  # every template's work bounded by its size (``tollway.prompts.render.is_plain``)
    counts: tuple[tuple[str, int], ...] = ()  # variable -> uses, over all templates

    @property
    def model(self) -> str | None:
        return self.raw.model

    @property
    def params(self) -> JSON:
        return dict(self.raw.params)


    def bind(self, given: JSON | None) -> JSON:
        """The variables for a render: declared ones only, each of its type, defaults filled in."""
        given = given or {}
        if not isinstance(given, dict):
            raise PromptError("'prompt.variables' must be an object.", param="prompt.variables")
        unknown = sorted(set(given) - set(self.raw.variables))
        if unknown:
            raise PromptError(f"Prompt '{self.name}' has no variable '{unknown[0]}' (it declares: "
                              f"{', '.join(sorted(self.raw.variables)) or 'none'}).",
                              param=f"prompt.variables.{unknown[0]}")
        out: JSON = {}
        for name, var in self.raw.variables.items():
            if name not in given:
                if var.default is None:
                    raise PromptError(f"Prompt '{self.name}' needs variable '{name}' ({var.type}).",
                                      param=f"prompt.variables.{name}")
                out[name] = var.default
                continue
            value = given[name]
            ok = isinstance(value, _TYPES[var.type]) and not (var.type in ("integer", "number")
                                                              and isinstance(value, bool))
            if not ok:
                raise PromptError(f"Prompt variable '{name}' must be of type {var.type}.",
                                  param=f"prompt.variables.{name}")
            out[name] = value
        return out

    def render(self, variables: JSON | None) -> list[JSON]:
        """In this process, within the size limits (``render_in`` bounds time as well)."""
        return self._render_here(self.bind(variables))

    async def render_in(self, pool: RenderPool | None, variables: JSON | None, owner: object = None) -> list[JSON]:
        """In process when the template is plain and its output is bounded by the limit (its time then is
        too); otherwise in ``pool``'s processes, bounded in time as well as size."""
        bound = self.bind(variables)
        if pool is None or (self.plain and self._bound(bound) <= MAX_OUTPUT):
            return self._render_here(bound)
        sources = tuple((m.role, m.content) for m in self.raw.messages)
        try:
            return await pool.render(sources, bound, owner)
        except RenderLimit as exc:
            raise RenderRefused(f"Prompt '{self.name}' could not be rendered: {exc}.", param="prompt") from exc

    def _bound(self, bound: JSON) -> int:
        return plain_bound(sum(len(m.content) for m in self.raw.messages), dict(self.counts), bound)

    def _render_here(self, bound: JSON) -> list[JSON]:
        try:
            return render_all(self.templates, bound)
        except RenderLimit as exc:
            raise RenderRefused(f"Prompt '{self.name}' could not be rendered: {exc}.", param="prompt") from exc
        except jinja2.TemplateError as exc:  # a sandbox refusal or a runtime error in the template
            raise PromptError(f"Prompt '{self.name}' could not be rendered: {exc}.", param="prompt") from exc
        except (TypeError, ValueError, LookupError, ArithmeticError) as exc:  # the template's own runtime errors
            raise PromptError(f"Prompt '{self.name}' could not be rendered: {type(exc).__name__}: {exc}.",
                              param="prompt") from exc


def parse_prompt(name: str, version: str, text: str | bytes) -> Prompt:
    """Parse, validate and compile a prompt file; every problem is a PromptError naming what is wrong."""
    try:
        data = load_yaml(text)
    except yaml.YAMLError as exc:
        raise PromptError(f"{name}.yaml is not valid YAML: {str(exc).splitlines()[0]}", param="content") from exc
    if not isinstance(data, dict):
        raise PromptError(f"{name}.yaml must be a mapping with at least 'messages'.", param="content")
    try:
        raw = RawPrompt.model_validate(data)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"])
        raise PromptError(f"{name}.yaml: {where}: {first['msg']}", param=where or "content") from exc
    unknown_params = sorted(set(raw.params) - PARAMS)
    if unknown_params:
        raise PromptError(f"{name}.yaml: params.{unknown_params[0]} is not a request parameter a prompt may set",
                          param=f"params.{unknown_params[0]}")
    from tollway.routing import check_sampling, check_structured_output  # here: routing is heavy for the CLI

    try:
        check_structured_output(raw.params)  # its response_format and tools reach the model server as a client's
        check_sampling(raw.params)
    except InvalidRequest as exc:
        raise PromptError(f"{name}.yaml: params.{exc.param}: {exc}", param=f"params.{exc.param}") from exc
    guards = None
    if raw.guards is not None:
        try:
            guards = parse_prompt_guards(raw.guards)
        except PolicyError as exc:
            raise PromptError(f"{name}.yaml: {exc}", param="guards") from exc
    for var_name, var in raw.variables.items():
        if var.default is not None and not isinstance(var.default, _TYPES[var.type]):
            raise PromptError(f"{name}.yaml: variables.{var_name}.default is not of type {var.type}",
                              param=f"variables.{var_name}")
    templates = []
    plain = True
    counts: dict[str, int] = {}
    for i, message in enumerate(raw.messages):
        try:
            parsed = ENV.parse(message.content)
        except jinja2.TemplateSyntaxError as exc:
            raise PromptError(f"{name}.yaml: messages[{i}].content: template error at line {exc.lineno}: "
                              f"{exc.message}", param=f"messages[{i}].content") from exc
        undeclared = sorted(meta.find_undeclared_variables(parsed) - set(raw.variables))
        if undeclared:
            raise PromptError(f"{name}.yaml: messages[{i}].content uses undeclared variable '{undeclared[0]}'",
                              param=f"messages[{i}].content")
        templates.append((message.role, ENV.from_string(message.content)))
        plain = plain and is_plain(parsed)
        for used, times in uses(parsed).items():
            counts[used] = counts.get(used, 0) + times
    return Prompt(name, version, raw, tuple(templates), guards, plain, tuple(sorted(counts.items())))


def check_golden_set(path: str, text: str | bytes) -> int:
    """A golden set as the evals part runs it (``tollway.evals.golden``): JSONL, each line an object with
    ``messages`` or ``variables`` and a list of ``checks`` it knows. Returns the number of items."""
    from tollway.evals import GoldenSetError, parse_set

    try:
        return len(parse_set(text, path).items)
    except GoldenSetError as exc:
        raise PromptError(str(exc), param="golden_set") from exc
