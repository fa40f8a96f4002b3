"""Whole-answer checks: JSON validity and JSON-schema conformance, and the repair a ``redact`` action
means for JSON (the JSON inside a fenced block or surrounding prose, when that alone is valid).

A caller that asked for JSON (``response_format`` ``json_object``, or ``json_schema`` with a schema) parses
the answer; an answer that does not parse, or does not conform, is what this check catches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
import regex

from tollway.jsontypes import SchemaUnchecked, best_schema_error, jsonschema


def warm() -> None:
    """Import jsonschema now (about 0.15 s), not in the first request that carries a schema."""
    jsonschema()


_FENCE = regex.compile(r"```(?:json|JSON)?\s*\n?(.*?)```", regex.DOTALL)


@dataclass(frozen=True, slots=True)
class JSONVerdict:
    ok: bool
    problem: str | None = None
    repaired: str | None = None  # a conforming text made from the answer, when one was found


def schema_of(response_format: Any) -> tuple[bool, dict[str, Any] | None]:
    """Whether the request asked for JSON, and the schema it gave (OpenAI's ``response_format``)."""
    if not isinstance(response_format, dict):
        return False, None
    kind = response_format.get("type")
    if kind == "json_object":
        return True, None
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        return True, schema if isinstance(schema, dict) else None
    return False, None


def _problem(text: str, schema: dict[str, Any] | None) -> str | None:
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        return f"not valid JSON ({str(exc).split(':')[0]})"
    if schema is not None:
        try:
            error = best_schema_error(schema, value)
        except SchemaUnchecked as exc:
            return str(exc)
        if error is not None:
            where = "/".join(str(p) for p in error.absolute_path) or "(root)"
            return f"does not match the schema at {where}: {error.message}"
    return None


def _candidates(text: str) -> list[str]:
    found = [m.group(1).strip() for m in _FENCE.finditer(text)]
    for opening, closing in (("{", "}"), ("[", "]")):
        start, end = text.find(opening), text.rfind(closing)
        if 0 <= start < end:
            found.append(text[start:end + 1])
    return found


def check_json(text: str, schema: dict[str, Any] | None = None) -> JSONVerdict:
    problem = _problem(text.strip(), schema)
    if problem is None:
        return JSONVerdict(True)
    for candidate in _candidates(text):
        if _problem(candidate, schema) is None:
            return JSONVerdict(False, problem, repaired=candidate)
    return JSONVerdict(False, problem)


def check_schema(schema: dict[str, Any]) -> str | None:
    """Why a schema is unusable (a request's ``response_format``), or None."""
    module = jsonschema()
    try:
        module.Draft202012Validator.check_schema(schema)
    except module.exceptions.SchemaError as exc:
        return str(exc.message)
    return None
