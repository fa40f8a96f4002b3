"""The one alias for a decoded JSON object (an OpenAI request or answer, a chunk, a config part), and the
one way the project imports jsonschema and validates against a client's schema."""

import importlib
import re
import sys
import time
from contextvars import ContextVar
from types import ModuleType
from typing import Any

import regex

JSON = dict[str, Any]
# A client's schema (a request's ``response_format``, an eval set's check) carries its own ``pattern``s, and
# the answer they run over is the model's, which a client can steer: one validation may spend this long on
# pattern matching in all, then it stops (``SchemaUnchecked``). jsonschema matches with ``re``, which cannot
# be interrupted (``^(a+)+$`` over 30 a's and a "!" takes most of a minute, holding the GIL); inside
# jsonschema's keyword modules ``re`` is replaced by ``regex`` with a timeout (``_BoundedRe``).
SCHEMA_PATTERN_S = 0.05
_deadline: ContextVar[float | None] = ContextVar("schema_deadline", default=None)


class SchemaUnchecked(Exception):
    """A value could not be checked against a client's schema: its patterns took longer than
    ``SCHEMA_PATTERN_S``, or one of them does not compile."""


class _BoundedRe:
    """What jsonschema's keywords call ``re``: ``search`` with the validation's remaining time."""

    def search(self, pattern: str, string: str, flags: int = 0) -> Any:
        deadline = _deadline.get()
        left = SCHEMA_PATTERN_S if deadline is None else deadline - time.monotonic()
        try:
            if left <= 0:
                raise TimeoutError
            return regex.search(pattern, string, flags, timeout=left)
        except TimeoutError:
            raise SchemaUnchecked(f"the schema's patterns took over {SCHEMA_PATTERN_S:g}s on this value") from None
        except regex.error as exc:
            raise SchemaUnchecked(f"the schema's pattern {pattern[:100]!r} does not compile ({exc})") from None

    def __getattr__(self, name: str) -> Any:
        return getattr(re, name)


def jsonschema() -> ModuleType:
    """jsonschema, imported without its optional ``rfc3987_syntax`` checker (the ``iri`` formats, which no
    check here uses): building that grammar costs about 0.8 s of import on every process start."""
    if "jsonschema" not in sys.modules:
        blocked = "rfc3987_syntax" not in sys.modules
        if blocked:
            sys.modules["rfc3987_syntax"] = None  # type: ignore[assignment]  # import fails: jsonschema skips it
        try:
            importlib.import_module("jsonschema")
        finally:
            if blocked:
                del sys.modules["rfc3987_syntax"]
    for name in ("jsonschema._keywords", "jsonschema._utils"):  # where its keywords call re.search (also when
        module = sys.modules.get(name)  # another library imported jsonschema first)
        if module is not None and getattr(module, "re", None) is re:
            module.re = _BoundedRe()  # type: ignore[attr-defined]
    return sys.modules["jsonschema"]


def schema_errors(schema: JSON, value: Any) -> list[Any]:
    """Every error of ``value`` against a client's ``schema`` (Draft 2020-12), its patterns matched within
    ``SCHEMA_PATTERN_S`` in all; raises ``SchemaUnchecked`` past that, for a pattern that does not compile, or
    for a schema jsonschema cannot apply (the schema is the client's: nothing about it may turn into a 500)."""
    token = _deadline.set(time.monotonic() + SCHEMA_PATTERN_S)
    try:
        return list(jsonschema().Draft202012Validator(schema).iter_errors(value))
    except SchemaUnchecked:
        raise
    except Exception as exc:  # a schema jsonschema cannot apply: a type it does not know, a reference to
        # nowhere or to itself, a keyword of the wrong shape
        raise SchemaUnchecked(f"the schema cannot be applied ({type(exc).__name__})") from None
    finally:
        _deadline.reset(token)


def best_schema_error(schema: JSON, value: Any) -> Any | None:
    """The error jsonschema's ``best_match`` picks among ``schema_errors`` (None: ``value`` matches); raises
    ``SchemaUnchecked`` as ``schema_errors`` does."""
    return jsonschema().exceptions.best_match(schema_errors(schema, value))
