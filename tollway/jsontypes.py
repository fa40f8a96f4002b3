"""The one alias for a decoded JSON object (an OpenAI request or answer, a chunk, a config part), and the
one way the project imports jsonschema."""

import importlib
import sys
from types import ModuleType
from typing import Any

JSON = dict[str, Any]


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
    return sys.modules["jsonschema"]
