"""The one alias for a decoded JSON object (an OpenAI request or answer, a chunk, a config part)."""

from typing import Any

JSON = dict[str, Any]
