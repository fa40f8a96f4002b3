"""The ``tollway`` command line: ``main`` parses and dispatches; one module per command group (budgets,
prompts, guards, quality, reports, retrieval, evals), ``common`` for what they share, ``doctor`` for
``tollway doctor``. Run as ``tollway ...`` or ``python -m tollway.cli ...``."""

from tollway.cli.main import main

__all__ = ["main"]
