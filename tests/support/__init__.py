"""Helpers the tests share, written once: import them as ``from support import ...`` (pytest puts tests/ on
the path; see ``pythonpath`` in pyproject.toml)."""

from support.sse import sse_frames, sse_payloads

__all__ = ["sse_frames", "sse_payloads"]
