"""Helpers the tests share, written once: import them as ``from support import ...`` (pytest puts tests/ on
the path; see ``pythonpath`` in pyproject.toml)."""

from support.sse import event_payloads, sse_frames, sse_payloads

__all__ = ["event_payloads", "sse_frames", "sse_payloads"]
