"""Tollway: an OpenAI-compatible LLM gateway with cost control.

The root package is the composition root (settings, app factory, CLI) plus the leaf modules every
part may import (`tollway.errors`). It imports nothing at package import time.
"""

__version__ = "0.1.0"
