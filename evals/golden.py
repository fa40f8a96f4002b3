"""Golden sets: JSONL, one item per line, each with the conversation (``messages``) or a prompt's
``variables``, and the checks its answer must pass. More fields are allowed and kept (``notes``, ...)::

    {"id": "q1", "messages": [{"role": "user", "content": "Capital of France?"}],
     "checks": [{"type": "contains", "value": "Paris"}]}
    {"id": "q2", "variables": {"city": "Oslo"}, "checks": [{"type": "regex", "pattern": "^Oslo"}]}

Check types: ``exact``, ``contains`` (``any``/``all`` of ``values``, ``case_sensitive``), ``regex``,
``numeric`` (``value`` within ``tolerance``, absolute, or ``relative``), ``json`` (valid JSON, with an
optional ``schema``), ``refusal`` (``expected``: true when the model should refuse), ``retrieval_recall``
(the answer cites ``documents``, at least ``min`` of them), ``judge`` (an LLM scores the answer against a
``rubric``, 0 to 1, passing at ``min_score``; ``model`` and an optional judge ``prompt`` reference).
Every check may be ``negate``d. An item may carry ``retrieval`` and ``params`` (temperature, max_tokens...)
that go into its request.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator


class GoldenSetError(ValueError):
    """A golden set that cannot be run; the message names the line and the field."""


class _Check(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    negate: bool = False
    name: str | None = None  # how reports name it (default: its type)


class Exact(_Check):
    type: Literal["exact"]
    value: str
    strip: bool = True
    case_sensitive: bool = True


class Contains(_Check):
    type: Literal["contains"]
    value: str | None = None
    values: list[str] | None = None
    mode: Literal["any", "all"] = "all"
    case_sensitive: bool = False

    @model_validator(mode="after")
    def _one(self) -> Contains:
        if (self.value is None) == (self.values is None):
            raise ValueError("give 'value' or 'values'")
        return self


class Regex(_Check):
    type: Literal["regex"]
    pattern: str
    flags: str = ""  # any of "imsx"

    @model_validator(mode="after")
    def _compiles(self) -> Regex:
        import regex

        try:
            regex.compile(self.pattern)
        except regex.error as exc:
            raise ValueError(f"pattern does not compile: {exc}") from exc
        if set(self.flags) - set("imsx"):
            raise ValueError("flags are any of i, m, s, x")
        return self


class Numeric(_Check):
    type: Literal["numeric"]
    value: float
    tolerance: float = Field(default=0.0, ge=0)
    relative: bool = False  # tolerance as a share of value


class JSONCheck(_Check):
    type: Literal["json"]
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")


class Refusal(_Check):
    type: Literal["refusal"]
    expected: bool = True


class RetrievalRecall(_Check):
    type: Literal["retrieval_recall"]
    documents: list[str] = Field(min_length=1)  # sources (file names, URLs) or document ids
    min: float = Field(default=1.0, gt=0, le=1)  # share of them the answer must cite


class Judge(_Check):
    type: Literal["judge"]
    rubric: str = Field(min_length=1)
    model: str = "auto"
    prompt: str | None = None  # a versioned judge prompt, NAME[@VERSION|LABEL]
    min_score: float = Field(default=0.7, ge=0, le=1)


Check = Annotated[Exact | Contains | Regex | Numeric | JSONCheck | Refusal | RetrievalRecall | Judge,
                  Field(discriminator="type")]
_CHECKS: TypeAdapter[list[Check]] = TypeAdapter(list[Check])


@dataclass(frozen=True, slots=True)
class Item:
    id: str
    checks: tuple[Check, ...]
    messages: tuple[dict[str, Any], ...] | None = None
    variables: dict[str, Any] | None = None
    params: dict[str, Any] = field(default_factory=dict)
    retrieval: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class GoldenSet:
    name: str
    items: tuple[Item, ...]
    digest: str  # of the text: which set a run used

    @property
    def needs_prompt(self) -> bool:
        return any(i.messages is None for i in self.items)


_KNOWN = {"id", "messages", "variables", "checks", "params", "retrieval"}
_PARAMS = {"temperature", "top_p", "max_tokens", "max_completion_tokens", "seed", "response_format", "stop",
           "tools", "tool_choice"}


def _item(number: int, data: Any, where: str) -> Item:
    if not isinstance(data, dict):
        raise GoldenSetError(f"{where}:{number}: not a JSON object")
    if not ({"messages", "variables"} & set(data)):
        raise GoldenSetError(f"{where}:{number}: needs 'messages' or 'variables'")
    messages = data.get("messages")
    if messages is not None and (not isinstance(messages, list) or not messages
                                 or not all(isinstance(m, dict) and "role" in m for m in messages)):
        raise GoldenSetError(f"{where}:{number}: 'messages' must be a non-empty list of messages")
    variables = data.get("variables")
    if variables is not None and not isinstance(variables, dict):
        raise GoldenSetError(f"{where}:{number}: 'variables' must be an object")
    raw_checks = data.get("checks")
    if not isinstance(raw_checks, list) or not raw_checks:
        raise GoldenSetError(f"{where}:{number}: 'checks' must be a non-empty list")
    try:
        checks = _CHECKS.validate_python(raw_checks)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        loc = ".".join(str(p) for p in first["loc"])
        raise GoldenSetError(f"{where}:{number}: checks.{loc}: {first['msg']}") from exc
    params = data.get("params") or {}
    if not isinstance(params, dict) or set(params) - _PARAMS:
        raise GoldenSetError(f"{where}:{number}: 'params' may set {', '.join(sorted(_PARAMS))}")
    retrieval = data.get("retrieval")
    if retrieval is not None and not isinstance(retrieval, dict):
        raise GoldenSetError(f"{where}:{number}: 'retrieval' must be an object")
    return Item(id=str(data.get("id") or f"line-{number}"), checks=tuple(checks),
                messages=None if messages is None else tuple(messages), variables=variables, params=params,
                retrieval=retrieval, extra={k: v for k, v in data.items() if k not in _KNOWN})


def parse_set(text: str | bytes, name: str = "golden set") -> GoldenSet:
    """Parse and check a golden set; every problem is a GoldenSetError naming the line."""
    raw = text.encode() if isinstance(text, str) else text
    items: list[Item] = []
    for number, line in enumerate(raw.decode("utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            data = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise GoldenSetError(f"{name}:{number}: not valid JSON") from exc
        items.append(_item(number, data, name))
    if not items:
        raise GoldenSetError(f"{name}: the golden set is empty")
    ids = [i.id for i in items]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise GoldenSetError(f"{name}: item id {dup!r} appears twice")
    return GoldenSet(name, tuple(items), hashlib.sha256(raw).hexdigest()[:16])


def set_from_items(items: list[Any], name: str) -> GoldenSet:
    """A golden set given as a list of objects (the API's inline form)."""
    return parse_set(b"\n".join(orjson.dumps(i) for i in items), name)
